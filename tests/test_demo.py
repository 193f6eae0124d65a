"""``incseg-fast demo --quick``: the files it writes, the structure of results.json, and the demo's point.

The quick demo takes about a minute of one core: it is the test of the whole pipeline (data,
models, every loss, the CAF module) training long enough to learn something.
"""

import json
import re

import pytest
import torch

from incseg_fast.cli import main


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    before = torch.get_num_threads()  # the demo sets one thread
    yield
    torch.set_num_threads(before)


def test_quick_demo_makes_the_point(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0  # CAF trains without diverging
    printed = capsys.readouterr().out
    assert "| method | step | old (0-15) | new (16-20) | all |" in printed
    assert "joint (the offline upper bound) runs in the full demo only" in printed
    assert str(out.resolve()) in printed

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"ft", "mib", "caf", "plop", "ssul", "dkd"}
    for entries in results.values():
        assert [e["step"] for e in entries] == [0, 1]
        for e in entries:
            assert set(e) == {"step", "miou_old", "miou_new", "miou_all"}
            assert 0.0 <= e["miou_old"] <= 100.0 and 0.0 <= e["miou_all"] <= 100.0
            if e["step"] == 0:
                assert e["miou_new"] is None
            else:
                assert 0.0 <= e["miou_new"] <= 100.0
    assert results["mib"][0] == results["ft"][0]  # one shared step 0
    for name in ("results.csv", "results.md", "miou.png"):
        assert (out / name).stat().st_size > 0

    # The point, after the last step. Predicting background everywhere scores 5.7 old / 0.0 new,
    # which is what every method scored when the quick demo was too short to learn anything.
    ft, mib = results["ft"][-1], results["mib"][-1]
    assert results["ft"][0]["miou_old"] >= 15, "step 0 learnt little more than the background"
    assert mib["miou_old"] >= ft["miou_old"] + 10, "mib does not keep the old classes that ft forgets"
    assert ft["miou_new"] >= 5 and mib["miou_new"] >= 5, "the new classes were not learnt"

    # an unchanged demo resumes: nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/step*.pt")}
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/step*.pt")} == stamps
    assert json.loads((out / "results.json").read_text()) == results


def test_demo_task_15_1_runs_six_steps_and_draws_them(tmp_path, capsys, monkeypatch):
    from incseg_fast.train import demo

    # the quick demo's shape at a few seconds' scale: enough images that every one-class step finds some
    tiny = dict(demo.QUICK, image_size=32, train_images=160, val_images=8, epochs=1, epochs_incremental=1, batch_size=8)
    monkeypatch.setattr(demo, "QUICK", tiny)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--task", "15-1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "synthetic 15-1 disjoint" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"ft", "mib", "caf", "plop", "ssul", "dkd"}  # the default methods, on every task
    for entries in results.values():
        assert [e["step"] for e in entries] == [0, 1, 2, 3, 4, 5]
    assert "| old (0-15) | new (16-20) |" in (out / "results.md").read_text()
    assert (out / "miou.png").stat().st_size > 0
    for step in range(6):
        assert (out / f"predictions_step{step}.png").stat().st_size > 0
    image = pytest.importorskip("matplotlib.image")
    from incseg_fast.train.pictures import DPI, PANEL_INCHES

    widths = [image.imread(out / f"predictions_step{step}.png").shape[1] for step in (0, 1)]
    # image, ground truth, then a column per method; at step 0 one column for ft's, which the softmax
    # methods share, and one each for ssul's and dkd's own
    assert widths == [round(DPI * PANEL_INCHES * 5), round(DPI * PANEL_INCHES * (2 + len(demo.DEFAULT_METHODS)))]
    assert f"{(out / 'predictions_step5.png').resolve()}" in printed


@pytest.fixture
def tiny_quick(monkeypatch):
    """The quick demo at a few seconds' scale (the pipeline, not the point)."""
    from incseg_fast.train import demo

    tiny = dict(demo.QUICK, image_size=32, train_images=160, val_images=8, epochs=1, epochs_incremental=1, batch_size=8)
    monkeypatch.setattr(demo, "QUICK", tiny)


def test_each_variant_has_its_own_default_folder(tmp_path, monkeypatch, capsys, tiny_quick):
    from incseg_fast.train.demo import default_out

    variants = {default_out(q, t, s) for q in (False, True) for t in ("15-5", "15-1") for s in (False, True)}
    assert len(variants) == 8 and {"runs/demo", "runs/demo-quick", "runs/demo-15-1"} <= variants
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--methods", "mib", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("device cpu; losses incremental_loss on backend ")
    assert (tmp_path / "runs" / "demo-quick" / "results.json").exists()
    assert not (tmp_path / "runs" / "demo").exists()


def test_replacing_results_of_other_settings_needs_overwrite(tmp_path, capsys, tiny_quick):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--methods", "mib", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    results = (out / "results.json").read_text()
    capsys.readouterr()

    assert main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"incseg-fast: error: {out} holds results of other settings (seed): pass --overwrite to " + (
        "replace them, or --out another folder\n"
    )
    assert (out / "results.json").read_text() == results
    assert json.loads((out / "demo_settings.json").read_text())["seed"] == 0

    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert json.loads((out / "demo_settings.json").read_text())["seed"] == 1

    (tmp_path / "mine" / "ft").mkdir(parents=True)  # results that are not a demo's are kept too
    (tmp_path / "mine" / "results.json").write_text("{}")
    assert main(["demo", "--quick", "--out", str(tmp_path / "mine"), "--no-progress"]) == 2
    assert "holds results of other settings (not a demo's)" in capsys.readouterr().err


def test_seeds_markdown_is_the_mean_and_spread_of_each_seed_s_results(tmp_path, capsys, tiny_quick):
    import statistics

    from incseg_fast.train.demo import settings_stamp

    out = tmp_path / "seeds"
    argv = ["demo", "--quick", "--methods", "mib", "--seeds", "0,1", "--markdown", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    stamp = settings_stamp([0, 1], quick=True, methods=["mib"])
    assert f"<!-- demo table: incseg-fast demo --quick --seeds 0,1 --markdown; settings {stamp}; commit " in printed
    assert "mean ± standard deviation over seeds 0, 1; " in printed and "1 thread:" in printed
    assert "| method | old (0-15) | new (16-20) | all |" in printed
    finals = [json.loads((out / f"seed{seed}" / "results.json").read_text()) for seed in (0, 1)]
    for method in ("ft", "mib"):
        cells = []
        for key in ("miou_old", "miou_new", "miou_all"):
            values = [results[method][-1][key] for results in finals]
            cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
        assert f"| {method} | {' | '.join(cells)} |" in printed
    # the stamp follows every setting the results depend on
    assert stamp != settings_stamp([0, 1], quick=True, methods=["mib", "caf"]) != settings_stamp([0, 1])

    assert main([*argv, "--seed", "3"]) == 2
    assert "--seed and --seeds both given" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--seeds", "0,x"])
    assert "argument --seeds: must be comma-separated integers" in capsys.readouterr().err


def test_the_readme_s_demo_table_is_what_the_current_demo_printed():
    from pathlib import Path

    from incseg_fast.train.demo import settings_stamp

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    found = re.search(r"<!-- demo table: incseg-fast demo --seeds 0,1,2 --markdown; settings (\w+); commit", readme)
    assert found, "README.md has no table from `incseg-fast demo --seeds 0,1,2 --markdown`"
    assert found.group(1) == settings_stamp([0, 1, 2]), (
        "the demo's settings changed since README.md's table: rerun `incseg-fast demo --seeds 0,1,2 --markdown` "
        "and paste its output"
    )
