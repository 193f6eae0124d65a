"""Training under torchrun (docs/TRAINER.md#distributed): two Gloo processes on CPU train the model
of one process, and a two-process run killed mid-step resumes to the result of an uninterrupted one.

The two-process runs are ``python -m torch.distributed.run --nproc-per-node 2 -m incseg_fast train``
in a new session, with PYTHONPATH set to the checkout this test imported incseg_fast from; each
is killed with its workers (which torchrun starts in sessions of their own) when the test ends.
"""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from queue import Empty

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import incseg_fast
import incseg_fast as isf
from incseg_fast._atomic import KILL_VARIABLE
from incseg_fast.cli import main
from incseg_fast.train import RunOptionsError, distributed, load_checkpoint
from incseg_fast.train.distributed import (
    GlobalBatches,
    Processes,
    on_main,
    rank_share,
    share_weights,
    synchronise_batch_norm,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKOUT = Path(incseg_fast.__file__).resolve().parent.parent
# caf: its fusion and SE blocks are unused at step 0 and run outside DDP's forward at step 1;
# step 0: 1 epoch, step 1: 2 epochs, each of 6 global batches of 8 images
COMMAND = [
    "train",
    "--method",
    "caf",
    "--lambda-ad",
    "1",
    "--image-size",
    "32",
    "--train-images",
    "48",
    "--val-images",
    "16",
    "--epochs",
    "1",
    "--epochs-incremental",
    "2",
    "--batch-size",
    "8",
    "--lr",
    "0.02",
    "--lr-incremental",
    "0.01",
    "--device",
    "cpu",
    "--threads",
    "1",
]
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _kill_everything(process: subprocess.Popen) -> None:
    for pid in _descendants(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _start_torchrun(out: Path, *extra, kill_at=None) -> subprocess.Popen:
    """torchrun of the command in two processes into ``out``, started (its output in ``out``.log)."""
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT), "OMP_NUM_THREADS": "1"}
    env.pop(KILL_VARIABLE, None)
    if kill_at is not None:
        env[KILL_VARIABLE] = str(kill_at)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    argv += ["--master-port", str(_free_port()), "-m", "incseg_fast", *COMMAND, *extra, "--out", str(out)]
    with open(f"{out}.log", "a") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def torchrun(out: Path, *extra, kill_at=None) -> int:
    """Run the command in two processes into ``out``; returns torchrun's exit status."""
    process = _start_torchrun(out, *extra, kill_at=kill_at)
    try:
        return process.wait(TIMEOUT_S)
    finally:
        _kill_everything(process)


def _finished(out: Path, *extra) -> Path:
    status = torchrun(out, *extra)
    assert status == 0, Path(f"{out}.log").read_text()[-3000:]
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return _finished(tmp_path_factory.mktemp("ddp") / "two")


def _checkpoints(out: Path) -> dict:
    return {step: load_checkpoint(out / "caf" / f"step{step}.pt") for step in (0, 1)}


