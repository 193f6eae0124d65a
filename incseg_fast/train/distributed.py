"""Several processes training one model (``torchrun ... -m incseg_fast train``): DDP (docs/TRAINER.md#distributed).

torchrun starts one process per device and sets WORLD_SIZE, RANK and LOCAL_RANK; without them
(or with WORLD_SIZE=1) the trainer is the one process it has always been. Processes on GPUs talk
through NCCL (process r uses cuda:LOCAL_RANK), on CPUs through Gloo.

What makes N processes train the model of one process: every process cuts its share out of the
same global batches (:class:`GlobalBatches`), batch norm uses the statistics of the global batch
(:func:`synchronise_batch_norm`), and each process weights its loss terms so that the mean over
processes, which is what DDP's averaged gradient differentiates, is the one-process loss
(:func:`share_weights`). Only rank 0 writes files; :func:`on_main` runs its writes and hands
their outcome, a value or the exception, to every process, so the others wait for them and stop
together when they fail.

What keeps a job from hanging or diverging silently: every process dies with torchrun's agent
(:func:`_end_with_the_launcher`); the processes compare their options and code when they join
(:func:`check_same_options`); every wait is bounded by ``--dist-timeout-s``, after which
:func:`peers_answer` names the ranks that did not answer.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .._errors import first_line


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes training one model."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Processes:
    """The processes torchrun started (its WORLD_SIZE, RANK, LOCAL_RANK), or this one alone."""
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = os.environ.get(name, "1" if name == "WORLD_SIZE" else "0")
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None
    processes = Processes(values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"])
    if processes.world_size < 1 or not 0 <= processes.rank < processes.world_size:
        raise ValueError(f"RANK={processes.rank} is not in [0, WORLD_SIZE={processes.world_size})")
    return processes


def process_device(processes: Processes, device: torch.device) -> torch.device:
    """The device of this process: with several processes on CUDA, cuda:LOCAL_RANK."""
    if processes.distributed and device.type == "cuda":
        return torch.device("cuda", processes.local_rank)
    return device


PR_SET_PDEATHSIG = 1  # linux/prctl.h
ROLL_CALL_S = 10.0  # at most this long, the processes whose wait failed report in before one is named


class PeerTimeoutError(TimeoutError):
    """A process did not answer within --dist-timeout-s; the message names its rank."""


class ProcessesDisagreeError(ValueError):
    """The processes of one job were started with other options or other code."""


def _end_with_the_launcher() -> None:
    """Under torchrun, have the kernel SIGKILL this process when torchrun's agent (its parent) ends.

    The agent starts every worker in a session of its own (so that it can signal the worker's
    process group), so a worker does not get the signals of the agent's terminal or group, and a
    SIGKILL of the agent, which cannot forward anything, used to leave the workers training. If
    the agent died before this call, joining the process group fails: torchrun's agent hosts its store.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def start(processes: Processes, device: torch.device, timeout_s: float, options: dict) -> None:
    """Join the process group (once per process): NCCL for CUDA devices, Gloo otherwise; every wait
    is bounded by ``timeout_s`` (--dist-timeout-s). Then check that every process has the same
    ``options`` and code (:func:`check_same_options`)."""
    if not processes.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _end_with_the_launcher()
    try:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=processes.rank,
            world_size=processes.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except RuntimeError as error:
        if not _lost_peer(error):
            raise
        raise PeerTimeoutError(
            f"not every process joined within --dist-timeout-s {timeout_s:g} ({first_line(error)})"
        ) from error
    check_same_options(processes, options)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """incseg_fast's version and a digest of its Python sources (processes of one job must run the same code)."""
    from .. import __version__

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return f"incseg_fast {__version__} (sources {digest.hexdigest()[:12]})"


