"""Training configuration: the options of a run and the per-dataset defaults of the papers (the
methods are in methods.py).

Defaults (MiB / ILT / CAF papers, DeepLabV3 ResNet-101, output stride 16):

| dataset | task | step-0 LR | later-step LR | epochs per step | batch | crop |
|---|---|---|---|---|---|---|
| voc | 15-5 | 0.01 | 0.001 | 30 | 24 | 512 |
| ade | 100-50 | 0.01 | 0.001 | 60 | 24 | 512 |
| synthetic | 15-5 | 0.1 | 0.05 | 12 | 8 | 48 (tiny backbone, output stride 4: the demo, docs/TRAINER.md) |

Every run uses SGD (momentum 0.9, weight decay 1e-4, Nesterov off) with the poly schedule
``lr = base * (1 - iter / max_iter) ** 0.9`` within each step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field

from ..vocabulary import BACKEND_CHOICES
from .methods import (
    CAF_KD_CHOICES,
    CAF_LAMBDA_AD,
    METHODS,
    SSUL_PSEUDO_THRESHOLD,
    Method,
    method_help,
    method_option_rules,
    per_method,
    resolve_method_options,
    spec_with_switches,
)

DATASET_DEFAULTS = {
    "voc": dict(
        task="15-5",
        lr=0.01,
        lr_incremental=0.001,
        epochs=30,
        batch_size=24,
        image_size=512,
        backbone="resnet101",
        output_stride=16,
    ),
    "ade": dict(
        task="100-50",
        lr=0.01,
        lr_incremental=0.001,
        epochs=60,
        batch_size=24,
        image_size=512,
        backbone="resnet101",
        output_stride=16,
    ),
    "synthetic": dict(
        task="15-5",
        lr=0.1,
        lr_incremental=0.05,
        epochs=12,
        batch_size=8,
        image_size=48,
        backbone="tiny",
        output_stride=4,
    ),
}


def per_dataset(key: str) -> str:
    """The defaults of ``key`` for the help texts, e.g. "voc/ade 0.001, synthetic 0.05"."""
    groups: dict = {}
    for dataset, defaults in DATASET_DEFAULTS.items():
        groups.setdefault(defaults[key], []).append(dataset)
    return ", ".join(f"{'/'.join(names)} {value}" for value, names in groups.items())


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: finite, from ``low`` (included) or above it (``low_open``),
    below ``high`` (excluded) when it has one."""

    low: float
    low_open: bool = False
    high: float | None = None

    def problem(self, value, kind: type) -> str | None:
        """None when ``value`` is in the range, else what it must be ("must be an integer >= 1")."""
        number = numbers.Integral if kind is int else numbers.Real
        ok = isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > self.low if self.low_open else value >= self.low)
        ok = ok and (self.high is None or value < self.high)
        if ok:
            return None
        what = "an integer" if kind is int else "a finite number"
        if self.high is not None:
            return f"must be {what} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g})"
        return f"must be {what} {'>' if self.low_open else '>='} {self.low:g}"


AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, FRACTION = Range(1), Range(0), Range(0, low_open=True), Range(0, high=1)


def option(default, help: str, valid: Range | None = None, **cli):
    """A TrainConfig field that is a command-line option of ``train`` (incseg_fast/cli.py builds
    them from these fields): ``help`` its help text (``%(default)s`` is the default), ``valid`` the
    range of a numeric option (checked when the command line is parsed and by
    :meth:`TrainConfig.resolved`), ``cli`` more argparse arguments (``choices``, ``metavar``;
    ``flag``: the option's name when it is not the field's, e.g. ``--no-progress`` for a True
    default that the flag turns off)."""
    return field(default=default, metadata={"help": help, "valid": valid, "cli": cli})


def _option(name: str) -> dataclasses.Field:
    (field,) = [f for f in dataclasses.fields(TrainConfig) if f.name == name]
    return field