def _rank_main(task, rank, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        queue.put((rank, {key: value.detach().numpy() for key, value in task(rank).items()}))
    finally:
        dist.destroy_process_group()


def _in_two_processes(task) -> list[dict]:
    """``task(rank)`` (a dict of tensors) in two processes forked from this one and joined by Gloo."""
    context, port = multiprocessing.get_context("fork"), _free_port()
    queue = context.Queue()
    workers = [context.Process(target=_rank_main, args=(task, rank, port, queue)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    results = {}
    try:
        for _ in range(60):  # seconds
            try:
                rank, result = queue.get(timeout=1)
                results[rank] = result
            except Empty:
                failed = [worker.exitcode for worker in workers if worker.exitcode not in (None, 0)]
                assert not failed, f"a process failed with exit code {failed} (its traceback is above)"
            if len(results) == 2:
                break
    finally:
        for worker in workers:
            worker.kill()
            worker.join()
    return [{key: torch.from_numpy(value) for key, value in results[rank].items()} for rank in (0, 1)]


def _global_batch():
    """4 images of logits and labels; image 0 is mostly ignored, so rank 0's share counts fewer pixels."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 5, 6, 6, generator=generator, dtype=torch.float64) * 2 + 0.5
    labels = torch.randint(0, 5, (4, 6, 6), generator=generator)
    labels[0, :5] = 255
    labels[2, 0] = 255
    return logits, labels


def _batch_norm(rank):
    logits, _ = _global_batch()
    model = synchronise_batch_norm(nn.Sequential(nn.BatchNorm2d(5)).double(), torch.device("cpu"))
    share = logits[2 * rank : 2 * rank + 2].clone().requires_grad_()
    out = model(share)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    norm = model[0]
    return {"out": out, "grad": share.grad, "weight_grad": norm.weight.grad, "running_var": norm.running_var}


def test_synchronised_batch_norm_is_the_batch_norm_of_the_global_batch():
    shares = _in_two_processes(_batch_norm)
    logits, _ = _global_batch()
    norm = nn.BatchNorm2d(5).double()
    logits.requires_grad_()
    out = norm(logits)
    half = out.numel() // 2
    weights = torch.linspace(-1, 1, half, dtype=out.dtype)
    (out * torch.cat([weights, weights]).reshape(out.shape)).sum().backward()
    assert torch.allclose(torch.cat([s["out"] for s in shares]), out, rtol=0, atol=1e-12)
    assert torch.allclose(torch.cat([s["grad"] for s in shares]), logits.grad, rtol=0, atol=1e-12)
    # each process holds its share's part of the parameter gradient (DDP sums them: x 2, then / 2)
    assert torch.allclose(shares[0]["weight_grad"] + shares[1]["weight_grad"], norm.weight.grad, rtol=0, atol=1e-12)
    for share in shares:
        assert torch.allclose(share["running_var"], norm.running_var, rtol=0, atol=1e-12)


def _weighted_cross_entropy(rank):
    logits, labels = _global_batch()
    share = logits[2 * rank : 2 * rank + 2].clone().requires_grad_()
    ce_weight, pixel_weight = share_weights(labels[2 * rank : 2 * rank + 2], 255)
    ce, _ = isf.incremental_loss(
        share, labels[2 * rank : 2 * rank + 2], None, old_classes=5, ce="plain", kd="none", backend="reference"
    )
    (ce_weight * ce).backward()
    return {"ce": ce, "weighted": ce_weight * ce, "pixel_weight": torch.tensor(pixel_weight), "grad": share.grad}


def test_share_weights_make_the_mean_over_processes_the_loss_of_the_global_batch():
    shares = _in_two_processes(_weighted_cross_entropy)
    logits, labels = _global_batch()
    logits.requires_grad_()
    ce, _ = isf.incremental_loss(logits, labels, None, old_classes=5, ce="plain", kd="none", backend="reference")
    ce.backward()
    ce = ce.detach()
    assert float(shares[0]["ce"] + shares[1]["ce"]) / 2 != pytest.approx(float(ce))  # unweighted means differ
    assert float(shares[0]["weighted"] + shares[1]["weighted"]) / 2 == pytest.approx(float(ce), rel=1e-12)
    # DDP's averaged gradient: each process's gradient / 2
    assert torch.allclose(torch.cat([s["grad"] for s in shares]) / 2, logits.grad, rtol=0, atol=1e-15)
    assert [float(s["pixel_weight"]) for s in shares] == [1.0, 1.0]  # equal shares


def _fails_on_rank_zero(rank):
    def check_the_run_directory():
        raise RunOptionsError("runs/x holds results of --lr 0.1, not --lr 0.2")

    try:
        on_main(Processes(world_size=2, rank=rank), check_the_run_directory)
    except RunOptionsError as error:
        return {"message": torch.tensor(list(str(error).encode()))}
    return {}


def test_an_error_of_rank_zero_stops_every_process_with_its_message():
    for result in _in_two_processes(_fails_on_rank_zero):
        assert bytes(result["message"].tolist()).decode() == "runs/x holds results of --lr 0.1, not --lr 0.2"


def test_global_batches_do_not_depend_on_the_number_of_processes():
    one = list(GlobalBatches(20, 8, Processes(), seed=5))
    shares = [list(GlobalBatches(20, 8, Processes(world_size=4, rank=r), seed=5)) for r in range(4)]
    assert [len(batch) for batch in one] == [8, 8]  # the 4 images after the last full batch are left out
    for k, batch in enumerate(one):
        assert [i for rank in shares for i in rank[k]] == batch
        assert {len(rank[k]) for rank in shares} == {2}
    assert one != list(GlobalBatches(20, 8, Processes(), seed=6))  # one permutation per seed
    assert rank_share(Processes(world_size=2, rank=1), [7, 3, 5]) == [3, 5]  # a short batch: near-equal parts


def test_two_processes_train_the_model_of_one(two_processes, tmp_path):
    """Equal up to float32 rounding (sums in another order: the loss terms, batch-norm statistics,
    the averaged gradient), which training amplifies. Measured: weights within 1.2e-4, per-epoch
    losses within a relative 2e-5; with --no-sync-bn 3.5e-2 and 6e-4 (docs/TRAINER.md#distributed)."""
    assert main([*COMMAND, "--out", str(tmp_path)]) == 0
    one, two = _checkpoints(tmp_path), _checkpoints(two_processes)
    for step in (0, 1):
        a, b = one[step]["metrics"], two[step]["metrics"]
        assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], rel=5e-5)
        for key in ("iou", "miou_old", "miou_all", "mpa", "mca"):
            assert b[key] == pytest.approx(a[key], abs=0.5), (step, key)
        weights = one[step]["state_dict"]
        worst = max(float((weights[k].double() - two[step]["state_dict"][k].double()).abs().max()) for k in weights)
        assert worst < 1e-3, (step, worst)


def test_a_killed_two_process_run_resumes_to_the_same_result(two_processes, tmp_path):
    out = tmp_path / "killed"
    # write boundary 28 (two per file written): rank 0 is killed in step 1, after its first epoch's checkpoint
    assert torchrun(out, kill_at=28) != 0
    assert (out / "caf" / "step0.pt").exists() and not (out / "caf" / "step1.pt").exists()
    assert (out / "caf" / "step1.partial.pt").exists()
    _finished(out)
    assert "resuming after epoch 1" in Path(f"{out}.log").read_text()
    assert json.loads((out / "results.json").read_text()) == json.loads((two_processes / "results.json").read_text())
    got, want = _checkpoints(out), _checkpoints(two_processes)
    for step in (0, 1):
        assert [h["loss"] for h in got[step]["metrics"]["history"]] == [
            h["loss"] for h in want[step]["metrics"]["history"]
        ]
        for key, tensor in want[step]["state_dict"].items():
            assert torch.equal(got[step]["state_dict"][key], tensor), (step, key)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.partial.pt"))


def test_a_global_batch_that_does_not_divide_is_one_line(tmp_path, capsys, monkeypatch):
    # as torchrun's rank 0 of 2 sees it; the check comes before the process group is joined
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert main([*COMMAND, "--batch-size", "7", "--out", str(tmp_path / "odd")]) == 2
    err = capsys.readouterr().err
    assert err == "incseg-fast: error: --batch-size 7 (the global batch) does not divide evenly across 2 processes\n"
    assert not (tmp_path / "odd").exists()


# ---------------------------------------------------------------- stuck, mismatched and orphaned processes


def _rank_in_child(argv, rank, port, log, other_code):
    """``incseg_fast.cli.main(argv)`` as rank ``rank`` of two processes started without torchrun
    (env://, Gloo), its output in ``log``; ``other_code``: as if it ran another version."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))  # not pytest's capture
    for name in ("TORCHELASTIC_RUN_ID", KILL_VARIABLE):
        os.environ.pop(name, None)
    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if other_code:
        distributed.code_version = lambda: "incseg_fast 9.9 (sources 000000000000)"
    sys.exit(main(argv))


def _two_ranks(tmp_path, argv0, argv1, other_code=False):
    """The two ranks, forked from this process (torch already imported), started."""
    context, port = multiprocessing.get_context("fork"), _free_port()
    ranks = []
    for rank, argv in enumerate((argv0, argv1)):
        log = tmp_path / f"rank{rank}.log"
        ranks.append(context.Process(target=_rank_in_child, args=(argv, rank, port, log, other_code and rank == 1)))
        ranks[-1].start()
    return ranks


def _error_line(log: Path) -> str:
    """The one error line of a rank's output, its last line (after rank 0's progress lines and
    the warnings of DDP's C++ code)."""
    lines = log.read_text().splitlines()
    errors = [line for line in lines if line.startswith("incseg-fast: error: ")]
    assert errors and errors == lines[-1:], lines
    return errors[0]


def _stop_all(processes):
    for process in processes:
        process.kill()
        process.join()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--lr", "0.5"], "--lr differs between the processes: 0.02 on rank 0, 0.5 on rank 1"),
        (["--seed", "3"], "--seed differs between the processes: 0 on rank 0, 3 on rank 1"),
        (["--batch-size", "4"], "--batch-size differs between the processes: 8 on rank 0, 4 on rank 1"),
        (["--train-images", "40"], "--train-images differs between the processes: 48 on rank 0, 40 on rank 1"),
        ([], "the processes run different code: incseg_fast"),
    ],
)
def test_processes_with_other_options_or_code_stop_before_training(tmp_path, extra, words):
    out = ["--out", str(tmp_path / "run")]
    ranks = _two_ranks(tmp_path, [*COMMAND, *out], [*COMMAND, *extra, *out], other_code=not extra)
    try:
        for rank in ranks:
            rank.join(60)
        assert [rank.exitcode for rank in ranks] == [2, 2]
    finally:
        _stop_all(ranks)
    for rank in (0, 1):
        assert _error_line(tmp_path / f"rank{rank}.log").startswith(f"incseg-fast: error: {words}")
    assert not (tmp_path / "run").exists(), "nothing is written"


