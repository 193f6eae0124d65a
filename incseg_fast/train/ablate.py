"""``incseg-fast ablate``: a method's parts switched on and off, one table.

``--method caf`` (the default) is CAF's Table III: the fusion module (SAB: the projection, the
fusion of the old and new features and the structured attention), the attentive distillation (AD,
on z-bar and h) and the balanced knowledge distillation (BKD), plus the paper's "+KD" row (MiB's
unbiased distillation instead of BKD). ``--method plop``: PLOP's Local POD (on the stages and the
logits) and its entropy pseudo-labels. Every row is a run of the method with its switches in its
own folder ``OUT/<row>/``; all rows start from one step 0, trained once in ``OUT/step0/`` (step 0
is plain cross-entropy for every method). A rerun resumes: finished rows are read back, an
interrupted one continues (each row is a train run).

Writes ``OUT/results.json`` ({row: {<switches>, "miou_old", "miou_new", "miou_all"}}) and
``OUT/results.md`` (the table, after the task's last step).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from .._atomic import refresh_file
from .config import TrainConfig, option_default
from .methods import METHODS
from .trainer import StepPlan, run


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # as in the paper's table
    folder: str
    switches: dict  # the ablation's switches (its columns) and their values in this row


@dataclasses.dataclass(frozen=True)
class Ablation:
    columns: dict  # switch -> column title
    rows: tuple
    options: Callable  # (base config, a row's switches) -> the options that set them


def _caf_options(base: TrainConfig, switches: dict) -> dict:
    """A row without logit distillation takes the neutral lambda_kd and alpha (they do not apply to it)."""
    distils = switches["kd"] != "none"
    return {
        "caf_module": switches["fusion"],
        "lambda_ad": base.lambda_ad if switches["ad"] else 0.0,
        "kd": switches["kd"],
        "lambda_kd": base.lambda_kd if distils else None,
        "alpha": base.alpha if distils else TrainConfig.alpha,
    }


def _plop_options(base: TrainConfig, switches: dict) -> dict:
    pod = switches["pod"]
    return {
        "lambda_pod": base.lambda_pod if pod else 0.0,
        "lambda_pod_logits": base.lambda_pod_logits if pod else 0.0,
        "pseudo_labels": switches["pseudo"],
    }


def _caf_row(name, folder, fusion, ad, kd):
    return Row(name, folder, {"fusion": fusion, "ad": ad, "kd": kd})


def _plop_row(name, folder, pod, pseudo):
    return Row(name, folder, {"pod": pod, "pseudo": pseudo})


ABLATIONS = {
    # CAF Table III, in its order: the 8 combinations of the three switches and the "+KD" row
    "caf": Ablation(
        columns={"fusion": "CAF module", "ad": "AD", "kd": "logit distillation"},
        rows=(
            _caf_row("baseline", "baseline", False, False, "none"),
            _caf_row("+KD", "kd", False, False, "unbiased"),
            _caf_row("+BKD", "bkd", False, False, "balanced"),
            _caf_row("+AD", "ad", False, True, "none"),
            _caf_row("+AD, BKD", "ad-bkd", False, True, "balanced"),
            _caf_row("+CAF", "caf", True, False, "none"),
            _caf_row("+CAF, BKD", "caf-bkd", True, False, "balanced"),
            _caf_row("+CAF, AD", "caf-ad", True, True, "none"),
            _caf_row("+CAF, AD, BKD", "caf-ad-bkd", True, True, "balanced"),
        ),
        options=_caf_options,
    ),
    # PLOP's two parts, each on and off
    "plop": Ablation(
        columns={"pod": "Local POD", "pseudo": "pseudo-labels"},
        rows=(
            _plop_row("baseline", "baseline", False, False),
            _plop_row("+POD", "pod", True, False),
            _plop_row("+pseudo-labels", "pseudo", False, True),
            _plop_row("+POD, pseudo-labels", "pod-pseudo", True, True),
        ),
        options=_plop_options,
    ),
}
SHARED_STEP0 = "step0"


def row_config(base: TrainConfig, row: Row, step0: Path) -> TrainConfig:
    """The configuration of one row: ``base`` (resolved) with the row's switches."""
    options = ABLATIONS[base.method].options(base, row.switches)
    return dataclasses.replace(
        base, out=str(Path(base.out) / row.folder), step0_checkpoint=str(step0), **options
    ).resolved()


def _train_shared_step0(base: TrainConfig, overwrite: bool) -> Path:
    """The shared step 0: a plain network trained with cross-entropy, like every method's."""
    method_options = ("lambda_kd", "alpha", *(name for m in METHODS.values() for name in m.own_options))
    shared = dataclasses.replace(
        base,
        method="ft",
        out=str(Path(base.out) / SHARED_STEP0),
        **{name: option_default(name) for name in method_options},
    )
    run(shared, [0], overwrite=overwrite)
    return Path(shared.out) / "ft" / "step0.pt"


def run_ablation(cfg: TrainConfig, *, overwrite: bool = False) -> dict:
    """Train every row of ``cfg.method``'s ablation and write the table; returns
    {"results": ..., "table": markdown}."""
    if cfg.method not in ABLATIONS:
        raise ValueError(f"--method must be one of {list(ABLATIONS)} for ablate, got {cfg.method!r}")
    base = cfg.resolved()
    ablation = ABLATIONS[base.method]
    step0 = Path(base.step0_checkpoint) if base.step0_checkpoint else _train_shared_step0(base, overwrite)
    results = {}
    for row in ablation.rows:
        last = run(row_config(base, row, step0), overwrite=overwrite)[-1]
        results[row.name] = {**row.switches, **{k: last[k] for k in ("miou_old", "miou_new", "miou_all")}}
    table = ablation_table(results, StepPlan(base, 0).task_steps, ablation.columns)
    out = Path(base.out)
    refresh_file(out / "results.json", json.dumps(results, indent=1))
    refresh_file(out / "results.md", table)
    return {"results": results, "table": table}


def _mark(value) -> str:
    names = {True: "yes", False: "-", "none": "-", "unbiased": "KD", "balanced": "BKD"}
    return names[value]


def ablation_table(results: dict, task_steps, columns: dict) -> str:
    first, rest = task_steps[0], [c for s in task_steps[1:] for c in s]
    titles = " | ".join(columns.values())
    lines = [
        f"| row | {titles} | old (0-{max(first)}) | new ({min(rest)}-{max(rest)}) | all |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for name, r in results.items():
        marks = " | ".join(_mark(r[key]) for key in columns)
        values = " | ".join("-" if r[k] is None else f"{r[k]:.1f}" for k in ("miou_old", "miou_new", "miou_all"))
        lines.append(f"| {name} | {marks} | {values} |")
    return "\n".join(lines) + "\n"