def option_flag(name: str) -> str:
    """The command-line flag of TrainConfig field ``name``: ``--no-fusion`` for caf_module, else from the
    name ("lr_incremental" -> "--lr-incremental")."""
    return _option(name).metadata["cli"].get("flag", "--" + name.replace("_", "-"))


def option_default(name: str):
    """The value TrainConfig field ``name`` has when it is not given (None: the dataset's or method's)."""
    return _option(name).default


def option_type(annotation) -> type:
    """The type of a TrainConfig field's values: int for ``int | None``, and so on."""
    options = [t for t in typing.get_args(annotation) if t is not type(None)] or [annotation]
    return options[0]


BACKBONES = ("resnet18", "resnet50", "resnet101", "tiny", "small")


@dataclass
class TrainConfig:
    """The options of a training run; None = the dataset's or the method's default, resolved by
    :meth:`resolved` from DATASET_DEFAULTS and METHODS (the help texts are generated from them)."""

    dataset: str = option(
        "synthetic",
        "dataset (default: synthetic, generated in memory; voc/ade need --root)",
        choices=sorted(DATASET_DEFAULTS),
    )
    root: str | None = option(None, "dataset folder (voc and ade only)")
    task: str | None = option(
        None,
        "task: voc/synthetic 19-1, 15-5, 15-1 (=15-5s), 10-1, offline; "
        f"ade 100-50, 100-10, 50-50, 100-5, offline (default: {per_dataset('task')})",
    )
    mode: str = option(
        "disjoint", "image selection per step (default: %(default)s)", choices=("disjoint", "overlapped")
    )
    image_size: int | None = option(
        None,
        f"training crop (voc/ade) or image side (synthetic) (default: {per_dataset('image_size')})",
        AT_LEAST_ONE,
    )
    train_images: int = option(600, "synthetic only: number of training images (default %(default)s)", AT_LEAST_ONE)
    val_images: int = option(200, "synthetic only: number of validation images (default %(default)s)", AT_LEAST_ONE)
    data_seed: int = option(0, "synthetic only: seed of the generated scenes (default %(default)s)", NOT_NEGATIVE)
    eval_protocol: str = option(
        "mib",
        "unseen classes at evaluation: ignored (mib, default) or background (plop)",
        choices=("mib", "plop"),
    )
    device: str = option("auto", "auto (CUDA when available), cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)")
    amp: str = option(
        "auto",
        "mixed precision: auto = bf16 (fp16 without bf16 support) on CUDA, off on CPU; bf16 also works on CPU",
        choices=("auto", "none", "bf16", "fp16"),
    )
    batch_size: int | None = option(
        None,
        "the global batch: under torchrun it is split evenly across the processes "
        f"(default: {per_dataset('batch_size')})",
        AT_LEAST_ONE,
    )
    workers: int = option(0, "DataLoader worker processes (default %(default)s)", NOT_NEGATIVE)
    loss_backend: str = option(
        "auto",
        "implementation of the losses (and of CAF's structured attention in the new and the old "
        "model): auto (fused kernel for the device), reference, cpu, cuda, triton (default auto)",
        choices=BACKEND_CHOICES,
    )
    progress: bool = option(True, "no progress line", flag="--no-progress")
    method: str = option("mib", method_help(), choices=list(METHODS))
    out: str = option("runs/train", "output folder (default %(default)s); rerunning the same command there resumes")
    backbone: str | None = option(None, f"encoder (default: {per_dataset('backbone')})", choices=BACKBONES)
    output_stride: int | None = option(
        None,
        f"encoder output stride via dilation (default: {per_dataset('output_stride')}; "
        "4 only for the tiny/small backbones)",
        choices=(4, 8, 16),
    )
    pretrained: str | None = option(
        None,
        "resnet backbones: torchvision ImageNet state dict file (torch.save(model.state_dict())); "
        "nothing is downloaded",
        metavar="PATH",
    )
    epochs: int | None = option(None, f"epochs of step 0 (default: {per_dataset('epochs')})", AT_LEAST_ONE)
    epochs_incremental: int | None = option(
        None, "epochs of each later step (default: same as --epochs; not for joint)", AT_LEAST_ONE
    )
    lr: float | None = option(None, f"step-0 learning rate (default: {per_dataset('lr')})", NOT_NEGATIVE)
    lr_incremental: float | None = option(
        None, f"learning rate of later steps (default: {per_dataset('lr_incremental')}; not for joint)", NOT_NEGATIVE
    )
    momentum: float = option(0.9, "SGD momentum (default %(default)s)", FRACTION)
    weight_decay: float = option(1e-4, "SGD weight decay (default %(default)s)", NOT_NEGATIVE)
    lambda_kd: float | None = option(
        None, f"logit distillation weight (default: {per_method('lambda_kd')})", NOT_NEGATIVE
    )
    alpha: float = option(
        1.0, "teacher logit scale of the distillation (lwf, ilt, mib, caf; default %(default)g)", POSITIVE
    )
    lambda_fd: float | None = option(
        None, f"L2 distillation weight of the encoder output (default: {per_method('lambda_fd')})", NOT_NEGATIVE
    )
    freeze_encoder: bool = option(False, "ilt only: freeze the encoder in steps > 0 (E_F)")
    lambda_ad: float | None = option(
        None,
        "caf only: attentive distillation weight (default: "
        + ", ".join(f"{d} {v:g}" for d, v in CAF_LAMBDA_AD.items())
        + "; 0 = off)",
        NOT_NEGATIVE,
    )
    # caf only, CAF's Table III switches (incseg-fast ablate): None = the method's default
    kd: str | None = option(
        None,
        "caf only: logit distillation, none, unbiased (MiB's) or balanced (BKD, the default)",
        choices=CAF_KD_CHOICES,
    )
    caf_module: bool | None = option(
        None, "caf only: without the fusion module (projection, fusion, SAB)", flag="--no-fusion", const=False
    )
    lambda_pod: float | None = option(
        None,
        f"plop only: Local POD weight of the backbone's stages (default: {per_method('lambda_pod')})",
        NOT_NEGATIVE,
    )
    lambda_pod_logits: float | None = option(
        None, f"plop only: Local POD weight of the logits (default: {per_method('lambda_pod_logits')})", NOT_NEGATIVE
    )
    pseudo_labels: bool | None = option(
        None,
        "plop, ssul: without the pseudo-labels (the background keeps its label; plop: every image weight 1)",
        flag="--no-pseudo-labels",
        const=False,
    )
    pseudo_threshold: float | None = option(
        None,
        "ssul only: a background (or unknown) pixel takes the old model's foreground class when its "
        f"sigmoid is at least this (default {SSUL_PSEUDO_THRESHOLD:g}, SSUL's)",
        Range(0, high=1),
    )
    lambda_ac: float | None = option(
        None, "dkd only: weight of the auxiliary classifier's loss (default 1, DKD's)", NOT_NEGATIVE
    )
    lambda_dkd: float | None = option(
        None,
        "dkd only: weight of each of the decomposed distillations pos_reg and neg_reg (default 5, DKD's; 0 = off)",
        NOT_NEGATIVE,
    )
    pos_weight: float | None = option(
        None, "dkd only: weight of the new classes' positives in the BCE (default 1, DKD's)", POSITIVE
    )
    step0_checkpoint: str | None = option(
        None, "reuse this trained step-0 checkpoint (same architecture) instead of training step 0", metavar="PATH"
    )
    seed: int = option(0, "seed of initialisation and data order (default %(default)s)", NOT_NEGATIVE)
    materialise_upsampled_logits: bool = option(
        False,
        "upsample the logits to the labels' resolution before the losses (MiB's way) instead of "
        "letting the fused losses upsample them (size=, MATH.md#upsampling; the default)",
    )
    sync_bn: bool = option(
        True,
        "under torchrun: batch norm of the student with each process's own batch statistics "
        "(default: the statistics of the global batch, synchronised across processes)",
        flag="--no-sync-bn",
    )
    dist_timeout_s: float = option(
        600.0,
        "under torchrun: seconds a process waits for the others (in a collective operation, or for "
        "rank 0's file work) before it stops and names the rank that did not answer (default %(default)g)",
        POSITIVE,
    )

    def resolved(self) -> TrainConfig:
        """A copy with every None replaced by the dataset's and the method's defaults."""
        self.check_values()
        cfg = dataclasses.replace(self)
        for key, value in DATASET_DEFAULTS[self.dataset].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.epochs_incremental is None:
            cfg.epochs_incremental = cfg.epochs
        resolve_method_options(cfg)
        cfg.check_values()
        _reject_options_that_do_not_apply(cfg)
        return cfg

    def check_values(self) -> None:
        """Every option that is set holds one of its choices or a number in its range; --out names a folder."""
        types = typing.get_type_hints(TrainConfig)
        for option_field in dataclasses.fields(self):
            name, value = option_field.name, getattr(self, option_field.name)
            choices, valid = option_field.metadata["cli"].get("choices"), option_field.metadata["valid"]
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"{option_flag(name)} must be one of {list(choices)}, got {value!r}")
            problem = valid.problem(value, option_type(types[name])) if valid and value is not None else None
            if problem:
                raise ValueError(f"{option_flag(name)} {problem}, got {value!r}")
        if not str(self.out).strip():
            raise ValueError("--out must name a folder, got an empty name (it would write into the current folder)")

    @property
    def method_spec(self) -> Method:
        """The method, with the switches ``kd`` and ``caf_module`` applied where they are set."""
        return spec_with_switches(self)


