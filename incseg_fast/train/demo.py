"""``incseg-fast demo``: the synthetic 15-5 disjoint task on CPU, fine-tuning vs MiB, CAF, PLOP, SSUL, DKD, joint.

Fine-tuning learns the new classes from images where the old ones are labelled background,
and forgets them; MiB's unbiased losses and balanced initialisation keep them. Step 0 is
identical for every softmax method (plain cross-entropy, same seed, the same network: CAF's modules
join at step 1), so it is trained once by ``ft`` and reused (``--step0-checkpoint``); the sigmoid
methods (ssul, dkd) train their own step 0 (their own head and loss). Every task (``--task 15-1``
too) runs the same methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from .._atomic import write_atomic
from .._environment import machine
from ..data import get_task
from .config import TrainConfig
from .methods import METHODS, incremental_methods
from .pictures import PICTURE_IMAGES
from .results import SUMMARY_KEYS, final_checkpoints, old_new_labels, write_reports
from .startup import start_line
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


DEFAULT_METHODS = ("ft", "mib", "caf", "plop", "ssul", "dkd")


def default_out(quick: bool, task: str, seeds: bool = False) -> str:
    """Each variant its own folder, so that running one never replaces another's results:
    runs/demo, runs/demo-quick, runs/demo-15-1, runs/demo-quick-15-1 (with --seeds: ...-seeds)."""
    return "runs/demo" + "-quick" * quick + (f"-{task}" if task != "15-5" else "") + "-seeds" * seeds


def demo_methods(methods) -> list[str]:
    """ft first (the baseline and the shared step 0), joint left out (the full demo adds it)."""
    methods = ["ft"] + [m for m in methods if m not in ("ft", "joint")]
    incremental = incremental_methods()
    unknown = set(methods) - set(incremental)
    if unknown:
        raise ValueError(f"methods must be incremental methods ({', '.join(incremental)}), got {sorted(unknown)}")
    return methods


def demo_settings(*, quick, seed, methods, loss_backend, task) -> dict:
    """What a demo's results depend on (demo_settings.json): an unchanged demo resumes."""
    return {
        "version": DEMO_VERSION,
        "task": task,
        **(QUICK if quick else FULL),
        "seed": seed,
        "methods": demo_methods(methods),
        "loss_backend": loss_backend,
    }


def _has_results(out: Path) -> bool:
    return (out / "results.json").exists() or any(final_checkpoints(out / m) for m in METHODS if (out / m).is_dir())


def _prepare_folder(out: Path, settings: dict, overwrite: bool) -> None:
    """Resume a demo of the same settings; start the folder over for other settings, which replaces
    results only with ``overwrite`` (else one line saying what differs)."""
    path = out / "demo_settings.json"
    previous = json.loads(path.read_text()) if path.exists() else None
    if previous == settings:
        return
    if _has_results(out) and not overwrite:
        differs = (
            ", ".join(sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k)))
            if previous is not None
            else "not a demo's"
        )
        raise ValueError(
            f"{out} holds results of other settings ({differs}): pass --overwrite to replace them, "
            "or --out another folder"
        )
    # every method's folder: one left by a demo with other --methods would be kept otherwise
    for name in [*METHODS, "cache"]:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("results.json", "results.csv", "results.md", "miou.png", "options.json"):
        (out / name).unlink(missing_ok=True)
    for picture in out.glob("predictions_step*.png"):
        picture.unlink()


def run_demo(
    out=None,
    *,
    quick=False,
    seed=0,
    methods=DEFAULT_METHODS,
    loss_backend="auto",
    progress=True,
    threads=1,
    task="15-5",
    overwrite=False,
) -> dict:
    """Train the demo's methods (an unchanged, interrupted demo resumes) and print the table.

    ``out``: default :func:`default_out`. ``task``: a task of the synthetic data (VOC's: 15-5,
    15-1 = five steps of one class, 19-1, 10-1). ``overwrite``: replace results of other settings.

    ``threads``: torch's intra-op threads. One is the default because these convolutions are
    small and on a busy machine several OpenMP threads wait on each other (measured: 2 threads
    ran 20-200x slower than 1 while other jobs shared the 2 cores).
    Returns ``write_reports``' dict (``results`` is what ``results.json`` holds).
    """
    torch.set_num_threads(threads)
    settings = demo_settings(quick=quick, seed=seed, methods=methods, loss_backend=loss_backend, task=task)
    methods = settings["methods"]
    out = Path(default_out(quick, task) if out is None else out)
    get_task("synthetic", task)  # an unknown task stops here, before anything is removed
    _prepare_folder(out, settings, overwrite)
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
    # joint, the offline upper bound, needs more than the quick budget: with 6 epochs at the quick
    # settings it learnt no new class (new mIoU 0.0, below mib's 22.8) and bounded nothing, and
    # with step 0's 10 it would add half again to the quick demo's time
    configs = [_method_config(base, method, out) for method in methods + ([] if quick else ["joint"])]
    print(start_line(configs))
    for cfg in configs:
        t0 = time.perf_counter()
        run(cfg)
        timings[cfg.method] = time.perf_counter() - t0
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


