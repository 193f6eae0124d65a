"""What runs where: `incseg-fast env`, `--version`, the line train prints first, and the warning when
backend="auto" can run only the reference on CUDA tensors."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from incseg_fast import _backends, _environment, ops
from incseg_fast.cli import main
from incseg_fast.vocabulary import BACKENDS


def test_env_names_each_backend_and_why_it_cannot_run(capsys):
    assert main(["env"]) == 0
    printed = capsys.readouterr().out.splitlines()
    for name in BACKENDS:
        reason = _backends.unavailable_reason(name)
        expected = f"  {name:<10} " + ("available" if reason is None else f"unavailable: {reason}")
        assert expected in printed
    assert any(line.startswith(f"torch {torch.__version__}") for line in printed)
    assert f"kernels built: {_environment.kernels_built()}" in printed
    assert any(line.startswith("triton: ") for line in printed)
    assert printed[printed.index("GPUs:") + 1].startswith("  none" if not torch.cuda.is_available() else "  cuda:0 ")


def test_python_m_incseg_fast_env_and_the_instruction_set_cap():
    if not ops.HAS_EXTENSION:
        pytest.skip("the CPU kernels' instruction set is the extension's")
    environment = dict(os.environ, INCSEG_CPU_ISA="baseline")
    run = subprocess.run(
        [sys.executable, "-m", "incseg_fast", "env"], env=environment, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "CPU kernels' instruction set: baseline (capped by INCSEG_CPU_ISA=baseline)" in run.stdout.splitlines()
    assert _environment.cpu_isa() in ("baseline", "avx2", "avx512")


def test_the_cuda_architectures_recorded_are_the_build_s():
    if not ops.HAS_EXTENSION:
        pytest.skip("no extension")
    archs = _environment.cuda_archs()
    assert (archs == []) == (not ops.HAS_CUDA_KERNELS)
    if ops.HAS_CUDA_KERNELS and torch.cuda.is_available():  # tools/gpu_check.py builds for the GPU it runs on
        major, minor = torch.cuda.get_device_capability()
        assert f"sm_{major}{minor}" in archs
        assert ", ".join(archs) in _environment.kernels_built()


def _gpu_backends_unavailable(monkeypatch):
    real = _backends.unavailable_reason
    reasons = {"cuda": "no CUDA kernels here (test)", "triton": "no triton here (test)"}
    monkeypatch.setattr(_backends, "unavailable_reason", lambda name: reasons.get(name) or real(name))
    monkeypatch.setattr(_backends, "_warned_reference_on_cuda", False)


def test_auto_on_cuda_tensors_warns_once_when_it_runs_the_reference(monkeypatch):
    _gpu_backends_unavailable(monkeypatch)
    with pytest.warns(_backends.ReferenceFallbackWarning) as caught:
        assert _backends.resolve("auto", torch.device("cuda")) is _backends.reference
    (warning,) = caught
    message = str(warning.message)
    assert "reference backend (plain PyTorch" in message
    assert "no CUDA kernels here (test)" in message and "no triton here (test)" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.resolve("auto", torch.device("cuda")) is _backends.reference  # once per process
        assert _backends.resolve("auto", torch.device("cpu")) is not None


def test_auto_on_cpu_tensors_does_not_warn(monkeypatch):
    _gpu_backends_unavailable(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backends.resolve("auto", torch.device("cpu"))
    assert not _backends._warned_reference_on_cuda


def test_the_start_line_names_each_loss_and_its_backend():
    from incseg_fast.train import TrainConfig
    from incseg_fast.train.startup import start_line

    def config(method, **options):
        return TrainConfig(method=method, device="cpu", **{"amp": "none", **options})

    expected_backend = _backends.auto_choice(torch.device("cpu"))
    line = start_line([config("mib")])
    assert line.startswith(f"device cpu; losses incremental_loss on backend {expected_backend} (auto); AMP none")
    assert line.endswith(f"; {torch.get_num_threads()} CPU thread" + "s" * (torch.get_num_threads() != 1))
    both = start_line([config("ft"), config("caf")])
    assert "losses incremental_loss, attentive_distillation, structured_attention on" in both
    assert "structured_attention" not in start_line([config("caf", caf_module=False)])
    assert "on backend reference; AMP bfloat16" in start_line([config("ft", loss_backend="reference", amp="bf16")])


def test_train_prints_the_start_line_first(tmp_path, capsys, one_thread):
    from test_cli import TINY

    assert main(["train", "--method", "ft", "--step", "0", "--out", str(tmp_path), *TINY]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("device cpu; losses incremental_loss on backend ") and first.endswith("; 1 CPU thread")
