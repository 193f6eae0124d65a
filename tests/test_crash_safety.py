"""A kill at any moment leaves a run that the same command finishes exactly as if it had never
been killed (docs/RELIABILITY.md#crash-safety).

The trainer is killed with SIGKILL in a child process: at each of its write boundaries in turn
(``INCSEG_KILL_AT_WRITE=n``: after the n-th temporary file is written, or after its rename), and
at random moments. Each child runs ``incseg_fast.cli.main`` with the command's arguments, as the
console script does; the children are forked from the test process, which has imported torch and
incseg_fast (a fresh interpreter spends seconds importing them, a fork milliseconds).
"""

import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time

import pytest
import torch

from incseg_fast._atomic import KILL_VARIABLE
from incseg_fast.train import load_checkpoint
from incseg_fast.train.results import final_checkpoints

# two steps (1 and 2 epochs, so that a kill can land inside a step), a few 32x32 images
COMMAND = [
    "train",
    "--method",
    "mib",
    "--image-size",
    "32",
    "--train-images",
    "32",
    "--val-images",
    "8",
    "--epochs",
    "1",
    "--epochs-incremental",
    "2",
    "--batch-size",
    "8",
    "--device",
    "cpu",
    "--no-progress",
    "--threads",
    "1",
]
TIMEOUT_S = 120


def _command_in_child(argv, kill_at, log):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.pop(KILL_VARIABLE, None)
    if kill_at is not None:
        os.environ[KILL_VARIABLE] = str(kill_at)
    from incseg_fast.cli import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def start():
    """start(out, kill_at=None) -> the started child process running the command into ``out``."""
    import matplotlib.pyplot  # noqa: F401  imported once here, not in every child
    import torch._dynamo  # noqa: F401  the first optimizer of a process imports it (1-2 s)

    # fork: the child starts with everything imported. It runs torch on one thread (--threads 1),
    # as DataLoader workers do, so an OpenMP pool of the parent cannot hang it.
    context = multiprocessing.get_context("fork")

    def start_command(out, kill_at=None):
        process = context.Process(target=_command_in_child, args=(COMMAND + ["--out", str(out)], kill_at, f"{out}.log"))
        process.start()
        return process

    return start_command


def _finish(start, out) -> float:
    """Run the command into ``out`` to its end; returns its wall time."""
    began = time.perf_counter()
    process = start(out)
    process.join(TIMEOUT_S)
    log = open(f"{out}.log").read()[-2000:] if os.path.exists(f"{out}.log") else ""
    assert process.exitcode == 0, f"the rerun failed ({process.exitcode}):\n{log}"
    return time.perf_counter() - began


@pytest.fixture(scope="module")
def reference(start, tmp_path_factory):
    """(folder, wall time) of an uninterrupted run."""
    out = tmp_path_factory.mktemp("crash") / "reference"
    return out, _finish(start, out)


def _comparable(entry):
    """A metrics entry without what depends on timing."""
    return {
        **{k: v for k, v in entry.items() if k not in ("eval_seconds", "history", "checkpoint_sha256")},
        "losses": [h["loss"] for h in entry["history"]],
    }


def _assert_same_run(out, reference, when):
    assert json.loads((out / "results.json").read_text()) == json.loads((reference / "results.json").read_text()), when
    for name in ("options.json", "mib/options.json"):
        assert (out / name).read_text() == (reference / name).read_text(), when
    finals, expected = final_checkpoints(out / "mib"), final_checkpoints(reference / "mib")
    assert list(finals) == list(expected) == [0, 1], when
    for step, path in expected.items():
        want, got = load_checkpoint(path), load_checkpoint(finals[step])
        assert _comparable(got["metrics"]) == _comparable(want["metrics"]), when
        for key, tensor in want["state_dict"].items():
            assert torch.equal(got["state_dict"][key], tensor), f"{when}: {key} differs"
    left = [p.name for p in out.rglob("*") if p.name.endswith((".tmp", ".partial.pt"))]
    assert not left, f"{when}: left {left}"


def test_a_kill_at_any_write_boundary(start, reference, tmp_path):
    boundary = 1
    while True:
        out = tmp_path / f"killed-at-{boundary}"
        process = start(out, kill_at=boundary)
        process.join(TIMEOUT_S)
        if process.exitcode == 0:  # the run has fewer write boundaries than this
            break
        assert process.exitcode == -signal.SIGKILL, f"boundary {boundary}: exit code {process.exitcode}"
        _finish(start, out)
        _assert_same_run(out, reference[0], f"killed at write boundary {boundary}")
        shutil.rmtree(out)
        boundary += 1
    assert boundary > 30, "the run should write more files than this: is the hook called?"


def test_kills_at_random_moments(start, reference):
    """Kills of the run and of its resumptions, at seeded random times within a run's duration."""
    out = reference[0].parent / "killed-at-random"
    moments = random.Random(0)
    for _ in range(6):
        process = start(out)
        time.sleep(moments.uniform(0, reference[1]))
        process.kill()
        process.join(TIMEOUT_S)
    _finish(start, out)
    _assert_same_run(out, reference[0], "killed at random moments")
