"""``incseg-fast ablate``: CAF's Table III on any task.

The three contributions of CAF switched on and off independently: the fusion module (SAB: the
projection, the fusion of the old and new features and the structured attention), the attentive
distillation (AD, on z-bar and h) and the balanced knowledge distillation (BKD), plus the paper's
"+KD" row (MiB's unbiased distillation instead of BKD). Every row is a ``caf`` run with its switches
(``caf_module``, ``lambda_ad`` 0 when AD is off, ``kd``) in its own folder ``OUT/<row>/``; all rows
start from one step 0, trained once in ``OUT/step0/`` (no CAF module is part of a step 0). A rerun
resumes: finished rows are read back, an interrupted one continues (each row is a train run).

Writes ``OUT/results.json`` ({row: {"fusion", "ad", "kd", "miou_old", "miou_new", "miou_all"}}) and
``OUT/results.md`` (the table, after the task's last step).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .._atomic import refresh_file
from .config import TrainConfig
from .trainer import StepPlan, run


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # as in the paper's table
    folder: str
    fusion: bool  # the CAF module (projection, fusion, structured attention)
    ad: bool  # attentive distillation
    kd: str  # logit distillation: "none", "unbiased" (KD) or "balanced" (BKD)


# CAF Table III, in its order: the 8 combinations of the three switches and the "+KD" row
ROWS = (
    Row("baseline", "baseline", False, False, "none"),
    Row("+KD", "kd", False, False, "unbiased"),
    Row("+BKD", "bkd", False, False, "balanced"),
    Row("+AD", "ad", False, True, "none"),
    Row("+AD, BKD", "ad-bkd", False, True, "balanced"),
    Row("+CAF", "caf", True, False, "none"),
    Row("+CAF, BKD", "caf-bkd", True, False, "balanced"),
    Row("+CAF, AD", "caf-ad", True, True, "none"),
    Row("+CAF, AD, BKD", "caf-ad-bkd", True, True, "balanced"),
)
SHARED_STEP0 = "step0"


def row_config(base: TrainConfig, row: Row, step0: Path) -> TrainConfig:
    """The ``caf`` configuration of one row: ``base`` (resolved, method caf) with the row's switches.
    A row without logit distillation takes the neutral lambda_kd and alpha (they do not apply to it)."""
    distils = row.kd != "none"
    return dataclasses.replace(
        base,
        out=str(Path(base.out) / row.folder),
        caf_module=row.fusion,
        lambda_ad=base.lambda_ad if row.ad else 0.0,
        kd=row.kd,
        lambda_kd=base.lambda_kd if distils else None,
        alpha=base.alpha if distils else TrainConfig.alpha,
        step0_checkpoint=str(step0),
    ).resolved()


def run_ablation(cfg: TrainConfig, *, overwrite: bool = False) -> dict:
    """Train every row of Table III with ``cfg`` (method caf) and write the table; returns
    {"results": ..., "table": markdown}."""
    base = dataclasses.replace(cfg, method="caf").resolved()
    if base.step0_checkpoint is None:
        # the shared step 0: a plain network trained with cross-entropy, like every method's
        shared = dataclasses.replace(
            base,
            method="ft",
            out=str(Path(base.out) / SHARED_STEP0),
            lambda_ad=None,
            lambda_kd=None,
            kd=None,
            caf_module=None,
            alpha=TrainConfig.alpha,
        )
        run(shared, [0], overwrite=overwrite)
        step0 = Path(shared.out) / "ft" / "step0.pt"
    else:
        step0 = Path(base.step0_checkpoint)
    results = {}
    for row in ROWS:
        entries = run(row_config(base, row, step0), overwrite=overwrite)
        last = entries[-1]
        results[row.name] = {
            "fusion": row.fusion,
            "ad": row.ad,
            "kd": row.kd,
            **{k: last[k] for k in ("miou_old", "miou_new", "miou_all")},
        }
    table = ablation_table(results, StepPlan(base, 0).task_steps)
    out = Path(base.out)
    refresh_file(out / "results.json", json.dumps(results, indent=1))
    refresh_file(out / "results.md", table)
    return {"results": results, "table": table}


def ablation_table(results: dict, task_steps) -> str:
    first, rest = task_steps[0], [c for s in task_steps[1:] for c in s]
    lines = [
        f"| row | CAF module | AD | logit distillation | old (0-{max(first)}) | new ({min(rest)}-{max(rest)}) | all |",
        "|---|---|---|---|---|---|---|",
    ]
    marks = {True: "yes", False: "-"}
    names = {"none": "-", "unbiased": "KD", "balanced": "BKD"}
    for name, r in results.items():
        values = " | ".join("-" if r[k] is None else f"{r[k]:.1f}" for k in ("miou_old", "miou_new", "miou_all"))
        lines.append(f"| {name} | {marks[r['fusion']]} | {marks[r['ad']]} | {names[r['kd']]} | {values} |")
    return "\n".join(lines) + "\n"
