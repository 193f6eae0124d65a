"""The compiled logit-loss ops themselves: schemas, fake kernels, autograd registration, checks.

torch.library.opcheck exercises each op's schema, fake kernel and autograd registration (and the
backward op on its own); torch.compile(fullgraph=True) must trace through the public API. Values
are compared with the reference in tests/test_parity_logit_losses.py.
"""

import os
import subprocess
import sys

import pytest
import torch
from parity_support import WIDER_TEACHERS

import incseg_fast as isf

pytestmark = pytest.mark.skipif("cpu" not in isf.available_backends(), reason="the compiled extension is not built")

MODES = [  # (ce, kd, reduction)
    ("unbiased", "unbiased", "mean"),
    ("plain", "balanced", "sum"),
    ("unbiased", "plain", "none"),
    ("none", "balanced", "none"),
    ("plain", "none", "mean"),
]


def _op_args(
    generator,
    ce,
    kd,
    reduction,
    *,
    dtype=torch.float32,
    teacher_dtype=None,
    batch=2,
    channels=6,
    old_classes=4,
    height=5,
    width=7,
):
    x = torch.randn((batch, channels, height, width), generator=generator, dtype=torch.float64).to(dtype)
    t = torch.randint(0, channels, (batch, height, width), generator=generator)
    t[torch.rand((batch, height, width), generator=generator) < 0.2] = 255
    y = torch.randn((batch, old_classes, height, width), generator=generator, dtype=torch.float64).to(
        teacher_dtype or dtype
    )
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gamma = (0.5 + torch.rand((batch,), generator=generator, dtype=torch.float64)).to(acc)
    mask = torch.rand((batch, height, width), generator=generator, dtype=torch.float64).to(acc)
    args = (
        x,
        t if ce != "none" else None,
        y if kd != "none" else None,
        gamma if kd == "balanced" else None,
        mask if kd != "none" else None,
    )
    kwargs = dict(old_classes=old_classes, ce=ce, kd=kd, alpha=0.8, ignore_index=255, reduction=reduction)
    return args, kwargs


@pytest.mark.parametrize("ce,kd,reduction", MODES)
def test_opcheck_forward(generator, ce, kd, reduction):
    args, kwargs = _op_args(generator, ce, kd, reduction)
    args = (args[0].requires_grad_(),) + args[1:]
    torch.library.opcheck(torch.ops.incseg_fast.logit_losses_fwd.default, args, kwargs)


@pytest.mark.parametrize("ce,kd,reduction", MODES)
def test_opcheck_backward(generator, ce, kd, reduction):
    args, kwargs = _op_args(generator, ce, kd, reduction)
    _, _, stats, valid_count = torch.ops.incseg_fast.logit_losses_fwd(*args, **kwargs)
    shape = (args[0].shape[0],) + args[0].shape[2:] if reduction == "none" else ()
    grad_ce = torch.randn(shape, generator=generator)
    grad_kd = torch.randn(shape, generator=generator)
    torch.library.opcheck(
        torch.ops.incseg_fast.logit_losses_bwd.default, (grad_ce, grad_kd) + args + (stats, valid_count), kwargs
    )


@pytest.mark.parametrize("namespace", ["incseg_fast", "incseg_fast_cuda_emulator"])
@pytest.mark.parametrize("dtype,teacher_dtype", WIDER_TEACHERS, ids=str)
@pytest.mark.parametrize("ce,kd,reduction", MODES[:3])
def test_opcheck_wider_teacher(generator, namespace, dtype, teacher_dtype, ce, kd, reduction):
    """The mixed signature (MATH.md#teacher-dtype): x in the student's dtype, y in the teacher's; the
    losses in x's accumulation dtype and dL/dx in x's dtype, as the fake kernels say."""
    ops = getattr(torch.ops, namespace)
    args, kwargs = _op_args(generator, ce, kd, reduction, dtype=dtype, teacher_dtype=teacher_dtype, height=4, width=8)
    torch.library.opcheck(ops.logit_losses_fwd.default, (args[0].requires_grad_(),) + args[1:], kwargs)
    ce_loss, _, stats, valid_count = ops.logit_losses_fwd(*args, **kwargs)
    grads = tuple(torch.randn(ce_loss.shape, generator=generator) for _ in range(2))
    backward_args = grads + args + (stats, valid_count)
    torch.library.opcheck(ops.logit_losses_bwd.default, backward_args, kwargs)
    assert ops.logit_losses_bwd(*backward_args, **kwargs).dtype == dtype


def test_outputs_and_saved_statistics(generator):
    """Loss dtypes/shapes, the saved per-pixel log-normalisers and the non-ignored pixel count."""
    args, kwargs = _op_args(generator, "unbiased", "unbiased", "none", dtype=torch.bfloat16)
    ce, kd, stats, valid_count = torch.ops.incseg_fast.logit_losses_fwd(*args, **kwargs)
    x, t, y = args[0].double(), args[1], args[2].double()
    co = kwargs["old_classes"]
    assert ce.dtype == kd.dtype == torch.float32 and ce.shape == kd.shape == t.shape
    assert valid_count.item() == (t != 255).sum().item()
    expected = torch.stack(
        [
            torch.logsumexp(x, 1),
            torch.logsumexp(x[:, :co], 1),
            torch.logsumexp(torch.cat([x[:, :1], x[:, co:]], 1), 1),
            torch.logsumexp(kwargs["alpha"] * y, 1),
        ],
        dim=1,
    )
    torch.testing.assert_close(stats.double(), expected, rtol=1e-5, atol=1e-5)


