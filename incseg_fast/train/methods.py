"""The training methods, one entry each: what a step > 0 trains, the options that are the method's
own, and the terms of its objective.

The trainer (the loop), the demo, the reports and the command line read this registry; adding a
method is one :class:`Method` entry in :data:`METHODS` and, when its objective is not MiB-style
logit terms, one terms function here (DEVELOPERS.md, "Adding a training method"). Step 0 is plain
cross-entropy for every softmax method; the sigmoid methods (ssul, dkd) train it with their own
head and terms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import incseg_fast as isf

IGNORE_INDEX = 255  # the label of ignored pixels in the data package's label tables


@dataclass
class Batch:
    """One batch's forward passes, which the terms functions read: ``out`` the student's outputs,
    ``old_out`` the frozen old model's (None without a teacher); ``size`` the labels' resolution
    when the losses upsample the logits themselves (None when the logits are already upsampled);
    ``labels`` the step's own int64 labels, which a terms function may overwrite (plop's pseudo-labels)."""

    cfg: object  # the resolved TrainConfig
    plan: object  # the step's StepPlan
    student: torch.nn.Module
    old: torch.nn.Module | None
    out: dict
    old_out: dict | None
    labels: torch.Tensor
    size: tuple[int, int] | None
    state: dict = field(default_factory=dict)  # what the method's prepare computed for the step
    saliency: torch.Tensor | None = None  # bool (B, H, W), salient pixels, for the methods that read it


def background_share_gamma(y: torch.Tensor) -> torch.Tensor:
    """BKD's γ per image as the trainer reads CAF eq. 11: the old model's non-background probability
    mass over its background mass, averaged over the image's pixels (γ_b = (1 - p̄_0) / p̄_0).

    The library's default (MATH.md#bkd-gamma) takes the softmax of the pooled logits instead; on the
    synthetic data that γ is about 1e-4 (the pooled background logit leads by ~10), which drops
    the background term, and the softmax of pooled probabilities is about 6, which multiplies it:
    neither re-weights it by the share the paper describes. Measured: docs/TRAINER.md, "CAF on
    the synthetic data"."""
    with torch.no_grad():
        p_background = y.float().softmax(1)[:, 0].mean((1, 2))
        return (1 - p_background) / p_background.clamp_min(torch.finfo(torch.float32).tiny)


def logit_terms(batch: Batch) -> dict:
    """ "ce" (plain at step 0 and for plain methods, MiB's unbiased CE otherwise) and, for a method
    that distils logits, "kd" weighted by lambda_kd: one fused incremental_loss call."""
    cfg, plan, spec = batch.cfg, batch.plan, batch.cfg.method_spec
    x = batch.out["logits"]
    incremental = plan.index > 0
    kd_mode = spec.kd if batch.old_out is not None else "none"
    y = batch.old_out["logits"].to(x.dtype) if kd_mode != "none" else None
    ce, kd = isf.incremental_loss(
        x,
        batch.labels,
        y,
        old_classes=plan.previous_classes if incremental else plan.num_classes,
        ce=spec.ce if incremental else "plain",
        kd=kd_mode,
        alpha=cfg.alpha,
        ignore_index=IGNORE_INDEX,
        gamma=background_share_gamma(y) if kd_mode == "balanced" else None,
        size=batch.size,
        backend=cfg.loss_backend,
    )
    return {"ce": ce, "kd": cfg.lambda_kd * kd} if kd_mode != "none" else {"ce": ce}


def ilt_terms(batch: Batch) -> dict:
    """ILT: the logit terms and "fd", the L2 distillation of the encoder output."""
    terms = logit_terms(batch)
    if batch.old_out is not None and batch.cfg.lambda_fd:
        encoder, old_encoder = batch.out["encoder"].float(), batch.old_out["encoder"].float()
        terms["fd"] = batch.cfg.lambda_fd * F.mse_loss(encoder, old_encoder)
    return terms


