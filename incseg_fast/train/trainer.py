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
import copy
import dataclasses
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..models import IncrementalSegmenter, load_pretrained
from .checkpoint import load_checkpoint, make_payload, save_checkpoint
from .config import TrainConfig
from .distributed import (
    GlobalBatches,
    Processes,
    all_reduce_sum,
    check_global_batch,
    from_environment,
    main_first,
    on_main,
    peers_answer,
    process_device,
    share_weights,
    synchronise_batch_norm,
)
from .distributed import start as start_processes
from .methods import IGNORE_INDEX, Batch, forward_options, head_layout, needs_teacher
from .progress import Progress
from .results import sync_metrics, write_reports
from .rundir import prepare_run_directory, recorded_options

ONE_PROCESS = Processes()

# ------------------------------------------------------------------------------------------
# Environment: device, mixed precision, seeding, checkpoints
# ------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """The device of ``--device``: auto (CUDA when available), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise ValueError(f"--device {name} is not a device the trainer runs on: auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
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
    (voc / ade: random scale, crop and flip for training, resize + centre crop for validation);
    the training images come with their saliency maps for a method that reads them (SSUL)."""
    from ..data import build_dataset

    saliency = {"saliency": True} if split == "train" and cfg.method_spec.saliency else {}
    if cfg.dataset == "synthetic":
        # cache: rendered scenes stay in memory instead of being drawn again every epoch
        return build_dataset(
            "synthetic",
            split,
            image_size=cfg.image_size,
            cache=True,
            seed=cfg.data_seed,
            num_images=cfg.train_images if split == "train" else cfg.val_images,
            **saliency,
        )
    return build_dataset(cfg.dataset, split, root=cfg.root, image_size=cfg.image_size, **saliency)


class StepPlan:
    """Which classes a training step learns, and how its results are reported.

    ``train_steps``: the class ids per step as trained (``joint``: one step with every class);
    ``index``: the training step; ``report_step``: the step number in the results (``joint`` is
    reported at the task's last step, the point it is the upper bound of); ``base_classes``: the
    task's step-0 class count, the old/new split of the metrics; ``previous_classes``: the classes
    of the steps before this one, the old model's channels (the distillation's Co).
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
        self.base_classes = len(self.task_steps[0])
        self.previous_classes = sum(self.classes_per_step[:-1])


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


class _SeededImages(Dataset):
    """The training images of one epoch, each augmented with torch's generator seeded from (the
    epoch's seed, its index): an image's augmentation does not depend on which process or
    DataLoader worker loads it, nor on the images loaded before it."""

    def __init__(self, images, epoch_seed: int):
        self.images, self.epoch_seed = images, epoch_seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        torch.manual_seed(_seed(self.epoch_seed, index))
        return self.images[index]


# ------------------------------------------------------------------------------------------
# Models and checkpoints
# ------------------------------------------------------------------------------------------


def model_from_checkpoint(ckpt: dict, device, *, loss_backend: str = "auto") -> IncrementalSegmenter:
    model = IncrementalSegmenter(**ckpt["model"], loss_backend=loss_backend)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device)


def run_identity(cfg: TrainConfig, plan: StepPlan, precision: str) -> dict:
    """What a checkpoint of this run's step records, and is checked against when it is read
    (checkpoint.check_identity): the method, the step, its classes and the options of the results."""
    return {
        "method": cfg.method,
        "step": plan.report_step,
        "classes": plan.train_steps[: plan.index + 1],
        **recorded_options(cfg, precision),
    }


