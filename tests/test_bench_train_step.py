"""The whole-training-step benchmark (incseg_fast.bench.train_step): every provider runs and agrees
with MiB's code at the first step, a wrong provider is caught, the figures and the report's CLI.

A tiny backbone at 48 x 48 stands in for ResNet-101 at 256 x 256: the step is the same code."""

import json

import pytest
import torch

from incseg_fast.bench import report
from incseg_fast.bench import train_step as ts

TINY = ts.Shape(2, 48, "tiny")


def _case(setting="voc15-5", dtype="fp32"):
    return ts.StepCase(ts.SETTINGS[setting], TINY, dtype, "cpu")


def test_every_provider_runs_and_agrees_with_mib_at_the_first_step():
    # ADE's 151 classes (VOC's 21 run in the report's test)
    record = ts.measure_case(_case("ade100-50"), reps=1, warmup=1, isolate=False)
    results = record["providers"]
    assert list(results) == list(ts.PROVIDERS)
    for name, result in results.items():
        assert 0 < result["loss_stage_median_s"] < result["step_median_s"], name
        assert 0 < result["loss_extra_bytes"] < result["peak_bytes"], name
        assert max(result["agreement"].values()) <= 1e-5, name
        computed = [record["fits"][name]["computed"][str(gb)] for gb in ts.FIT_BUDGETS_GB]
        assert 0 < computed[0] <= computed[1] <= computed[2], name
    # What the fused upsampling exists for: no full-resolution logits in the loss stage.
    assert results["fused+size"]["loss_extra_bytes"] < results["mib"]["loss_extra_bytes"] / 4


def _scaled_value(x, t, y, size):
    ce, kd = ts.loss_stages()["mib"](x, t, y, size)
    return ce * 1.001, kd


def _scaled_gradient(x, t, y, size):
    # the same value, a gradient 1 % larger
    return ts.loss_stages()["mib"](x + 0.01 * (x - x.detach()), t, y, size)


@pytest.mark.parametrize("wrong", [_scaled_value, _scaled_gradient], ids=["loss", "gradient"])
def test_the_agreement_check_fails_loudly_for_a_wrong_provider(wrong):
    stages = {**ts.loss_stages(), "wrong": wrong}
    with pytest.raises(ts.AgreementError, match=r"wrong: loss .* gradient norm"):
        ts.measure_case(_case(), ["fused+size", "wrong"], reps=1, warmup=1, isolate=False, stages=stages)


def test_a_fresh_process_starts_from_the_same_weights_and_batch():
    case = _case()
    alone = ts._run_provider_in_subprocess(case, "fused+size", reps=1, warmup=1)
    here = ts.run_provider(case, "fused+size", reps=1, warmup=1)
    assert alone["first_step"] == here["first_step"]
    assert alone["peak_bytes"] > 0


def test_agreement_tolerance_follows_the_dtype():
    def results(loss):
        return {
            "mib": {"first_step": {"loss": 1.0, "grad_norm": 2.0}},
            "fused": {"first_step": {"loss": loss, "grad_norm": 2.0}},
        }

    ts.check_agreement(_case(dtype="bf16"), results(1.005))
    with pytest.raises(ts.AgreementError, match="fused"):
        ts.check_agreement(_case(), results(1.005))
    with pytest.raises(ts.AgreementError, match="fused"):
        ts.check_agreement(_case(), results(float("nan")))


def test_computed_largest_batch_scales_per_image_memory_to_512():
    gib = 2**30
    # 1 GiB per image at 48 x 48 above 0.5 GiB of gradients; 3 GiB of weights and momentum
    result = {"peak_bytes": 2 * gib + gib // 2, "grad_bytes": gib // 2, "state_bytes": 3 * gib}
    per_image = gib * (512 / 48) ** 2
    found = ts.computed_largest_batches(_case(), result)
    for gb in ts.FIT_BUDGETS_GB:
        assert found[str(gb)] == int((gb * ts.GB - 3.5 * gib) // per_image)
        assert (found[str(gb)] + 1) * per_image + 3.5 * gib > gb * ts.GB


@pytest.mark.parametrize("limit", [0, 1, 23, 24, 37, 200])
def test_largest_fitting_finds_the_limit_from_any_start(limit):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= limit

    assert ts.largest_fitting(fits, 24) == limit
    assert len(tried) <= 2 * limit.bit_length() + 8


def _record(setting, mib_s, compiled_s, ours_s, mib_peak, ours_peak):
    def result(step_s, peak):
        return {
            "step_median_s": step_s,
            "loss_stage_median_s": step_s / 4,
            "peak_bytes": peak,
            "loss_extra_bytes": peak // 2,
            "live_at_loss_bytes": peak // 3,
        }

    providers = {"mib": result(mib_s, mib_peak), "compiled": result(compiled_s, mib_peak)}
    providers["fused"] = providers["fused+size"] = result(ours_s, ours_peak)
    return {"setting": setting, "dtype": "fp32", "providers": providers}


def test_targets_judge_the_headline_and_say_where_time_and_memory_go():
    mib = 2**20
    met = ts.evaluate_targets([_record("ade100-50", 2.0, 1.5, 1.0, 1000 * mib, 500 * mib)])
    assert [v for _, v, _ in met] == ["met"] * 3
    missed = ts.evaluate_targets([_record("ade100-50", 2.0, 1.7, 1.8, 1000 * mib, 700 * mib)])
    assert [v for _, v, _ in missed] == ["NOT met"] * 3
    for _, _, detail in missed:
        assert "loss stage" in detail and "network" in detail
    voc = ts.evaluate_targets([_record("voc15-5", 1.0, 1.0, 1.01, 100 * mib, 101 * mib)])
    assert len(voc) == 4 and {v for _, v, _ in voc} == {"NOT met"}


def test_report_runs_train_step_by_name_only(tmp_path, capsys):
    out = tmp_path / "r.json"
    markdown = tmp_path / "r.md"
    argv = ["--ops", "train_step", "--sizes", "voc15-5", "--quick", "--providers", "fused+size"]
    assert report.main([*argv, "--json", str(out), "--markdown", str(markdown)]) == 0
    data = json.loads(out.read_text())
    assert data["cases"] == []
    (record,) = data["train_step_cases"]
    assert record["setting"] == "voc15-5" and list(record["providers"]) == ["mib", "fused+size"]
    assert any(t["target"].startswith("train_step voc15-5") for t in data["targets"])
    assert "| voc15-5 fp32 | fused+size |" in markdown.read_text()
    assert "train_step voc15-5 (21 classes, 16 old)" in capsys.readouterr().out
    selected = report.select(report.parse_args(["--sizes", "voc15-5,voc"]))
    assert not any(isinstance(case, ts.StepCase) for case in selected)


def test_report_rejects_an_unknown_setting():
    with pytest.raises(SystemExit) as stop:
        report.parse_args(["--ops", "train_step", "--sizes", "voc15-6"])
    assert stop.value.code == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_train_step_agrees_and_bisects_the_largest_batch():
    case = ts.StepCase(ts.SETTINGS["voc15-5"], ts.Shape(2, 256, "tiny"), "fp32", "cuda")
    record = ts.measure_case(case, ["fused+size"], reps=1, warmup=1)
    assert max(record["providers"]["fused+size"]["agreement"].values()) <= 1e-5
    found = ts.bisected_largest_batches(case, "fused+size", budgets_gb=(1, 2))["largest_batch"]
    assert 0 < found["1"] <= found["2"]
