"""The sigmoid-loss ops (MATH.md#sigmoid-losses) themselves, their public API's argument checks,
backend choice, and the SSUL/DKD drop-in modules. Values against the reference: test_parity_sigmoid.py.
"""

import pytest
import torch
import torch.nn.functional as F
from test_parity_sigmoid import IGNORE, _labels

import incseg_fast as isf
from incseg_fast import _backends
from incseg_fast.bench.sigmoid_papers import dkd_terms, ssul_bce, ssul_pseudo_labels
from incseg_fast.losses import BCEWithLogitsLossWithIgnoreIndex, DKDLoss


def _op_args(generator, reduction, *, size=None):
    B, C, Co, H, W = 2, 7, 4, 5, 6
    low = (3, 4) if size else (H, W)
    x = torch.randn((B, C, *low), generator=generator, dtype=torch.float64)
    y = torch.randn((B, Co, *low), generator=generator, dtype=torch.float64)
    t = _labels(generator, (B, H, W), [0, 1, 4, 5, 6])
    pos = 0.5 + torch.rand(C, generator=generator, dtype=torch.float64)
    kwargs = dict(
        negative_channels=1,
        label_channels_from=Co,
        pseudo_threshold=0.5,
        pseudo_background=1,
        ignore_index=IGNORE,
        ignored_pixels="skip",
        reduction=reduction,
        size=size,
    )
    return (x, t, y, pos, None), kwargs


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("size", [None, [5, 6]])
@pytest.mark.parametrize("namespace", ["incseg_fast", "incseg_fast_triton", "incseg_fast_cuda_emulator"])
def test_opcheck(generator, reduction, size, namespace):
    """The compiled (CPU), the Triton (under the interpreter without a GPU) and the emulated CUDA ops."""
    if namespace == "incseg_fast_triton":
        reason = _backends.unavailable_reason("triton")
        if reason is not None:
            pytest.skip(reason)
        import incseg_fast.triton  # noqa: F401  (registers the Triton kernels)
    ops = getattr(torch.ops, namespace)
    args, kwargs = _op_args(generator, reduction, size=size)
    args = (args[0].requires_grad_(),) + args[1:]
    torch.library.opcheck(ops.sigmoid_losses_fwd.default, args, kwargs)
    label, soft, negative, count = ops.sigmoid_losses_fwd(*args, **kwargs)
    grads = tuple(torch.randn(label.shape, generator=generator, dtype=torch.float64) for _ in range(3))
    x, t, y, pos, channel = args
    backward_args = (*grads, x.detach(), t, y, pos, channel, count)
    torch.library.opcheck(ops.sigmoid_losses_bwd.default, backward_args, kwargs)


def test_label_count_is_the_counted_pixels(generator):
    args, kwargs = _op_args(generator, "mean")
    *_, count = torch.ops.incseg_fast.sigmoid_losses_fwd(*args, **kwargs)
    assert count.dtype == torch.int64 and count.item() == (args[1] != IGNORE).sum().item()
    kwargs["ignored_pixels"] = "negative"
    *_, count = torch.ops.incseg_fast.sigmoid_losses_fwd(*args, **kwargs)
    assert count.item() == args[1].numel()


def test_gradcheck_cpu(generator):
    args, kwargs = _op_args(generator, "mean", size=[5, 6])
    x = args[0].requires_grad_()

    def loss(x):
        label, soft, negative = isf.sigmoid_losses(
            x,
            args[1],
            args[2],
            negative_channels=1,
            label_channels_from=4,
            pseudo_threshold=0.5,
            size=(5, 6),
            backend="cpu",
        )
        return label + 2 * soft + 3 * negative

    assert torch.autograd.gradcheck(loss, (x,))


def test_deterministic(generator):
    x = torch.randn((3, 21, 33, 35), generator=generator)
    y = torch.randn((3, 16, 33, 35), generator=generator)
    t = _labels(generator, (3, 33, 35), [0] + list(range(16, 21)))
    runs = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            xb = x.clone().requires_grad_()
            losses = isf.sigmoid_losses(xb, t, y, negative_channels=1, label_channels_from=16, backend="cpu")
            sum(losses).backward()
            runs.append((torch.stack(losses), xb.grad))
        finally:
            torch.set_num_threads(before)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ---------------------------------------------------------------------------------------------
# Argument checks: the argument as the caller wrote it
# ---------------------------------------------------------------------------------------------