def _build_model(cfg: TrainConfig, plan: StepPlan, method_dir: Path, device, precision: str):
    """(new model, frozen old model or None) for the step, before any partial-epoch resume; both
    run CAF's structured attention on ``cfg.loss_backend``."""
    spec = cfg.method_spec
    torch.manual_seed(_seed(cfg.seed, plan.index, 10_000))
    if plan.index == 0:
        # every method's step 0 is the same network (CAF's modules join at step 1), so it can be shared
        model = IncrementalSegmenter(
            cfg.backbone,
            head_layout(spec, plan.classes_per_step),
            output_stride=cfg.output_stride,
            output=spec.output,
            loss_backend=cfg.loss_backend,
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
    ckpt = load_checkpoint(previous, identity=run_identity(cfg, StepPlan(cfg, plan.index - 1), precision))
    old = model_from_checkpoint(ckpt, device, loss_backend=cfg.loss_backend)
    old.eval()
    old.requires_grad_(False)
    model = model_from_checkpoint(ckpt, device, loss_backend=cfg.loss_backend)
    model.classifier.add_step(plan.classes_per_step[-1])
    if spec.balanced_init:
        model.classifier.balanced_init()
    if spec.output != "softmax":
        model.classifier.init_from_first_head()
    add_caf_modules(cfg, model, old)
    return model, old


def add_caf_modules(cfg: TrainConfig, model, old) -> None:
    """Give a step > 0 the CAF modules its previous step lacks (step 0 never has them): the fusion
    module, which starts as the identity, and the attentive distillation's channel attentions,
    the old model's a frozen copy of the new one's (as when they were carried over untrained)."""
    if cfg.method_spec.caf_module and model.caf is None:
        model.add_fusion()
    if cfg.lambda_ad and model.se_encoder is None:
        model.add_squeeze_excitation()
        old.se_encoder = copy.deepcopy(model.se_encoder).requires_grad_(False)
        old.se_features = copy.deepcopy(model.se_features).requires_grad_(False)


# ------------------------------------------------------------------------------------------
# Loss of one batch
# ------------------------------------------------------------------------------------------


def _batch_loss(
    cfg: TrainConfig, plan: StepPlan, net, student, old, images, labels, weights=(1.0, 1.0), state=None, saliency=None
):
    """The step's objective; ``net`` runs ``student`` (itself, or its DDP wrapper); ``old`` is the
    frozen previous model, None at step 0 and for ft. ``weights``: those of :func:`share_weights`
    for the CE and for the terms that average over every pixel (1 with one process); ``state``:
    what the method's prepare computed for the step; ``saliency``: the images' saliency maps (SSUL)."""
    terms = loss_terms(cfg, plan, net, student, old, images, labels, state, saliency)
    ce_weight, pixel_weight = weights
    return ce_weight * terms.pop("ce", 0.0) + pixel_weight * sum(terms.values())


def loss_terms(cfg: TrainConfig, plan: StepPlan, net, student, old, images, labels, state=None, saliency=None) -> dict:
    """The weighted terms of the step's objective by name (the method's terms function, methods.py);
    their sum is the loss (tools/caf_terms.py measures them one by one). ``net`` runs ``student``
    (itself, or its DDP wrapper)."""
    # The logits stay at the network's resolution and the losses upsample them to the labels'
    # (size=, MATH.md#upsampling), unless the switch asks for MiB's interpolate-then-loss.
    upsample, more = cfg.materialise_upsampled_logits, forward_options(cfg)
    old_out = None
    if old is not None:
        with torch.no_grad():
            old_out = old(images, upsample=upsample, **more)
    out = net(images, old_out.get("projected") if old_out is not None else None, upsample=upsample, **more)
    size = None if upsample else tuple(labels.shape[-2:])
    return cfg.method_spec.terms(Batch(cfg, plan, student, old, out, old_out, labels, size, state or {}, saliency))


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model,
    dataset,
    *,
    num_classes: int,
    base_classes: int,
    batch_size: int,
    device,
    amp: torch.dtype | None = None,
    workers: int = 0,
    processes: Processes = ONE_PROCESS,
) -> dict:
    """Per-class IoU and old/new/all mIoU, mPA, mCA (percent) of ``model`` on ``dataset``; the
    ids below ``base_classes`` are "old". With several processes each evaluates every
    ``world_size``-th image and the confusion matrices are summed."""
    from ..metrics import ConfusionMatrix

    model.eval()
    matrix = ConfusionMatrix(num_classes)
    if processes.distributed:
        dataset = Subset(dataset, range(processes.rank, len(dataset), processes.world_size))
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        with _autocast(device, amp):
            logits = model(images.to(device))["logits"]
        matrix.update(model.predict(logits).cpu(), labels)
    if processes.distributed:  # NCCL reduces device tensors only
        matrix.matrix = all_reduce_sum(matrix.matrix.to(device)).cpu()
    return matrix.compute(base_classes)


