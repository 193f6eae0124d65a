"""The benchmark cases shared by the pytest-benchmark suite and the report.

A case is one op at one size and dtype. It makes fresh random inputs and knows how to call the
op through each provider: the eager reference (``incseg_fast.reference``),
``torch.compile(reference)``, and a fused backend through the public API (``backend=...``).
Every provider is called the same way: ``fn(**inputs.arguments) -> tuple of outputs``, then
``torch.autograd.backward(outputs, inputs.upstream)`` for the backward.
"""

import contextlib
import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from incseg_fast import reference
from incseg_fast.bench import mib
from incseg_fast.vocabulary import FUSED_BACKENDS

IGNORE_INDEX = 255
IGNORED_FRACTION = 0.1
# MiB's lambda_kd: the upstream gradient of the distillation term in the fwd+bwd benchmark.
KD_WEIGHT = 10.0

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPE = "fp32"
# Which fused backends can run on tensors of each device type. The Triton interpreter on CPU
# tensors is a debugging tool, not a benchmark.
BACKENDS_FOR_DEVICE = {"cpu": ("cpu",), "cuda": tuple(b for b in FUSED_BACKENDS if b != "cpu")}


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    kind: str  # "logits": dims B, C, Co, H, W; "features": B, C, H, W; "upsampled": B, C, Co, H, W, stride
    dims: tuple
    cuda_only: bool = False
    dtypes: tuple = ()  # dtype names this size runs in when none is asked for; empty: DEFAULT_DTYPE only
    quick: bool = False

    def describe(self):
        letters = {
            "logits": ("B", "C", "Co", "H", "W"),
            "features": ("B", "C", "H", "W"),
            "upsampled": ("B", "C", "Co", "H", "W", "stride"),
            "pseudo": ("B", "Co", "N", "H", "W"),
        }[self.kind]
        return " ".join(f"{k}={v}" for k, v in zip(letters, self.dims, strict=True))


SIZES = {
    s.name: s
    for s in (
        Size("voc", "logits", (4, 21, 16, 256, 256)),
        Size("ade", "logits", (2, 151, 101, 128, 128)),
        Size("voc512", "logits", (8, 21, 16, 512, 512), cuda_only=True, dtypes=("fp32", "bf16")),
        # The papers' batch of 24 at 512 x 512 (tools/gpu_check.py): logits far beyond a GPU's L2.
        Size("voc512_b24", "logits", (24, 21, 16, 512, 512), cuda_only=True, dtypes=("fp32", "bf16")),
        Size("ade512_b24", "logits", (24, 151, 101, 512, 512), cuda_only=True, dtypes=("fp32", "bf16")),
        Size("feat2048", "features", (4, 2048, 32, 32)),
        Size("feat256", "features", (4, 256, 64, 64)),
        Size("feat2048x64", "features", (8, 2048, 64, 64), cuda_only=True),
        # size=: labels at H x W, logits at the network's resolution (H / stride, W / stride).
        Size("voc_s8", "upsampled", (4, 21, 16, 256, 256, 8)),
        Size("voc_s16", "upsampled", (4, 21, 16, 256, 256, 16)),
        Size("ade_s8", "upsampled", (2, 151, 101, 256, 256, 8)),
        Size("voc512_s8", "upsampled", (8, 21, 16, 512, 512, 8), cuda_only=True),
        Size("voc512_s16", "upsampled", (8, 21, 16, 512, 512, 16), cuda_only=True),
        Size("ade512_s8", "upsampled", (4, 151, 101, 512, 512, 8), cuda_only=True),
        Size("voc512_s16_b24", "upsampled", (24, 21, 16, 512, 512, 16), cuda_only=True, dtypes=("fp32", "bf16")),
        # Small odd shapes for smoke tests (--quick).
        Size("quick_logits", "logits", (2, 21, 16, 45, 53), quick=True),
        Size("quick_features", "features", (2, 96, 19, 23), quick=True),
        Size("quick_upsampled", "upsampled", (2, 21, 16, 45, 53, 8), quick=True),
    )
}


