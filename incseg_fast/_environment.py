"""What runs where: the report of ``incseg-fast env`` (what a bug report needs), the kernels named
by ``--version``, and the line ``train`` and ``demo`` print when they start."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

from . import __version__, ops
from ._backends import TRITON_INSTALLED, auto_choice, unavailable_reason
from .vocabulary import BACKENDS


def _build_op(name):
    """A query of csrc/build_info.cpp, or None when the extension is not built (or predates it)."""
    if not ops.HAS_EXTENSION or not hasattr(torch.ops, "incseg_fast_build"):
        return None
    try:
        return getattr(torch.ops.incseg_fast_build, name)()
    except (AttributeError, RuntimeError):
        return None


def cpu_isa() -> str | None:
    """The instruction set the CPU kernels run here: baseline, avx2 or avx512 (INCSEG_CPU_ISA caps it);
    None when unknown (no extension)."""
    if _build_op("cpu_isa") is None:
        return None
    from .cpu_isa import active_cpu_isa

    return active_cpu_isa()


def cuda_archs() -> list[str] | None:
    """The GPU architectures of the compiled CUDA kernels (["sm_80", "sm_90"]); [] without CUDA kernels;
    None when unknown (no extension)."""
    archs = _build_op("cuda_archs")
    if archs is None:
        return None
    return [f"sm_{int(arch) // 10}" for arch in archs.split(",") if arch.strip()]


def kernels_built() -> str:
    """One phrase: which compiled kernels this install has."""
    if not ops.HAS_EXTENSION:
        return "no compiled kernels (incseg_fast._C is not built: the reference backend only)"
    isa = cpu_isa()
    cpu = f"CPU (running {isa} here)" if isa else "CPU"
    if not ops.HAS_CUDA_KERNELS:
        return f"{cpu}; no CUDA kernels"
    archs = cuda_archs()
    return f"{cpu} and CUDA ({', '.join(archs) if archs else 'architectures not recorded'})"


def version_text(prog: str) -> str:
    """``--version``: the package, torch, and the kernels built."""
    return f"{prog} {__version__} (torch {torch.__version__}; kernels: {kernels_built()})"


def _triton() -> str:
    if not TRITON_INSTALLED:
        return "not installed"
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = "version unknown"
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    return version + (" (TRITON_INTERPRET=1: its kernels run on CPU tensors through the interpreter)" * interpreter)


def _gpus() -> list[str]:
    if not torch.cuda.is_available():
        return ["none (torch.cuda.is_available() is False)"]
    lines = []
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        lines.append(f"cuda:{index} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    return lines


def _isa_text(isa, cap) -> str:
    if not ops.HAS_EXTENSION:
        return "none (no extension)"
    if isa is None:
        return "not recorded (this incseg_fast._C was built before it could say: rebuild it)"
    return isa + (f" (capped by INCSEG_CPU_ISA={cap})" if cap else " (the widest this CPU has; INCSEG_CPU_ISA caps it)")


def report() -> list[str]:
    """The lines of ``incseg-fast env``."""
    cap = os.environ.get("INCSEG_CPU_ISA")
    isa = cpu_isa()
    lines = [
        f"incseg_fast {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python {platform.python_version()} ({sys.executable}), {platform.platform()}",
        f"torch {torch.__version__}, "
        + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build (no CUDA)")
        + f", {torch.get_num_threads()} CPU threads",
        f"kernels built: {kernels_built()}",
        f"CPU kernels' instruction set: {_isa_text(isa, cap)}",
        f"triton: {_triton()}",
        "backends:",
    ]
    for name in BACKENDS:
        reason = unavailable_reason(name)
        lines.append(f"  {name:<10} " + ("available" if reason is None else f"unavailable: {reason}"))
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    lines.append("backend='auto' runs: " + ", ".join(f"{d} tensors -> {auto_choice(torch.device(d))}" for d in devices))
    lines.append("GPUs:")
    lines += [f"  {gpu}" for gpu in _gpus()]
    return lines


def run_summary(device: torch.device, loss_backend: str, losses, amp: torch.dtype | None, threads: int) -> str:
    """The line ``train`` and ``demo`` print when they start: where the run computes, and how."""
    backend = auto_choice(device) if loss_backend == "auto" else loss_backend
    chosen = f"backend {backend}" + (" (auto)" if loss_backend == "auto" else "")
    amp_text = "none (float32)" if amp is None else str(amp).removeprefix("torch.")
    count = f"{threads} CPU thread{'s' * (threads != 1)}"
    return f"device {device}; losses {', '.join(losses)} on {chosen}; AMP {amp_text}; {count}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The machine in one phrase, for measured figures: CPU model and count, kernels' ISA, torch."""
    isa = cpu_isa()
    kernels = f", CPU kernels {isa}" if isa else ""
    return f"{_cpu_model()} ({os.cpu_count()} CPUs{kernels}), torch {torch.__version__}"


def source_commit() -> str:
    """The git commit of the source tree the package runs from (``+changes`` when it differs), or "unknown"."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=30
        )
        changed = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+changes" if changed.stdout.strip() else "")
