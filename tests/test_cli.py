"""The incseg-fast command line: help, train / eval round trip, bench forwarding."""
import json
import subprocess
import sys
import types

import pytest

from incseg_fast.cli import build_parser, main


pytestmark = pytest.mark.usefixtures("one_thread")


def _subparsers(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


@pytest.mark.parametrize("command", ["train", "eval", "demo"])
def test_help_documents_every_option(command, capsys):
    sub = _subparsers(build_parser())[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in sub._actions:
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"
        for option in action.option_strings:
            assert option in text, option


def test_top_level_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "incseg_fast", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("train", "eval", "demo", "bench"):
        assert command in done.stdout


TINY = ["--image-size", "32", "--train-images", "48", "--val-images", "16", "--epochs", "1", "--batch-size", "8",
        "--device", "cpu", "--no-progress"]


def test_train_then_eval(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["train", "--method", "ft", "--step", "0", "--out", out, *TINY]) == 0
    assert (tmp_path / "ft" / "step0.pt").exists() and not (tmp_path / "ft" / "step1.pt").exists()
    assert main(["train", "--method", "ft", "--step", "1", "--out", out, *TINY]) == 0
    printed = capsys.readouterr().out
    assert "| ft | 1 |" in printed and "results.json" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert [e["step"] for e in results["ft"]] == [0, 1]

    assert main(["eval", str(tmp_path / "ft" / "step1.pt"), "--device", "cpu", "--amp", "none"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["miou_all"] == pytest.approx(results["ft"][1]["miou_all"])
    assert len(metrics["iou"]) == 21


def test_bad_arguments_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="--step"):
        main(["train", "--step", "last", "--out", str(tmp_path), *TINY])
    with pytest.raises(SystemExit):
        main(["train", "--method", "nope"])


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("incseg_fast.bench.report")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "incseg_fast.bench.report", fake)
    assert main(["bench", "--quick", "--out", "x"]) == 3
    assert seen == [["--quick", "--out", "x"]]
