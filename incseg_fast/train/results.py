"""Reports written after every step: JSON, CSV, a markdown table like the papers', a PNG plot.

Layout of an output folder::

    OUT/<method>/step<k>.pt         final checkpoint of step k (model + its metrics)
    OUT/<method>/metrics.json       per step: per-class IoU, mIoU old/new/all, mPA, mCA
    OUT/results.json                {method: [{"step", "miou_old", "miou_new", "miou_all"}, ...]}
    OUT/results.csv, OUT/results.md, OUT/miou.png
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

SUMMARY_KEYS = ("miou_old", "miou_new", "miou_all")
METHOD_ORDER = ("ft", "lwf", "ilt", "mib", "caf", "joint")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_step(method_dir: Path, entry: dict) -> None:
    """Add (or replace) one step's metrics in ``method_dir/metrics.json``."""
    path = method_dir / "metrics.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    entries = [e for e in entries if e["step"] != entry["step"]] + [entry]
    entries.sort(key=lambda e: e["step"])
    atomic_write_text(path, json.dumps(entries, indent=1))


def _sorted_methods(names):
    return sorted(names, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def collect(out: Path) -> dict[str, list[dict]]:
    """Every method's per-step metrics found under ``out``."""
    found = {}
    for path in sorted(Path(out).glob("*/metrics.json")):
        found[path.parent.name] = json.loads(path.read_text())
    return {m: found[m] for m in _sorted_methods(found)}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown_table(metrics: dict[str, list[dict]], task_steps: list[list[int]] | None = None) -> str:
    """Rows = methods, columns = old / new / all mIoU after each method's last step (as in MiB's and
    CAF's tables: e.g. ``1-15 | 16-20 | all`` for 15-5)."""
    old_label, new_label = "old", "new"
    if task_steps is not None and len(task_steps) > 1:
        first, rest = task_steps[0], [c for s in task_steps[1:] for c in s]
        old_label = f"old (0-{max(first)})"
        new_label = f"new ({min(rest)}-{max(rest)})"
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
        return "matplotlib is not installed: skipped the plot (pip install matplotlib)"
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
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def write_reports(out: Path, task_steps: list[list[int]] | None = None) -> dict:
    """Rewrite results.json / .csv / .md and miou.png from every ``*/metrics.json`` under ``out``.

    Returns ``{"results": ..., "table": markdown, "plot_message": None or why it was skipped}``.
    """
    out = Path(out)
    metrics = collect(out)
    summary = {m: [{"step": e["step"], **{k: e[k] for k in SUMMARY_KEYS}} for e in entries]
               for m, entries in metrics.items()}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))

    num_classes = max((len(e["iou"]) for entries in metrics.values() for e in entries), default=0)
    rows = [["method", "step", "miou_old", "miou_new", "miou_all", "mpa", "mca"]
            + [f"iou_{c}" for c in range(num_classes)]]
    for method, entries in metrics.items():
        for e in entries:
            values = [e[k] for k in ("miou_old", "miou_new", "miou_all", "mpa", "mca")] + list(e["iou"])
            values += [None] * (num_classes - len(e["iou"]))
            rows.append([method, e["step"]] + ["" if v is None else f"{v:.4f}" for v in values])
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    os.replace(tmp, out / "results.csv")

    table = markdown_table(metrics, task_steps)
    atomic_write_text(out / "results.md", table)
    message = plot(metrics, out / "miou.png") if metrics else None
    return {"results": summary, "table": table, "plot_message": message}
