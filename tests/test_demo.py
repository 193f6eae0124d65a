"""``incseg-fast demo --quick``: the files it writes, the structure of results.json, and the demo's point.

The quick demo takes about a minute of one core: it is the test of the whole pipeline (data,
models, every loss, the CAF module) training long enough to learn something.
"""

import json

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
    assert set(results) == {"ft", "mib", "caf"}
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
    assert main(["demo", "--quick", "--task", "15-1", "--methods", "mib", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "synthetic 15-1 disjoint" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"ft", "mib"}
    for entries in results.values():
        assert [e["step"] for e in entries] == [0, 1, 2, 3, 4, 5]
    assert "| old (0-15) | new (16-20) |" in (out / "results.md").read_text()
    assert (out / "miou.png").stat().st_size > 0
    for step in range(6):
        assert (out / f"predictions_step{step}.png").stat().st_size > 0
    assert f"{(out / 'predictions_step5.png').resolve()}" in printed
