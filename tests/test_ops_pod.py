"""The Local POD ops (torch.ops.<namespace>.local_pod_*) as torch custom ops: opcheck (schema, fake
kernels, autograd registration), the saved state and the memory it spares, the checks that keep a direct call from
reading out of bounds, and the public API's argument errors. Numerical parity: test_parity_pod.py.
"""

import importlib

import pytest
import torch
from torch.library import opcheck

import incseg_fast as isf
from incseg_fast import _backends, ops, reference
from incseg_fast.bench import measure
from incseg_fast.losses import LocalPODLoss

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="incseg_fast._C is not built")

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
NAMESPACES = (ops.COMPILED_NAMESPACE, ops.CUDA_EMULATOR_NAMESPACE)


def _randn(generator, shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_opcheck_local_pod_forward(generator, namespace, dtype, reduction):
    new = _randn(generator, (2, 3, 9, 7), dtype, requires_grad=True)
    old = _randn(generator, (2, 3, 9, 7), dtype)
    opcheck(getattr(torch.ops, namespace).local_pod_forward.default, (new, old, [1, 2, 4], reduction))


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_opcheck_local_pod_backward(generator, namespace, dtype, reduction):
    op_namespace = getattr(torch.ops, namespace)
    new, old = _randn(generator, (2, 3, 9, 7), dtype), _randn(generator, (2, 3, 9, 7), dtype)
    loss, inv_norm = op_namespace.local_pod_forward(new, old, [1, 2, 4], reduction)
    grad_loss = torch.full_like(loss, 0.7)
    args = (grad_loss, new, old, inv_norm, [1, 2, 4], reduction)
    opcheck(op_namespace.local_pod_backward.default, args)
    assert op_namespace.local_pod_backward(*args).dtype == dtype


@pytest.mark.parametrize("namespace", (*NAMESPACES, ops.TRITON_NAMESPACE))
def test_saved_state_is_the_inverse_distance(generator, namespace):
    if namespace == ops.TRITON_NAMESPACE:
        reason = _backends.unavailable_reason("triton")
        if reason is not None:
            pytest.skip(reason)
        importlib.import_module("incseg_fast.triton")  # registers the Triton kernels
    new, old = _randn(generator, (2, 3, 13, 11), torch.float64), _randn(generator, (2, 3, 13, 11), torch.float64)
    loss, inv_norm = getattr(torch.ops, namespace).local_pod_forward(new, old, [1, 2, 4], "none")
    distances = reference.local_pod(new, old, reduction="none")
    torch.testing.assert_close(loss, distances)
    torch.testing.assert_close(inv_norm, 1 / distances)


def test_autograd_saves_the_inputs_and_one_value_per_image(generator):
    new = _randn(generator, (2, 3, 13, 11), requires_grad=True)
    old = _randn(generator, (2, 3, 13, 11))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        isf.local_pod(new, old, backend="cpu")
    others = [t for t in saved if t.data_ptr() not in (new.data_ptr(), old.data_ptr())]
    assert len(saved) - len(others) == 2
    assert sum(t.numel() for t in others) == 2  # 1/l per image: no pooled differences


def test_cpu_forward_backward_allocates_the_gradient_and_little_else(generator):
    # MATH.md#local-pod's pooled values for scales (1, 2, 4) are 7 (H + W) per channel: 0.44 of
    # these features; the backward pools each plane again in per-thread scratch instead of saving them.
    new = _randn(generator, (2, 256, 16, 16), requires_grad=True)
    old = _randn(generator, (2, 256, 16, 16))

    def forward_backward():
        isf.local_pod(new, old, backend="cpu").backward()

    peak = measure.peak_extra_bytes(forward_backward, "cpu")
    feature_bytes = new.numel() * new.element_size()
    assert feature_bytes <= peak <= 1.01 * feature_bytes


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_direct_calls_with_bad_arguments_are_refused(generator, namespace):
    op_namespace = getattr(torch.ops, namespace)
    new, old = _randn(generator, (2, 3, 9, 7)), _randn(generator, (2, 3, 9, 7))
    for args, message in (
        ((new, old[:, :2], [1], "mean"), "old must have new's shape"),
        ((new, old, [8], "mean"), r"every scale must be in \[1, min\(H, W\)\]"),
        ((new, old, [1] * 9, "mean"), "scales must hold 1 to 8 values"),
        ((new, old, [1], "avg"), "reduction must be"),
        ((new, old.double(), [1], "mean"), "one dtype and device"),
    ):
        with pytest.raises(RuntimeError, match=message):
            op_namespace.local_pod_forward(*args)
    _, inv_norm = op_namespace.local_pod_forward(new, old, [1, 2], "mean")
    grad_loss = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="inv_norm must be the forward's"):
        op_namespace.local_pod_backward(grad_loss, new, old, inv_norm[:1], [1, 2], "mean")
    with pytest.raises(RuntimeError, match="old must have new's shape"):
        op_namespace.local_pod_backward(grad_loss, new, old[:, :2], inv_norm, [1, 2], "mean")
    with pytest.raises(RuntimeError, match="grad_loss must be shaped like the loss"):
        op_namespace.local_pod_backward(torch.ones(2), new, old, inv_norm, [1, 2], "mean")


