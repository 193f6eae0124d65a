"""Property tests: every backend against the float64 reference over random inputs (docs/RELIABILITY.md#numerics).

Hypothesis draws shapes (1 and odd sizes included), dtypes, modes, reductions, alpha, masks, ignore
patterns, memory layouts (channels_last, strided, transposed; stride-0 expanded upstream gradients),
magnitudes and -inf logits of masked classes; each example runs one public function on the backend
under test and the same function of incseg_fast.reference on float64 copies of the same values,
and compares outputs and gradients. Tensors come from a torch generator seeded by a drawn seed.
Examples are derandomized (the same every run) and few under the Triton interpreter, which is slow.

The guarantee checked: for finite inputs inside the documented ranges every output and gradient is
finite and within RTOL[dtype] of the reference's scale (plus, for logits, the float32 rounding of
the log-normalisers, `_logit_slack`); where the reference is not finite because an input holds NaN
or +inf in a place that decides the result, the backend is not finite either.
"""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from parity_support import RTOL, device_for, interpreted

import incseg_fast as isf
from incseg_fast import reference
from incseg_fast.vocabulary import FEATURE_REDUCTIONS, INCREMENTAL_CE_MODES, KD_MODES, REDUCTIONS

EXAMPLES = {"cpu": 200, "cuda_emulator": 120, "cuda": 200, "triton": 30}
LOGIT_FUNCTIONS = (
    "incremental_loss",
    "unbiased_cross_entropy",
    "knowledge_distillation",
    "unbiased_knowledge_distillation",
    "balanced_knowledge_distillation",
)
# Input dtypes, float32 twice as often as the others.
DTYPES = (torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")


def run_examples(backend, strategy, check, scale=1.0):
    """check(backend, example) for derandomized examples of `strategy`; fewer under the Triton interpreter."""
    count = max(1, int(EXAMPLES[backend] * scale))

    @settings(
        max_examples=count,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def examples(example):
        check(backend, example)

    examples()


# ---------------------------------------------------------------------------------------------
# Shared helpers: layouts, upstream gradients, the comparison.
# ---------------------------------------------------------------------------------------------


def with_layout(tensor, layout):
    """The same values in another memory layout (4-D or 3-D tensors)."""
    if layout == "channels_last" and tensor.dim() == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a larger buffer
        big = tensor.new_zeros([2 * n for n in tensor.shape])
        view = big[tuple(slice(None, None, 2) for _ in tensor.shape)]
        view.copy_(tensor)
        return view
    if layout == "transposed":
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    return tensor.contiguous()


def upstream_gradient(shape, kind, generator):
    """A random upstream gradient: a full random map, or one value expanded with stride 0."""
    if len(shape) == 0:
        magnitude = 0.5 + 2.5 * torch.rand((), generator=generator, dtype=torch.float64)
        return magnitude * (1 if torch.rand((), generator=generator) < 0.5 else -1)
    if kind == "expanded":
        return torch.randn((), generator=generator, dtype=torch.float64).expand(shape)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def assert_matches(actual, expected, what, *, rtol, slack=0.0, poisoned=None, scale=None):
    """Where the reference is finite and representable in actual's dtype: |actual - expected| <= rtol *
    scale + slack, scale = max of those |expected|. Where it is not finite: actual is not finite either.
    Elements in `poisoned` (a bool mask) need only the latter; unrepresentable ones are not compared.
    `scale`, where given, replaces max|expected| (a sum's scale is that of its terms, not of its value)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    dtype = actual.dtype
    largest = torch.finfo(dtype).max
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(expected) & (expected.abs() <= largest)
    not_finite = ~torch.isfinite(expected)
    assert not torch.isfinite(actual[not_finite]).any(), f"{what}: finite where the reference is not"
    compared = finite if poisoned is None else finite & ~poisoned
    if not compared.any():
        return
    assert torch.isfinite(actual[compared]).all(), f"{what}: not finite where the reference is"
    scale = expected[finite].abs().max().item() if scale is None else scale
    error = (actual[compared] - expected[compared]).abs().max().item()
    # Below the dtype's normal range a value is only representable to one subnormal step.
    bound = rtol * scale + slack + torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    assert error <= bound, f"{what}: max error {error:.3e} > {rtol:.0e} * scale {scale:.3e} + slack {slack:.1e}"


def float64_copy(value, requires_grad=False):
    if not isinstance(value, torch.Tensor):
        return value
    copy = value.detach().cpu()
    copy = copy.to(torch.float64) if copy.is_floating_point() else copy
    return copy.contiguous().requires_grad_(requires_grad)


def on_device(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


# ---------------------------------------------------------------------------------------------
# Logit losses.
# ---------------------------------------------------------------------------------------------


def _alphas():
    """alpha, the teacher's logit scale: 1, 0, and magnitudes in [0.1, 4] of either sign."""
    return st.sampled_from([1.0, 0.0]) | st.floats(0.1, 4.0) | st.floats(-4.0, -0.1)


@st.composite
def logit_cases(draw, small=False):
    channels = draw(st.integers(1, 6 if small else 9))
    height, width = (draw(st.integers(1, 5 if small else 7)) for _ in range(2))
    case = dict(
        function=draw(st.sampled_from(LOGIT_FUNCTIONS)),
        shape=(draw(st.integers(1, 3)), channels, height, width),
        # size=: x and y at their own resolutions (at most the output's), upsampled by the loss.
        size=draw(st.sampled_from([None, (height, width)])),
        x_resolution=(draw(st.integers(1, height)), draw(st.integers(1, width))),
        y_resolution=(draw(st.integers(1, height)), draw(st.integers(1, width))),
        old_classes=draw(st.integers(1, channels)),
        dtype=draw(st.sampled_from(DTYPES)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        ce=draw(st.sampled_from(INCREMENTAL_CE_MODES)),
        kd=draw(st.sampled_from(KD_MODES)),
        alpha=draw(_alphas()),
        # Logit scales 1e-3 .. 1e4 for the student x and the scaled teacher alpha * y.
        x_exponent=draw(st.floats(-3.0, 4.0)),
        teacher_exponent=draw(st.floats(-3.0, 4.0)),
        mask=draw(st.sampled_from(["none", "bool", "float"])),
        ignore=draw(st.sampled_from(["none", "some", "all"])),
        ignore_index=draw(st.sampled_from([255, -100])),
        label_dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.uint8])),
        masked_classes=draw(st.sampled_from(["none", "channel", "pixels"])),
        given_gamma=draw(st.booleans()),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        y_layout=draw(st.sampled_from(LAYOUTS)),
        small_layout=draw(st.sampled_from(["contiguous", "transposed"])),  # labels and mask
        upstream=draw(st.sampled_from(["random", "expanded"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return case


class LogitInputs:
    """The tensors of one logit case (float64 values rounded to the case's dtype)."""

    def __init__(self, case):
        g = torch.Generator().manual_seed(case["seed"])
        B, C, H, W = case["shape"]
        Co, dtype, size = case["old_classes"], case["dtype"], case["size"]
        x_resolution, y_resolution = (H, W), (H, W)
        if size is not None:
            x_resolution, y_resolution = case["x_resolution"], case["y_resolution"]
        cap = 3.0 if dtype == torch.float16 else 30.0  # float16 holds |values| < 65504
        x = torch.randn((B, C, *x_resolution), generator=g, dtype=torch.float64) * 10 ** min(case["x_exponent"], cap)
        teacher_scale = 10 ** min(case["teacher_exponent"], cap) / max(abs(case["alpha"]), 1.0)
        y = torch.randn((B, Co, *y_resolution), generator=g, dtype=torch.float64) * teacher_scale
        self.x = _mask_classes(x, Co, case["masked_classes"], g).to(dtype)
        self.y = y.to(dtype)
        self.t = _labels(reference.upsample(self.x.double(), size), Co, case, g)
        self.mask = _kd_mask(case["mask"], (B, H, W), g)
        self.gamma = 0.2 + 2 * torch.rand((B,), generator=g, dtype=torch.float64)
        self.generator = g


def _mask_classes(x, old_classes, how, g):
    """-inf logits (masked classes) in channels at or above Co: whole channels, or random pixels."""
    x = x.clone()
    for c in range(old_classes, x.shape[1]):
        if how == "channel" and torch.rand((), generator=g) < 0.5:
            x[:, c] = float("-inf")
        elif how == "pixels":
            x[:, c][torch.rand(x[:, c].shape, generator=g) < 0.5] = float("-inf")
    return x


def _labels(x, old_classes, case, g):
    """Labels in [0, C) never on a -inf logit, with none, some or all pixels set to ignore_index."""
    B, C, H, W = x.shape
    t = torch.randint(0, C, (B, H, W), generator=g)
    on_masked = torch.isinf(x.gather(1, t.unsqueeze(1)).squeeze(1))
    t = torch.where(on_masked, torch.randint(0, old_classes, t.shape, generator=g), t)
    ignore_index = 255 if case["label_dtype"] == torch.uint8 else case["ignore_index"]
    fraction = {"none": 0.0, "some": 0.3, "all": 1.0}[case["ignore"]]
    ignored = torch.rand(t.shape, generator=g) < fraction
    return torch.where(ignored, torch.full_like(t, ignore_index), t).to(case["label_dtype"])


def _kd_mask(kind, shape, g):
    if kind == "bool":
        return torch.rand(shape, generator=g) < 0.7
    if kind == "float":
        return 1.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    return None


def logit_call(case, inputs):
    """(function name, positional arguments, keyword arguments) of the public call the case makes."""
    size = {} if case["size"] is None else dict(size=case["size"])
    name, args, kwargs = _call_arguments(case, inputs)
    return name, args, {**kwargs, **size}


def _call_arguments(case, inputs):
    name, mask = case["function"], inputs.mask
    ignore_index = 255 if case["label_dtype"] == torch.uint8 else case["ignore_index"]
    if name == "incremental_loss":
        kwargs = dict(
            old_classes=case["old_classes"],
            ce=case["ce"],
            kd=case["kd"],
            alpha=case["alpha"],
            mask=mask,
            ignore_index=ignore_index,
        )
        return name, (inputs.t, inputs.y), kwargs
    if name == "unbiased_cross_entropy":
        kwargs = dict(ignore_index=ignore_index, reduction=case["reduction"])
        return name, (inputs.t, case["old_classes"]), kwargs
    kwargs = dict(alpha=case["alpha"], mask=mask, reduction=case["reduction"])
    if name == "balanced_knowledge_distillation" and case["given_gamma"]:
        kwargs["gamma"] = inputs.gamma
    return name, (inputs.y,), kwargs


def _logit_slack(case, inputs, upstreams):
    """The float32 rounding of the per-pixel log-normalisers (lse ~ max|logit| = L): each carries an
    absolute error up to u·L, u = 2^-24 (2^-53 for float64), which no float32 kernel can avoid and
    which exceeds RTOL for |logits| above ~170. Returns (output slacks, gradient slack)."""
    u = 2.0**-53 if case["dtype"] == torch.float64 else 2.0**-24
    L = max(_finite_abs_max(inputs.x), abs(case["alpha"]) * _finite_abs_max(inputs.y), 1.0)
    B, _, H, W = case["shape"]
    pixels = B * H * W
    mask_max = 1.5 if case["mask"] == "float" else 1.0
    reduction = "mean" if case["function"] == "incremental_loss" else case["reduction"]
    per_pixel = {"sum": float(pixels), "mean": 1.0, "none": 1.0}[reduction]
    # Balanced distillation weighs lse_bg - lse by γ q_0 (formed in log space: a γ of 1e38 against a q_0
    # of 1e-38 weighs 1), which a given γ, or a pixel whose teacher disagrees with its pooled teacher,
    # can make larger than 1.
    weight = mask_max * max(1.0, _largest_background_weight(case, inputs))
    output_slack = 8 * u * L * per_pixel * weight
    # Per pixel, dL/dx carries the log-normalisers' error times the pixel's upstream weight, at most
    # max|upstream| ("mean" divides it further).
    grad_slack = 8 * u * L * sum(up.abs().max().item() for up in upstreams) * weight
    # A computed γ = exp(Δ) of pooled raw teacher logits carries Δ's absolute rounding, ~u·max|y|, as
    # a relative error, and so does every result it scales.
    gamma_rtol = 8 * u * _finite_abs_max(inputs.y) if _computes_gamma(case) else 0.0
    return gamma_rtol, output_slack, grad_slack


def _largest_background_weight(case, inputs):
    """The largest γ q_0 of balanced distillation over the pixels (0 without it)."""
    if case["function"] == "balanced_knowledge_distillation" and case["given_gamma"]:
        log_gamma = inputs.gamma.log()
    elif _computes_gamma(case):
        log_gamma = reference.balanced_log_gamma(inputs.y.double())
    else:
        return 0.0
    y = reference.upsample(inputs.y.double(), case["size"])
    log_q0 = torch.log_softmax(case["alpha"] * y, dim=1)[:, 0]
    return (log_gamma.view(-1, 1, 1) + log_q0).exp().max().item()


def _computes_gamma(case):
    if case["function"] == "balanced_knowledge_distillation":
        return not case["given_gamma"]
    return case["function"] == "incremental_loss" and case["kd"] == "balanced"


def _finite_abs_max(tensor):
    finite = tensor.double()[torch.isfinite(tensor)]
    return finite.abs().max().item() if finite.numel() else 0.0


def check_logit_case(backend, case, poison=None):
    """Run the case on `backend` and on the reference; compare outputs and dL/dx (see assert_matches)."""
    inputs = LogitInputs(case)
    if poison is not None:
        poisoned = poison(case, inputs)
    else:
        # Bound: balanced distillation's background weight γ q_0 (not γ: MATH.md#bkd-gamma) must fit the
        # accumulation dtype with room for the terms it scales (log γ = 460 from teacher logits ~1e3 with
        # q_0 ~ 1 at some pixel overflows float32 there, as the float32 reference does).
        bound = 1e300 if case["dtype"] == torch.float64 else 1e30
        assume(_largest_background_weight(case, inputs) < bound)
    name, args, kwargs = logit_call(case, inputs)
    device = device_for(backend)
    x = with_layout(inputs.x.to(device), case["x_layout"]).detach().requires_grad_()
    args = [_placed(a, device, case["y_layout"] if a is inputs.y else case["small_layout"]) for a in args]
    kwargs = {k: _placed(v, device, case["small_layout"]) for k, v in kwargs.items()}
    outputs = _as_tuple(getattr(isf, name)(x, *args, backend=backend, **kwargs))

    xr = float64_copy(inputs.x, requires_grad=True)
    ref_outputs = _as_tuple(
        getattr(reference, name)(xr, *map(float64_copy, args), **{k: float64_copy(v) for k, v in kwargs.items()})
    )
    upstreams = [upstream_gradient(r.shape, case["upstream"], inputs.generator) for r in ref_outputs]
    gamma_rtol, output_slack, grad_slack = _logit_slack(case, inputs, upstreams)
    rtol = RTOL[case["dtype"]] + gamma_rtol
    for i, (out, ref) in enumerate(zip(outputs, ref_outputs, strict=True)):
        mask = None if poison is None else poisoned["output"]
        assert_matches(out, ref, f"{name} output {i}", rtol=rtol, slack=output_slack, poisoned=mask)
    _backward(outputs, upstreams, device)
    _backward(ref_outputs, upstreams, "cpu")
    assert x.grad.dtype == case["dtype"] and x.grad.shape == x.shape
    mask = None if poison is None else poisoned["grad"]
    assert_matches(x.grad, xr.grad, f"{name} dL/dx", rtol=rtol, slack=grad_slack, poisoned=mask)


def _placed(value, device, layout):
    """A tensor argument on `device` in `layout` (1-D ones stay as they are); other arguments unchanged."""
    if not isinstance(value, torch.Tensor):
        return value
    return with_layout(value.to(device), layout) if value.dim() >= 2 else value.to(device)


def _as_tuple(outputs):
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _backward(outputs, upstreams, device):
    """Backpropagate each output with its upstream gradient (sent as given: stride 0 stays stride 0)."""
    pairs = [
        (o, u.to(device=device, dtype=o.dtype)) for o, u in zip(outputs, upstreams, strict=True) if o.requires_grad
    ]
    torch.autograd.backward([o for o, _ in pairs], [u for _, u in pairs])


def test_logit_losses_match_the_reference(backend):
    run_examples(backend, logit_cases(small=interpreted(backend)), check_logit_case)


# NaN and +inf where they decide the result: the logit of a counted pixel (every channel enters its
# lse) or a teacher logit.
@st.composite
def poisoned_logit_cases(draw):
    case = draw(logit_cases(small=True))
    case.update(
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        masked_classes="none",
        size=None,
        poison_value=draw(st.sampled_from([float("nan"), float("inf")])),
        poison_teacher=draw(st.booleans()),
        poison_at=draw(st.integers(0, 2**31 - 1)),
    )
    return case


def _poison(case, inputs):
    """Put the case's NaN or +inf into one logit that decides the result; returns the poisoned pixel's masks."""
    B, C, H, W = case["shape"]
    index = case["poison_at"]
    b, h, w = index % B, (index // B) % H, (index // (B * H)) % W
    distils = case["function"] != "unbiased_cross_entropy" and not (
        case["function"] == "incremental_loss" and case["kd"] == "none"
    )
    if case["poison_teacher"] and distils:
        inputs.y[b, (index // 7) % case["old_classes"], h, w] = case["poison_value"]
    else:
        inputs.t[b, h, w] = 0  # counted by the CE term: every channel decides its lse
        # Plain distillation reads channels [0, Co) only; a NaN beyond them need not reach it (not guaranteed).
        plain_kd = case["function"] == "knowledge_distillation" or (
            case["function"] == "incremental_loss" and case["kd"] == "plain"
        )
        channels = case["old_classes"] if plain_kd else C
        inputs.x[b, (index // 7) % channels, h, w] = case["poison_value"]
    pixel = torch.zeros((B, H, W), dtype=torch.bool)
    pixel[b, h, w] = True
    return dict(
        output=pixel if case["reduction"] == "none" and case["function"] != "incremental_loss" else None,
        grad=pixel.unsqueeze(1).expand(B, C, H, W),
    )


def test_logit_losses_propagate_nan_and_inf(backend):
    run_examples(backend, poisoned_logit_cases(), lambda b, case: check_logit_case(b, case, poison=_poison), 0.5)


# ---------------------------------------------------------------------------------------------
# Attentive distillation.
# ---------------------------------------------------------------------------------------------

# Feature magnitudes covered: 1e-15 .. 1e15 for float32, bfloat16 and float64 (inside the float32
# bounds of docs/RELIABILITY.md#numerics: S = sum_c f^2, P and 1/N stay normal float32 numbers, ~1e-19 .. ~1e18);
# 1e-3 .. 1e3 for float16, whose largest value is 65504.
FEATURE_EXPONENTS = {torch.float16: (-3.0, 3.0)}
DEFAULT_FEATURE_EXPONENTS = (-15.0, 15.0)


@st.composite
def attention_cases(draw, small=False):
    dtype = draw(st.sampled_from(DTYPES))
    low, high = FEATURE_EXPONENTS.get(dtype, DEFAULT_FEATURE_EXPONENTS)
    return dict(
        shape=(
            draw(st.integers(1, 3)),
            draw(st.integers(1, 6 if small else 9)),
            draw(st.integers(1, 5 if small else 7)),
            draw(st.integers(1, 5 if small else 7)),
        ),
        dtype=dtype,
        reduction=draw(st.sampled_from(FEATURE_REDUCTIONS)),
        detach_spatial=draw(st.booleans()),
        wanted=draw(st.sets(st.sampled_from("fgab"))),
        f_exponent=draw(st.floats(low, high)),
        # The old features: their own magnitude, or a relative perturbation of f (the start of a step).
        pair=draw(st.sampled_from(["independent", "near"])),
        g_exponent=draw(st.floats(low, high)),
        near_exponent=draw(st.floats(-4.0, -1.0)),
        attentions=draw(st.sampled_from(["sigmoid", "signed"])),
        zero_map=draw(st.sampled_from(["none", "none", "f", "g", "both"])),
        f_layout=draw(st.sampled_from(LAYOUTS)),
        g_layout=draw(st.sampled_from(LAYOUTS)),
        a_layout=draw(st.sampled_from(["contiguous", "transposed"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def attention_inputs(case):
    """(f, g, a, b) in the case's dtype, and the generator for the upstream gradient."""
    gen = torch.Generator().manual_seed(case["seed"])
    B, C = case["shape"][:2]
    f = torch.randn(case["shape"], generator=gen, dtype=torch.float64) * 10 ** case["f_exponent"]
    a = torch.randn((B, C), generator=gen, dtype=torch.float64)
    b = torch.randn((B, C), generator=gen, dtype=torch.float64)
    a, b = (torch.sigmoid(a), torch.sigmoid(b)) if case["attentions"] == "sigmoid" else (a, b)
    if case["pair"] == "near":
        eps = 10 ** case["near_exponent"]
        g = f * (1 + eps * torch.randn(case["shape"], generator=gen, dtype=torch.float64))
        b = a * (1 + eps * torch.randn((B, C), generator=gen, dtype=torch.float64))
    else:
        g = torch.randn(case["shape"], generator=gen, dtype=torch.float64) * 10 ** case["g_exponent"]
    # Deliberate all-zero feature maps of one image (N = 0, Ŝ = 0).
    if case["zero_map"] in ("f", "both"):
        f[0] = 0
    if case["zero_map"] in ("g", "both"):
        g[-1 if case["zero_map"] == "g" else 0] = 0
    return [t.to(case["dtype"]) for t in (f, g, a, b)], gen


def check_attention_case(backend, case, poison=None):
    tensors, gen = attention_inputs(case)
    if poison is not None:
        poison(case, tensors)
    device = device_for(backend)
    layouts = (case["f_layout"], case["g_layout"], case["a_layout"], case["a_layout"])
    leaves = [
        with_layout(t.to(device), layout).detach().requires_grad_(name in case["wanted"])
        for name, t, layout in zip("fgab", tensors, layouts, strict=True)
    ]
    loss = isf.attentive_distillation(
        *leaves, reduction=case["reduction"], detach_spatial=case["detach_spatial"], backend=backend
    )
    ref_leaves = [
        float64_copy(t, requires_grad=name in case["wanted"]) for name, t in zip("fgab", tensors, strict=True)
    ]
    ref_loss = reference.attentive_distillation(
        *ref_leaves, reduction=case["reduction"], detach_spatial=case["detach_spatial"]
    )
    rtol = RTOL[case["dtype"]]
    assert loss.dtype == (torch.float64 if case["dtype"] == torch.float64 else torch.float32)
    assert_matches(loss, ref_loss, "loss", rtol=rtol)
    if not case["wanted"]:
        assert not loss.requires_grad
        return
    upstream = upstream_gradient((), "random", gen)
    (loss * upstream).backward()
    (ref_loss * upstream).backward()
    for name, leaf, ref_leaf in zip("fgab", leaves, ref_leaves, strict=True):
        if name in case["wanted"]:
            assert leaf.grad.dtype == leaf.dtype, f"d{name} dtype"
            assert_matches(leaf.grad, ref_leaf.grad, f"d{name}", rtol=rtol)
        else:
            assert leaf.grad is None, f"d{name} computed although {name} does not require grad"


def test_attentive_distillation_matches_the_reference(backend):
    run_examples(backend, attention_cases(small=interpreted(backend)), check_attention_case)


@st.composite
def poisoned_attention_cases(draw):
    case = draw(attention_cases(small=True))
    case.update(
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        zero_map="none",
        f_exponent=0.0,
        g_exponent=0.0,
        wanted=set("fgab"),
        poison_value=draw(st.sampled_from([float("nan"), float("inf")])),
        poison_input=draw(st.sampled_from("fgab")),
        poison_at=draw(st.integers(0, 2**31 - 1)),
    )
    return case


def _poison_features(case, tensors):
    """One NaN or +inf in f, g, a or b: every value of the loss depends on all of them."""
    target = tensors["fgab".index(case["poison_input"])]
    target.view(-1)[case["poison_at"] % target.numel()] = case["poison_value"]


def test_attentive_distillation_propagates_nan_and_inf(backend):
    run_examples(
        backend, poisoned_attention_cases(), lambda b, case: check_attention_case(b, case, poison=_poison_features), 0.5
    )


# ---------------------------------------------------------------------------------------------
# Structured attention.
# ---------------------------------------------------------------------------------------------


@st.composite
def structured_cases(draw, small=False):
    dtype = draw(st.sampled_from(DTYPES))
    v_range, a_range = ((-2.0, 1.0), (-1.0, 0.5)) if dtype == torch.float16 else ((-6.0, 6.0), (-3.0, 3.0))
    return dict(
        shape=(
            draw(st.integers(1, 3)),
            draw(st.integers(1, 6 if small else 9)),
            draw(st.integers(1, 5 if small else 7)),
            draw(st.integers(1, 5 if small else 7)),
        ),
        dtype=dtype,
        wanted=draw(st.sets(st.sampled_from(["v", "a_ch", "a_sp"]), min_size=1)),
        v_exponent=draw(st.floats(*v_range)),
        a_exponent=draw(st.floats(*a_range)),
        a_sp_channel_dim=draw(st.booleans()),  # (B, 1, H, W) instead of (B, H, W)
        v_layout=draw(st.sampled_from(LAYOUTS)),
        grad_layout=draw(st.sampled_from(["random", "expanded", "channels_last"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _structured_grad_out(shape, layout, gen):
    if layout == "expanded":
        return torch.randn((), generator=gen, dtype=torch.float64).expand(shape)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    return grad.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else grad


def _structured_term_scales(refs, grad_out, spatial_shape):
    """The largest sum of |terms| of each gradient (da_ch and da_sp sum over pixels and channels: their
    rounding is relative to those sums, which cancellation can make far larger than the result)."""
    absolute = {k: t.detach().abs().requires_grad_() for k, t in refs.items()}
    out = reference.structured_attention(absolute["v"], absolute["a_ch"], absolute["a_sp"].reshape(spatial_shape))
    out.backward(grad_out.abs())
    return {k: t.grad.max().item() for k, t in absolute.items()}


def check_structured_case(backend, case):
    gen = torch.Generator().manual_seed(case["seed"])
    B, C, H, W = case["shape"]
    a_scale = 10 ** case["a_exponent"]
    values = dict(
        v=torch.randn(case["shape"], generator=gen, dtype=torch.float64) * 10 ** case["v_exponent"],
        a_ch=torch.randn((B, C), generator=gen, dtype=torch.float64) * a_scale,
        a_sp=torch.randn((B, 1, H, W) if case["a_sp_channel_dim"] else (B, H, W), generator=gen, dtype=torch.float64)
        * a_scale,
    )
    values = {k: t.to(case["dtype"]) for k, t in values.items()}
    device = device_for(backend)
    leaves = {
        k: (with_layout(t.to(device), case["v_layout"]) if k == "v" else t.to(device)).requires_grad_(
            k in case["wanted"]
        )
        for k, t in values.items()
    }
    out = isf.structured_attention(leaves["v"], leaves["a_ch"], leaves["a_sp"], backend=backend)
    refs = {k: float64_copy(t, requires_grad=k in case["wanted"]) for k, t in values.items()}
    ref_out = reference.structured_attention(refs["v"], refs["a_ch"], refs["a_sp"].reshape(B, H, W))
    rtol = RTOL[case["dtype"]]
    assert out.dtype == case["dtype"]
    assert_matches(out, ref_out, "out", rtol=rtol)
    grad_out = _structured_grad_out(case["shape"], case["grad_layout"], gen)
    out.backward(grad_out.to(device=device, dtype=case["dtype"]))
    ref_out.backward(grad_out.to(case["dtype"]).double())
    term_scales = _structured_term_scales(refs, grad_out.to(case["dtype"]).double(), (B, H, W))
    for name in ("v", "a_ch", "a_sp"):
        if name in case["wanted"]:
            assert_matches(leaves[name].grad, refs[name].grad, f"d{name}", rtol=rtol, scale=term_scales[name])
        else:
            assert leaves[name].grad is None, f"d{name}"


def test_structured_attention_matches_the_reference(backend):
    run_examples(backend, structured_cases(small=interpreted(backend)), check_structured_case)


# ---------------------------------------------------------------------------------------------
# Determinism (docs/RELIABILITY.md#numerics).
# ---------------------------------------------------------------------------------------------


def _logit_and_attention_results(backend, generator_seed, shape=(1, 7, 40, 50)):
    """Losses and gradients of incremental_loss and attentive_distillation on fixed random inputs."""
    g = torch.Generator().manual_seed(generator_seed)
    device = device_for(backend)
    B, C, H, W = (1, 5, 9, 7) if interpreted(backend) else shape
    x = torch.randn(B, C, H, W, generator=g).to(device).requires_grad_()
    y, t = torch.randn(B, 4, H, W, generator=g).to(device), torch.randint(0, C, (B, H, W), generator=g).to(device)
    ce, kd = isf.incremental_loss(x, t, y, old_classes=4, kd="balanced", alpha=0.7, backend=backend)
    (ce + 0.3 * kd).backward()
    features = [torch.randn(B, C, H, W, generator=g).to(device).requires_grad_() for _ in range(2)]
    attentions = [torch.rand(B, C, generator=g).to(device).requires_grad_() for _ in range(2)]
    loss = isf.attentive_distillation(*features, *attentions, backend=backend)
    loss.backward()
    return [ce, kd, x.grad, loss] + [leaf.grad for leaf in features + attentions]


def test_reruns_are_bitwise_identical(backend):
    """Fixed-order reductions everywhere: the same inputs give the same bits."""
    first, second = _logit_and_attention_results(backend, 11), _logit_and_attention_results(backend, 11)
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a, b), f"result {i} differs between two runs"


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_kernels_across_thread_counts(restore_threads):
    """The logit kernels' tiles are fixed (512 pixels): any thread count gives the same bits. The
    attention kernels cut an image into finer tiles when there are fewer images than threads, which
    regroups the partial sums of da, db (and of every float64 result): equal to rounding only."""
    torch.set_num_threads(1)
    one = _logit_and_attention_results("cpu", 12)
    torch.set_num_threads(4)
    four = _logit_and_attention_results("cpu", 12)
    for i in range(3):  # ce, kd, dL/dx
        assert torch.equal(one[i], four[i]), f"logit result {i} depends on the thread count"
    for i in range(3, len(one)):
        assert_matches(four[i], one[i], f"attention result {i}", rtol=RTOL[torch.float32])
