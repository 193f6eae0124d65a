"""``incseg-fast demo --quick``: the files it writes and the structure of results.json."""
import json

import pytest
import torch

from incseg_fast.cli import main


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    before = torch.get_num_threads()  # the demo sets one thread
    yield
    torch.set_num_threads(before)


def test_quick_demo_writes_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| method | step | old (0-15) | new (16-20) | all |" in printed
    assert str(out.resolve()) in printed

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"ft", "mib", "caf", "joint"}
    for method, entries in results.items():
        assert [e["step"] for e in entries] == ([1] if method == "joint" else [0, 1])
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

    # an unchanged demo resumes: nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/step*.pt")}
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/step*.pt")} == stamps
    assert json.loads((out / "results.json").read_text()) == results
