"""The public API: exact names, backend selection, the MiB drop-in modules."""

import importlib
import inspect
import subprocess
import sys

import pytest
import torch

import incseg_fast as isf
from incseg_fast import _backends, losses, ops, reference
from incseg_fast import reference as ref


def test_public_signatures():
    expected = {
        "unbiased_cross_entropy": "(x, t, old_classes, *, ignore_index=255, reduction='mean', size=None, "
        "backend='auto')",
        "knowledge_distillation": "(x, y, *, alpha=1.0, mask=None, reduction='mean', size=None, backend='auto')",
        "unbiased_knowledge_distillation": "(x, y, *, alpha=1.0, mask=None, reduction='mean', size=None, "
        "backend='auto')",
        "balanced_knowledge_distillation": "(x, y, *, alpha=1.0, mask=None, reduction='mean', gamma=None, "
        "size=None, backend='auto')",
        "incremental_loss": "(x, t, y, *, old_classes, ce='unbiased', kd='unbiased', alpha=1.0, mask=None, "
        "gamma=None, ignore_index=255, size=None, backend='auto')",
        "attentive_distillation": "(f, g, a, b, *, reduction='mean', detach_spatial=False, backend='auto')",
        "structured_attention": "(v, a_ch, a_sp, *, backend='auto')",
        "local_pod": "(new, old, *, scales=(1, 2, 4), reduction='mean', backend='auto')",
        "available_backends": "()",
    }
    for name, signature in expected.items():
        assert str(inspect.signature(getattr(isf, name))) == signature, name


def test_available_backends_order_and_reference():
    names = isf.available_backends()
    assert "reference" in names
    assert names == [b for b in ("cuda", "triton", "cpu", "reference") if b in names]


def test_auto_picks_compiled_cpu_backend_for_cpu_tensors():
    backend = _backends.resolve("auto", torch.device("cpu"))
    if "cpu" in isf.available_backends():
        assert backend is ops.COMPILED and backend.namespace == "incseg_fast"
    else:
        assert backend is reference


def test_triton_availability_follows_interpreter_flag(monkeypatch):
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        pytest.skip("needs triton installed and no CUDA device")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in isf.available_backends()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in isf.available_backends()
    x, t = torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(isf.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        isf.unbiased_cross_entropy(x, t, 1, backend="triton")


def test_backend_requires_matching_device():
    if "cpu" not in isf.available_backends():
        pytest.skip("the compiled extension is not built")
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        _backends.resolve("cpu", torch.device("meta"))


@pytest.fixture
def batch(generator):
    x = torch.randn(2, 6, 5, 7, generator=generator) * 2
    y = torch.randn(2, 4, 5, 7, generator=generator) * 2
    t = torch.randint(0, 6, (2, 5, 7), generator=generator)
    t[0, 0] = 255
    return x, t, y


def test_incremental_loss_returns_two_float32_scalars(batch):
    x, t, y = batch
    ce, kd = isf.incremental_loss(x.requires_grad_(), t, y, old_classes=4, backend="reference")
    assert ce.shape == () and kd.shape == () and ce.dtype == kd.dtype == torch.float32
    (ce + 10 * kd).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_incremental_loss_without_distillation(batch):
    x, t, _ = batch
    ce, kd = isf.incremental_loss(x, t, None, old_classes=4, kd="none", backend="reference")
    torch.testing.assert_close(ce, ref.unbiased_cross_entropy(x, t, 4))
    assert kd.item() == 0.0


def test_bool_and_float_masks_agree(batch):
    x, _, y = batch
    mask = torch.rand(2, 5, 7) > 0.5
    torch.testing.assert_close(
        isf.knowledge_distillation(x, y, mask=mask, backend="reference"),
        isf.knowledge_distillation(x, y, mask=mask.float(), backend="reference"),
    )


# ---------------------------------------------------------------------------------------------
# MiB drop-in modules.
# ---------------------------------------------------------------------------------------------


def test_mib_modules_match_functions(batch):
    x, t, y = batch
    torch.testing.assert_close(losses.UnbiasedCrossEntropy(old_cl=4)(x, t), isf.unbiased_cross_entropy(x, t, 4))
    mask = torch.rand(2, 5, 7)
    for module, function in [
        (losses.KnowledgeDistillationLoss, isf.knowledge_distillation),
        (losses.UnbiasedKnowledgeDistillationLoss, isf.unbiased_knowledge_distillation),
        (losses.BalancedKnowledgeDistillationLoss, isf.balanced_knowledge_distillation),
    ]:
        loss = module(reduction="sum", alpha=0.5)(x, y, mask=mask)
        torch.testing.assert_close(loss, function(x, y, alpha=0.5, mask=mask, reduction="sum"))


def test_unbiased_ce_module_mask_ignores_pixels_like_plop(batch):
    x, t, _ = batch
    mask = torch.rand(2, 5, 7) > 0.6
    expected = isf.unbiased_cross_entropy(x, t.masked_fill(mask, 255), 4)
    torch.testing.assert_close(losses.UnbiasedCrossEntropy(old_cl=4)(x, t, mask=mask), expected)


def test_unbiased_ce_module_refuses_a_float_mask(batch):
    """PLOP's mask marks pixels to ignore; cross-entropy has no weight, so a float mask is an error
    (binarising it would silently drop every pixel with a nonzero weight)."""
    x, t, _ = batch
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        losses.UnbiasedCrossEntropy(old_cl=4)(x, t, mask=torch.rand(2, 5, 7))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x, t, y: losses.UnbiasedCrossEntropy(old_cl=9)(x, t), "old_cl must be <= 6"),
        (lambda x, t, y: losses.UnbiasedCrossEntropy(old_cl=4)(x, t.float()), "targets must be an int64"),
        (lambda x, t, y: losses.UnbiasedCrossEntropy(old_cl=4)(x[0], t), "inputs must be 4-D"),
        (lambda x, t, y: losses.UnbiasedCrossEntropy(old_cl=4)(x, t[:, :2]), r"targets must have shape \(B, H, W\)"),
        (lambda x, t, y: losses.KnowledgeDistillationLoss()(x, y[:, :, :2]), "targets must have shape"),
        (lambda x, t, y: losses.UnbiasedKnowledgeDistillationLoss()(x, y.half()), "targets has dtype .* but inputs"),
        (lambda x, t, y: losses.BalancedKnowledgeDistillationLoss()(x, y, mask=torch.ones(3)), "mask must have shape"),
    ],
    ids=["old_cl", "targets_dtype", "inputs_rank", "targets_shape", "kd_targets", "unkd_dtype", "bkd_mask"],
)
def test_module_errors_name_the_module_arguments(batch, call, message):
    x, t, y = batch
    with pytest.raises((ValueError, TypeError), match=message):
        call(x, t, y)