# ------------------------------------------------------------------------------------------
# Training: prepare the step, restore a partial step, train epochs, write checkpoints, finish
# ------------------------------------------------------------------------------------------


def method_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / cfg.method


def _precision(autocast_dtype: torch.dtype | None) -> str:
    return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]


@dataclasses.dataclass
class _Step:
    """What every part of one step's training needs to know."""

    cfg: TrainConfig
    plan: StepPlan
    processes: Processes
    device: torch.device
    autocast_dtype: torch.dtype | None
    final: Path  # the step's final checkpoint (its commit)
    partial: Path  # its last finished epoch

    @property
    def label(self) -> str:
        return f"[{self.cfg.method}] step {self.plan.report_step}"

    @property
    def precision(self) -> str:
        return _precision(self.autocast_dtype)

    @property
    def identity(self) -> dict:
        return run_identity(self.cfg, self.plan, self.precision)


@dataclasses.dataclass
class _Training:
    """The models and the optimizer of a step being trained."""

    student: IncrementalSegmenter
    net: torch.nn.Module  # what the loss calls: the student, or its DDP wrapper
    teacher: IncrementalSegmenter | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    history: list  # per finished epoch: loss, images/s
    state: dict = dataclasses.field(default_factory=dict)  # the method's statistics for the step


def _reuse_step0(step: _Step) -> None:
    """Copy a trained step 0 (``--step0-checkpoint``) instead of training it again; the copy
    records this run's identity (whose options name the file it came from)."""
    cfg, plan = step.cfg, step.plan
    source = Path(cfg.step0_checkpoint)
    payload = load_checkpoint(source)
    model = payload["model"]
    needed = {
        "backbone": cfg.backbone,
        "output_stride": cfg.output_stride,
        "caf": False,
        "classes_per_step": head_layout(cfg.method_spec, plan.classes_per_step),
        "output": cfg.method_spec.output,
    }
    if any(model.get(key, "softmax") != value for key, value in needed.items()):
        raise ValueError(
            f"--step0-checkpoint {source} has a different architecture ({model}) than this run needs ({needed})"
        )
    save_checkpoint({**payload, "identity": step.identity}, step.final)


def _settle_run_directory(step: _Step, overwrite: bool) -> None:
    """Rank 0's part of preparing a step: check the options in --out, remove what a kill left,
    and put a reused step 0 in place."""
    prepare_run_directory(step.cfg, step.precision, overwrite=overwrite)
    if step.final.exists():
        if step.partial.exists():  # left by a kill between the commit and its removal
            step.partial.unlink()  # (only then: a finished run on a read-only disk is reported too)
    elif step.plan.index == 0 and step.cfg.step0_checkpoint:
        _reuse_step0(step)


# options that may differ between the processes of one job: where the data is on each machine,
# the loader workers and the progress line (rank 0 alone prints it)
PER_PROCESS_OPTIONS = ("root", "workers", "progress")