def caf_terms(batch: Batch) -> dict:
    """CAF: the logit terms and eq. 8's attentive distillation of the pairs (z-bar, z-bar old) and
    (h, h old), "ad_z" and "ad_h", each with its own SE attention."""
    terms = logit_terms(batch)
    cfg, old = batch.cfg, batch.old
    if old is None or not cfg.lambda_ad:
        return terms
    for name, key, se in (("ad_z", "encoder", "se_encoder"), ("ad_h", "features", "se_features")):
        f, g = batch.out[key], batch.old_out[key].to(batch.out[key].dtype)
        with torch.no_grad():
            b = getattr(old, se)(g)
        attention = getattr(batch.student, se)(f)
        terms[name] = cfg.lambda_ad * isf.attentive_distillation(f, g, attention, b, backend=cfg.loss_backend)
    return terms


# PLOP (Douillard et al., CVPR 2021): Local POD on the backbone's stages and the logits, and the
# background relabelled with the old model's confident predictions (MATH.md#local-pod,
# MATH.md#entropy-pseudo-labels). PLOP's entropy threshold floor, 0.001 in its units (its entropy
# divided by Co and by log N, N the classes seen so far), is 0.001 Co log N in ours (normalised entropy).
PLOP_ENTROPY_FLOOR = 0.001
PLOP_HISTOGRAM_BINS = 100


def plop_prepare(batch_outputs: Iterable, sum_over_processes: Callable, cfg, plan) -> dict:
    """PLOP's statistics before a step: the per-class thresholds of the pseudo-labels, the median
    normalised entropy of the old model's predictions on the step's background pixels, floored.
    ``batch_outputs``: (old model's outputs, labels, size) of this process's share of the training
    images; ``sum_over_processes`` adds the processes' histograms."""
    if not cfg.pseudo_labels:
        return {}
    histogram = None
    for old_out, labels, size in batch_outputs:
        counts = isf.entropy_histogram(
            old_out["logits"],
            labels,
            bins=PLOP_HISTOGRAM_BINS,
            ignore_index=IGNORE_INDEX,
            size=size,
            backend=cfg.loss_backend,
        )
        histogram = counts if histogram is None else histogram + counts
    medians = isf.histogram_medians(sum_over_processes(histogram))
    floor = PLOP_ENTROPY_FLOOR * plan.previous_classes * math.log(plan.num_classes)
    return {"thresholds": medians.clamp_min(floor)}


def plop_terms(batch: Batch) -> dict:
    """PLOP: "pseudo_ce", the cross-entropy on the labels with the background relabelled by the
    old model where it is confident, each image weighted by its share of confident background
    pixels, averaged over every pixel (PLOP's reduction); "pod", Local POD of the backbone's
    stages and of the logits, scaled by sqrt(classes / new classes) and averaged over the layers."""
    cfg, plan = batch.cfg, batch.plan
    if batch.old_out is None:
        return logit_terms(batch)
    x, y, labels = batch.out["logits"], batch.old_out["logits"], batch.labels
    factor = None
    if cfg.pseudo_labels:  # into the step's labels: no second full-resolution map
        labels, factor = isf.entropy_pseudo_labels_(
            y, labels, batch.state["thresholds"], ignore_index=IGNORE_INDEX, size=batch.size, backend=cfg.loss_backend
        )
    ce = isf.unbiased_cross_entropy(
        x, labels, 1, ignore_index=IGNORE_INDEX, reduction="none", size=batch.size, backend=cfg.loss_backend
    )
    terms = {"pseudo_ce": (ce * factor[:, None, None]).mean() if factor is not None else ce.mean()}
    if cfg.lambda_pod or cfg.lambda_pod_logits:
        pairs = [(cfg.lambda_pod, a, b) for a, b in zip(batch.out["stages"], batch.old_out["stages"], strict=True)]
        pairs.append((cfg.lambda_pod_logits, x, y.to(x.dtype)))
        pod = sum(w * isf.local_pod(a, b, backend=cfg.loss_backend) for w, a, b in pairs if w)
        schedule = math.sqrt(plan.num_classes / plan.classes_per_step[-1])
        terms["pod"] = schedule * pod / len(pairs)
    return terms


