"""The benchmark report runs end to end (quick sizes) and its measurements are sane.

Timings are not asserted (speed is the report's business, not the tests'); what is checked is
that every case was measured by every provider, that the fused results agree with the float64
reference, and that the memory counter is exact on known allocations and sees at least the
gradient each call must allocate.
"""

import json

import pytest
import torch

from incseg_fast.bench import cases, measure, report


def test_cpu_peak_memory_counter_is_exact():
    assert measure.check_peak_counter() == 6_000_000


ALL_OPS = [
    "incremental_loss",
    "incremental_loss_balanced",
    "unbiased_cross_entropy",
    "knowledge_distillation",
    "attentive_distillation",
    "structured_attention",
    "local_pod",
    "entropy_pseudo_labels",
]
# Ops without a gradient: their forward+backward is the forward (bench/cases.py run_forward_backward).
FORWARD_ONLY_OPS = {"entropy_pseudo_labels"}


@pytest.mark.parametrize(
    "ops, providers",
    [
        (ALL_OPS, ["eager", *cases.fused_backends("cpu")]),
        (["incremental_loss"], ["eager", "compiled"]),  # torch.compile(reference) on one op: compiling is slow
    ],
)
def test_quick_report_measures_every_case_and_provider(tmp_path, ops, providers):
    out = tmp_path / "report.json"
    assert (
        report.main(
            [
                "--quick",
                "--ops",
                ",".join(ops),
                "--providers",
                ",".join(providers),
                "--reps",
                "1",
                "--warmup",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert {case["op"] for case in results["cases"]} == set(ops)
    for case in results["cases"]:
        assert sorted(case["providers"]) == sorted(providers), case["op"]
        for name, measured in case["providers"].items():
            what = f"{case['op']} {case['size']} {name}"
            assert "error" not in measured, (what, measured.get("error"))
            assert measured["fwd_bwd_median_s"] > 0, what
            assert measured["max_rel_err"] < 1e-5, what  # float32 against the float64 reference
            # forward+backward allocates at least the gradient of the primary input (ops with a gradient)
            if case["op"] not in FORWARD_ONLY_OPS:
                assert measured["peak_extra_bytes"] >= case["primary_bytes"], what


def test_max_seconds_stops_starting_cases_and_lists_the_others(tmp_path):
    out = tmp_path / "report.json"
    assert (
        report.main(
            [
                "--quick",
                "--ops",
                "incremental_loss,structured_attention",
                "--providers",
                "eager",
                "--reps",
                "1",
                "--warmup",
                "1",
                "--max-seconds",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert results["cases"] == []
    assert results["not_measured"] == ["incremental_loss-quick_logits-fp32", "structured_attention-quick_features-fp32"]


def test_a_case_out_of_memory_is_listed_and_the_others_still_run(tmp_path, monkeypatch):
    measured = report.measure_case

    def measure_or_run_out(case, *args, **kwargs):
        if case.op.name == "incremental_loss":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.00 GiB")
        return measured(case, *args, **kwargs)

    monkeypatch.setattr(report, "measure_case", measure_or_run_out)
    out = tmp_path / "report.json"
    argv = ["--quick", "--ops", "incremental_loss,structured_attention", "--providers", "eager"]
    assert report.main(argv + ["--reps", "1", "--warmup", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [c["op"] for c in results["cases"]] == ["structured_attention"]
    assert results["failed_cases"] == [
        {
            "case": "incremental_loss-quick_logits-fp32",
            "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 7.00 GiB",
        }
    ]
    assert results["not_measured"] == []


def test_an_explicit_dtype_applies_to_every_size():
    def names(dtype_name):
        return [
            c.name
            for c in cases.select_cases(
                ops=["incremental_loss"], sizes=["voc512", "ade"], dtype_name=dtype_name, device="cuda"
            )
        ]

    # voc512 runs in both dtypes by default; a dtype asked for is the only one
    assert names(None) == ["incremental_loss-voc512-fp32", "incremental_loss-voc512-bf16", "incremental_loss-ade-fp32"]
    assert names("bf16") == ["incremental_loss-voc512-bf16", "incremental_loss-ade-bf16"]


def _isa_copy_providers():
    return [n for n in cases.provider_names(cases.OPS["incremental_loss"], "cpu") if cases.CPU_ISA_SEPARATOR in n]


def test_mib_code_and_every_isa_copy_are_providers_and_match_the_reference(tmp_path):
    """MiB's loss code (what a user runs today) and each other CPU ISA copy give the reference's results."""
    providers = [cases.MIB, *_isa_copy_providers()]
    out = tmp_path / "report.json"
    arguments = ["--quick", "--ops", "incremental_loss,unbiased_cross_entropy,knowledge_distillation"]
    arguments += ["--providers", ",".join(providers), "--reps", "1", "--warmup", "1", "--json", str(out)]
    assert report.main(arguments) == 0
    results = json.loads(out.read_text())
    assert len(results["cases"]) == 3
    for case in results["cases"]:
        assert sorted(case["providers"]) == sorted(providers), case["op"]
        for name, measured in case["providers"].items():
            assert measured["max_rel_err"] < 1e-5, (case["op"], name)


def _record(size, seconds_by_provider):
    providers = {
        name: {"fwd_median_s": s, "fwd_bwd_median_s": s, "peak_extra_bytes": 1e8}
        for name, s in seconds_by_provider.items()
    }
    record = {"op": "incremental_loss", "size": size, "dtype": "fp32", "providers": providers}
    record.update(bytes_fwd_bwd=5e8, copy_bytes_per_s=1e10, primary_bytes=1e8)
    record["speedups"] = report.speedups(record)
    return record


def test_targets_quote_mib_compiled_and_skip_the_scalar_copy_for_speed():
    records = [
        _record("voc", {"eager": 1.0, "compiled": 0.2, cases.MIB_COMPILED: 0.36, "cpu": 0.1, "cpu:baseline": 0.3}),
        _record("ade", {cases.MIB_COMPILED: 1.0, "cpu": 0.3}),
    ]
    verdicts = {description: (verdict, value) for description, verdict, value in report.evaluate_targets(records)}
    assert verdicts["incremental_loss voc fp32 fwd+bwd, cpu >= 3.5x mib-compiled"] == ("met", "3.60x")
    assert verdicts["incremental_loss ade fp32 fwd+bwd, cpu >= 4x mib-compiled"] == ("NOT met", "3.33x")
    assert verdicts["incremental_loss voc fp32 fwd+bwd, cpu >= 40% of copy bandwidth"] == ("met", "50%")
    # the scalar copy is judged for memory, not for speed
    assert [d for d in verdicts if "cpu:baseline" in d] == [
        "incremental_loss voc fp32 peak extra memory, cpu:baseline <= 1.25x logits"
    ]


def _timed_record(fwd_s, fwd_bwd_s):
    result = {"fwd_s": fwd_s, "fwd_bwd_s": fwd_bwd_s}
    result["fwd_median_s"], result["fwd_bwd_median_s"] = measure.median(fwd_s), measure.median(fwd_bwd_s)
    return {"op": "incremental_loss", "size": "voc", "dtype": "fp32", "providers": {"cpu": result}}


def test_a_report_whose_repetitions_disagree_says_the_machine_was_noisy():
    quiet = _timed_record([1.0e-3, 1.1e-3, 1.0e-3], [3.0e-3, 3.2e-3, 3.1e-3])
    assert report.noisy_measurements([quiet]) == [] and report.format_noise([]) == ""
    forward_slower = _timed_record([5.0e-3, 5.1e-3, 5.2e-3], [3.0e-3, 3.2e-3, 3.1e-3])
    spread = _timed_record([1.0e-3, 1.1e-3, 1.0e-3], [3.0e-3, 9.0e-3, 3.1e-3])
    noisy = report.noisy_measurements([quiet, forward_slower, spread])
    assert noisy == [
        "incremental_loss voc fp32 cpu: fwd 5.10 ms > fwd+bwd 3.10 ms",
        "incremental_loss voc fp32 cpu: fwd+bwd repetitions 3.00 to 9.00 ms",
    ]
    assert report.format_noise(noisy).startswith("the machine was noisy: the repetitions of 2 measurement(s) disagree")


def test_help_explains_every_provider_and_names_the_command_typed(capsys):
    from incseg_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: incseg-fast bench ")
    assert "--device {cpu,cuda}   where the tensors live" in text
    explained = text.split("providers (the columns of each case):")[1]
    for op in cases.OPS.values():
        for device in ("cpu", "cuda"):
            for name, _ in cases.providers(op, device):
                assert name in explained, name
    for name in ("cuda", "triton", "cuda-size", "triton-size"):  # also where no GPU lists them
        assert name in explained
    with pytest.raises(SystemExit):
        report.parse_args(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m incseg_fast.bench ")
