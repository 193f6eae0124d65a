"""How the trainer runs CAF: BKD's γ as the background share, passed to the fused objective."""

import math

import pytest
import torch

import incseg_fast as isf
from incseg_fast.train.methods import background_share_gamma


def test_gamma_is_the_non_background_share_over_the_background_share():
    # two images of two pixels; the teacher's probabilities (background first) per pixel
    probabilities = torch.tensor(
        [
            [[0.9, 0.05, 0.05], [0.6, 0.3, 0.1]],  # mean background 0.75: gamma 1/3
            [[0.2, 0.8, 0.0], [0.2, 0.0, 0.8]],  # mean background 0.2: gamma 4
        ]
    )
    y = probabilities.clamp_min(1e-30).log().permute(0, 2, 1).unsqueeze(-1)  # (B, C, 2, 1) logits
    assert background_share_gamma(y).tolist() == pytest.approx([1 / 3, 4.0], rel=1e-5)


def test_gamma_stays_finite_when_the_teacher_sees_no_background():
    y = torch.tensor([[-200.0, 200.0]]).view(1, 2, 1, 1)
    gamma = background_share_gamma(y)
    assert math.isfinite(gamma.item()) and gamma.item() > 1e30


def test_incremental_loss_takes_gamma_for_the_balanced_distillation(generator):
    x = torch.randn(2, 5, 4, 4, generator=generator, requires_grad=True)
    y = torch.randn(2, 3, 4, 4, generator=generator)
    t = torch.randint(0, 5, (2, 4, 4), generator=generator)
    gamma = torch.tensor([0.25, 2.0])
    _, kd = isf.incremental_loss(x, t, y, old_classes=3, kd="balanced", gamma=gamma, backend="reference")
    assert kd.item() == pytest.approx(isf.balanced_knowledge_distillation(x, y, gamma=gamma).item(), rel=1e-6)
    _, default = isf.incremental_loss(x, t, y, old_classes=3, kd="balanced", backend="reference")
    assert default.item() != pytest.approx(kd.item(), rel=1e-3)  # the given gamma was used
    with pytest.raises(ValueError, match="gamma weights the balanced distillation only"):
        isf.incremental_loss(x, t, y, old_classes=3, kd="unbiased", gamma=gamma)