def _call(**overrides):
    x = torch.randn(2, 5, 3, 4)
    arguments = dict(x=x, t=torch.zeros(2, 3, 4, dtype=torch.long), y=torch.randn(2, 3, 3, 4))
    arguments.update(overrides)
    x, t, y = arguments.pop("x"), arguments.pop("t"), arguments.pop("y")
    options = dict(negative_channels=1, label_channels_from=3)
    options.update(arguments)
    return isf.sigmoid_losses(x, t, y, backend="reference", **options)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(negative_channels=-1), ValueError, "negative_channels must be >= 0"),
        (dict(label_channels_from=6), ValueError, "label_channels_from must be <= 5"),
        (dict(negative_channels=3, label_channels_from=2), ValueError, "label_channels_from=2 is below"),
        (dict(negative_channels=1.0), TypeError, "negative_channels must be an int"),
        (dict(y=None), ValueError, "y \\(the old model's logits\\) is required"),
        (dict(negative_channels=3), ValueError, "y is not used"),
        (dict(y=torch.randn(2, 2, 3, 4)), ValueError, "fewer than label_channels_from=3"),
        (dict(t=None), TypeError, "t must be a torch.Tensor"),
        (dict(t=torch.full((2, 3, 4), 7)), ValueError, "t has label 7 outside"),
        (dict(pseudo_threshold=1.5), ValueError, "pseudo_threshold must be in \\[0, 1\\]"),
        (dict(pseudo_threshold=0.5, pseudo_background=0), ValueError, "pseudo_background must be >= 1"),
        (dict(ignored_pixels="drop"), ValueError, "ignored_pixels must be one of"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(pos_weight=torch.ones(4)), ValueError, "pos_weight must have shape \\(C,\\) = \\(5,\\)"),
        (dict(channel_weight="1"), TypeError, "channel_weight must be None, a number or a \\(C,\\) tensor"),
        (dict(pos_weight=float("inf")), ValueError, "pos_weight must be finite"),
        (dict(channel_weight=torch.ones(5, requires_grad=True)), ValueError, "channel_weight must not require grad"),
        (dict(size=(2, 2)), ValueError, "smaller than x's resolution"),
    ],
)
def test_errors_name_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_unused_labels_are_refused():
    with pytest.raises(ValueError, match="t is not used"):
        isf.sigmoid_losses(
            torch.randn(1, 2, 3, 3),
            torch.zeros(1, 3, 3, dtype=torch.long),
            torch.randn(1, 2, 3, 3),
            label_channels_from=2,
        )


# ---------------------------------------------------------------------------------------------
# Drop-in modules against SSUL's and DKD's formulations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ssul_module(generator, reduction):
    B, C, Co, H, W = 2, 7, 5, 9, 8
    x = 3 * torch.randn((B, C, H, W), generator=generator, dtype=torch.float64)
    y = 3 * torch.randn((B, Co, H, W), generator=generator, dtype=torch.float64)
    t = _labels(generator, (B, H, W), [0, 1, 5, 6])
    module = BCEWithLogitsLossWithIgnoreIndex(reduction=reduction)
    torch.testing.assert_close(module(x, t), ssul_bce(x, t, reduction), rtol=1e-10, atol=0)
    pseudo = ssul_pseudo_labels(t, y, fg_idx=1, threshold=0.7)
    actual = module(x, t, old_logits=y, pseudo_threshold=0.7, pseudo_background=2)
    torch.testing.assert_close(actual, ssul_bce(x, pseudo, reduction), rtol=1e-10, atol=0)


def test_ssul_module_refusals():
    module = BCEWithLogitsLossWithIgnoreIndex()
    x, t = torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="weight"):
        module(x, t, torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="old_logits and pseudo_threshold go together"):
        module(x, t, old_logits=torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="targets has label 5"):
        module(x, torch.full((1, 2, 2), 5))


def test_dkd_module(generator):
    n_old, n_new, H, W = 4, 2, 10, 7
    x = 3 * torch.randn((2, 1 + n_old + n_new, 5, 4), generator=generator, dtype=torch.float64)
    y = 3 * torch.randn((2, 1 + n_old, 5, 4), generator=generator, dtype=torch.float64)
    t = _labels(generator, (2, H, W), [0, 5, 6])
    actual = DKDLoss(n_old, n_new, pos_weight=3.0)(x, t, y, size=(H, W))
    up = dict(size=(H, W), mode="bilinear", align_corners=False)
    expected = dkd_terms(F.interpolate(x, **up), F.interpolate(y, **up), t, n_old=n_old, pos_weight=3.0)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="logit has 6 channels"):
        DKDLoss(n_old, n_new)(x[:, :6], t, y, size=(H, W))