def test_attentive_distillation_module_checks_channels_and_takes_half_features(generator):
    module = losses.AttentiveDistillationLoss(8, backend="reference")
    f = torch.randn(2, 8, 3, 4, generator=generator)
    with pytest.raises(ValueError, match="inputs has 6 channels but .* channels=8"):
        module(f[:, :6], f[:, :6])
    # float16 features outside autocast: the attention blocks run in their own dtype.
    loss = module(f.half(), (f + 0.1).half())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize(
    "module",
    [
        losses.KnowledgeDistillationLoss(),
        losses.UnbiasedKnowledgeDistillationLoss(),
        losses.BalancedKnowledgeDistillationLoss(),
        losses.AttentiveDistillationLoss(3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_distillation_modules_take_a_float32_teacher_under_autocast(batch, module):
    """MiB's AMP loop: the student inside autocast (bfloat16), the teacher under no_grad outside it
    (float32), passed as it is (MATH.md#teacher-dtype); a narrower teacher names the module's arguments."""
    x, _, y = batch
    if isinstance(module, losses.AttentiveDistillationLoss):  # features of 3 channels
        x, y = x[:, :3], y[:, :3]
    inputs = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(inputs.bfloat16(), y)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and inputs.grad.abs().max() > 0
    with pytest.raises(TypeError, match="targets has dtype torch.float16 but inputs has torch.float32"):
        module(x, y.half())


def test_unbiased_ce_module_without_old_classes_is_cross_entropy(batch):
    x, t, _ = batch
    torch.testing.assert_close(
        losses.UnbiasedCrossEntropy()(x, t), torch.nn.functional.cross_entropy(x, t, ignore_index=255)
    )


def test_attentive_distillation_module_uses_two_se_blocks(generator):
    f = torch.randn(2, 32, 4, 5, generator=generator, requires_grad=True)
    g = torch.randn(2, 32, 4, 5, generator=generator)
    module = losses.AttentiveDistillationLoss(32, backend="reference")
    loss = module(f, g)
    a, b = module.new_attention(f), module.old_attention(g)
    torch.testing.assert_close(loss, ref.attentive_distillation(f, g, a, b))
    loss.backward()
    assert module.new_attention.fc1.weight.grad is not None
    assert module.old_attention.fc1.weight.grad is not None
    assert f.grad is not None


def test_import_stays_light():
    """`import incseg_fast` loads neither Triton (whose interpreter mode is the user's to decide), nor
    the trainer, datasets, plotting or benchmarks: those cost time on first use only."""
    heavy = (
        "triton",
        "incseg_fast.train",
        "incseg_fast.data",
        "incseg_fast.models",
        "matplotlib",
        "PIL",
        "incseg_fast.bench",
        "benchmarks",
    )
    code = f"import sys, incseg_fast; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_works_on_the_reference_path_without_the_extension():
    """With incseg_fast._C missing (INCSEG_SKIP_EXT=1 installs), the package still imports, says so,
    computes on the reference path, and refuses an explicit backend='cpu'."""
    code = """
import sys, importlib.abc
class HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "incseg_fast._C":
            raise ImportError("hidden for the test")
sys.meta_path.insert(0, HideExtension())
import torch, incseg_fast as isf
assert "cpu" not in isf.available_backends() and "reference" in isf.available_backends()
x, t = torch.randn(2, 5, 3, 4), torch.randint(0, 5, (2, 3, 4))
loss = isf.unbiased_cross_entropy(x, t, 3)
assert torch.allclose(loss, isf.reference.unbiased_cross_entropy(x, t, 3))
try:
    isf.unbiased_cross_entropy(x, t, 3, backend="cpu")
except isf.BackendUnavailableError as error:
    assert "not built" in str(error)
else:
    raise AssertionError("backend='cpu' must raise without the extension")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