def test_a_stopped_process_is_named_within_the_timeout(tmp_path):
    """Rank 1 is stopped (SIGSTOP) during step 0: rank 0 stops after --dist-timeout-s with one line
    naming it, where it used to wait for Gloo's 30 minutes."""
    argv = [*COMMAND, "--epochs", "100", "--dist-timeout-s", "8", "--out", str(tmp_path / "run")]
    ranks = _two_ranks(tmp_path, argv, argv)
    try:
        partial = tmp_path / "run" / "caf" / "step0.partial.pt"
        for _ in range(int(TIMEOUT_S / 0.2)):  # until the first epoch is written
            if partial.exists() or not ranks[0].is_alive():
                break
            time.sleep(0.2)
        assert partial.exists(), (tmp_path / "rank0.log").read_text()
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        ranks[0].join(40)
        waited = time.monotonic() - stopped
        assert ranks[0].exitcode == 2, (ranks[0].exitcode, (tmp_path / "rank0.log").read_text())
    finally:
        _stop_all(ranks)
    line = _error_line(tmp_path / "rank0.log")
    assert line.startswith("incseg-fast: error: rank 1 did not answer within --dist-timeout-s 8 (stopped"), line
    assert waited < 30, waited


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; its new parent has not reaped it yet


def test_a_killed_torchrun_ends_its_workers(tmp_path):
    """SIGKILL of torchrun's agent, which cannot forward it, ends the workers (they used to train
    on: torchrun starts them in sessions of their own)."""
    out = tmp_path / "run"
    process = _start_torchrun(out, "--epochs", "50")
    workers = []
    try:
        for _ in range(int(TIMEOUT_S / 0.2)):  # until both processes have joined and rank 0 has written
            if (out / "options.json").exists() or process.poll() is not None:
                break
            time.sleep(0.2)
        assert (out / "options.json").exists(), Path(f"{out}.log").read_text()[-3000:]
        workers = _descendants(process.pid)
        assert len(workers) == 2, workers
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        for _ in range(100):
            if not any(_alive(pid) for pid in workers):
                break
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "the workers outlived torchrun"
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _kill_everything(process)
