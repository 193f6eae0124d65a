"""The incseg-fast command line: help, train / eval round trip, bench forwarding, one-line errors."""

import json
import pickle
import re
import subprocess
import sys
import types

import pytest
import torch
from test_checkpoints import WritesAMarker

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
    done = subprocess.run([sys.executable, "-m", "incseg_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("train", "eval", "demo", "bench"):
        assert command in done.stdout


TINY = [
    "--image-size",
    "32",
    "--train-images",
    "48",
    "--val-images",
    "16",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--device",
    "cpu",
    "--no-progress",
]


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


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    for argv in (["train", "--step", "last", "--out", str(tmp_path), *TINY], ["train", "--method", "nope"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("incseg-fast: error: argument --") and err.count("\n") == 1, err


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("incseg_fast.bench.report")
    fake.main = lambda argv, prog: seen.append((argv, prog)) or 3
    monkeypatch.setitem(sys.modules, "incseg_fast.bench.report", fake)
    assert main(["bench", "--quick", "--out", "x"]) == 3
    assert seen == [(["--quick", "--out", "x"], "incseg-fast bench")]


# ---------------------------------------------------------------- the error contract (docs/RELIABILITY.md#cli)


def _one_error_line(capsys, argv, *words):
    """Run ``argv``; it must exit with 2 and print one line ``incseg-fast: error: ...`` holding ``words``."""
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("incseg-fast: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err


def test_version_names_the_package_torch_and_the_kernels(capsys):
    from incseg_fast import __version__, ops
    from incseg_fast._environment import kernels_built

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    expected = f"incseg-fast {__version__} (torch {torch.__version__}; kernels: {kernels_built()})\n"
    assert capsys.readouterr().out == expected
    assert ("no CUDA kernels" in expected) == (ops.HAS_EXTENSION and not ops.HAS_CUDA_KERNELS)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--method", "mib", "--lambda-fd", "5"], ["--lambda-fd does not apply to --method mib"]),
        (["--method", "mib", "--lambda-ad", "5"], ["--lambda-ad does not apply to --method mib"]),
        (["--method", "caf", "--freeze-encoder"], ["--freeze-encoder does not apply to --method caf"]),
        (["--method", "ft", "--alpha", "2"], ["--alpha does not apply to --method ft"]),
        (["--method", "joint", "--lr-incremental", "0.1"], ["--lr-incremental does not apply to --method joint"]),
        (["--root", "data/VOC"], ["--root does not apply to --dataset synthetic"]),
        (["--dataset", "voc", "--root", "data/VOC", "--train-images", "10"], ["--train-images does not apply"]),
        (["--backbone", "tiny", "--pretrained", "r.pth"], ["--pretrained does not apply to --backbone tiny"]),
        (["--method", "mib", "--no-fusion"], ["--no-fusion does not apply to --method mib"]),
        (["--method", "joint", "--step", "0"], ["joint trains every class in one step, reported as step 1"]),
        (["--task", "100-50"], ["task '100-50' is not defined for 'voc'"]),
        (["--threads", "0"], ["argument --threads: must be an integer >= 1"]),
    ],
)
def test_options_that_do_not_apply_are_rejected(tmp_path, capsys, argv, words):
    _one_error_line(capsys, ["train", "--out", str(tmp_path), *TINY, *argv], *words)
    assert not any(tmp_path.iterdir()), "nothing is recorded"


def test_help_states_the_defaults_that_are_used(capsys):
    from incseg_fast.train import DATASET_DEFAULTS, TrainConfig
    from incseg_fast.train.trainer import StepPlan

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for dataset in DATASET_DEFAULTS:
        cfg = TrainConfig(dataset=dataset, method="mib", root=None if dataset == "synthetic" else "r").resolved()
        StepPlan(cfg, 0)  # the default task is one of the dataset's
        for key in ("task", "lr", "lr_incremental", "epochs", "batch_size", "image_size", "backbone"):
            value = getattr(cfg, key)
            assert re.search(rf"{dataset}(/\w+)* {re.escape(str(value))}[,;)]", text), (dataset, key, value)


def test_expected_errors_are_one_line(tmp_path, capsys):
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps(WritesAMarker(marker)))
    (tmp_path / "notes.pt").write_text("a text file\n")
    _one_error_line(capsys, ["eval", str(tmp_path / "missing.pt")], "missing.pt does not exist")
    _one_error_line(capsys, ["eval", str(tmp_path / "notes.pt")], "notes.pt is not an incseg_fast checkpoint")
    _one_error_line(capsys, ["eval", str(crafted)], "crafted.pt")
    assert not marker.exists()

    out = str(tmp_path / "run")
    assert main(["train", "--method", "ft", "--step", "0", "--out", out, *TINY]) == 0
    capsys.readouterr()
    _one_error_line(
        capsys,
        ["train", "--method", "ft", "--out", out, *TINY, "--lr", "0.2"],
        "holds results of --lr 0.1, not --lr 0.2",
        "--overwrite",
    )
    if not torch.cuda.is_available():
        _one_error_line(capsys, ["train", "--out", out, *TINY, "--device", "cuda"], "no CUDA device")
        _one_error_line(
            capsys,
            ["train", "--method", "ft", "--out", out, *TINY, "--loss-backend", "cuda"],
            "backend='cuda' is not available",
        )


def test_an_interruption_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("incseg_fast.train.run", interrupted)
    assert main(["train", "--out", str(tmp_path), *TINY]) == 130
    assert capsys.readouterr().err == "incseg-fast: interrupted (rerun the same command to resume)\n"


def test_debug_shows_the_traceback(tmp_path):
    for argv in (["train", "--debug"], ["--debug", "train"]):
        with pytest.raises(ValueError, match="--lambda-fd does not apply"):
            main([*argv, "--method", "mib", "--lambda-fd", "5", "--out", str(tmp_path), *TINY])


def _voc_run(tmp_path, *extra):
    from test_train import _fake_voc

    _fake_voc(tmp_path / "voc")
    return [
        "train",
        "--dataset",
        "voc",
        "--root",
        str(tmp_path / "voc"),
        "--mode",
        "overlapped",
        "--method",
        "ft",
        "--backbone",
        "tiny",
        "--output-stride",
        "4",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
        *extra,
    ]


def test_a_bad_training_image_is_named_before_the_step_trains(tmp_path, capsys):
    argv = _voc_run(tmp_path)
    assert main([*argv, "--step", "0"]) == 0
    image = tmp_path / "voc/VOCdevkit/VOC2012/JPEGImages/2007_000001.jpg"  # one of step 1's images
    image.write_bytes(image.read_bytes()[:300])
    capsys.readouterr()
    _one_error_line(capsys, [*argv, "--step", "1"], f"image {image} cannot be read")
    assert not (tmp_path / "run/ft/step1.partial.pt").exists()  # found before the first epoch


def test_a_data_error_in_a_loader_worker_is_one_line(tmp_path, capsys, monkeypatch):
    from incseg_fast.data._files import FileSegmentation

    argv = _voc_run(tmp_path, "--workers", "1", "--step", "0")
    image = tmp_path / "voc/VOCdevkit/VOC2012/JPEGImages/2007_000001.jpg"
    image.write_bytes(image.read_bytes()[:300])
    monkeypatch.setattr(FileSegmentation, "check_files", lambda self, indices: None)  # as if it had passed
    _one_error_line(capsys, argv, f"image {image} cannot be read")


def test_train_options_are_the_config_fields():
    """One place per option: the command line's defaults are TrainConfig's, and every field is an option."""
    import dataclasses

    from incseg_fast.cli import _config
    from incseg_fast.train import TrainConfig

    assert _config(build_parser().parse_args(["train"])) == TrainConfig()
    flipped = _config(build_parser().parse_args(["train", "--no-progress", "--no-sync-bn", "--freeze-encoder"]))
    assert (flipped.progress, flipped.sync_bn, flipped.freeze_encoder) == (False, False, True)
    text = " ".join(build_parser().format_help().split()) + " ".join(
        _subparsers(build_parser())["train"].format_help().split()
    )
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata["cli"].get("flag", "--" + field.name.replace("_", "-")) in text, field.name


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--method", "mib", "--lambda-kd", "nan"], ["argument --lambda-kd: must be a finite number >= 0, got 'nan'"]),
        (["--method", "mib", "--lambda-kd", "-1"], ["argument --lambda-kd: must be a finite number >= 0, got '-1'"]),
        (["--lr-incremental", "nan"], ["argument --lr-incremental: must be a finite number >= 0"]),
        (["--lr", "inf"], ["argument --lr: must be a finite number >= 0"]),
        (["--lr", "-0.1"], ["argument --lr: must be a finite number >= 0"]),
        (["--momentum", "2"], ["argument --momentum: must be a finite number in [0, 1), got '2'"]),
        (["--weight-decay=-1e-4"], ["argument --weight-decay: must be a finite number >= 0"]),
        (["--method", "mib", "--alpha", "0"], ["argument --alpha: must be a finite number > 0"]),
        (["--method", "ilt", "--lambda-fd", "nan"], ["argument --lambda-fd: must be a finite number >= 0"]),
        (["--method", "caf", "--lambda-ad=-inf"], ["argument --lambda-ad: must be a finite number >= 0"]),
        (["--workers", "-1"], ["argument --workers: must be an integer >= 0, got '-1'"]),
        (["--epochs", "0"], ["argument --epochs: must be an integer >= 1, got '0'"]),
        (["--batch-size", "2.5"], ["argument --batch-size: must be an integer >= 1, got '2.5'"]),
        (["--image-size", "-3"], ["argument --image-size: must be an integer >= 1"]),
        (["--seed", "-1"], ["argument --seed: must be an integer >= 0"]),
        (["--dist-timeout-s", "0"], ["argument --dist-timeout-s: must be a finite number > 0"]),
        (["--dist-timeout-s", "nan"], ["argument --dist-timeout-s: must be a finite number > 0"]),
        (["--out", ""], ["--out must name a folder"]),
        (["--device", "xyz"], ["--device xyz is not a device"]),
        (["--device", "meta"], ["--device meta is not a device"]),
        (["--device", "cpu:1"], ["--device cpu:1 is not a device"]),
    ],
)
def test_bad_option_values_are_one_line(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)  # --out "" would write here
    _one_error_line(capsys, ["train", "--out", str(tmp_path / "run"), *TINY, *argv], *words)
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_the_config_refuses_what_the_command_line_refuses():
    from incseg_fast.train import TrainConfig

    for field, value, words in (
        ("momentum", float("nan"), "--momentum must be a finite number in [0, 1), got nan"),
        ("workers", -1, "--workers must be an integer >= 0, got -1"),
        ("lr", -1.0, "--lr must be a finite number >= 0, got -1.0"),
        ("out", "", "--out must name a folder"),
    ):
        with pytest.raises(ValueError, match=re.escape(words)):
            TrainConfig(**{field: value}).resolved()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--batch-size", "-1"], ["argument --batch-size: must be an integer >= 1"]),
        (["--workers", "-1"], ["argument --workers: must be an integer >= 0"]),
        (["--device", "meta"], ["--device meta is not a device"]),
    ],
)
def test_eval_option_values_are_checked(tmp_path, capsys, argv, words):
    out = str(tmp_path)
    assert main(["train", "--method", "ft", "--step", "0", "--out", out, *TINY]) == 0
    capsys.readouterr()
    _one_error_line(capsys, ["eval", str(tmp_path / "ft" / "step0.pt"), *argv], *words)


def test_an_allocation_failure_is_one_line(tmp_path, capsys):
    # 200000 x 200000 pixels: the CPU allocator refuses the image (no torch.OutOfMemoryError on CPU)
    _one_error_line(
        capsys,
        ["train", "--method", "ft", "--out", str(tmp_path), *TINY, "--image-size", "200000", "--train-images", "2"],
        "no memory left",
    )


def test_an_empty_validation_list_is_refused_before_training(tmp_path, capsys):
    argv = _voc_run(tmp_path, "--step", "0")
    val_list = tmp_path / "voc/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    val_list.write_text("\n")
    _one_error_line(capsys, argv, f"image list {val_list} is empty")
    assert not list((tmp_path / "run").rglob("*.pt")), "nothing is trained"


def test_bench_usage_errors_are_one_line(capsys):
    _one_error_line(capsys, ["bench", "--frobnicate"], "unrecognized arguments: --frobnicate")
