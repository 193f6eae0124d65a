"""Training configuration: methods and the per-dataset defaults of the papers.

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
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """How a method trains a step > 0 (step 0 is plain cross-entropy for all of them)."""

    ce: str  # "plain" | "unbiased"
    kd: str  # "none" | "plain" | "unbiased" | "balanced"
    lambda_kd: float = 0.0
    lambda_fd: float = 0.0  # ILT's L2 distillation of the encoder output
    lambda_ad: float = 0.0  # CAF's attentive distillation (docs/MATH.md#ad), on z-bar and h
    balanced_init: bool = False
    caf_module: bool = False
    joint: bool = False  # all classes in one step (the offline upper bound)


METHODS = {
    "ft": Method(ce="plain", kd="none"),
    "lwf": Method(ce="plain", kd="plain", lambda_kd=100.0),
    "ilt": Method(ce="plain", kd="plain", lambda_kd=100.0, lambda_fd=100.0),
    "mib": Method(ce="unbiased", kd="unbiased", lambda_kd=10.0, balanced_init=True),
    "caf": Method(ce="unbiased", kd="balanced", lambda_kd=10.0, lambda_ad=1000.0, balanced_init=True, caf_module=True),
    "joint": Method(ce="plain", kd="none", joint=True),
}

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


@dataclass
class TrainConfig:
    dataset: str = "synthetic"
    task: str | None = None  # None = the dataset's default (voc/synthetic 15-5, ade 100-50)
    method: str = "mib"
    mode: str = "disjoint"  # image selection: "disjoint" | "overlapped"
    root: str | None = None  # dataset root for voc / ade
    out: str = "runs/train"
    # None = the dataset's default from DATASET_DEFAULTS
    backbone: str | None = None
    output_stride: int | None = None
    pretrained: str | None = None  # torchvision ResNet state dict file
    lr: float | None = None  # step 0
    lr_incremental: float | None = None  # steps > 0
    epochs: int | None = None  # step 0
    epochs_incremental: int | None = None  # steps > 0 (defaults to epochs)
    batch_size: int | None = None
    image_size: int | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # method hyper-parameters: None = the method's default in METHODS
    lambda_kd: float | None = None
    lambda_fd: float | None = None
    lambda_ad: float | None = None
    alpha: float = 1.0
    freeze_encoder: bool = False  # ILT's E_F
    # synthetic data only
    train_images: int = 600
    val_images: int = 200
    data_seed: int = 0
    eval_protocol: str = "mib"  # "mib" (unseen classes ignored) | "plop" (counted as background)
    amp: str = "auto"  # "auto" (bf16/fp16 on CUDA, off on CPU) | "none" | "bf16" | "fp16"
    loss_backend: str = "auto"
    # True: the model upsamples its logits and the losses take them at the labels' resolution
    # (MiB's way); False: the fused losses upsample them (size=, MATH.md#upsampling)
    materialise_upsampled_logits: bool = False
    device: str = "auto"
    workers: int = 0
    seed: int = 0
    step0_checkpoint: str | None = None  # reuse a trained step 0 (same architecture) instead of training it
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with every None replaced by the dataset's and the method's defaults."""
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(f"dataset must be one of {sorted(DATASET_DEFAULTS)}, got {self.dataset!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        for name, options in (
            ("mode", ("disjoint", "overlapped")),
            ("eval_protocol", ("mib", "plop")),
            ("amp", ("auto", "none", "bf16", "fp16")),
        ):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {list(options)}, got {getattr(self, name)!r}")
        cfg = dataclasses.replace(self)
        for key, value in DATASET_DEFAULTS[self.dataset].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.epochs_incremental is None:
            cfg.epochs_incremental = cfg.epochs
        method = METHODS[self.method]
        for key in ("lambda_kd", "lambda_fd", "lambda_ad"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, getattr(method, key))
        for key in ("epochs", "epochs_incremental", "batch_size", "image_size", "train_images", "val_images"):
            if getattr(cfg, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
        _reject_options_that_do_not_apply(cfg)
        return cfg

    @property
    def method_spec(self) -> Method:
        return METHODS[self.method]


def _reject_options_that_do_not_apply(cfg: TrainConfig) -> None:
    """An option that the method, dataset or backbone would ignore is an error, not a silent no-op.

    An option that does not apply must keep its neutral value (the value resolution gives it, so
    that a resolved config resolves again unchanged).
    """
    spec = cfg.method_spec
    distils, synthetic = spec.kd != "none", cfg.dataset == "synthetic"
    method, dataset, backbone = f"--method {cfg.method}", f"--dataset {cfg.dataset}", f"--backbone {cfg.backbone}"
    rules = (  # (option, neutral value, whether it applies, the choice it would not apply to, what it is for)
        ("lambda_kd", spec.lambda_kd, distils, method, "the logit distillation of lwf, ilt, mib, caf"),
        ("alpha", 1.0, distils, method, "the logit distillation of lwf, ilt, mib, caf"),
        ("lambda_fd", spec.lambda_fd, cfg.method == "ilt", method, "ilt's feature distillation"),
        ("freeze_encoder", False, cfg.method == "ilt", method, "ilt (E_F)"),
        ("lambda_ad", spec.lambda_ad, spec.caf_module, method, "caf's attentive distillation"),
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
    for name, neutral, applies, choice, purpose in rules:
        if not applies and getattr(cfg, name) != neutral:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does not apply to {choice} (it is for {purpose})")


def per_dataset(key: str) -> str:
    """The defaults of ``key`` for the help texts, e.g. "voc/ade 0.001, synthetic 0.05"."""
    groups: dict = {}
    for dataset, defaults in DATASET_DEFAULTS.items():
        groups.setdefault(defaults[key], []).append(dataset)
    return ", ".join(f"{'/'.join(names)} {value}" for value, names in groups.items())


def per_method(key: str) -> str:
    """The methods' defaults of ``key`` where it applies, e.g. "lwf/ilt 100, mib/caf 10"."""
    groups: dict = {}
    for name, method in METHODS.items():
        if getattr(method, key):
            groups.setdefault(getattr(method, key), []).append(name)
    return ", ".join(f"{'/'.join(names)} {value:g}" for value, names in groups.items())
