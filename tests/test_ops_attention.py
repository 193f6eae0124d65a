"""The compiled attention ops (torch.ops.incseg_fast.*) as torch custom ops: opcheck (schema, fake
kernels, autograd registration, AOT dispatch), the saved statistics, and the shape checks that keep a
direct call from reading out of bounds. Numerical parity through the API is in test_parity_attention.py.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from parity_support import WIDER_TEACHERS
from torch.library import opcheck

from incseg_fast import ops

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="incseg_fast._C is not built")

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The compiled kernels, and the CUDA kernels run thread by thread on the CPU (incseg_fast_cuda_emulator).
NAMESPACES = (ops.COMPILED_NAMESPACE, ops.CUDA_EMULATOR_NAMESPACE)


def _randn(generator, shape, dtype, requires_grad=False):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def _feature_pair(generator, dtype, requires_grad=False, shape=(2, 5, 7, 9), teacher_dtype=None):
    """f, a in dtype; the teacher's g, b in teacher_dtype (dtype by default)."""
    teacher_dtype = teacher_dtype or dtype
    f = _randn(generator, shape, dtype, requires_grad)
    g = _randn(generator, shape, teacher_dtype, requires_grad)
    a = torch.sigmoid(_randn(generator, shape[:2], torch.float64)).to(dtype).requires_grad_(requires_grad)
    b = torch.sigmoid(_randn(generator, shape[:2], torch.float64)).to(teacher_dtype).requires_grad_(requires_grad)
    return f, g, a, b


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("save_spatial_grad", (False, True))
@pytest.mark.parametrize("requires_grad", (False, True), ids=("no_grad", "grad"))
def test_opcheck_attentive_distillation_forward(
    generator, namespace, dtype, reduction, save_spatial_grad, requires_grad
):
    args = (*_feature_pair(generator, dtype, requires_grad), reduction, save_spatial_grad)
    opcheck(getattr(torch.ops, namespace).attentive_distillation_forward.default, args)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spatial_chain", (False, True))
@pytest.mark.parametrize(
    "output_mask",
    ([True, True, True, True], [True, False, False, True], [False, False, True, False]),
    ids=lambda m: "".join("1" if x else "0" for x in m),
)
def test_opcheck_attentive_distillation_backward(generator, namespace, dtype, spatial_chain, output_mask):
    op_namespace = getattr(torch.ops, namespace)
    f, g, a, b = _feature_pair(generator, dtype)
    _, spatial, inv_norm, pixel_grad = op_namespace.attentive_distillation_forward(f, g, a, b, "mean", spatial_chain)
    grad_loss = torch.tensor(0.7, dtype=spatial.dtype)
    args = (grad_loss, f, g, a, b, spatial, inv_norm, pixel_grad, "mean", spatial_chain, output_mask)
    opcheck(op_namespace.attentive_distillation_backward.default, args)
    grads = op_namespace.attentive_distillation_backward(*args)
    for wanted, grad, like in zip(output_mask, grads, (f, g, a, b), strict=True):
        assert grad.shape == (like.shape if wanted else (0,)) and grad.dtype == like.dtype


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("dtype,teacher_dtype", WIDER_TEACHERS, ids=str)
@pytest.mark.parametrize("shape", ((2, 5, 7, 9), (2, 5, 4, 8)), ids=("odd", "packed"))
def test_opcheck_attentive_distillation_wider_teacher(generator, namespace, dtype, teacher_dtype, shape):
    """The mixed signature (MATH.md#teacher-dtype): the teacher's g, b in a wider dtype than f, a; their
    gradients in their own dtype, the loss and saved state in f's accumulation dtype."""
    op_namespace = getattr(torch.ops, namespace)
    f, g, a, b = _feature_pair(generator, dtype, True, shape, teacher_dtype)
    opcheck(op_namespace.attentive_distillation_forward.default, (f, g, a, b, "mean", True))
    f, g, a, b = (t.detach() for t in (f, g, a, b))  # the backward op itself is not differentiated
    _, spatial, inv_norm, pixel_grad = op_namespace.attentive_distillation_forward(f, g, a, b, "mean", True)
    args = (torch.tensor(0.7, dtype=spatial.dtype), f, g, a, b, spatial, inv_norm, pixel_grad, "mean", True, [True] * 4)
    opcheck(op_namespace.attentive_distillation_backward.default, args)
    grads = op_namespace.attentive_distillation_backward(*args)
    assert [grad.dtype for grad in grads] == [dtype, teacher_dtype, dtype, teacher_dtype]


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("requires_grad", (False, True), ids=("no_grad", "grad"))
def test_opcheck_structured_attention(generator, namespace, dtype, requires_grad):
    v = _randn(generator, (2, 6, 5, 7), dtype, requires_grad)
    a_ch = _randn(generator, (2, 6), dtype, requires_grad)
    a_sp = _randn(generator, (2, 5, 7), dtype, requires_grad)
    opcheck(getattr(torch.ops, namespace).structured_attention.default, (v, a_ch, a_sp))


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "output_mask",
    ([True, True, True], [False, True, False], [True, False, True]),
    ids=lambda m: "".join("1" if x else "0" for x in m),
)
def test_opcheck_structured_attention_backward(generator, namespace, dtype, output_mask):
    v = _randn(generator, (2, 6, 5, 7), dtype)
    args = (
        _randn(generator, v.shape, dtype),
        v,
        _randn(generator, (2, 6), dtype),
        _randn(generator, (2, 5, 7), dtype),
        output_mask,
    )
    opcheck(getattr(torch.ops, namespace).structured_attention_backward.default, args)