def _training_step(x, t, y, mask):
    ce, kd = isf.incremental_loss(
        x, t, y, old_classes=y.shape[1], ce="unbiased", kd="balanced", alpha=1.5, mask=mask, backend="cpu"
    )
    return ce + 10 * kd


def _ops_step(x, t, y, gamma, mask):
    ce, kd = isf.ops.COMPILED.logit_losses(
        x,
        t,
        y,
        gamma,
        mask,
        old_classes=y.shape[1],
        ce="unbiased",
        kd="balanced",
        alpha=1.5,
        ignore_index=255,
        reduction="none",
    )
    return (ce * mask).sum() + 10 * kd.mean()


@pytest.mark.parametrize("step", [_training_step, _ops_step], ids=["public_api", "ops_wrapper"])
def test_torch_compile_fullgraph_matches_eager(generator, step):
    args, _ = _op_args(generator, "unbiased", "balanced", "mean", height=9, width=11)
    x, t, y, gamma, mask = args
    inputs = (t, y, mask) if step is _training_step else (t, y, gamma, mask)
    x_eager = x.clone().requires_grad_()
    x_compiled = x.clone().requires_grad_()
    eager = step(x_eager, *inputs)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True)(x_compiled, *inputs)
    compiled.backward()
    # Inductor may compute the balanced-KD gamma with another summation order: float32 rounding.
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    scale = x_eager.grad.abs().max().item()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-5, atol=1e-5 * scale)


def test_only_x_is_differentiated(generator):
    args, kwargs = _op_args(generator, "unbiased", "balanced", "mean")
    x, t, y, gamma, mask = args
    x.requires_grad_()
    ce, kd = isf.ops.COMPILED.logit_losses(x, t, y, gamma, mask, **kwargs)
    (ce + kd).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("used", ["ce", "kd"])
def test_backward_through_one_loss(generator, used):
    """When only one loss reaches backward (the other's gradient is None), dL/dx is that loss's alone."""
    args, kwargs = _op_args(generator, "unbiased", "plain", "mean")
    grads = []
    for other_weight in (None, 0.0):
        x = args[0].clone().requires_grad_()
        ce, kd = isf.ops.COMPILED.logit_losses(x, *args[1:], **kwargs)
        loss = ce if used == "ce" else kd
        if other_weight is not None:
            loss = loss + other_weight * (kd if used == "ce" else ce)
        loss.backward()
        grads.append(x.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "case",
    [
        "x_3d",
        "target_shape",
        "target_dtype",
        "y_channels",
        "y_dtype",
        "gamma_missing",
        "old_classes",
        "mode",
        "label_range",
        "mask_shape",
    ],
)
def test_direct_calls_are_checked(generator, case):
    """A direct torch.ops call with bad arguments raises instead of reading out of bounds."""
    (x, t, y, gamma, mask), kwargs = _op_args(generator, "unbiased", "balanced", "mean")
    error = ValueError
    if case == "x_3d":
        x = x[0]
    elif case == "target_shape":
        t = t[:, :-1]
    elif case == "target_dtype":
        t, error = t.float(), TypeError
    elif case == "y_channels":
        y = y[:, :-1]
    elif case == "y_dtype":  # narrower than x: no teacher is
        y, error = y.half(), TypeError
    elif case == "gamma_missing":
        gamma = None
    elif case == "old_classes":
        kwargs["old_classes"] = x.shape[1] + 1
    elif case == "mode":
        kwargs["kd"] = "unbiassed"
    elif case == "label_range":
        t = t.clone()
        t[0, 0, 0] = x.shape[1]
    elif case == "mask_shape":
        mask = mask[:1]
    with pytest.raises(error):
        torch.ops.incseg_fast.logit_losses_fwd(x, t, y, gamma, mask, **kwargs)


_ISA_SCRIPT = """
import torch, incseg_fast as isf
g = torch.Generator().manual_seed(7)
x = torch.randn(2, 9, 23, 29, generator=g).requires_grad_()
y = torch.randn(2, 5, 23, 29, generator=g)
t = torch.randint(0, 9, (2, 23, 29), generator=g)
out = []
pairs = [(d, d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
pairs += [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float64)]
for dtype, teacher_dtype in pairs:
    xd = x.detach().to(dtype).requires_grad_()
    yd = y.to(teacher_dtype)
    ce, kd = isf.incremental_loss(xd, t, yd, old_classes=5, kd="balanced", mask=y[:, 0] > 0, backend="cpu")
    (ce + 3 * kd).backward()
    out += [ce.detach(), kd.detach(), xd.grad.double()]
torch.save(out, {path!r})
"""


def test_isa_variants_agree(tmp_path):
    """The baseline, AVX2 and AVX-512 compiled copies of the kernels give the same results.

    INCSEG_CPU_ISA caps the copy the extension picks (read once per process, hence subprocesses); on a
    CPU without AVX-512 (or AVX2) the higher caps run the widest copy it has.
    """
    results = {}
    for cap in ("baseline", "avx2", "avx512"):
        path = tmp_path / f"{cap}.pt"
        env = dict(os.environ, INCSEG_CPU_ISA=cap)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(path=str(path))], env=env, check=True)
        results[cap] = torch.load(path)
    for cap in ("avx2", "avx512"):
        for got, want in zip(results[cap], results["baseline"], strict=True):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-7)