def _shares_ft_step0(method: str) -> bool:
    """The incremental softmax methods start from ft's step 0; the sigmoid ones train their own."""
    return METHODS[method].incremental and METHODS[method].output == "softmax"


def _method_config(base: TrainConfig, method: str, out: Path) -> TrainConfig:
    cfg = dataclasses.replace(base, method=method)
    if method == "joint":  # one step: the incremental steps' settings do not apply
        cfg.lr_incremental = cfg.epochs_incremental = None
    if method != "ft" and _shares_ft_step0(method):  # ft trains the step 0 they share
        cfg.step0_checkpoint = str(out / "ft" / "step0.pt")
    return cfg


def _draw_predictions(cfg: TrainConfig, out: Path, steps: int) -> tuple[list[Path], str | None]:
    """``out/predictions_stepK.png`` for every step: one column per method with a checkpoint of that
    step (joint at the last step), one at step 0, which the methods share. Returns (the pictures,
    None) or ([], why none was drawn)."""
    pictures = []
    for step in range(steps):
        columns = {}
        for method in METHODS:
            checkpoint = final_checkpoints(out / method).get(step)
            if checkpoint is not None:
                columns[method] = checkpoint
        if step == 0 and "ft" in columns:  # one column for the methods that share ft's step 0
            own = {m: c for m, c in columns.items() if METHODS[m].incremental and not _shares_ft_step0(m)}
            columns = {"ft and the softmax methods": columns["ft"], **own}
        path = out / f"predictions_step{step}.png"
        message = write_predictions(cfg, step, columns, path)
        if message:
            return [], message
        pictures.append(path)
    return pictures, None


def run_demo_seeds(seeds, out=None, **options) -> dict[int, dict]:
    """The demo once per seed, each in OUT/seed<N> (``options``: run_demo's). Returns {seed: results}."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds must be distinct seeds, e.g. 0,1,2; got {','.join(map(str, seeds))}")
    out = Path(
        default_out(options.get("quick", False), options.get("task", "15-5"), seeds=True) if out is None else out
    )
    return {seed: run_demo(out / f"seed{seed}", seed=seed, **options)["results"] for seed in seeds}


def settings_stamp(seeds, *, quick=False, methods=DEFAULT_METHODS, loss_backend="auto", task="15-5") -> str:
    """A digest of every setting the seeds' results depend on (the demo's version included): the
    README's table carries it, and a test checks that it is the current demo's."""
    settings = [
        demo_settings(quick=quick, seed=seed, methods=methods, loss_backend=loss_backend, task=task) for seed in seeds
    ]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _mean_and_spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def seeds_markdown(results_by_seed: dict[int, dict], *, quick, methods, loss_backend, task, threads, commit) -> str:
    """The table of the README: each method's old/new/all mIoU after the last step, mean ± standard
    deviation over the seeds, with the machine, and the stamp of the settings and of the commit
    that trained them (``source_commit()`` taken when the run started)."""
    seeds = sorted(results_by_seed)
    stamp = settings_stamp(seeds, quick=quick, methods=methods, loss_backend=loss_backend, task=task)
    command = "incseg-fast demo" + " --quick" * quick + (f" --task {task}" if task != "15-5" else "")
    command += f" --seeds {','.join(map(str, seeds))} --markdown"
    old_label, new_label = old_new_labels(get_task("synthetic", task))
    lines = [
        f"<!-- demo table: {command}; settings {stamp}; commit {commit} -->",
        f"synthetic {task} disjoint, {'quick' if quick else 'full'} demo: mIoU (%) after the last step, "
        f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}; "
        f"{machine()}, {threads} thread{'s' * (threads != 1)}:",
        "",
        f"| method | {old_label} | {new_label} | all |",
        "|---|---|---|---|",
    ]
    methods_seen = list(dict.fromkeys(m for results in results_by_seed.values() for m in results))
    for method in methods_seen:
        finals = [results[method][-1] for results in results_by_seed.values() if method in results]
        cells = [_mean_and_spread([final[key] for final in finals]) for key in SUMMARY_KEYS]
        name = "joint (upper bound)" if method == "joint" else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