def _reject_options_that_do_not_apply(cfg: TrainConfig) -> None:
    """An option that the method, dataset or backbone would ignore is an error, not a silent no-op.

    An option that does not apply must keep its neutral value (the value resolution gives it, so
    that a resolved config resolves again unchanged).
    """
    spec, synthetic = cfg.method_spec, cfg.dataset == "synthetic"
    method, dataset, backbone = f"--method {cfg.method}", f"--dataset {cfg.dataset}", f"--backbone {cfg.backbone}"
    by_method = [
        (name, neutral, applies, method, purpose)
        for name, neutral, applies, purpose in method_option_rules(cfg, option_default)
    ]
    rules = (  # (option, neutral value, whether it applies, the choice it would not apply to, what it is for)
        *by_method,
        (
            "lr_incremental",
            DATASET_DEFAULTS[cfg.dataset]["lr_incremental"],
            not spec.joint,
            method,
            "the steps after step 0; joint trains one step with --lr",
        ),
        (
            "epochs_incremental",
            cfg.epochs,
            not spec.joint,
            method,
            "the steps after step 0; joint trains one step with --epochs",
        ),
        ("step0_checkpoint", None, not spec.joint, method, "incremental methods; joint trains every class at once"),
        ("root", None, not synthetic, dataset, "voc and ade; synthetic data is generated"),
        ("train_images", TrainConfig.train_images, synthetic, dataset, "synthetic data"),
        ("val_images", TrainConfig.val_images, synthetic, dataset, "synthetic data"),
        ("data_seed", TrainConfig.data_seed, synthetic, dataset, "synthetic data"),
        ("pretrained", None, cfg.backbone.startswith("resnet"), backbone, "the resnet backbones"),
    )
    if spec.saliency and cfg.dataset == "ade":
        raise ValueError(f"{method} needs saliency maps of the training images; the ade reader reads none (voc does)")
    for name, neutral, applies, choice, purpose in rules:
        if not applies and getattr(cfg, name) != neutral:
            raise ValueError(f"{option_flag(name)} does not apply to {choice} (it is for {purpose})")
