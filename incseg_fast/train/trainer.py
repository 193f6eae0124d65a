"""The continual-segmentation training loop (docs/DATA.md#protocol).

One call of :func:`train_step` trains one step of one method and evaluates it; :func:`run`
trains a range of steps. Every epoch ends with an atomic checkpoint (``stepK.partial.pt``); a
step that was interrupted resumes from it and reaches the same weights and metrics as an
uninterrupted run (every source of randomness is re-seeded from (seed, step, epoch)).

A step is committed by one atomic rename: its final checkpoint (``stepK.pt``), which holds its
weights and its metrics. Everything else (``metrics.json``, the reports) is rebuilt from the
final checkpoints, so a kill at any moment leaves either the committed step or the partial one,
and the same command finishes the run as if it had not been killed (docs/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import incseg_fast as isf

from .._atomic import write_atomic
from ..models import IncrementalSegmenter, load_pretrained
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .progress import Progress
from .results import sync_metrics, write_reports
from .rundir import prepare_run_directory

# ------------------------------------------------------------------------------------------
# Environment: device, mixed precision, seeding, checkpoints
# ------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("amp='fp16' is for CUDA; use amp='bf16' on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _seed(*parts: int) -> int:
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (2**31 - 1)
    return value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def _dataset(cfg: TrainConfig, split: str):
    """The base dataset of ``split`` ("train" | "val") with the data package's default transforms
    (voc / ade: random scale, crop and flip for training, resize + centre crop for validation)."""
    from ..data import build_dataset

    if cfg.dataset == "synthetic":
        # cache: rendered scenes stay in memory instead of being drawn again every epoch
        return build_dataset(
            "synthetic",
            split,
            image_size=cfg.image_size,
            cache=True,
            seed=cfg.data_seed,
            num_images=cfg.train_images if split == "train" else cfg.val_images,
        )
    return build_dataset(cfg.dataset, split, root=cfg.root, image_size=cfg.image_size)


class StepPlan:
    """Which classes a training step learns, and how its results are reported.

    ``train_steps``: the class ids per step as trained (``joint``: one step with every class);
    ``index``: the training step; ``report_step``: the step number in the results (``joint`` is
    reported at the task's last step, the point it is the upper bound of); ``old_classes``: the
    task's step-0 class count, the old/new split of the metrics.
    """

    def __init__(self, cfg: TrainConfig, step: int):
        from ..data import get_task

        task_dataset = "voc" if cfg.dataset == "synthetic" else cfg.dataset
        self.task_steps = get_task(task_dataset, cfg.task)
        last = len(self.task_steps) - 1
        if not 0 <= step <= last:
            raise ValueError(f"step must be in [0, {last}] for task {cfg.task!r}, got {step}")
        if cfg.method_spec.joint:
            self.train_steps = get_task(task_dataset, "offline")
            self.index, self.report_step = 0, last
        else:
            self.train_steps, self.index, self.report_step = self.task_steps, step, step
        seen = [c for s in self.train_steps[: self.index + 1] for c in s]
        if sorted(seen) != list(range(len(seen))):
            raise ValueError(
                f"task {cfg.task!r}: the classes of steps 0..{self.index} must be the "
                "contiguous ids 0..N-1 (the model's channel c is class c)"
            )
        self.classes_per_step = [len(s) for s in self.train_steps[: self.index + 1]]
        self.num_classes = sum(self.classes_per_step)
        self.old_classes = len(self.task_steps[0])


def _train_subset(cfg: TrainConfig, plan: StepPlan, base):
    from ..data import IncrementalSubset, select_indices, train_label_lut

    cache_dir = Path(cfg.out) / "cache" if getattr(base, "cache_key", None) else None
    indices = select_indices(base, plan.train_steps, plan.index, mode=cfg.mode, cache_dir=cache_dir)
    if len(indices) == 0:
        raise ValueError(f"step {plan.index} of task {cfg.task!r} ({cfg.mode}) selects no training image")
    return IncrementalSubset(base, indices, train_label_lut(plan.train_steps, plan.index))


def _val_subset(cfg: TrainConfig, plan: StepPlan, base):
    """Every validation image; classes not seen yet are ignored (mib) or background (plop)."""
    from ..data import IncrementalSubset, eval_label_lut

    return IncrementalSubset(
        base, range(len(base)), eval_label_lut(plan.train_steps, plan.index, protocol=cfg.eval_protocol)
    )


def _check_files(*subsets) -> None:
    """Find unreadable files before a step spends minutes on its first epoch (synthetic data has none)."""
    for subset in subsets:
        check = getattr(subset.dataset, "check_files", None)
        if check is not None:
            check(subset.indices)


# ------------------------------------------------------------------------------------------
# Models and checkpoints
# ------------------------------------------------------------------------------------------


def model_from_checkpoint(ckpt: dict, device) -> IncrementalSegmenter:
    model = IncrementalSegmenter(**ckpt["model"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device)


def _build_model(cfg: TrainConfig, plan: StepPlan, method_dir: Path, device):
    """(new model, frozen old model or None) for the step, before any partial-epoch resume."""
    spec = cfg.method_spec
    torch.manual_seed(_seed(cfg.seed, plan.index, 10_000))
    if plan.index == 0:
        model = IncrementalSegmenter(
            cfg.backbone, plan.classes_per_step, output_stride=cfg.output_stride, caf=spec.caf_module
        )
        if cfg.pretrained:
            load_pretrained(model.encoder, cfg.pretrained)
        return model.to(device), None
    previous = method_dir / f"step{plan.index - 1}.pt"
    if not previous.exists():
        raise FileNotFoundError(
            f"step {plan.index} needs the previous step's checkpoint {previous}; "
            f"train step {plan.index - 1} first (or every step with --step all)"
        )
    ckpt = load_checkpoint(previous)
    old = model_from_checkpoint(ckpt, device)
    old.eval()
    old.requires_grad_(False)
    model = model_from_checkpoint(ckpt, device)
    model.classifier.add_step(plan.classes_per_step[-1])
    if spec.balanced_init:
        model.classifier.balanced_init()
    return model, old


# ------------------------------------------------------------------------------------------
# Loss of one batch
# ------------------------------------------------------------------------------------------


def _needs_teacher(cfg: TrainConfig) -> bool:
    """Whether steps > 0 run the old model (fine-tuning does not)."""
    return cfg.method_spec.kd != "none" or bool(cfg.lambda_fd) or cfg.method_spec.caf_module


def _batch_loss(cfg: TrainConfig, plan: StepPlan, model, old, images, labels):
    """The step's objective; ``old`` is the frozen previous model, None at step 0 and for ft."""
    spec = cfg.method_spec
    # The logits stay at the network's resolution and the losses upsample them to the labels'
    # (size=, MATH.md#upsampling), unless the switch asks for MiB's interpolate-then-loss.
    upsample = cfg.materialise_upsampled_logits
    size = None if upsample else tuple(labels.shape[-2:])
    old_out = None
    if old is not None:
        with torch.no_grad():
            old_out = old(images, upsample=upsample)
    out = model(images, old_out.get("projected") if old_out is not None else None, upsample=upsample)
    x = out["logits"]
    incremental = plan.index > 0
    old_classes = plan.num_classes - plan.classes_per_step[-1] if incremental else plan.num_classes
    kd_mode = spec.kd if old is not None else "none"
    y = old_out["logits"].to(x.dtype) if kd_mode != "none" else None
    ce, kd = isf.incremental_loss(
        x,
        labels,
        y,
        old_classes=old_classes,
        ce=spec.ce if incremental else "plain",
        kd=kd_mode,
        alpha=cfg.alpha,
        size=size,
        backend=cfg.loss_backend,
    )
    loss = ce + cfg.lambda_kd * kd
    if old is not None and cfg.lambda_fd:
        loss = loss + cfg.lambda_fd * F.mse_loss(out["encoder"].float(), old_out["encoder"].float())
    if old is not None and cfg.lambda_ad and spec.caf_module:
        # CAF eq. 8: the pairs (z-bar, z-bar old) and (h, h old), each with its own SE attention
        for key, se in (("encoder", "se_encoder"), ("features", "se_features")):
            f, g = out[key], old_out[key].to(out[key].dtype)
            with torch.no_grad():
                b = getattr(old, se)(g)
            loss = loss + cfg.lambda_ad * isf.attentive_distillation(
                f, g, getattr(model, se)(f), b, backend=cfg.loss_backend
            )
    return loss


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model,
    dataset,
    *,
    num_classes: int,
    old_classes: int,
    batch_size: int,
    device,
    amp: torch.dtype | None = None,
    workers: int = 0,
) -> dict:
    """Per-class IoU and old/new/all mIoU, mPA, mCA (percent) of ``model`` on ``dataset``."""
    from ..metrics import ConfusionMatrix

    model.eval()
    matrix = ConfusionMatrix(num_classes)
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        with _autocast(device, amp):
            logits = model(images.to(device))["logits"]
        matrix.update(logits.argmax(1).cpu(), labels)
    return matrix.compute(old_classes)


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def method_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / cfg.method