def _options_of_every_process(cfg: TrainConfig) -> dict:
    """The options every process of one job must share."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PER_PROCESS_OPTIONS}


def prepare_step(cfg: TrainConfig, step: int, overwrite: bool = False) -> _Step:
    """The step's plan, device and files, with the run directory checked (by rank 0; every
    process goes on once it is done)."""
    cfg = cfg.resolved()
    plan = StepPlan(cfg, step)
    processes = from_environment()
    check_global_batch(processes, cfg.batch_size)
    device = process_device(processes, resolve_device(cfg.device))
    start_processes(processes, device, cfg.dist_timeout_s, _options_of_every_process(cfg))
    folder = method_dir(cfg)
    prepared = _Step(
        cfg=cfg if processes.is_main else dataclasses.replace(cfg, progress=False),
        plan=plan,
        processes=processes,
        device=device,
        autocast_dtype=amp_dtype(cfg.amp, device),
        final=folder / f"step{plan.report_step}.pt",
        partial=folder / f"step{plan.report_step}.partial.pt",
    )
    on_main(processes, _settle_run_directory, prepared, overwrite)
    return prepared


def _start_training(step: _Step) -> _Training:
    """The step's models (the student's batch norm synchronised across processes unless
    --no-sync-bn), optimizer and gradient scaler, before any partial-epoch resume."""
    cfg, plan = step.cfg, step.plan
    student, teacher = _build_model(cfg, plan, method_dir(cfg), step.device, step.precision)
    if plan.index > 0 and cfg.freeze_encoder:
        student.encoder.requires_grad_(False)
    if plan.index > 0 and cfg.method_spec.freeze_old:  # SSUL: the first head (unknown) and the new one learn
        student.requires_grad_(False)
        for head in (student.classifier.heads[0], student.classifier.heads[-1]):
            head.requires_grad_(True)
    if step.processes.distributed and cfg.sync_bn:
        student = synchronise_batch_norm(student, step.device)
    base_lr = cfg.lr if plan.index == 0 else cfg.lr_incremental
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(step.device.type, enabled=step.autocast_dtype == torch.float16)
    teacher = teacher if needs_teacher(cfg) else None
    return _Training(student, student, teacher, optimizer, scaler, history=[])


def _restore_partial_step(step: _Step, training: _Training) -> int:
    """Load the step's last finished epoch if there is one (every process loads the same file);
    returns the first epoch to train."""
    if not step.partial.exists():
        return 0
    state = load_checkpoint(step.partial, kind="epoch", identity=step.identity)
    training.student.load_state_dict(state["state_dict"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scaler.load_state_dict(state["scaler"])
    training.history = state["history"]
    if step.cfg.progress:
        print(f"{step.label}: resuming after epoch {state['epoch'] + 1}")
    return state["epoch"] + 1


def _distribute(step: _Step, training: _Training) -> None:
    """Wrap the student in DDP when there are several processes (after the resume: DDP starts
    every process from rank 0's weights, which are those of the same file)."""
    if not step.processes.distributed:
        return
    from torch.nn.parallel import DistributedDataParallel

    cfg = step.cfg
    # CAF's fusion and SE blocks take no part in a step without the old model or without
    # lambda_AD; DDP must then look for unused parameters. It must not otherwise: the SE blocks
    # run outside DDP's forward (in the loss), which that search would count as unused.
    uses_everything = training.teacher is not None and bool(cfg.lambda_ad)
    training.net = DistributedDataParallel(
        training.student,
        device_ids=[step.device.index] if step.device.type == "cuda" else None,
        find_unused_parameters=cfg.method_spec.caf_module and not uses_everything,
    )


def _global_mean(value: torch.Tensor, processes: Processes) -> float:
    """The mean over processes of a scalar (the loss of the global batch)."""
    if not processes.distributed:
        return value.item()
    return all_reduce_sum(value.detach().float().reshape(1).to(value.device)).item() / processes.world_size


def _sgd_step(step: _Step, training: _Training, batch, where: str) -> float:
    """One optimisation step on this process's share of a global batch; returns the global loss."""
    cfg, plan = step.cfg, step.plan
    images, labels, *saliency = (t.to(step.device, non_blocking=True) for t in batch)
    weights = share_weights(labels, IGNORE_INDEX)
    with _autocast(step.device, step.autocast_dtype):
        loss = _batch_loss(
            cfg,
            plan,
            training.net,
            training.student,
            training.teacher,
            images,
            labels,
            weights,
            training.state,
            saliency[0] if saliency else None,
        )
    loss_value = _global_mean(loss, step.processes)  # every process stops on a non-finite loss
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"non-finite loss at {where}: lower the learning rate")
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss).backward()
    training.scaler.step(training.optimizer)
    training.scaler.update()
    return loss_value