def test_saved_statistics(generator):
    """Ŝ = S / ||S|| (and Ŝ_f - Ŝ_g), 1/N, and P = dL/dŜ per unit of w = 2 * scale * upstream."""
    f, g, a, b = _feature_pair(generator, torch.float64, shape=(3, 4, 5, 6))
    f[2] = 0  # N == 0: Ŝ and 1/N are 0
    _, spatial, inv_norm, pixel_grad = torch.ops.incseg_fast.attentive_distillation_forward(f, g, a, b, "sum", True)
    for side, x in enumerate((f, g)):
        energy = (x * x).sum(1)
        norm = energy.flatten(1).norm(dim=1)
        expected_inv = torch.where(norm > 0, 1 / norm, torch.zeros_like(norm))
        torch.testing.assert_close(inv_norm[side], expected_inv, rtol=1e-12, atol=0)
        torch.testing.assert_close(spatial[side], energy * expected_inv[:, None, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(spatial[2], spatial[0] - spatial[1], rtol=1e-12, atol=0)
    diff = (a[:, :, None, None] * spatial[0][:, None] + 1) * f - (b[:, :, None, None] * spatial[1][:, None] + 1) * g
    torch.testing.assert_close(pixel_grad[0], (diff * a[:, :, None, None] * f).sum(1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pixel_grad[1], (diff * b[:, :, None, None] * g).sum(1), rtol=1e-12, atol=1e-14)


def test_wrapper_saves_pixel_gradients_only_when_needed(generator, monkeypatch):
    calls = []
    real_ops = torch.ops.incseg_fast

    class RecordingOps:
        def attentive_distillation_forward(self, *args):
            calls.append(args[-1])
            return real_ops.attentive_distillation_forward(*args)

    monkeypatch.setattr(ops.COMPILED, "ops", RecordingOps())
    f, g, a, b = _feature_pair(generator, torch.float32)
    backend = ops.COMPILED
    backend.attentive_distillation(f.requires_grad_(), g, a, b, reduction="mean", detach_spatial=False)
    backend.attentive_distillation(f, g, a, b, reduction="mean", detach_spatial=True)
    with torch.no_grad():
        backend.attentive_distillation(f, g, a, b, reduction="mean", detach_spatial=False)
    backend.attentive_distillation(f.detach(), g, a.requires_grad_(), b, reduction="mean", detach_spatial=False)
    assert calls == [True, False, False, False]


@pytest.mark.parametrize(
    "case, message",
    [
        (lambda f, g, a, b: (f[0], g[0], a, b), "f must be"),
        (lambda f, g, a, b: (f, g[:, :3], a, b), "g must have"),
        (lambda f, g, a, b: (f, g, a[:, :3], b), "a must be"),
        (lambda f, g, a, b: (f, g, a, b.t()), "b must have"),
        (lambda f, g, a, b: (f, g.half(), a, b.half()), "g has dtype Half but f has Float"),
        (lambda f, g, a, b: (f, g.double(), a, b), "b g's"),
        (lambda f, g, a, b: (f.long(), g.long(), a.long(), b.long()), "f must be float16"),
    ],
    ids=("f_rank", "g_shape", "a_shape", "b_shape", "teacher_narrower", "b_not_g_dtype", "integer"),
)
def test_direct_forward_call_checks_shapes(generator, case, message):
    args = case(*_feature_pair(generator, torch.float32))
    with pytest.raises((RuntimeError, TypeError), match=message):
        torch.ops.incseg_fast.attentive_distillation_forward(*args, "mean", False)


def test_direct_calls_check_reduction_and_saved_statistics(generator):
    f, g, a, b = _feature_pair(generator, torch.float32)
    with pytest.raises(RuntimeError, match="reduction must be"):
        torch.ops.incseg_fast.attentive_distillation_forward(f, g, a, b, "none", False)
    _, spatial, inv_norm, pixel_grad = torch.ops.incseg_fast.attentive_distillation_forward(f, g, a, b, "mean", False)
    grad_loss = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="pixel_grad must be"):  # the spatial chain needs P from the forward
        torch.ops.incseg_fast.attentive_distillation_backward(
            grad_loss, f, g, a, b, spatial, inv_norm, pixel_grad, "mean", True, [True, False, False, False]
        )
    with pytest.raises(RuntimeError, match="spatial must be"):
        torch.ops.incseg_fast.attentive_distillation_backward(
            grad_loss, f, g, a, b, spatial[:, :1], inv_norm, pixel_grad, "mean", False, [True, False, False, False]
        )


def test_direct_structured_attention_call_checks_shapes(generator):
    v = _randn(generator, (2, 6, 5, 7), torch.float32)
    with pytest.raises(RuntimeError, match="a_ch must be"):
        torch.ops.incseg_fast.structured_attention(v, v[:, :, 0, 0].t(), v[:, 0])
    with pytest.raises(RuntimeError, match="a_sp must be"):
        torch.ops.incseg_fast.structured_attention(v, v[:, :, 0, 0], v[:, 0, :4])


ISA_PARITY_SCRIPT = textwrap.dedent("""
    import torch
    import incseg_fast as isf
    from incseg_fast import reference

    generator = torch.Generator().manual_seed(7)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)):
        shape = (2, 9, 37, 29)  # a chunk tail and several chunks per image
        values = [torch.randn(s, generator=generator, dtype=torch.float64)
                  for s in (shape, shape, shape[:2], shape[:2], shape, shape[:2], (2, 37, 29))]
        f, g, a, b, v, a_ch, a_sp = [x.to(dtype).clone().requires_grad_() for x in values]
        leaves = [x.detach().double().requires_grad_() for x in (f, g, a, b, v, a_ch, a_sp)]
        grad_out = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        acc = torch.promote_types(dtype, torch.float32)
        pairs = [(isf.attentive_distillation(f, g, a, b, backend="cpu"),
                  reference.attentive_distillation(*leaves[:4], reduction="mean", detach_spatial=False)),
                 ((isf.structured_attention(v, a_ch, a_sp, backend="cpu").to(acc) * grad_out.to(acc)).sum(),
                  (reference.structured_attention(*leaves[4:]) * grad_out.double()).sum())]
        for loss, ref in pairs:
            assert abs(loss.item() - ref.item()) <= rtol * abs(ref.item()), (dtype, loss.item(), ref.item())
            (loss * 1.7).backward()
            (ref * 1.7).backward()
        for x, y in zip((f, g, a, b, v, a_ch, a_sp), leaves):
            error = (x.grad.double() - y.grad).abs().max().item()
            assert error <= rtol * y.grad.abs().max().item(), (dtype, x.shape, error)
    print("parity ok")
""")


@pytest.mark.parametrize("isa", ("baseline", "avx2", "avx512"))
def test_every_isa_copy_matches_reference(isa):
    """Each compiled copy of the hot loops (what a CPU with only that ISA runs) agrees with the reference.

    INCSEG_CPU_ISA caps the copy the extension picks (read once per process, hence subprocesses); on a
    CPU without AVX-512 (or AVX2) the higher caps run the widest copy it has.
    """
    environment = dict(os.environ, INCSEG_CPU_ISA=isa)
    result = subprocess.run(
        [sys.executable, "-c", ISA_PARITY_SCRIPT], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity ok" in result.stdout


def test_unknown_isa_cap_is_rejected():
    environment = dict(os.environ, INCSEG_CPU_ISA="avx3")
    script = textwrap.dedent("""
        import torch
        import incseg_fast  # noqa: F401 (registers the ops)
        v = torch.ones(1, 2, 3, 3)
        torch.ops.incseg_fast.structured_attention(v, v[:, :, 0, 0], v[:, 0])
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "INCSEG_CPU_ISA must be" in result.stderr
