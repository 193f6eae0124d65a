"""``incseg-fast ablate``: CAF's Table III rows, each a caf run with its switches, one table; PLOP's rows."""

import json

import pytest
import torch

from incseg_fast.cli import main
from incseg_fast.train import load_checkpoint
from incseg_fast.train.ablate import ABLATIONS
from incseg_fast.train.methods import CAF_LAMBDA_AD

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS = ABLATIONS["caf"].rows

TINY = [
    "--image-size",
    "32",
    "--train-images",
    "48",
    "--val-images",
    "8",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--device",
    "cpu",
    "--no-progress",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "run"
    # a train option that only some rows use: the others keep its neutral value instead of stopping
    assert main(["ablate", "--out", str(out), *TINY, "--lambda-kd", "5"]) == 0
    return out


def test_every_row_is_trained_and_tabulated(ablation, capsys):
    results = json.loads((ablation / "results.json").read_text())
    assert list(results) == [row.name for row in ROWS]
    assert len(ROWS) == 9  # the 8 combinations of the three switches and the paper's +KD row
    assert len({tuple(r.switches.values()) for r in ROWS}) == 9
    for values in results.values():
        for key in ("miou_old", "miou_new", "miou_all"):
            assert 0.0 <= values[key] <= 100.0
    table = (ablation / "results.md").read_text().splitlines()
    assert table[0] == "| row | CAF module | AD | logit distillation | old (0-15) | new (16-20) | all |"
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {row.name}" for row in ROWS]


def test_the_switches_change_the_configuration_and_the_network(ablation):
    step0 = load_checkpoint(ablation / "step0" / "ft" / "step0.pt")["state_dict"]
    for row in ROWS:
        ckpt = load_checkpoint(ablation / row.folder / "caf" / "step1.pt")
        cfg, model = ckpt["config"], ckpt["model"]
        assert cfg["method"] == "caf"
        fusion, ad, kd = (row.switches[k] for k in ("fusion", "ad", "kd"))
        assert cfg["kd"] == kd
        assert cfg["caf_module"] is fusion and model["caf"] is fusion
        assert (cfg["lambda_ad"] > 0) is ad and model["se_blocks"] is ad
        assert (cfg["lambda_ad"] == CAF_LAMBDA_AD["synthetic"]) is ad  # the default lambda_AD when on
        assert cfg["lambda_kd"] == (5.0 if kd != "none" else 10.0)
        # every row started from the one shared step 0
        first = load_checkpoint(ablation / row.folder / "caf" / "step0.pt")["state_dict"]
        assert all(torch.equal(first[k], step0[k]) for k in step0)


def test_rerun_resumes_without_training(ablation):
    stamps = {p: p.stat().st_mtime_ns for p in ablation.glob("*/*/step*.pt")}
    assert len(stamps) == 1 + 2 * len(ROWS)
    assert main(["ablate", "--out", str(ablation), *TINY, "--lambda-kd", "5"]) == 0
    assert {p: p.stat().st_mtime_ns for p in ablation.glob("*/*/step*.pt")} == stamps


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "mib"], "--method mib has no ablation: ablate runs caf or plop"),
        (["--method", "plop", "--no-pseudo-labels"], "--no-pseudo-labels does not apply to ablate"),
        (["--kd", "none"], "--kd does not apply to ablate"),
        (["--no-fusion"], "--no-fusion does not apply to ablate"),
        (["--step", "1"], "--step does not apply to ablate"),
        (["--lambda-fd", "1"], "--lambda-fd does not apply to --method caf"),
    ],
)
def test_options_that_do_not_apply_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["ablate", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("incseg-fast: error: ") and message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # stopped before training anything


def test_train_rejects_caf_switches_for_other_methods(tmp_path, capsys):
    assert main(["train", "--method", "mib", "--kd", "none", "--out", str(tmp_path)]) == 2
    assert "--kd does not apply to --method mib" in capsys.readouterr().err


def test_plop_rows_switch_local_pod_and_the_pseudo_labels(tmp_path):
    out = tmp_path / "plop"
    assert main(["ablate", "--method", "plop", "--out", str(out), *TINY]) == 0
    rows = ABLATIONS["plop"].rows
    results = json.loads((out / "results.json").read_text())
    assert list(results) == [row.name for row in rows]
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| row | Local POD | pseudo-labels | old (0-15) | new (16-20) | all |"
    for row in rows:
        cfg = load_checkpoint(out / row.folder / "plop" / "step1.pt")["config"]
        assert cfg["pseudo_labels"] is row.switches["pseudo"]
        assert (cfg["lambda_pod"] > 0 and cfg["lambda_pod_logits"] > 0) is row.switches["pod"]
