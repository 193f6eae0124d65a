"""A CAF-style training step through each fused backend under torch.compile(fullgraph=True).

fullgraph=True turns any graph break (in the public API, the op wrappers, the fake kernels or the
autograd registration) into an error; the compiled step must give the eager loss and gradients.
Runs on the cpu backend here, and on cuda and triton where there is a GPU (Triton's interpreter is
covered by tests/test_triton_ops.py).
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from parity_support import device_for, interpreted
from torch import nn

import incseg_fast as isf
from incseg_fast.vocabulary import FUSED_BACKENDS

CLASSES, OLD_CLASSES, IGNORE = 6, 4, 255


class TinySegmenter(nn.Module):
    """Encoder features, a squeeze-excitation channel attention over them, and a 1x1 classifier."""

    def __init__(self, classes, channels=12):
        super().__init__()
        self.encoder = nn.Conv2d(3, channels, 3, padding=1)
        self.excitation = nn.Linear(channels, channels)
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, images):
        features = torch.relu(self.encoder(images))
        channel_attention = torch.sigmoid(self.excitation(features.mean((2, 3))))
        return self.classifier(features), features, channel_attention


def training_loss(new_model, old_model, images, labels, *, backend):
    logits, features, attention = new_model(images)
    with torch.no_grad():
        old_logits, old_features, old_attention = old_model(images)
    ce, kd = isf.incremental_loss(
        logits, labels, old_logits, old_classes=OLD_CLASSES, ignore_index=IGNORE, backend=backend
    )
    ad = isf.attentive_distillation(features, old_features, attention, old_attention, backend=backend)
    return ce + 10 * kd + 1000 * ad


def attention_only_loss(new_model, old_model, images, labels, *, backend):
    """The attention ops alone (plain cross-entropy), with the structured attention block on the new features."""
    logits, features, attention = new_model(images)
    with torch.no_grad():
        _, old_features, old_attention = old_model(images)
    fused = isf.structured_attention(features, attention, features.mean(1), backend=backend)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    ad = isf.attentive_distillation(fused, old_features, attention, old_attention, backend=backend)
    return ce + 1000 * ad


def _models_and_batch(generator, device):
    torch.manual_seed(20261121)
    old_model = TinySegmenter(OLD_CLASSES).requires_grad_(False).eval().to(device)
    new_model = TinySegmenter(CLASSES).to(device)
    images = torch.randn(2, 3, 9, 11, generator=generator)
    labels = torch.randint(0, CLASSES, (2, 9, 11), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.1] = IGNORE
    return new_model, old_model, images.to(device), labels.to(device)


def _loss_and_grads(step, new_model, old_model, images, labels):
    new_model.zero_grad(set_to_none=True)
    loss = step(new_model, old_model, images, labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in new_model.named_parameters()}


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("step", (training_loss, attention_only_loss), ids=lambda step: step.__name__)
def test_compiled_training_step_matches_eager(generator, step, backend):
    if backend not in isf.available_backends() or interpreted(backend):
        pytest.skip(f"backend {backend!r} does not run compiled here")
    torch._dynamo.reset()
    step = functools.partial(step, backend=backend)
    new_model, old_model, images, labels = _models_and_batch(generator, device_for(backend))
    eager_loss, eager_grads = _loss_and_grads(step, new_model, old_model, images, labels)
    compiled = torch.compile(step, fullgraph=True)
    # The on-disk caches key compiled graphs without the ops' fake kernels: a kernel rebuilt with new
    # output shapes could be paired with a stale graph, so this test always compiles afresh.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        compiled_loss, compiled_grads = _loss_and_grads(compiled, new_model, old_model, images, labels)

    assert eager_loss.abs() > 0
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
