"""Checkpoint files that cannot run code and that say when they are damaged.

A checkpoint is one file: two header lines, then the bytes of ``torch.save(payload)``::

    incseg_fast checkpoint
    format 4 sha256 <64 hex digits> bytes <length of the payload>
    <payload>

The header and the payload's SHA-256 are checked before anything is unpickled, whenever a
checkpoint is read (also for its digest alone), so an empty, truncated, corrupt or foreign file
is named and refused; the payload is loaded with ``torch.load(weights_only=True)``, which builds
tensors and plain containers only and never calls code a file names (the checksum finds damage,
it is no signature: weights_only is what makes a crafted file harmless).

Payloads: ``kind="step"``, the final checkpoint of a step (model config, weights, metrics) and
``kind="epoch"``, the last finished epoch of an unfinished step (weights, optimizer, history).
Both hold the ``identity`` of the run and step they belong to (:func:`check_identity`).
Formats 1 and 2 were plain ``torch.save`` files, which cannot be verified: they are refused;
format 3 had no identity.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import torch

from .._atomic import write_atomic
from .._errors import first_line

CHECKPOINT_FORMAT = 4
MAGIC = b"incseg_fast checkpoint\n"
_HEADER = re.compile(rb"format (\d+) sha256 ([0-9a-f]{64}) bytes (\d+)\n")
_ZIP = b"PK\x03\x04"  # torch.save's archives
KINDS = {"step": "a step's final checkpoint (stepK.pt)", "epoch": "an epoch checkpoint (stepK.partial.pt)"}
REQUIRED = {
    "step": ("model", "state_dict", "metrics", "config", "task_steps", "train_steps", "index", "identity"),
    "epoch": ("state_dict", "optimizer", "scaler", "epoch", "history", "config", "identity"),
}


def make_payload(kind: str, **fields) -> dict:
    """The payload of a checkpoint of ``kind``: exactly the fields :data:`REQUIRED` names (the schema
    :func:`load_checkpoint` checks when it reads one)."""
    if set(fields) != set(REQUIRED[kind]):
        raise TypeError(f"a {kind} checkpoint holds {sorted(REQUIRED[kind])}, got {sorted(fields)}")
    return {"kind": kind, **fields}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def save_checkpoint(payload: dict, path) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    header = f"format {CHECKPOINT_FORMAT} sha256 {hashlib.sha256(data).hexdigest()} bytes {len(data)}\n"
    write_atomic(path, [MAGIC, header, data])


def _read_header(path: Path, f) -> tuple[str, int]:
    """(SHA-256, payload length) from the header of the open file ``f``."""
    start = f.read(len(MAGIC))
    if not start:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if start != MAGIC:
        if start.startswith(_ZIP):
            raise CheckpointError(
                f"{path} is a PyTorch file without incseg_fast's checkpoint header: another "
                "program's file, or a checkpoint of incseg_fast 0.1 (format 1-2, which cannot be "
                "verified: train it again)"
            )
        raise CheckpointError(f"{path} is not an incseg_fast checkpoint (it does not start with the header)")
    line = f.readline(200)
    match = _HEADER.fullmatch(line)
    if match is None:
        raise CheckpointError(f"checkpoint {path} has a damaged header (truncated or corrupt)")
    if int(match.group(1)) != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {int(match.group(1))}; this incseg_fast reads format {CHECKPOINT_FORMAT}"
        )
    return match.group(2).decode(), int(match.group(3))


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, not a file") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error.strerror}") from None


def _verified_payload(path: Path) -> tuple[str, bytes]:
    """(SHA-256, payload bytes) of the checkpoint ``path``, the payload checked against its header."""
    with _open(path) as f:
        digest, length = _read_header(path, f)
        data = f.read(length + 1)
    if len(data) != length:
        problem = f"truncated ({len(data)} of {length} bytes)" if len(data) < length else "longer than its header says"
        raise CheckpointError(f"checkpoint {path} is {problem}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the SHA-256 in its header")
    return digest, data


def checkpoint_digest(path) -> str:
    """The SHA-256 of a checkpoint's payload, verified: the whole file is read (nothing unpickled)."""
    return _verified_payload(Path(path))[0]


def _describe(key: str, value) -> str:
    if key == "step":
        return f"step {value}"
    if key == "classes":
        return f"the classes {value}"
    return f"--{key.replace('_', '-')} {value}"


def check_identity(path, recorded: dict, expected: dict) -> None:
    """Refuse a checkpoint of another run or step: ``recorded`` (its ``identity``) must hold
    ``expected``'s value for each of its keys (method, step, classes, the options of the results)."""
    differ = [key for key in expected if recorded.get(key) != expected[key]]
    if differ:
        was = ", ".join(_describe(key, recorded.get(key)) for key in differ)
        now = ", ".join(_describe(key, expected[key]) for key in differ)
        raise CheckpointError(
            f"checkpoint {path} belongs to another run or step: it holds {was}, not {now} "
            "(move it away; a missing step is trained again)"
        )


def load_checkpoint(path, kind: str = "step", identity: dict | None = None) -> dict:
    """The verified payload of the checkpoint ``path`` of ``kind`` ("step" or "epoch"); with
    ``identity``, one of the run and step it describes (:func:`check_identity`)."""
    path = Path(path)
    data = _verified_payload(path)[1]
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses anything but tensors and plain data
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds more than tensors and plain data, "
            f"and loading it could run code ({first_line(error)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("kind") not in REQUIRED:
        raise CheckpointError(f"checkpoint {path} does not hold an incseg_fast step or epoch")
    if payload["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} is {KINDS[payload['kind']]}, not {KINDS[kind]}")
    missing = [key for key in REQUIRED[kind] if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    if identity is not None:
        check_identity(path, payload["identity"], identity)
    return payload