def test_api_errors_name_the_argument(generator):
    new, old = _randn(generator, (2, 3, 9, 7)), _randn(generator, (2, 3, 9, 7))
    cases = (
        (dict(new=new.numpy(), old=old), TypeError, "new must be a torch.Tensor"),
        (dict(new=new, old=old[0]), ValueError, "old must be 4-D"),
        (dict(new=new, old=old.double()), TypeError, "old has dtype torch.float64 but new has torch.float32"),
        (dict(new=new, old=old[:, :, :8]), ValueError, r"old must have shape \(B, C, H, W\) = \(2, 3, 9, 7\)"),
        (dict(new=new[:, :2], old=old), ValueError, "old has 3 channels; need 1 <= 3 <= 2"),
        (dict(new=new, old=old.requires_grad_()), ValueError, "old .* must not require grad"),
        (dict(new=new, old=old.detach(), scales=(1, 8)), ValueError, r"scales\[1\]=8 must be in \[1, min\(H, W\)\]"),
        (dict(new=new, old=old.detach(), scales=(1, 0)), ValueError, r"scales\[1\]=0"),
        (dict(new=new, old=old.detach(), scales=(1, 2.0)), TypeError, r"scales\[1\] must be an int"),
        (dict(new=new, old=old.detach(), scales=4), TypeError, "scales must be a sequence of ints"),
        (dict(new=new, old=old.detach(), scales=()), ValueError, "scales must hold 1 to 8 scales"),
        (dict(new=new, old=old.detach(), reduction="avg"), ValueError, "reduction must be one of"),
        (dict(new=new, old=old.detach(), backend="gpu"), ValueError, "backend must be one of"),
    )
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            isf.local_pod(**kwargs)


def test_auto_runs_the_cpu_kernels_on_cpu_tensors(generator, monkeypatch):
    calls = []
    monkeypatch.setattr(ops.COMPILED, "local_pod", lambda *a, **k: calls.append(1) or torch.zeros(()))
    isf.local_pod(_randn(generator, (2, 3, 9, 7)), _randn(generator, (2, 3, 9, 7)))
    assert calls == [1]


def test_empty_batch_gives_the_reference_result(generator):
    new = torch.zeros(0, 3, 8, 8, requires_grad=True)
    loss = isf.local_pod(new, torch.zeros(0, 3, 8, 8), backend="cpu")
    loss.backward()
    assert loss.item() == 0 and new.grad.shape == new.shape


def test_local_pod_loss_weights_layers_as_plop(generator):
    """PLOP: 0.01 per feature layer, 0.0005 for the logits, times sqrt(all classes / new classes),
    divided by the number of layers."""
    features = [(_randn(generator, (2, 4, 9, 9)), _randn(generator, (2, 4, 9, 9))) for _ in range(2)]
    logits = (_randn(generator, (2, 6, 9, 9)), _randn(generator, (2, 5, 9, 9)))
    layers = [*features, logits]
    module = LocalPODLoss(backend="reference")
    loss = module([new for new, _ in layers], [old for _, old in layers], num_classes=6, num_new_classes=1)
    weights = (0.01, 0.01, 0.0005)
    expected = sum(w * reference.local_pod(n, o) for w, (n, o) in zip(weights, layers, strict=True))
    torch.testing.assert_close(loss, expected * 6**0.5 / 3)


def test_local_pod_loss_errors_name_its_arguments(generator):
    module = LocalPODLoss()
    new, old = _randn(generator, (2, 3, 9, 9)), _randn(generator, (2, 3, 9, 9))
    with pytest.raises(ValueError, match="new_features and old_features must hold as many layers, got 2 and 1"):
        module([new, new], [old])
    with pytest.raises(TypeError, match=r"old_features\[0\] has dtype"):
        module([new], [old.double()])
    with pytest.raises(ValueError, match="num_classes and num_new_classes go together"):
        module([new], [old], num_classes=3)
    with pytest.raises(ValueError, match="num_new_classes must be >= 1"):
        module([new], [old], num_classes=3, num_new_classes=0)
