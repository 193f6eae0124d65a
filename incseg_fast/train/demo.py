"""``incseg-fast demo``: the synthetic 15-5 disjoint task on CPU, fine-tuning vs MiB (vs CAF) vs joint.

Fine-tuning learns the new classes from images where the old ones are labelled background,
and forgets them; MiB's unbiased losses and balanced initialisation keep them. Step 0 is
identical for every method (plain cross-entropy, same seed, the same network: CAF's modules join
at step 1), so it is trained once by ``ft`` and reused (``--step0-checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from .._atomic import write_atomic
from ..data import get_task
from .config import METHODS, TrainConfig
from .pictures import PICTURE_IMAGES
from .results import final_checkpoints, write_reports
from .trainer import StepPlan, run, write_predictions

# Tuned so that the full demo runs in about 4 minutes on the shared 2-core development machine
# and mib keeps far more of the old classes than ft (measured figures: docs/TRAINER.md).
# Step 1 uses LR 0.05: at 0.01 no method learned the new classes well (ft new mIoU 12; at 0.05, 55).
FULL = dict(
    image_size=48,
    train_images=800,
    val_images=200,
    epochs=12,
    epochs_incremental=8,
    batch_size=8,
    lr=0.1,
    lr_incremental=0.05,
    output_stride=4,
)
# bumped when the models, the demo or the files change, so that an old runs/demo is not resumed
# (4: CAF's structured attention has sigmoid gates; the quick demo's settings; 5: checkpoint
# format 3 and options.json; 6: caf shares step 0, its modules join at step 1; 7: checkpoint
# format 4, which records the run identity)
DEMO_VERSION = 7
# The same at small scale, in about a minute of one core: mib keeps the old classes that ft
# forgets and both learn the new ones. Step 0 needs several hundred iterations before it learns
# more than the background (at the old 32x32, 160 scenes, 2 + 2 epochs every method ended at the
# background-only 5.7 old / 0.0 new mIoU): 600 iterations of batch 4 at 40x40.
QUICK = dict(
    image_size=40,
    train_images=400,
    val_images=200,
    epochs=10,
    epochs_incremental=5,
    batch_size=4,
    lr=0.1,
    lr_incremental=0.05,
    output_stride=4,
)


def _settings_match(out: Path, settings: dict) -> bool:
    path = out / "demo_settings.json"
    return path.exists() and json.loads(path.read_text()) == settings


def run_demo(
    out="runs/demo",
    *,
    quick=False,
    seed=0,
    methods=("ft", "mib", "caf"),
    loss_backend="auto",
    progress=True,
    threads=1,
    task="15-5",
) -> dict:
    """Train the demo's methods (an unchanged, interrupted demo resumes) and print the table.

    ``task``: a task of the synthetic data (VOC's: 15-5, 15-1 = five steps of one class, 19-1, 10-1).

    ``threads``: torch's intra-op threads. One is the default because these convolutions are
    small and on a busy machine several OpenMP threads wait on each other (measured: 2 threads
    ran 20-200x slower than 1 while other jobs shared the 2 cores).
    Returns ``write_reports``' dict (``results`` is what ``results.json`` holds).
    """
    torch.set_num_threads(threads)
    methods = ["ft"] + [m for m in methods if m not in ("ft", "joint")]  # ft: the baseline and the shared step 0
    unknown = set(methods) - {"ft", "lwf", "ilt", "mib", "caf"}
    if unknown:
        raise ValueError(f"methods must be incremental methods (ft, lwf, ilt, mib, caf), got {sorted(unknown)}")
    out = Path(out)
    get_task("synthetic", task)  # an unknown task stops here, before anything is removed
    settings = {
        "version": DEMO_VERSION,
        "task": task,
        **(QUICK if quick else FULL),
        "seed": seed,
        "methods": methods,
        "loss_backend": loss_backend,
    }
    if not _settings_match(out, settings):
        # results of other settings would be mixed into the tables: start this folder over
        # (every method's folder: one left by a demo with other --methods would be kept otherwise)
        for name in [*METHODS, "cache"]:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("results.json", "results.csv", "results.md", "miou.png", "options.json"):
            (out / name).unlink(missing_ok=True)
        for picture in out.glob("predictions_step*.png"):
            picture.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "demo_settings.json", json.dumps(settings, indent=1))

    base = TrainConfig(
        dataset="synthetic",
        task=task,
        mode="disjoint",
        out=str(out),
        backbone="tiny",
        seed=seed,
        data_seed=seed,
        device="cpu",
        amp="none",
        loss_backend=loss_backend,
        progress=progress,
        **{k: settings[k] for k in FULL},
    )
    start = time.perf_counter()
    timings = {}
    shared_step0 = out / "ft" / "step0.pt"
    # joint, the offline upper bound, needs more than the quick budget: with 6 epochs at the quick
    # settings it learnt no new class (new mIoU 0.0, below mib's 22.8) and bounded nothing, and
    # with step 0's 10 it would add half again to the quick demo's time
    for method in methods + ([] if quick else ["joint"]):
        t0 = time.perf_counter()
        cfg = dataclasses.replace(base, method=method)
        if method == "joint":  # one step: the incremental steps' settings do not apply
            cfg.lr_incremental = cfg.epochs_incremental = None
        if method in ("lwf", "ilt", "mib", "caf"):
            cfg.step0_checkpoint = str(shared_step0)
        run(cfg)
        timings[method] = time.perf_counter() - t0
    total = time.perf_counter() - start

    task_steps = StepPlan(base.resolved(), 0).task_steps
    report = write_reports(out, task_steps)
    pictures, picture_message = _draw_predictions(base.resolved(), out, len(task_steps))
    print()
    print(f"synthetic {task} disjoint, {'quick' if quick else 'full'} demo, mIoU (%) after the last step:")
    print(report["table"])
    final = {m: entries[-1] for m, entries in report["results"].items()}
    if (
        "ft" in final
        and "mib" in final
        and final["ft"]["miou_old"] is not None
        and final["mib"]["miou_old"] is not None
    ):
        gap = final["mib"]["miou_old"] - final["ft"]["miou_old"]
        print(
            f"old classes: mib {final['mib']['miou_old']:.1f} vs ft {final['ft']['miou_old']:.1f} ({gap:+.1f} points)"
        )
    print("time: " + ", ".join(f"{m} {t:.0f}s" for m, t in timings.items()) + f"; total {total:.0f}s")
    if quick:
        print("joint (the offline upper bound) runs in the full demo only")
    if report["plot_message"]:
        print(report["plot_message"])
    if picture_message:
        print(picture_message)
    else:
        where = pictures[-1].resolve()
        print(f"predictions of each method on {PICTURE_IMAGES} validation images: {where} (one per step)")
    print(
        f"files in {out.resolve()}: results.json, results.csv, results.md"
        + ("" if report["plot_message"] else ", miou.png")
        + ", <method>/metrics.json, <method>/step<k>.pt"
    )
    return report


def _draw_predictions(cfg: TrainConfig, out: Path, steps: int) -> tuple[list[Path], str | None]:
    """``out/predictions_stepK.png`` for every step: one column per method with a checkpoint of that
    step (joint at the last step). Returns (the pictures, None) or ([], why none was drawn)."""
    pictures = []
    for step in range(steps):
        columns = {}
        for method in METHODS:
            checkpoint = final_checkpoints(out / method).get(step)
            if checkpoint is not None:
                columns[method] = checkpoint
        path = out / f"predictions_step{step}.png"
        message = write_predictions(cfg, step, columns, path)
        if message:
            return [], message
        pictures.append(path)
    return pictures, None