@dataclasses.dataclass
class Inputs:
    """Keyword arguments of one call, the names of those that receive gradients, and the
    upstream gradients of the outputs (one per output; any dtype, cast to the output's)."""

    arguments: dict
    grad_names: tuple
    upstream: tuple
    primary: str  # the tensor whose size is the unit of the memory figure (logits or features)
    unit_bytes: int = None  # the unit itself where it is not the primary tensor's size

    def unit(self):
        """Bytes of the memory figure's unit: the primary tensor, or unit_bytes where given."""
        if self.unit_bytes is not None:
            return self.unit_bytes
        primary = self.arguments[self.primary]
        return primary.numel() * primary.element_size()

    def tensors(self):
        return {k: v for k, v in self.arguments.items() if isinstance(v, torch.Tensor)}

    def grad_tensors(self):
        return [self.arguments[name] for name in self.grad_names]

    def clear_grads(self):
        for t in self.grad_tensors():
            t.grad = None

    def converted(self, dtype):
        """A detached copy with every floating tensor in ``dtype`` (the float64 reference)."""
        arguments = {}
        for k, v in self.arguments.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().to(dtype) if v.is_floating_point() else v.clone()
                v.requires_grad_(k in self.grad_names)
            arguments[k] = v
        upstream = tuple(u.to(dtype) for u in self.upstream)
        return Inputs(arguments, self.grad_names, upstream, self.primary, self.unit_bytes)


# ---------------------------------------------------------------------------------------------
# Input makers.
# ---------------------------------------------------------------------------------------------


def _randn(shape, generator, scale=1.0):
    return torch.randn(shape, generator=generator) * scale


def _labels(B, C, H, W, generator):
    t = torch.randint(0, C, (B, H, W), generator=generator)
    ignored = torch.rand((B, H, W), generator=generator) < IGNORED_FRACTION
    return t.masked_fill(ignored, IGNORE_INDEX)


def _finish(arguments, grad_names, upstream, primary, dtype, device):
    for k, v in arguments.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
            arguments[k] = v.requires_grad_(k in grad_names)
    upstream = tuple(u.to(device=device, dtype=torch.float32 if u.dim() == 0 else dtype) for u in upstream)
    return Inputs(arguments, tuple(grad_names), upstream, primary)


def make_logit_inputs(dims, dtype, device, generator, *, with_target, with_teacher):
    B, C, Co, H, W = dims
    arguments = {"x": _randn((B, C, H, W), generator, 3.0)}
    upstream = []
    if with_target:
        arguments["t"] = _labels(B, C, H, W, generator)
        upstream.append(torch.tensor(1.0))
    if with_teacher:
        arguments["y"] = _randn((B, Co, H, W), generator, 3.0)
        upstream.append(torch.tensor(KD_WEIGHT))
    else:
        arguments["old_classes"] = Co
    return _finish(arguments, ("x",), upstream, "x", dtype, device)


def make_upsampled_inputs(dims, dtype, device, generator):
    """Logits x (B, C, h, w) and y (B, Co, h, w) at the network's resolution h = H // stride, labels
    (B, H, W); the memory unit is one full-resolution logits tensor (B, C, H, W)."""
    B, C, Co, H, W, stride = dims
    h, w = H // stride, W // stride
    arguments = {
        "x": _randn((B, C, h, w), generator, 3.0),
        "t": _labels(B, C, H, W, generator),
        "y": _randn((B, Co, h, w), generator, 3.0),
        "size": (H, W),
    }
    inputs = _finish(arguments, ("x",), [torch.tensor(1.0), torch.tensor(KD_WEIGHT)], "x", dtype, device)
    inputs.unit_bytes = B * C * H * W * inputs.arguments["x"].element_size()
    return inputs