def _precision(autocast_dtype: torch.dtype | None) -> str:
    return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]


def _reuse_step0(cfg: TrainConfig, plan: StepPlan, final: Path) -> None:
    """Copy a trained step 0 (``--step0-checkpoint``) instead of training it again."""
    source = Path(cfg.step0_checkpoint)
    model = load_checkpoint(source)["model"]
    needed = {
        "backbone": cfg.backbone,
        "output_stride": cfg.output_stride,
        "caf": cfg.method_spec.caf_module,
        "classes_per_step": plan.classes_per_step,
    }
    if any(model[key] != value for key, value in needed.items()):
        raise ValueError(
            f"--step0-checkpoint {source} has a different architecture ({model}) than this run needs ({needed})"
        )
    write_atomic(final, source.read_bytes())  # verified above, and again whenever it is loaded


def _resume(cfg: TrainConfig, plan: StepPlan, partial: Path, model, optimizer, scaler) -> tuple[int, list]:
    """(first epoch to train, loss history so far), loading the step's last finished epoch if there is one."""
    if not partial.exists():
        return 0, []
    state = load_checkpoint(partial, kind="epoch")
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if cfg.progress:
        print(f"[{cfg.method}] step {plan.report_step}: resuming after epoch {state['epoch'] + 1}")
    return state["epoch"] + 1, state["history"]