def _train_epoch(step: _Step, training: _Training, train_set, epoch: int) -> None:
    """One epoch of global batches; appends its loss and throughput to the history."""
    cfg, plan = step.cfg, step.plan
    epochs = cfg.epochs if plan.index == 0 else cfg.epochs_incremental
    base_lr = cfg.lr if plan.index == 0 else cfg.lr_incremental
    seed_everything(_seed(cfg.seed, plan.index, epoch))
    batches = GlobalBatches(len(train_set), cfg.batch_size, step.processes, _seed(cfg.seed, plan.index, epoch, 1))
    images = _SeededImages(train_set, _seed(cfg.seed, plan.index, epoch, 2))
    loader = DataLoader(images, batch_sampler=batches, num_workers=cfg.workers)
    training.net.train()
    if plan.index > 0 and cfg.freeze_encoder:
        training.student.encoder.eval()  # E_F: the frozen encoder keeps its BatchNorm statistics too
    if plan.index > 0 and cfg.method_spec.freeze_old:  # SSUL's frozen batch norm too
        training.student.encoder.eval()
        training.student.head.eval()
    progress = Progress(len(batches), f"{step.label} epoch {epoch + 1}/{epochs}", enabled=cfg.progress)
    max_iters = epochs * len(batches)
    for i, batch in enumerate(loader):
        for group in training.optimizer.param_groups:
            group["lr"] = base_lr * (1 - (epoch * len(batches) + i) / max_iters) ** 0.9
        where = f"step {plan.report_step}, epoch {epoch}, iteration {i}"
        progress.update(min(cfg.batch_size, len(train_set)), _sgd_step(step, training, batch, where))
    training.history.append(
        {"epoch": epoch, "loss": progress.loss_sum / len(batches), "images_per_s": progress.images_per_second}
    )


def _write_epoch_checkpoint(step: _Step, training: _Training, epoch: int) -> None:
    payload = make_payload(
        "epoch",
        epoch=epoch,
        history=training.history,
        state_dict=training.student.state_dict(),
        optimizer=training.optimizer.state_dict(),
        scaler=training.scaler.state_dict(),
        config=dataclasses.asdict(step.cfg),
        identity=step.identity,
    )
    on_main(step.processes, save_checkpoint, payload, step.partial)


def _commit(step: _Step, model, entry: dict) -> None:
    """The commit of the step: weights and metrics in one rename."""
    payload = make_payload(
        "step",
        model=model.config(),
        state_dict=model.state_dict(),
        metrics=entry,
        task_steps=step.plan.task_steps,
        train_steps=step.plan.train_steps,
        index=step.plan.index,
        config=dataclasses.asdict(step.cfg),
        identity=step.identity,
    )
    save_checkpoint(payload, step.final)
    step.partial.unlink(missing_ok=True)


def _finish_step(step: _Step, model, history: list, val_set) -> None:
    """Evaluate the trained model and commit the step (rank 0 writes)."""
    cfg, plan = step.cfg, step.plan
    start = time.perf_counter()
    metrics = evaluate(
        model,
        val_set,
        num_classes=plan.num_classes,
        base_classes=plan.base_classes,
        batch_size=cfg.batch_size // step.processes.world_size,
        device=step.device,
        amp=step.autocast_dtype,
        workers=cfg.workers,
        processes=step.processes,
    )
    entry = {"step": plan.report_step, **metrics, "history": history}
    entry["eval_seconds"] = round(time.perf_counter() - start, 2)
    on_main(step.processes, _commit, step, model, entry)