def make_distillation_inputs(dims, dtype, device, generator):
    B, C, H, W = dims
    f = _randn((B, C, H, W), generator)
    arguments = {
        "f": f,
        "g": f + _randn((B, C, H, W), generator, 0.1),  # the old model's features are close
        "a": torch.sigmoid(_randn((B, C), generator)),  # squeeze-excitation outputs in (0, 1)
        "b": torch.sigmoid(_randn((B, C), generator)),
    }
    # The old model (g, b) is frozen: gradients go to the student's f and a only.
    return _finish(arguments, ("f", "a"), [torch.tensor(1000.0)], "f", dtype, device)


def make_attention_inputs(dims, dtype, device, generator):
    B, C, H, W = dims
    arguments = {
        "v": _randn((B, C, H, W), generator),
        "a_ch": _randn((B, C), generator),
        "a_sp": _randn((B, H, W), generator),
    }
    upstream = [_randn((B, C, H, W), generator)]
    return _finish(arguments, ("v", "a_ch", "a_sp"), upstream, "v", dtype, device)


def make_pod_inputs(dims, dtype, device, generator):
    """One layer of PLOP's Local POD: the new features and the frozen old ones, close to them."""
    B, C, H, W = dims
    new = _randn((B, C, H, W), generator)
    arguments = {"new": new, "old": new + _randn((B, C, H, W), generator, 0.1)}
    return _finish(arguments, ("new",), [torch.tensor(0.01)], "new", dtype, device)


# ---------------------------------------------------------------------------------------------
# The ops: the reference call and the public-API call with the same arguments.
# ---------------------------------------------------------------------------------------------


def _api():
    import incseg_fast

    return incseg_fast


def reference_incremental_loss(x, t, y):
    return reference.incremental_loss(x, t, y, old_classes=y.shape[1], ce="unbiased", kd="unbiased")


def fused_incremental_loss(x, t, y, *, backend):
    return _api().incremental_loss(x, t, y, old_classes=y.shape[1], ce="unbiased", kd="unbiased", backend=backend)


def reference_incremental_loss_balanced(x, t, y):
    return reference.incremental_loss(x, t, y, old_classes=y.shape[1], ce="unbiased", kd="balanced")


def fused_incremental_loss_balanced(x, t, y, *, backend):
    return _api().incremental_loss(x, t, y, old_classes=y.shape[1], ce="unbiased", kd="balanced", backend=backend)


def _upsample(v, size):
    return F.interpolate(v, size=size, mode="bilinear", align_corners=False)


def reference_incremental_loss_upsampled(x, t, y, size):
    """What a MiB-style trainer runs: interpolate both models' logits, then the loss."""
    return reference.incremental_loss(_upsample(x, size), t, _upsample(y, size), old_classes=y.shape[1])


def fused_incremental_loss_upsampled(x, t, y, size, *, backend, fused_upsampling):
    """The fused loss on interpolated logits, or (fused_upsampling) on the logits as they are with size=."""
    if fused_upsampling:
        return _api().incremental_loss(x, t, y, old_classes=y.shape[1], size=size, backend=backend)
    return _api().incremental_loss(_upsample(x, size), t, _upsample(y, size), old_classes=y.shape[1], backend=backend)


def mib_incremental_loss_upsampled(x, t, y, size):
    """MiB's way: its module interpolates both models' logits, then its loss modules run on them."""
    return mib.mib_incremental_loss(_upsample(x, size), t, _upsample(y, size))


def mib_unbiased_cross_entropy(x, t, old_classes):
    return (mib.mib_unbiased_cross_entropy(x, t, old_classes),)


def mib_knowledge_distillation(x, y):
    return (mib.mib_knowledge_distillation(x, y),)


def reference_unbiased_cross_entropy(x, t, old_classes):
    return (reference.unbiased_cross_entropy(x, t, old_classes),)