# SSUL (Cha et al., NeurIPS 2021) and DKD (Baek et al., NeurIPS 2022): a sigmoid per channel and
# binary cross-entropy with composed targets, one fused sigmoid_losses call (MATH.md#sigmoid-losses).
# The channel layouts are the models' outputs "sigmoid_unknown" and "sigmoid_auxiliary" (deeplab.py).
SSUL_PSEUDO_THRESHOLD = 0.7  # SSUL's run script (--pseudo_thresh)
SSUL_BACKGROUND_LABELS = 2  # SSUL's labels below fg_idx + 1 = 2 (unknown 0, background 1) can be relabelled


def ssul_targets(labels: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """SSUL's labels in its channel layout: unknown 0, background 1, class c -> c + 1, ignored stays
    ignored; a background pixel that the saliency map marks is "unknown" (an object the step does
    not label: a past or a future class, or none of the task's)."""
    shifted = torch.where(labels == IGNORE_INDEX, labels, labels + 1)
    return torch.where((labels == 0) & saliency, torch.zeros_like(labels), shifted)


def ssul_terms(batch: Batch) -> dict:
    """SSUL: "ce", its BCE on every channel with the unknown class from the saliency map and, at a
    step > 0, the background relabelled with the old model's confident foreground prediction
    (pseudo_threshold), averaged over the non-ignored pixels."""
    cfg, x = batch.cfg, batch.out["logits"]
    if batch.saliency is None:
        raise ValueError("ssul needs the saliency maps of its training images (the batch has none)")
    pseudo = batch.old_out is not None and cfg.pseudo_labels
    loss, _, _ = isf.sigmoid_losses(
        x,
        ssul_targets(batch.labels, batch.saliency),
        batch.old_out["logits"].to(x.dtype) if pseudo else None,
        pseudo_threshold=cfg.pseudo_threshold if pseudo else None,
        pseudo_background=SSUL_BACKGROUND_LABELS,
        ignore_index=IGNORE_INDEX,
        ignored_pixels="skip",
        size=batch.size,
        backend=cfg.loss_backend,
    )
    return {"ce": loss}


def decomposed_logits(model, features: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's pos_reg and neg_reg: the logits of the classes 1..channels-1 (no bias) computed with only
    the positive, and only the negative, weights of their 1x1 classifiers."""
    weight = torch.cat([head.weight for head in model.classifier.heads], 0)[1:channels, :, 0, 0]
    weight = weight.to(features.dtype)
    return (
        torch.einsum("bfhw,kf->bkhw", features, weight.clamp(min=0)),
        torch.einsum("bfhw,kf->bkhw", features, weight.clamp(max=0)),
    )


def dkd_decomposed_distillation(batch: Batch) -> torch.Tensor:
    """DKD's dkd_pos + dkd_neg: BCE of the student's decomposed logits of the old classes against the
    sigmoid of the old model's, per-channel means over the pixels, summed (at the features' resolution)."""
    cfg, channels = batch.cfg, batch.plan.previous_classes
    student = decomposed_logits(batch.student, batch.out["features"], channels)
    with torch.no_grad():
        teacher = decomposed_logits(batch.old, batch.old_out["features"], channels)
    total = 0.0
    for x, y in zip(student, teacher, strict=True):
        _, soft, _ = isf.sigmoid_losses(
            x, None, y.to(x.dtype), label_channels_from=x.shape[1], backend=cfg.loss_backend
        )
        total = total + soft
    return total


def dkd_terms(batch: Batch) -> dict:
    """DKD: "wbce", the BCE of the step's classes (pos_weight on their positives; background and
    ignored pixels are negatives); "ac", the auxiliary channel 0 pushed to 0 (lambda_ac); at a
    step > 0, "kd", the BCE of the old classes' channels against the sigmoid of the old model's
    (lambda_kd), and "dkd", the decomposed distillation (lambda_dkd). Each a per-channel mean
    over every pixel, summed over the channels (DKD's reduction)."""
    cfg, plan, x = batch.cfg, batch.plan, batch.out["logits"]
    old_channels = plan.previous_classes if batch.old_out is not None else 1
    pos_weight = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    pos_weight[old_channels:] = cfg.pos_weight
    wbce, kd, ac = isf.sigmoid_losses(
        x,
        batch.labels,
        batch.old_out["logits"].to(x.dtype) if batch.old_out is not None else None,
        pos_weight=pos_weight,
        negative_channels=1,
        label_channels_from=old_channels,
        ignore_index=IGNORE_INDEX,
        ignored_pixels="negative",
        size=batch.size,
        backend=cfg.loss_backend,
    )
    terms = {"wbce": wbce, "ac": cfg.lambda_ac * ac}
    if batch.old_out is not None:
        terms["kd"] = cfg.lambda_kd * kd
        if cfg.lambda_dkd:
            terms["dkd"] = cfg.lambda_dkd * dkd_decomposed_distillation(batch)
    return terms


@dataclass(frozen=True)
class Method:
    """How a method trains a step > 0.

    ``own_options``: the options only this method takes (TrainConfig field -> what it is for, as the
    error for another method says it); ``dataset_defaults``: per-dataset defaults of those options;
    ``terms``: the objective, a function of the :class:`Batch` returning its weighted terms by name
    ("ce", the cross-entropy averaged over the non-ignored pixels, when it has one; every other
    term averages over every pixel or feature element); ``prepare``: what a step > 0 computes
    before it trains (:func:`plop_prepare`'s arguments), the :attr:`Batch.state` of its batches."""

    name: str
    summary: str
    ce: str = "plain"  # "plain" | "unbiased"
    kd: str = "none"  # "none" | "plain" | "unbiased" | "balanced"
    lambda_kd: float = 0.0
    lambda_fd: float = 0.0  # ILT's L2 distillation of the encoder output
    lambda_ad: float = 0.0  # CAF's attentive distillation (docs/MATH.md#ad), on z-bar and h
    lambda_pod: float = 0.0  # PLOP's Local POD of the backbone's stages
    lambda_pod_logits: float = 0.0  # PLOP's Local POD of the logits
    pseudo_labels: bool = False  # PLOP's entropy pseudo-labels of the background, SSUL's confident ones
    pseudo_threshold: float | None = None  # SSUL's confidence threshold of its pseudo-labels
    output: str = "softmax"  # how the logits become classes (models/deeplab.py OUTPUTS)
    saliency: bool = False  # the training images come with their saliency maps (SSUL's unknown class)
    freeze_old: bool = False  # steps > 0 train only the classifier's first head and the new one (SSUL)
    uses_teacher: bool = False  # steps > 0 run the old model whatever the options (DKD)
    lambda_ac: float = 0.0  # DKD's loss on its auxiliary channel
    lambda_dkd: float = 0.0  # DKD's decomposed distillation (pos_reg + neg_reg)
    pos_weight: float = 1.0  # DKD's weight of the new classes' positives
    balanced_init: bool = False  # the new classes' classifier starts from the background's (MiB)
    caf_module: bool = False
    joint: bool = False  # all classes in one step (the offline upper bound)
    own_options: dict = field(default_factory=dict)
    dataset_defaults: dict = field(default_factory=dict)
    terms: Callable[[Batch], dict] = logit_terms
    prepare: Callable | None = None

    @property
    def incremental(self) -> bool:
        return not self.joint

    def default(self, option: str, dataset: str):
        """This method's default of ``option`` on ``dataset``."""
        return self.dataset_defaults.get(dataset, {}).get(option, getattr(self, option))


# CAF's lambda_AD per dataset. The attentive distillation is a squared error on raw features: the
# curvature of the objective grows linearly with lambda_AD, and momentum SGD needs
# lr * lambda_max < 3.8. The papers' 1000 goes with ResNet-101 features and an incremental LR of
# 0.001; at the synthetic data's 0.05 it diverges within a few iterations, 100 too, and 10 spikes.
# Of the stable 0, 0.1 and 1, 0.1 gave the best all-class mIoU on the demo (1 pins the features
# the new classes need): docs/TRAINER.md, "CAF on the synthetic data".
CAF_LAMBDA_AD = {"voc": 1000.0, "ade": 1000.0, "synthetic": 0.1}
# the logit distillations CAF's ablation switches between (Table III: none, KD, BKD)
CAF_KD_CHOICES = ("none", "unbiased", "balanced")

_METHOD_LIST = (
    Method("ft", "fine-tuning: plain cross-entropy on the new classes only"),
    Method("lwf", "LwF: plain CE and knowledge distillation", kd="plain", lambda_kd=100.0),
    Method(
        "ilt",
        "ILT: LwF plus an L2 distillation of the encoder output",
        kd="plain",
        lambda_kd=100.0,
        lambda_fd=100.0,
        own_options={"lambda_fd": "ilt's feature distillation", "freeze_encoder": "ilt (E_F)"},
        terms=ilt_terms,
    ),
    Method(
        "mib",
        "MiB: unbiased CE and unbiased KD, new classes initialised from the background",
        ce="unbiased",
        kd="unbiased",
        lambda_kd=10.0,
        balanced_init=True,
    ),
    Method(
        "caf",
        "CAF: MiB's CE, balanced KD (BKD), attentive distillation and the fusion module",
        ce="unbiased",
        kd="balanced",
        lambda_kd=10.0,
        lambda_ad=1000.0,
        balanced_init=True,
        caf_module=True,
        own_options={
            "lambda_ad": "caf's attentive distillation",
            "kd": "caf's ablation (Table III)",
            "caf_module": "caf's ablation (Table III)",
        },
        dataset_defaults={dataset: {"lambda_ad": value} for dataset, value in CAF_LAMBDA_AD.items()},
        terms=caf_terms,
    ),
    Method(
        "plop",
        "PLOP: CE on entropy pseudo-labels, Local POD of the backbone stages and the logits",
        lambda_pod=0.01,
        lambda_pod_logits=0.0005,
        pseudo_labels=True,
        balanced_init=True,
        own_options={
            "lambda_pod": "plop's Local POD",
            "lambda_pod_logits": "plop's Local POD",
            "pseudo_labels": "plop's and ssul's pseudo-labels",
        },
        terms=plop_terms,
        prepare=plop_prepare,
    ),
    Method(
        "ssul",
        "SSUL: sigmoid BCE with an unknown class from saliency maps and pseudo-labels, the old network frozen",
        pseudo_labels=True,
        pseudo_threshold=SSUL_PSEUDO_THRESHOLD,
        output="sigmoid_unknown",
        saliency=True,
        freeze_old=True,
        own_options={"pseudo_labels": "plop's and ssul's pseudo-labels", "pseudo_threshold": "ssul's pseudo-labels"},
        terms=ssul_terms,
    ),
    Method(
        "dkd",
        "DKD: sigmoid BCE on the new classes, KD and decomposed KD of the old ones, an auxiliary classifier",
        lambda_kd=5.0,
        output="sigmoid_auxiliary",
        uses_teacher=True,
        lambda_ac=1.0,
        lambda_dkd=5.0,
        own_options={
            "lambda_ac": "dkd's auxiliary classifier",
            "lambda_dkd": "dkd's decomposed distillation",
            "pos_weight": "dkd's weighted BCE",
        },
        terms=dkd_terms,
    ),
    Method("joint", "all classes in one step (the offline upper bound)", joint=True),
)
METHODS = {method.name: method for method in _METHOD_LIST}  # in the order of the reports


def incremental_methods() -> list[str]:
    """The methods that train the task step by step (every one but joint), ft first."""
    return [name for name, method in METHODS.items() if method.incremental]


def distilling_methods() -> list[str]:
    return [name for name, method in METHODS.items() if method.kd != "none"]


def method_help() -> str:
    """--method's help text."""
    return "; ".join(f"{name}: {method.summary}" for name, method in METHODS.items()) + " (default mib)"


def per_method(key: str) -> str:
    """The methods' defaults of ``key`` where it applies, e.g. "lwf/ilt 100, mib/caf 10"."""
    groups: dict = {}
    for name, method in METHODS.items():
        if getattr(method, key):
            groups.setdefault(getattr(method, key), []).append(name)
    return ", ".join(f"{'/'.join(names)} {value:g}" for value, names in groups.items())


def spec_with_switches(cfg) -> Method:
    """``cfg``'s method, with the switches ``kd`` and ``caf_module`` applied where they are set."""
    spec = METHODS[cfg.method]
    overrides = {k: getattr(cfg, k) for k in ("kd", "caf_module") if getattr(cfg, k) is not None}
    return dataclasses.replace(spec, **overrides) if overrides else spec


# the loss weights every method resolves (0 where a method has no such term)
LOSS_WEIGHTS = ("lambda_kd", "lambda_fd", "lambda_ad", "lambda_pod", "lambda_pod_logits", "lambda_dkd", "lambda_ac")
# those of terms that read the old model's outputs
OLD_OUTPUT_WEIGHTS = ("lambda_fd", "lambda_ad", "lambda_pod", "lambda_pod_logits", "lambda_dkd")


def resolve_method_options(cfg) -> None:
    """Fill ``cfg``'s method options left at None with the method's defaults for its dataset."""
    method = METHODS[cfg.method]
    for key in (*LOSS_WEIGHTS, *method.own_options):
        if getattr(cfg, key) is None and hasattr(method, key):
            setattr(cfg, key, method.default(key, cfg.dataset))
    if cfg.kd is not None and cfg.kd not in CAF_KD_CHOICES:
        raise ValueError(f"kd must be one of {list(CAF_KD_CHOICES)}, got {cfg.kd!r}")


def method_option_rules(cfg, neutral_default: Callable[[str], object]) -> list[tuple]:
    """(option, neutral value, whether it applies, what it is for) for the options that depend on
    the method: the logit distillation's and every method's own options. ``neutral_default(name)``:
    the value an unset option resolves to (its TrainConfig default)."""
    spec = cfg.method_spec
    distils = ", ".join(distilling_methods())
    rules = [
        ("lambda_kd", spec.lambda_kd, bool(spec.lambda_kd), f"the logit distillation of {distils}, dkd"),
        ("alpha", 1.0, spec.kd != "none", f"the logit distillation of {distils}"),
    ]
    method = METHODS[cfg.method]
    for owner in METHODS.values():
        for name, purpose in owner.own_options.items():
            neutral = getattr(method, name) if name.startswith("lambda_") else neutral_default(name)
            rules.append((name, neutral, name in method.own_options, purpose))
    return rules


def needs_teacher(cfg) -> bool:
    """Whether steps > 0 run the old model (fine-tuning does not)."""
    spec = cfg.method_spec
    uses_old_outputs = any(getattr(cfg, key) for key in OLD_OUTPUT_WEIGHTS) or bool(cfg.pseudo_labels)
    return spec.kd != "none" or spec.caf_module or spec.uses_teacher or uses_old_outputs


def head_layout(spec: Method, classes_per_step: list[int]) -> list[int]:
    """The channels of each classifier head of ``spec``'s network for steps with ``classes_per_step``
    classes (background included in step 0's): SSUL's unknown head before them, or DKD's auxiliary
    channel 0 as its own head (in place of a background channel)."""
    if spec.output == "sigmoid_unknown":
        return [1, *classes_per_step]
    if spec.output == "sigmoid_auxiliary":
        return [1, classes_per_step[0] - 1, *classes_per_step[1:]]
    return list(classes_per_step)


def forward_options(cfg) -> dict:
    """What the models' forward passes return beyond the logits: the stages for Local POD."""
    return {"stages": bool(cfg.lambda_pod or cfg.lambda_pod_logits)}


def fused_losses(cfg) -> list[str]:
    """The incseg_fast functions a run of ``cfg`` (resolved) calls: its terms' and CAF's fusion module's."""
    if cfg.method_spec.output != "softmax":
        return ["sigmoid_losses"]
    plop = cfg.method == "plop"
    return (
        (["unbiased_cross_entropy"] if plop else ["incremental_loss"])
        + ["entropy_pseudo_labels"] * bool(cfg.pseudo_labels)
        + ["local_pod"] * bool(cfg.lambda_pod or cfg.lambda_pod_logits)
        + ["attentive_distillation"] * bool(cfg.lambda_ad)
        + ["structured_attention"] * bool(cfg.method_spec.caf_module)
    )
