"""A run directory that knows its options: a rerun either continues the same experiment or stops.

``OUT/options.json`` holds the options every method in ``OUT`` shares (the data and the task,
which make the methods' results one table); ``OUT/<method>/options.json`` those of one method.
A rerun whose options differ from those of the results already in ``OUT`` stops with a
:class:`RunOptionsError` naming the option, unless ``overwrite`` discards those results.

Not recorded, free to change between runs: ``root`` (the data may move), ``out``, ``device``,
``loss_backend`` and ``materialise_upsampled_logits`` (the same math; results differ by rounding),
the number of processes under torchrun (the same up to rounding with synchronised batch norm),
``sync_bn`` (it matters only with several processes), ``dist_timeout_s``, ``workers``, ``progress``
and the CPU threads. An interrupted step resumes bit-identically only with the same values of these too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .._atomic import remove_stale_temporaries, write_atomic
from .config import TrainConfig
from .methods import METHODS

OPTIONS_FILE = "options.json"
TASK_OPTIONS = ("dataset", "task", "mode", "image_size", "train_images", "val_images", "data_seed", "eval_protocol")
METHOD_OPTIONS = (
    "backbone",
    "output_stride",
    "pretrained",
    "step0_checkpoint",
    "lr",
    "lr_incremental",
    "epochs",
    "epochs_incremental",
    "batch_size",
    "momentum",
    "weight_decay",
    "lambda_kd",
    "alpha",
    "seed",
    "amp",
)  # and the method's own options (methods.py)
REPORTS = ("results.json", "results.csv", "results.md", "miou.png")


class RunOptionsError(ValueError):
    """The output folder holds results of other options."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _holds_results(method_dir: Path) -> bool:
    return any(method_dir.glob("step*.pt")) or (method_dir / "metrics.json").exists()


def _read_options(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _conflict(folder: Path, stored: dict | None, wanted: dict) -> str | None:
    """Why the results in ``folder`` (trained with ``stored``) cannot be continued with ``wanted``."""
    if stored is None:
        return (
            f"{folder} holds results without a record of their options (from incseg_fast 0.1, or an "
            "interrupted --overwrite)"
        )
    differ = [k for k in wanted if stored.get(k) != wanted[k]]
    if not differ:
        return None
    was = ", ".join(f"{_flag(k)} {stored.get(k)}" for k in differ)
    now = ", ".join(f"{_flag(k)} {wanted[k]}" for k in differ)
    return f"{folder} holds results of {was}, not {now}"


def _settlement(options_path: Path, wanted: dict, results: list[Path], overwrite: bool) -> str | None:
    """Why ``results`` (existing paths) in the folder of ``options_path`` must be removed before
    ``wanted`` is recorded there (with ``overwrite``), or None; without ``overwrite`` a conflict stops."""
    stored = _read_options(options_path)
    conflict = _conflict(options_path.parent, stored, wanted) if results and stored != wanted else None
    if conflict and not overwrite:
        raise RunOptionsError(
            f"{conflict}: rerun with the same options, use a new --out, or pass --overwrite to discard them"
        )
    return conflict


def _record(options_path: Path, wanted: dict, conflict: str | None, removed=()) -> None:
    """Record ``wanted`` in ``options_path``, after removing the paths ``removed`` when there is a ``conflict``."""
    if _read_options(options_path) == wanted:
        return
    if conflict:
        print(f"--overwrite: {conflict}; removing them")
        options_path.unlink(missing_ok=True)  # first: a kill below leaves results without options, never mixed
        for path in removed:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    options_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(options_path, json.dumps(wanted, indent=1))


def recorded_options(cfg: TrainConfig, precision: str) -> dict:
    """The options ``cfg.out`` records (those that change results), ``amp`` as ``precision``."""
    names = TASK_OPTIONS + METHOD_OPTIONS + tuple(METHODS[cfg.method].own_options)
    return {**{k: getattr(cfg, k) for k in names}, "amp": precision}


def read_recorded_options(method_dir: Path) -> dict:
    """The options recorded for the results in ``method_dir`` (and its output folder), as far as
    their files can be read."""
    return {
        **(_read_options(method_dir.parent / OPTIONS_FILE) or {}),
        **(_read_options(method_dir / OPTIONS_FILE) or {}),
    }


def _refuse_symbolic_links(folders) -> None:
    for folder in folders:
        if folder.is_symlink():
            raise RunOptionsError(
                f"{folder} is a symbolic link: the trainer writes and removes its method folders itself; "
                "make it a folder (or point --out at a folder of real folders)"
            )


def prepare_run_directory(cfg: TrainConfig, precision: str, *, overwrite: bool = False) -> Path:
    """Check (or record) the options of ``cfg.out`` and its method folder, remove what a kill left
    behind there (temporary files), and return the method folder.

    ``precision``: the autocast dtype ``cfg.amp`` resolves to on this device ("none", "bf16",
    "fp16"), recorded as ``amp`` so that "auto" on another kind of device is seen to differ.
    Everything is checked before anything is removed.
    """
    out = Path(cfg.out)
    method_dir = out / cfg.method
    options = recorded_options(cfg, precision)
    _refuse_symbolic_links([out / m for m in METHODS])
    method_dirs = [out / m for m in METHODS if _holds_results(out / m)]
    shared = {k: options[k] for k in TASK_OPTIONS}
    own = {k: options[k] for k in METHOD_OPTIONS}
    shared_conflict = _settlement(out / OPTIONS_FILE, shared, method_dirs, overwrite)
    # the method's own results are checked too, unless the shared conflict removes them
    own_results = [method_dir] if _holds_results(method_dir) and not shared_conflict else []
    own_conflict = _settlement(method_dir / OPTIONS_FILE, own, own_results, overwrite)
    _record(out / OPTIONS_FILE, shared, shared_conflict, removed=method_dirs + [out / r for r in REPORTS])
    _record(method_dir / OPTIONS_FILE, own, own_conflict, removed=[method_dir])
    for folder in (out, method_dir, out / "cache"):
        remove_stale_temporaries(folder)
    return method_dir
