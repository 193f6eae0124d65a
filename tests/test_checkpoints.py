"""Checkpoints: loaded without running code, verified by their SHA-256, and every damaged or foreign
file refused with one line that names it (docs/RELIABILITY.md#checkpoint-safety)."""

import hashlib
import io
import pickle
import re

import pytest
import torch

from incseg_fast.train.checkpoint import (
    CHECKPOINT_FORMAT,
    MAGIC,
    CheckpointError,
    checkpoint_digest,
    load_checkpoint,
    save_checkpoint,
)

STEP = {
    "kind": "step",
    "model": {"backbone": "tiny"},
    "state_dict": {"w": torch.arange(6.0)},
    "config": {"seed": 0},
    "metrics": {"step": 0, "miou_all": 50.0, "iou": [50.0, None]},
    "task_steps": [[0, 1]],
    "train_steps": [[0, 1]],
    "index": 0,
    "identity": {"method": "mib", "step": 0, "classes": [[0, 1]], "task": "15-5", "lr": 0.1},
}


class WritesAMarker:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _with_header(payload_bytes: bytes) -> bytes:
    """A file with a valid incseg_fast header around any payload (a checksum is no signature)."""
    digest = hashlib.sha256(payload_bytes).hexdigest()
    header = f"format {CHECKPOINT_FORMAT} sha256 {digest} bytes {len(payload_bytes)}\n"
    return MAGIC + header.encode() + payload_bytes


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_round_trip_and_digest(tmp_path):
    path = tmp_path / "step0.pt"
    save_checkpoint(STEP, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], STEP["state_dict"]["w"])
    assert loaded["metrics"] == STEP["metrics"]
    payload = path.read_bytes().split(b"\n", 2)[2]
    assert checkpoint_digest(path) == hashlib.sha256(payload).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["step0.pt"]  # no temporary file left


def _damaged(tmp_path):
    """{case: (file contents or None for a directory, words the message must hold)}."""
    good = tmp_path / "good.pt"
    save_checkpoint(STEP, good)
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[-100] ^= 0x01
    return {
        "empty": (b"", "empty"),
        "truncated": (data[:-50], "truncated"),
        "truncated header": (data[: len(MAGIC) + 20], "damaged header"),
        "corrupt": (bytes(flipped), "corrupt"),
        "text file": (b"# notes\nnot a checkpoint\n\xff\xfe", "not an incseg_fast checkpoint"),
        "another program's .pt": (_torch_bytes({"weights": torch.ones(3)}), "without incseg_fast's checkpoint header"),
        "a bare state dict": (_torch_bytes(torch.nn.Linear(2, 2).state_dict()), "without incseg_fast's checkpoint"),
        "format 2 (no header)": (_torch_bytes({"format": 2, **STEP}), "format 1-2"),
        "a pickle": (pickle.dumps({"state_dict": {}}), "not an incseg_fast checkpoint"),
        "newer format": (data.replace(f"format {CHECKPOINT_FORMAT}".encode(), b"format 9", 1), "format 9"),
        "format 3 (no identity)": (data.replace(f"format {CHECKPOINT_FORMAT}".encode(), b"format 3", 1), "format 3"),
        "no metadata": (_with_header(_torch_bytes({"w": torch.ones(2)})), "does not hold an incseg_fast step"),
        "missing key": (_with_header(_torch_bytes({k: v for k, v in STEP.items() if k != "config"})), "lacks config"),
        "an epoch": (_with_header(_torch_bytes({**STEP, "kind": "epoch"})), "is an epoch checkpoint"),
        "directory": (None, "is a directory"),
    }


def test_damaged_or_foreign_files_are_refused_in_one_line(tmp_path):
    for case, (contents, words) in _damaged(tmp_path).items():
        path = tmp_path / f"{case}.pt"
        path.mkdir() if contents is None else path.write_bytes(contents)
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path)
        message = str(error.value)
        assert str(path) in message and words in message and "\n" not in message, (case, message)
    with pytest.raises(CheckpointError, match=r"missing\.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("wrapping", ["pickle", "torch.save", "torch.save inside a valid header"])
def test_a_crafted_file_is_refused_without_running_its_code(tmp_path, wrapping):
    marker = tmp_path / "marker"
    bomb = {**STEP, "config": WritesAMarker(marker)}
    contents = {
        "pickle": pickle.dumps(bomb),
        "torch.save": _torch_bytes(bomb),
        "torch.save inside a valid header": _with_header(_torch_bytes(bomb)),
    }[wrapping]
    path = tmp_path / "step0.pt"
    path.write_bytes(contents)
    with pytest.raises(CheckpointError, match="step0.pt"):
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code from it"


def test_the_digest_is_that_of_a_verified_payload(tmp_path):
    """The digest that decides whether metrics.json is up to date comes from a payload that was
    checked: a damage the header does not show (its last 4 KB) is found without loading."""
    path = tmp_path / "step0.pt"
    save_checkpoint({**STEP, "state_dict": {"w": torch.arange(4096.0)}}, path)
    data = path.read_bytes()
    for damaged, words in (
        (data[:-4096], "truncated"),
        (data[:-4096] + bytes(4096), "corrupt"),  # a zeroed tail
        (data[:-1000] + bytes([data[-1000] ^ 0x40]) + data[-999:], "corrupt"),  # a flipped bit
    ):
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=f"step0.pt is {words}"):
            checkpoint_digest(path)


def test_a_checkpoint_of_another_run_or_step_is_refused(tmp_path):
    path = tmp_path / "step0.pt"
    save_checkpoint(STEP, path)
    assert load_checkpoint(path, identity={"method": "mib", "step": 0, "task": "15-5"})["index"] == 0
    for expected, words in (
        ({"method": "caf", "step": 0}, "it holds --method mib, not --method caf"),
        ({"step": 1, "task": "15-1"}, "it holds step 0, --task 15-5, not step 1, --task 15-1"),
        ({"classes": [[0, 1], [2]]}, "it holds the classes [[0, 1]], not the classes [[0, 1], [2]]"),
    ):
        with pytest.raises(
            CheckpointError, match=re.escape(f"checkpoint {path} belongs to another run or step: {words}")
        ):
            load_checkpoint(path, identity=expected)