def fused_unbiased_cross_entropy(x, t, old_classes, *, backend):
    return (_api().unbiased_cross_entropy(x, t, old_classes, backend=backend),)


def reference_knowledge_distillation(x, y):
    return (reference.knowledge_distillation(x, y),)


def fused_knowledge_distillation(x, y, *, backend):
    return (_api().knowledge_distillation(x, y, backend=backend),)


def reference_attentive_distillation(f, g, a, b):
    return (reference.attentive_distillation(f, g, a, b),)


def fused_attentive_distillation(f, g, a, b, *, backend):
    return (_api().attentive_distillation(f, g, a, b, backend=backend),)


def reference_structured_attention(v, a_ch, a_sp):
    return (reference.structured_attention(v, a_ch, a_sp),)


def fused_structured_attention(v, a_ch, a_sp, *, backend):
    return (_api().structured_attention(v, a_ch, a_sp, backend=backend),)


def reference_local_pod(new, old):
    return (reference.local_pod(new, old),)


def fused_local_pod(new, old, *, backend):
    return (_api().local_pod(new, old, backend=backend),)


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    kind: str  # the kind of Size it runs at
    make_inputs: object  # (dims, dtype, device, generator) -> Inputs
    reference: object
    fused: object
    sizes: tuple  # the default sizes (CUDA-only ones are dropped on CPU)
    mib: object = None  # the same outputs computed as MiB's loss modules compute them, where MiB has the loss