def _sgd_step(cfg, plan, model, teacher, optimizer, scaler, batch, device, autocast_dtype, where: str) -> float:
    """One optimisation step on ``batch``; returns the loss."""
    images, labels = (t.to(device, non_blocking=True) for t in batch)
    with _autocast(device, autocast_dtype):
        loss = _batch_loss(cfg, plan, model, teacher, images, labels)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"non-finite loss at {where}: lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss_value


def _train(cfg: TrainConfig, plan: StepPlan, train_set, device, autocast_dtype, partial: Path, on_epoch_end):
    """The step's model after its epochs (resumed from ``partial``), and its loss history."""
    model, teacher = _build_model(cfg, plan, method_dir(cfg), device)
    teacher = teacher if _needs_teacher(cfg) else None
    model.loss_backend = cfg.loss_backend
    frozen_encoder = cfg.freeze_encoder and plan.index > 0
    if frozen_encoder:
        model.encoder.requires_grad_(False)
    base_lr = cfg.lr if plan.index == 0 else cfg.lr_incremental
    epochs = cfg.epochs if plan.index == 0 else cfg.epochs_incremental
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    start_epoch, history = _resume(cfg, plan, partial, model, optimizer, scaler)

    drop_last = len(train_set) > cfg.batch_size
    iters_per_epoch = len(train_set) // cfg.batch_size if drop_last else 1
    max_iters = epochs * iters_per_epoch
    for epoch in range(start_epoch, epochs):
        seed_everything(_seed(cfg.seed, plan.index, epoch))
        order = torch.Generator().manual_seed(_seed(cfg.seed, plan.index, epoch, 1))
        loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=order,
            drop_last=drop_last,
            num_workers=cfg.workers,
        )
        model.train()
        if frozen_encoder:
            model.encoder.eval()  # E_F: the frozen encoder keeps its BatchNorm statistics too
        progress = Progress(
            iters_per_epoch, f"[{cfg.method}] step {plan.report_step} epoch {epoch + 1}/{epochs}", enabled=cfg.progress
        )
        loss_sum = 0.0
        for i, batch in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = base_lr * (1 - (epoch * iters_per_epoch + i) / max_iters) ** 0.9
            loss_value = _sgd_step(
                cfg,
                plan,
                model,
                teacher,
                optimizer,
                scaler,
                batch,
                device,
                autocast_dtype,
                f"step {plan.report_step}, epoch {epoch}, iteration {i}",
            )
            loss_sum += loss_value
            progress.update(batch[0].shape[0], loss_value)
        history.append(
            {"epoch": epoch, "loss": loss_sum / max(iters_per_epoch, 1), "images_per_s": progress.images_per_second}
        )
        save_checkpoint(
            {
                "kind": "epoch",
                "epoch": epoch,
                "history": history,
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "config": dataclasses.asdict(cfg),
            },
            partial,
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return model, history


def _train_and_commit(
    cfg: TrainConfig, plan: StepPlan, device, autocast_dtype, final: Path, partial: Path, on_epoch_end
) -> None:
    train_set = _train_subset(cfg, plan, _dataset(cfg, "train"))
    val_set = _val_subset(cfg, plan, _dataset(cfg, "val"))
    _check_files(train_set, val_set)
    model, history = _train(cfg, plan, train_set, device, autocast_dtype, partial, on_epoch_end)
    start = time.perf_counter()
    metrics = evaluate(
        model,
        val_set,
        num_classes=plan.num_classes,
        old_classes=plan.old_classes,
        batch_size=cfg.batch_size,
        device=device,
        amp=autocast_dtype,
        workers=cfg.workers,
    )
    entry = {
        "step": plan.report_step,
        **metrics,
        "history": history,
        "eval_seconds": round(time.perf_counter() - start, 2),
    }
    # the commit of the step: weights and metrics in one rename
    save_checkpoint(
        {
            "kind": "step",
            "model": model.config(),
            "state_dict": model.state_dict(),
            "metrics": entry,
            "task_steps": plan.task_steps,
            "train_steps": plan.train_steps,
            "index": plan.index,
            "config": dataclasses.asdict(cfg),
        },
        final,
    )
    partial.unlink(missing_ok=True)


def train_step(cfg: TrainConfig, step: int, *, on_epoch_end=None, overwrite: bool = False) -> dict:
    """Train (or resume) one step, evaluate it and update the reports; returns its metrics entry.

    A step whose final checkpoint exists is not trained again: its metrics are read back from it.
    ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is written. ``overwrite``:
    results of other options in ``cfg.out`` are discarded instead of stopping the run (rundir.py).
    """
    cfg = cfg.resolved()
    plan = StepPlan(cfg, step)
    device = resolve_device(cfg.device)
    autocast_dtype = amp_dtype(cfg.amp, device)
    out_dir = prepare_run_directory(cfg, _precision(autocast_dtype), overwrite=overwrite)
    final = out_dir / f"step{plan.report_step}.pt"
    partial = out_dir / f"step{plan.report_step}.partial.pt"
    if final.exists():
        partial.unlink(missing_ok=True)  # left by a kill between the commit and its removal
    elif plan.index == 0 and cfg.step0_checkpoint:
        _reuse_step0(cfg, plan, final)
    else:
        _train_and_commit(cfg, plan, device, autocast_dtype, final, partial, on_epoch_end)
    entries = sync_metrics(out_dir)
    write_reports(Path(cfg.out), plan.task_steps)
    return next(e for e in entries if e["step"] == plan.report_step)


def run(cfg: TrainConfig, steps=None, *, overwrite: bool = False) -> list[dict]:
    """Train ``steps`` (default: every step of the task; ``joint`` has only its one step)."""
    cfg = cfg.resolved()
    last = len(StepPlan(cfg, 0).task_steps) - 1
    if cfg.method_spec.joint:
        if steps is not None and list(steps) != [last]:
            raise ValueError(
                f"joint trains every class in one step, reported as step {last}: use --step all (or {last})"
            )
        steps = [last]
    elif steps is None:
        steps = range(last + 1)
    return [train_step(cfg, k, overwrite=overwrite) for k in steps]


def evaluate_checkpoint(
    path, *, root=None, device="auto", amp="auto", batch_size=None, workers=0, eval_protocol=None
) -> dict:
    """Metrics of a final step checkpoint on the validation split of the step it was trained for."""
    ckpt = load_checkpoint(path)
    cfg = TrainConfig(**ckpt["config"])
    if root is not None and cfg.dataset == "synthetic":
        raise ValueError(f"--root does not apply to {path}: it was trained on generated synthetic data")
    cfg.root = root if root is not None else cfg.root
    cfg.eval_protocol = eval_protocol or cfg.eval_protocol
    plan = StepPlan(cfg, ckpt["metrics"]["step"])
    torch_device = resolve_device(device)
    model = model_from_checkpoint(ckpt, torch_device)
    val_set = _val_subset(cfg, plan, _dataset(cfg, "val"))
    _check_files(val_set)
    return evaluate(
        model,
        val_set,
        num_classes=plan.num_classes,
        old_classes=plan.old_classes,
        batch_size=batch_size or cfg.batch_size,
        device=torch_device,
        amp=amp_dtype(amp, torch_device),
        workers=workers,
    )