def _prepare_method(step: _Step, training: _Training, train_set) -> dict:
    """The method's statistics for the step (methods.py, ``prepare``), from the old model's outputs on
    this process's share of the training images, augmented with a fixed seed: a deterministic
    function of the old model and the images, so a resumed step computes them again, the same."""
    cfg, plan = step.cfg, step.plan
    prepare = cfg.method_spec.prepare
    if prepare is None or training.teacher is None:
        return {}
    share = Subset(train_set, range(step.processes.rank, len(train_set), step.processes.world_size))
    images = _SeededImages(share, _seed(cfg.seed, plan.index, 3))
    loader = DataLoader(images, batch_size=max(cfg.batch_size // step.processes.world_size, 1), num_workers=cfg.workers)
    upsample = cfg.materialise_upsampled_logits

    def batch_outputs():
        for images, labels, *_ in loader:
            images, labels = images.to(step.device), labels.to(step.device)
            with torch.no_grad(), _autocast(step.device, step.autocast_dtype):
                old_out = training.teacher(images, upsample=upsample)
            yield old_out, labels, None if upsample else tuple(labels.shape[-2:])

    def sum_over_processes(tensor):
        return all_reduce_sum(tensor) if step.processes.distributed else tensor

    if cfg.progress:
        print(f"{step.label}: the old model's statistics for {cfg.method} ({len(share)} images)")
    return prepare(batch_outputs(), sum_over_processes, cfg, plan)


def _train_and_commit(step: _Step, on_epoch_end) -> None:
    cfg, plan = step.cfg, step.plan
    # rank 0 first: it writes the cache of the image selection that the others then read
    train_set = main_first(step.processes, _train_subset, cfg, plan, _dataset(cfg, "train"))
    val_set = _val_subset(cfg, plan, _dataset(cfg, "val"))
    on_main(step.processes, _check_files, train_set, val_set)
    training = _start_training(step)
    training.state = _prepare_method(step, training, train_set)
    first_epoch = _restore_partial_step(step, training)
    _distribute(step, training)
    for epoch in range(first_epoch, cfg.epochs if plan.index == 0 else cfg.epochs_incremental):
        _train_epoch(step, training, train_set, epoch)
        _write_epoch_checkpoint(step, training, epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    _finish_step(step, training.student, training.history, val_set)


def _report(step: _Step) -> list[dict]:
    entries = sync_metrics(method_dir(step.cfg))
    write_reports(Path(step.cfg.out), step.plan.task_steps)
    _draw_predictions(step)
    return entries


def _draw_predictions(step: _Step) -> None:
    cfg, plan = step.cfg, step.plan
    picture = step.final.parent / f"predictions_step{plan.report_step}.png"
    if not picture.exists():  # drawn from the committed checkpoint: a kill before it is redrawn here
        message = write_predictions(cfg, plan.report_step, {cfg.method: step.final}, picture)
        if message and cfg.progress:
            print(message)


def train_step(cfg: TrainConfig, step: int, *, on_epoch_end=None, overwrite: bool = False) -> dict:
    """Train (or resume) one step, evaluate it and update the reports; returns its metrics entry.

    A step whose final checkpoint exists is not trained again: its metrics are read back from it.
    ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is written. ``overwrite``:
    results of other options in ``cfg.out`` are discarded instead of stopping the run (rundir.py).
    Under torchrun, every process calls it (docs/TRAINER.md#distributed).
    """
    with peers_answer(from_environment(), cfg.dist_timeout_s):
        prepared = prepare_step(cfg, step, overwrite)
        if not prepared.final.exists():
            _train_and_commit(prepared, on_epoch_end)
        entries = on_main(prepared.processes, _report, prepared)
    return next(e for e in entries if e["step"] == prepared.plan.report_step)


def write_predictions(cfg: TrainConfig, step: int, checkpoints: dict, path: Path) -> str | None:
    """Draw ``path``: the first validation images of step ``step``, their ground truth and the
    predictions of the final checkpoints ``checkpoints`` ({column title: path}). Returns None, or
    why nothing was drawn (no matplotlib)."""
    from .pictures import picture_samples, predict, write_predictions_picture

    val_set = _val_subset(cfg, StepPlan(cfg, step), _dataset(cfg, "val"))
    images, labels = picture_samples(val_set)
    device = resolve_device(cfg.device)
    predictions = {
        title: predict(
            model_from_checkpoint(load_checkpoint(checkpoint), device, loss_backend=cfg.loss_backend), images, device
        )
        for title, checkpoint in checkpoints.items()
    }
    class_names = getattr(val_set.dataset, "class_names", None)
    title = f"{cfg.dataset} {cfg.task} {cfg.mode}, step {step}"
    return write_predictions_picture(path, images, labels, predictions, class_names, title)


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
    processes = from_environment()
    if processes.distributed and processes.is_main:
        check_global_batch(processes, cfg.batch_size)
        print(
            f"{processes.world_size} processes: global batch {cfg.batch_size}, "
            f"{cfg.batch_size // processes.world_size} images per process"
        )
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
        base_classes=plan.base_classes,
        batch_size=batch_size or cfg.batch_size,
        device=torch_device,
        amp=amp_dtype(amp, torch_device),
        workers=workers,
    )