OPS = {
    op.name: op
    for op in (
        Op(
            "incremental_loss",
            "logits",
            functools.partial(make_logit_inputs, with_target=True, with_teacher=True),
            reference_incremental_loss,
            fused_incremental_loss,
            ("voc", "ade", "voc512"),
            mib.mib_incremental_loss,
        ),
        Op(
            "incremental_loss_balanced",
            "logits",
            functools.partial(make_logit_inputs, with_target=True, with_teacher=True),
            reference_incremental_loss_balanced,
            fused_incremental_loss_balanced,
            ("voc",),
        ),
        Op(
            "unbiased_cross_entropy",
            "logits",
            functools.partial(make_logit_inputs, with_target=True, with_teacher=False),
            reference_unbiased_cross_entropy,
            fused_unbiased_cross_entropy,
            ("voc", "ade"),
            mib_unbiased_cross_entropy,
        ),
        Op(
            "knowledge_distillation",
            "logits",
            functools.partial(make_logit_inputs, with_target=False, with_teacher=True),
            reference_knowledge_distillation,
            fused_knowledge_distillation,
            ("voc", "ade"),
            mib_knowledge_distillation,
        ),
        Op(
            "incremental_loss_upsampled",
            "upsampled",
            make_upsampled_inputs,
            reference_incremental_loss_upsampled,
            fused_incremental_loss_upsampled,
            ("voc_s8", "voc_s16", "ade_s8", "voc512_s8", "voc512_s16", "ade512_s8"),
            mib_incremental_loss_upsampled,
        ),
        Op(
            "attentive_distillation",
            "features",
            make_distillation_inputs,
            reference_attentive_distillation,
            fused_attentive_distillation,
            ("feat2048", "feat256", "feat2048x64"),
        ),
        Op(
            "structured_attention",
            "features",
            make_attention_inputs,
            reference_structured_attention,
            fused_structured_attention,
            ("feat2048", "feat256", "feat2048x64"),
        ),
        Op(
            "local_pod",
            "features",
            make_pod_inputs,
            reference_local_pod,
            fused_local_pod,
            ("feat2048", "feat256", "feat2048x64"),
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Case:
    op: Op
    size: Size
    dtype_name: str
    device: str

    @property
    def dtype(self):
        return DTYPES[self.dtype_name]

    @property
    def name(self):
        return f"{self.op.name}-{self.size.name}-{self.dtype_name}"

    def make_inputs(self, seed=0):
        generator = torch.Generator().manual_seed(seed)
        return self.op.make_inputs(self.size.dims, self.dtype, self.device, generator)


def select_cases(*, ops=None, sizes=None, dtype_name=None, device="cpu", quick=False):
    """The cases to run. ``ops``/``sizes``: names to keep (None: all); ``quick``: the small
    smoke-test sizes instead of the default ones; ``dtype_name``: every case in that dtype only
    (None: DEFAULT_DTYPE, and each size's own ``dtypes`` where it has them)."""
    unknown = set(ops or ()) - set(OPS)
    if unknown:
        raise ValueError(f"ops: unknown {sorted(unknown)}; choose from {sorted(OPS)}")
    unknown = set(sizes or ()) - set(SIZES)
    if unknown:
        raise ValueError(f"sizes: unknown {sorted(unknown)}; choose from {sorted(SIZES)}")
    cases = []
    for op in OPS.values():
        if ops is not None and op.name not in ops:
            continue
        if sizes is not None:
            size_names = [n for n in sizes if SIZES[n].kind == op.kind]
        elif quick:
            size_names = [n for n, s in SIZES.items() if s.quick and s.kind == op.kind]
        else:
            size_names = op.sizes
        for size_name in size_names:
            size = SIZES[size_name]
            if size.cuda_only and device != "cuda":
                continue
            for name in (dtype_name,) if dtype_name else size.dtypes or (DEFAULT_DTYPE,):
                cases.append(Case(op, size, name, device))
    return cases


# ---------------------------------------------------------------------------------------------
# Providers: name -> callable(**arguments) -> tuple of outputs.
# ---------------------------------------------------------------------------------------------


def fused_backends(device):
    """The fused backends available for tensors on ``device`` (empty until the public API and a
    compiled backend exist)."""
    try:
        available = _api().available_backends()
    except (ImportError, AttributeError):
        return []
    return [b for b in BACKENDS_FOR_DEVICE[device] if b in available]


@functools.cache
def _compiled(fn):
    # dynamic=False: each size gets its own static-shape graph, as a training run would.
    return torch.compile(fn, dynamic=False)


# The suffix of the fused-upsampling providers of the "upsampled" cases: backend "cpu" is
# interpolate + the fused loss, "cpu-size" the fused loss with size= (MATH.md#upsampling).
FUSED_UPSAMPLING = "-size"


# What a user runs today: MiB's loss modules as MiB writes them (bench/mib.py), eager and compiled.
MIB = "mib"
MIB_COMPILED = "mib-compiled"
# The providers every fused one is compared with (speedup = their time / the fused one's).
BASELINE_PROVIDERS = ("eager", "compiled", MIB, MIB_COMPILED)

# The providers "cpu:<isa>" run backend "cpu" with its kernels' <isa> copy (incseg_fast.cpu_isa), one
# for each copy this CPU supports besides the one "cpu" runs, so that a copy that falls behind shows.
CPU_ISA_SEPARATOR = ":"


def _cpu_isa_providers(op):
    from incseg_fast import cpu_isa

    found = []
    for isa in reversed(cpu_isa.supported_cpu_isas()):
        if isa != cpu_isa.active_cpu_isa():
            fn = functools.partial(op.fused, backend="cpu")
            fn.cpu_isa = isa  # read by run_forward and run_forward_backward
            found.append(("cpu" + CPU_ISA_SEPARATOR + isa, fn))
    return found


def providers(op, device, names=None):
    """Ordered (name, callable) for ``op``: eager, compiled, MiB's code (eager and compiled) where
    MiB has the loss, then the fused backends (for an
    "upsampled" op each twice: after interpolate, and with the fused upsampling; for backend "cpu"
    also each of its other ISA copies). ``names`` keeps only those providers (None: all)."""
    found = [("eager", op.reference), ("compiled", _compiled(op.reference))]
    if op.mib is not None:
        found += [(MIB, op.mib), (MIB_COMPILED, _compiled(op.mib))]
    for b in fused_backends(device):
        if op.kind == "upsampled":
            found.append((b, functools.partial(op.fused, backend=b, fused_upsampling=False)))
            found.append((b + FUSED_UPSAMPLING, functools.partial(op.fused, backend=b, fused_upsampling=True)))
        else:
            found.append((b, functools.partial(op.fused, backend=b)))
            if b == "cpu":
                found += _cpu_isa_providers(op)
    return [(n, fn) for n, fn in found if names is None or n in names]


def provider_names(op, device):
    return [name for name, _ in providers(op, device)]


def _provider_context(fn):
    """The CPU ISA cap of a "cpu:<isa>" provider, around its forward and its backward alike."""
    isa = getattr(fn, "cpu_isa", None)
    if isa is None:
        return contextlib.nullcontext()
    from incseg_fast.cpu_isa import cpu_isa_cap

    return cpu_isa_cap(isa)


def run_forward(fn, inputs):
    with _provider_context(fn):
        return tuple(fn(**inputs.arguments))


def run_forward_backward(fn, inputs):
    """The forward, then the backward of its outputs; an op without gradients (no upstream: the
    pseudo-labels) has no backward, and its forward+backward is its forward."""
    with _provider_context(fn):
        outputs = tuple(fn(**inputs.arguments))
        if inputs.upstream:
            upstream = [u.to(o.dtype) for u, o in zip(inputs.upstream, outputs, strict=True)]
            torch.autograd.backward(outputs, upstream)
    return outputs


def minimal_bytes(inputs, outputs, *, backward):
    """Bytes an ideal implementation moves: every input read once and every non-scalar output
    written once; with ``backward`` also each non-scalar upstream gradient read once and each
    gradient written once."""
    total = sum(t.numel() * t.element_size() for t in inputs.tensors().values())
    total += sum(o.numel() * o.element_size() for o in outputs if o.dim() > 0)
    if backward:
        total += sum(u.numel() * u.element_size() for u in inputs.upstream if u.dim() > 0)
        total += sum(t.numel() * t.element_size() for t in inputs.grad_tensors())
    return total


# ---------------------------------------------------------------------------------------------
# Entropy pseudo-labels (PLOP; MATH.md#pseudo-labels): no gradient, so forward only.
# ---------------------------------------------------------------------------------------------

SIZES.update(
    (s.name, s)
    for s in (
        # VOC 15-5 at its last step: Co = 16 old classes, N = 21 classes; CPU-sized batch and resolution.
        Size("voc_pseudo", "pseudo", (4, 16, 21, 256, 256)),
        Size("voc512_pseudo_b24", "pseudo", (24, 16, 21, 512, 512), cuda_only=True, dtypes=("fp32", "bf16")),
        Size("quick_pseudo", "pseudo", (2, 16, 21, 45, 53), quick=True),
    )
)


def make_pseudo_label_inputs(dims, dtype, device, generator):
    """Old-model logits y (B, Co, H, W), the step's labels (background 0, new classes Co..N-1, ignored)
    and thresholds in (0.2, 0.8); nothing receives a gradient."""
    B, Co, N, H, W = dims
    labels = _labels(B, N, H, W, generator)
    arguments = {
        "y": _randn((B, Co, H, W), generator, 3.0),
        "t": labels.masked_fill(labels < Co, 0),
        "thresholds": 0.2 + 0.6 * torch.rand(Co, generator=generator),
    }
    inputs = _finish(arguments, (), [], "y", dtype, device)
    inputs.arguments["thresholds"] = inputs.arguments["thresholds"].float()
    return inputs


def plop_entropy_pseudo_labels(y, t, thresholds):
    """PLOP's entropy pseudo-labelling as its train.py writes it (eager, full-size temporaries: the
    probabilities, p·log(p + 1e-8), the masks, a cloned label map), with our thresholds turned into
    PLOP's scale θ / (Co·log N) (MATH.md#pseudo-labels); N is taken as Co + 5 (VOC 15-5)."""
    old_classes = y.shape[1]
    plop_thresholds = thresholds / (old_classes * math.log(old_classes + 5))
    probabilities = torch.softmax(y.float(), dim=1)
    _, pseudo = probabilities.max(dim=1)
    entropy = -(probabilities * torch.log(probabilities + 1e-8)).mean(dim=1) / math.log(old_classes + 1e-8)
    valid = entropy / math.log(old_classes + 5) < plop_thresholds[pseudo]
    background = t < old_classes
    labels = t.long().clone()
    labels[~valid & background] = IGNORE_INDEX
    labels[valid & background] = pseudo[valid & background]
    factor = (valid & background).float().sum(dim=(1, 2)) / (background.float().sum(dim=(1, 2)) + 1e-6)
    return labels, factor


def fused_entropy_pseudo_labels(y, t, thresholds, *, backend):
    return _api().entropy_pseudo_labels(y, t, thresholds, backend=backend)


OPS["entropy_pseudo_labels"] = Op(
    "entropy_pseudo_labels",
    "pseudo",
    make_pseudo_label_inputs,
    plop_entropy_pseudo_labels,
    fused_entropy_pseudo_labels,
    ("voc_pseudo", "voc512_pseudo_b24"),
)


# ---------------------------------------------------------------------------------------------
# The sigmoid losses (MATH.md#sigmoid-losses): DKD's step objective on the logits. Its "mib" slot
# (the paper's own code, eager and compiled) holds DKD's code as DKD writes it (bench/sigmoid_papers.py).
# ---------------------------------------------------------------------------------------------

# DKD's weights of its WBCE, KD and AC terms (its VOC config): the upstream gradients of the three outputs.
DKD_TERM_WEIGHTS = (1.0, 5.0, 1.0)


def make_dkd_inputs(dims, dtype, device, generator):
    """Logits (B, C, H, W) with DKD's layout (channel 0 auxiliary, old classes 1..Co-1, new ones
    after), old logits (B, Co, H, W), labels in {0} and the new classes, with ignored pixels."""
    B, C, Co, H, W = dims
    classes = torch.tensor([0, *range(Co, C)])
    t = classes[torch.randint(0, len(classes), (B, H, W), generator=generator)]
    ignored = torch.rand((B, H, W), generator=generator) < IGNORED_FRACTION
    arguments = {
        "x": _randn((B, C, H, W), generator, 3.0),
        "t": t.masked_fill(ignored, IGNORE_INDEX),
        "y": _randn((B, Co, H, W), generator, 3.0),
    }
    return _finish(arguments, ("x",), [torch.tensor(w) for w in DKD_TERM_WEIGHTS], "x", dtype, device)


def _dkd_options(y):
    return dict(negative_channels=1, label_channels_from=y.shape[1], ignored_pixels="negative", reduction="mean")


def reference_dkd_sigmoid_losses(x, t, y):
    return reference.sigmoid_losses(
        x, t, y, None, None, pseudo_threshold=None, pseudo_background=1, ignore_index=IGNORE_INDEX, **_dkd_options(y)
    )


def fused_dkd_sigmoid_losses(x, t, y, *, backend):
    return _api().sigmoid_losses(x, t, y, backend=backend, **_dkd_options(y))


def dkd_code_sigmoid_losses(x, t, y):
    from incseg_fast.bench.sigmoid_papers import dkd_terms

    return dkd_terms(x, y, t, n_old=y.shape[1] - 1, pos_weight=1.0)


OPS["dkd_sigmoid_losses"] = Op(
    "dkd_sigmoid_losses",
    "logits",
    make_dkd_inputs,
    reference_dkd_sigmoid_losses,
    fused_dkd_sigmoid_losses,
    ("voc", "ade"),
    dkd_code_sigmoid_losses,
)