def _where(values: list) -> str:
    """ "0.1 on ranks 0, 2, 0.5 on rank 1" for the values of the ranks."""
    ranks: dict = {}
    for rank, value in enumerate(values):
        ranks.setdefault(repr(value), ([], value))[0].append(rank)
    return ", ".join(
        f"{value} on rank{'s' if len(found) > 1 else ''} {', '.join(map(str, found))}"
        for found, value in ranks.values()
    )


def check_same_options(processes: Processes, options: dict) -> None:
    """Stop every process, before anything is trained, when the processes differ in their code or
    in ``options`` ({name: value}): they would train different weights, or hang on batches of
    different sizes."""
    everyone = [None] * processes.world_size
    dist.all_gather_object(everyone, (code_version(), options))
    codes = [code for code, _ in everyone]
    if len(set(codes)) > 1:
        raise ProcessesDisagreeError(f"the processes run different code: {_where(codes)}")
    for name in options:
        values = [theirs.get(name) for _, theirs in everyone]
        if len(set(map(repr, values))) > 1:
            raise ProcessesDisagreeError(
                f"--{name.replace('_', '-')} differs between the processes: {_where(values)} "
                "(every process must be started with the same options)"
            )


def _lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a wait that timed out or a connection to another process that broke."""
    text = str(error).lower()
    return "timed out" in text or "connection" in text


def _answered(rank: int) -> str:
    return f"incseg_fast/answered/{rank}"


def _roll_call(processes: Processes, grace_s: float) -> list[int] | None:
    """The ranks that did not report in within ``grace_s`` (every process whose wait failed reports
    in here), or None when the store does not answer either (it lives in torchrun's agent, or
    in rank 0 without torchrun)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=grace_s))
        store.set(_answered(processes.rank), "1")
        deadline = time.monotonic() + grace_s
        while True:
            silent = [rank for rank in range(processes.world_size) if not store.check([_answered(rank)])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.1)
    except RuntimeError:
        return None


