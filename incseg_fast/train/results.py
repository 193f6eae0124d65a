"""Reports rebuilt from the checkpoints on disk: JSON, CSV, a markdown table like the papers', a PNG plot.

Layout of an output folder::

    OUT/<method>/step<k>.pt         final checkpoint of step k (model + its metrics): the commit of the step
    OUT/<method>/metrics.json       per step: per-class IoU, mIoU old/new/all, mPA, mCA (a copy of the
                                    checkpoints' metrics, brought up to date by sync_metrics)
    OUT/results.json                {method: [{"step", "miou_old", "miou_new", "miou_all"}, ...]}
    OUT/results.csv, OUT/results.md, OUT/miou.png
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from .._atomic import refresh_file
from .checkpoint import check_identity, checkpoint_digest, load_checkpoint
from .methods import METHODS
from .rundir import read_recorded_options

SUMMARY_KEYS = ("miou_old", "miou_new", "miou_all")
_FINAL_CHECKPOINT = re.compile(r"step(\d+)\.pt")
PLOT_SKIPPED = "matplotlib is not installed: skipped the plot (pip install matplotlib)"


def final_checkpoints(method_dir: Path) -> dict[int, Path]:
    """{step: path} of the final checkpoints in ``method_dir``."""
    found = {}
    for path in Path(method_dir).glob("step*.pt"):
        match = _FINAL_CHECKPOINT.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _read_entries(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: it is rebuilt from the checkpoints
        return []


def sync_metrics(method_dir: Path) -> list[dict]:
    """Bring ``method_dir/metrics.json`` up to date with the final checkpoints, and return its entries.

    A step's checkpoint holds its metrics, so a run killed between writing the checkpoint and
    this file loses nothing: an entry that is missing, or that came from another file than the
    checkpoint now on disk (``checkpoint_sha256``), is read from the checkpoint again. Only the
    checkpoints on disk are reported, each verified (its payload against its SHA-256, its
    identity against the method, the step of its name and the options recorded in the folder).
    """
    method_dir = Path(method_dir)
    path = method_dir / "metrics.json"
    cached = {e["step"]: e for e in _read_entries(path) if "identity" in e}
    options = read_recorded_options(method_dir)
    entries = []
    for step, checkpoint in final_checkpoints(method_dir).items():
        digest = checkpoint_digest(checkpoint)
        entry = cached.get(step)
        if entry is None or entry.get("checkpoint_sha256") != digest:
            payload = load_checkpoint(checkpoint)
            entry = {**payload["metrics"], "identity": payload["identity"], "checkpoint_sha256": digest}
        check_identity(checkpoint, entry["identity"], {"method": method_dir.name, "step": step, **options})
        entries.append(entry)
    refresh_file(path, json.dumps(entries, indent=1))
    return entries


def _sorted_methods(names):
    order = list(METHODS)  # the registry's order
    return sorted(names, key=lambda m: (order.index(m) if m in order else len(order), m))


def collect(out: Path) -> dict[str, list[dict]]:
    """Every method's per-step metrics found under ``out`` (synced with its checkpoints)."""
    found = {}
    for folder in sorted(p for p in Path(out).iterdir() if p.is_dir()):
        if final_checkpoints(folder) or (folder / "metrics.json").exists():
            found[folder.name] = sync_metrics(folder)
    return {m: found[m] for m in _sorted_methods(found) if found[m]}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def old_new_labels(task_steps: list[list[int]] | None) -> tuple[str, str]:
    """The headers of the old and new classes' columns: ``old (0-15)``, ``new (16-20)`` for 15-5."""
    if task_steps is None or len(task_steps) < 2:
        return "old", "new"
    first, rest = task_steps[0], [c for s in task_steps[1:] for c in s]
    return f"old (0-{max(first)})", f"new ({min(rest)}-{max(rest)})"


def markdown_table(metrics: dict[str, list[dict]], task_steps: list[list[int]] | None = None) -> str:
    """Rows = methods, columns = old / new / all mIoU after each method's last step (as in MiB's and
    CAF's tables: e.g. ``1-15 | 16-20 | all`` for 15-5)."""
    old_label, new_label = old_new_labels(task_steps)
    lines = [f"| method | step | {old_label} | {new_label} | all |", "|---|---|---|---|---|"]
    for method, entries in metrics.items():
        last = entries[-1]
        lines.append(f"| {method} | {last['step']} | " + " | ".join(_fmt(last[k]) for k in SUMMARY_KEYS) + " |")
    return "\n".join(lines) + "\n"


def plot(metrics: dict[str, list[dict]], path: Path) -> str | None:
    """mIoU (all classes) across steps per method; returns a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PLOT_SKIPPED
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, entries in metrics.items():
        steps = [e["step"] for e in entries]
        values = [e["miou_all"] for e in entries]
        ax.plot(steps, values, marker="o", label=method)
    ax.set_xticks(sorted({e["step"] for entries in metrics.values() for e in entries}))
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU, all seen classes (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    refresh_file(path, image.getvalue())
    return None


def write_reports(out: Path, task_steps: list[list[int]] | None = None) -> dict:
    """Rewrite results.json / .csv / .md and miou.png from every method folder under ``out``.

    Returns ``{"results": ..., "table": markdown, "plot_message": None or why it was skipped}``.
    """
    out = Path(out)
    metrics = collect(out)
    summary = {
        m: [{"step": e["step"], **{k: e[k] for k in SUMMARY_KEYS}} for e in entries] for m, entries in metrics.items()
    }
    refresh_file(out / "results.json", json.dumps(summary, indent=1))

    num_classes = max((len(e["iou"]) for entries in metrics.values() for e in entries), default=0)
    rows = [
        ["method", "step", "miou_old", "miou_new", "miou_all", "mpa", "mca"] + [f"iou_{c}" for c in range(num_classes)]
    ]
    for method, entries in metrics.items():
        for e in entries:
            values = [e[k] for k in ("miou_old", "miou_new", "miou_all", "mpa", "mca")] + list(e["iou"])
            values += [None] * (num_classes - len(e["iou"]))
            rows.append([method, e["step"]] + ["" if v is None else f"{v:.4f}" for v in values])
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    refresh_file(out / "results.csv", text.getvalue())

    table = markdown_table(metrics, task_steps)
    refresh_file(out / "results.md", table)
    message = plot(metrics, out / "miou.png") if metrics else None
    return {"results": summary, "table": table, "plot_message": message}