@contextlib.contextmanager
def peers_answer(processes: Processes, timeout_s: float):
    """Turn a wait for other processes that failed (--dist-timeout-s passed, or a connection broke)
    into one line that names the ranks that did not answer."""
    try:
        yield
    except RuntimeError as error:
        if not (processes.distributed and dist.is_initialized() and _lost_peer(error)):
            raise
        silent = _roll_call(processes, min(timeout_s, ROLL_CALL_S))
        if silent is None:
            who = "a process (and the rendezvous store, in torchrun or in rank 0)"
        elif silent:
            who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))}"
        else:
            raise
        raise PeerTimeoutError(
            f"{who} did not answer within --dist-timeout-s {timeout_s:g} (stopped, hung, killed or "
            "unreachable; raise the option if it was only busy)"
        ) from error


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def on_main(processes: Processes, action, *args):
    """``action(*args)`` on rank 0; every process returns its value or raises its exception.

    The other processes wait here until rank 0 is done: what it wrote is complete when they go on.
    """
    if not processes.distributed:
        return action(*args)
    outcome, failure = [None], None
    if processes.is_main:
        try:
            outcome[0] = ("value", action(*args))
        except Exception as error:  # handed to the other processes, then raised here too
            failure = error
            outcome[0] = ("error", error if _picklable(error) else RuntimeError(f"on rank 0: {error}"))
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def _picklable(error: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # e.g. an exception class whose __init__ takes other arguments than its args
        return False
    return True


def main_first(processes: Processes, action, *args):
    """``action(*args)`` on rank 0, then on the others (which then read the files rank 0 wrote)."""
    value = on_main(processes, action, *args)
    return value if processes.is_main else action(*args)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes (a copy; the tensor itself when there is one process)."""
    if not dist.is_initialized():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def check_global_batch(processes: Processes, batch_size: int) -> None:
    if batch_size % processes.world_size:
        raise ValueError(
            f"--batch-size {batch_size} (the global batch) does not divide evenly across "
            f"{processes.world_size} processes"
        )


def rank_share(processes: Processes, batch: list) -> list:
    """This process's part of a global batch: equal parts, in rank order (as equal as possible
    for the one short batch of a step with fewer images than the batch size)."""
    n, world = len(batch), processes.world_size
    return batch[processes.rank * n // world : (processes.rank + 1) * n // world]


class GlobalBatches:
    """This process's share of each global batch of an epoch (a batch sampler for a DataLoader).

    The global batches come from one seeded permutation per epoch, so they are the same for any
    number of processes. The images after the last full batch are left out, as the one-process
    loop always did; a step with fewer images than one batch trains on them all, in one batch.
    """

    def __init__(self, num_images: int, batch_size: int, processes: Processes, seed: int):
        if num_images < processes.world_size:
            raise ValueError(
                f"the step has {num_images} training image(s), fewer than the {processes.world_size} processes"
            )
        self.num_images, self.batch_size, self.processes, self.seed = num_images, batch_size, processes, seed

    def __len__(self) -> int:
        return max(self.num_images // self.batch_size, 1)

    def global_batches(self) -> list[list[int]]:
        order = torch.randperm(self.num_images, generator=torch.Generator().manual_seed(self.seed)).tolist()
        if self.num_images <= self.batch_size:
            return [order]
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]

    def __iter__(self):
        for batch in self.global_batches():
            yield rank_share(self.processes, batch)


def share_weights(labels: torch.Tensor, ignore_index: int) -> tuple[float, float]:
    """(weight of the CE "mean", weight of the terms that average over every pixel) of this share.

    DDP averages the processes' gradients, so the model follows the gradient of the mean over
    processes of their losses. A "mean" over this share's pixels times (its pixels x processes /
    all processes' pixels) makes that mean the one-process loss of the global batch: the CE
    counts non-ignored pixels (each share has its own number), the other terms every pixel
    (the same for equal shares: weight 1). With one process both weights are 1.
    """
    if not dist.is_initialized():
        return 1.0, 1.0
    counts = torch.stack([(labels != ignore_index).sum(), torch.tensor(labels.numel(), device=labels.device)])
    totals = all_reduce_sum(counts)
    weights = counts.double() * dist.get_world_size() / totals.clamp(min=1).double()
    return weights[0].item(), weights[1].item()


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: each process's input reaches
    every process's output."""

    @staticmethod
    def forward(ctx, tensor):
        return all_reduce_sum(tensor)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad)


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """Batch norm over the global batch for CPU tensors (torch's SyncBatchNorm is GPU-only).

    Training: the per-channel mean and variance of every process's batch, from two all-reduces
    (sum, then the sum of squared deviations from the global mean: no cancellation); the
    all-reduce is differentiable, so the gradient flows to every process's inputs as in one
    process. Evaluation and one process: plain batch norm. State dict: that of nn.BatchNorm2d.
    """

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        count = torch.tensor(float(x.numel() // x.shape[1]))
        total = all_reduce_sum(count)
        mean = _SumOverProcesses.apply(x.sum((0, 2, 3))) / total
        centred = x - mean[None, :, None, None]
        var = _SumOverProcesses.apply(centred.square().sum((0, 2, 3))) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                weight = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.detach(), weight)
                self.running_var.lerp_(var.detach() * total / (total - 1).clamp(min=1), weight)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        out = centred * scale[None, :, None, None]
        return out + self.bias[None, :, None, None] if self.affine else out


def synchronise_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """The model with every BatchNorm2d computing the global batch's statistics in training."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = GlooSyncBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                device=child.running_mean.device,
                dtype=child.running_mean.dtype,
            )
            synced.load_state_dict(child.state_dict())
            if child.affine:  # the same Parameter objects: an optimizer built before still holds them
                synced.weight, synced.bias = child.weight, child.bias
            synced.train(child.training)
            setattr(model, name, synced)
        else:
            synchronise_batch_norm(child, device)
    return model
