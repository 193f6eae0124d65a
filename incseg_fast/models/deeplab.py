"""DeepLabV3 (ASPP head) with MiB's incremental classifier, and the CAF modules.

``IncrementalSegmenter.forward`` returns a dict:
``logits`` (B, C, H, W) at the input resolution (with ``upsample=False`` at the network's own,
H / output_stride: the fused losses upsample them with ``size=``), ``encoder`` the backbone output (ILT's
feature-distillation target; with CAF the attended ``z-bar``), ``features`` the pre-classifier
head output (CAF's ``h``), and with CAF ``projected`` (the input of the next step's fusion); with
``stages=True`` also ``stages``, the outputs of the backbone's four stages (PLOP's Local POD).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import incseg_fast as isf

from .resnet import build_backbone


def _conv_bn_relu(cin, cout, kernel=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, dilated 3x3 branches and image pooling."""

    def __init__(self, in_channels: int, channels: int, rates):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, channels)] + [_conv_bn_relu(in_channels, channels, 3, r) for r in rates]
        )
        # no BatchNorm on the pooled 1x1 branch: it would fail on a training batch of one image
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False), nn.ReLU(inplace=True)
        )
        self.project = _conv_bn_relu(channels * (len(rates) + 2), channels)

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, 1))


class DeepLabV3Head(nn.Module):
    """ASPP followed by a 3x3 conv (MiB's head), ``channels`` output features."""

    def __init__(self, in_channels: int, channels: int, rates):
        super().__init__()
        self.aspp = ASPP(in_channels, channels, rates)
        self.last = _conv_bn_relu(channels, channels, 3)

    def forward(self, x):
        return self.last(self.aspp(x))


class IncrementalClassifier(nn.Module):
    """One 1x1 convolution per step; the logits of all steps are concatenated (MiB).

    ``detach_first_head``: the first head sees the features detached, so that its loss trains it
    and nothing before it (DKD's auxiliary classifier)."""

    def __init__(self, in_channels: int, classes_per_step, detach_first_head: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.heads = nn.ModuleList(nn.Conv2d(in_channels, n, 1) for n in classes_per_step)
        self.detach_first_head = detach_first_head

    @property
    def classes_per_step(self) -> list[int]:
        return [h.out_channels for h in self.heads]

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_step)

    def add_step(self, n_new: int) -> nn.Conv2d:
        head = nn.Conv2d(self.in_channels, n_new, 1).to(self.heads[0].weight.device)
        self.heads.append(head)
        return head

    @torch.no_grad()
    def balanced_init(self) -> None:
        """MiB's initialisation of the newest head from the background classifier.

        The background probability is split evenly between the background and the ``n``
        new classes: new weights = background weights, new bias = background bias - log(n+1),
        and the background bias itself is lowered by log(n+1).
        """
        if len(self.heads) < 2:
            raise ValueError("balanced_init needs a step > 0 (at least two classifier heads)")
        new, background = self.heads[-1], self.heads[0]
        shift = math.log(new.out_channels + 1)
        new.weight.copy_(background.weight[0:1].expand_as(new.weight))
        new.bias.fill_(float(background.bias[0]) - shift)
        background.bias[0] -= shift

    @torch.no_grad()
    def init_from_first_head(self) -> None:
        """The newest head's classes start as copies of the first head's one channel: SSUL's weight
        transfer from its "unknown" class, DKD's initialisation from its auxiliary classifier."""
        first, new = self.heads[0], self.heads[-1]
        if len(self.heads) < 2 or first.out_channels != 1:
            raise ValueError("init_from_first_head needs a one-channel first head and a step > 0")
        new.weight.copy_(first.weight.expand_as(new.weight))
        new.bias.copy_(first.bias.expand_as(new.bias))

    def forward(self, x):
        first = self.heads[0](x.detach() if self.detach_first_head else x)
        return torch.cat([first] + [h(x) for h in self.heads[1:]], 1)


class SqueezeExcitation(nn.Module):
    """Channel attention of CAF eq. 5: sigmoid(W2 relu(W1 GAP(m))), shape (B, C)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, m):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(m.float().mean((2, 3)))))).to(m.dtype)


class NonLocalProjection(nn.Module):
    """CAF's feature projection (Fig. 3): an embedded-Gaussian non-local block, ``z + W(attention(z))``.

    The output BatchNorm's scale starts at zero, so the block starts as the identity (the usual
    non-local initialisation: a pretrained encoder's features first pass through unchanged).
    """

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)
        self.scale = inner**-0.5

    def forward(self, z):
        b, _, h, w = z.shape
        query = self.theta(z).flatten(2).transpose(1, 2)  # (B, N, C')
        key = self.phi(z).flatten(2)  # (B, C', N)
        value = self.g(z).flatten(2).transpose(1, 2)  # (B, N, C')
        attention = torch.softmax((query @ key) * self.scale, dim=-1)  # (B, N, N)
        context = (attention @ value).transpose(1, 2).reshape(b, -1, h, w)
        return z + self.out(context)


class ContinualAttentiveFusion(nn.Module):
    """CAF's module (MATH.md#sab): project the new (and, while training, the old) encoder
    features with a non-local block, fuse them with a 1x1 conv, and reweight the result with
    the structured attention ``(1 + A_CH (x) A_SP) * v``.

    Without old features (evaluation) the fusion is skipped, the paper's "skip" strategy. A_SP
    and A_CH use MATH.md#sab's collapsed form (a one-output 1x1 conv and a matrix-vector product
    on the pooled features), gated by a sigmoid and a tanh, so the structured attention
    ``1 + A_CH (x) A_SP`` stays in (0, 2), bounded as the attention of the attentive distillation
    is (sigmoid channel attention, normalised spatial map) and as the authors' code bounds it
    (sigmoid channel attention, max-normalised spatial map). A_CH's weights start at zero, and
    with the non-local block and the fusion the whole module starts as the identity: it joins a
    trained step-0 network at step 1 without changing what it computes.

    Why the gates: with the linear A_SP and A_CH of CAF eq. 1-2 the output is cubic in ``v`` and
    the gates' scale is free (the head's BatchNorm hides it from the segmentation loss), while the
    attentive distillation of z-bar (a squared error on raw features) sees all of it: its
    curvature grows with the gates until SGD is unstable. Measured on the quick demo (CAF step 1,
    LR 0.05, momentum 0.9): the largest Hessian eigenvalue went 163 -> 2905 -> 60067 while
    max |A_CH (x) A_SP| went 4 -> 21 -> 311, and the loss reached 3.5e19 in three iterations (the
    stability limit of momentum SGD is lr * lambda_max < 2 (1 + momentum) = 3.8); with the gates
    lambda_max stayed within 22-39 (docs/TRAINER.md, "CAF's structured attention").
    """

    def __init__(self, channels: int):
        super().__init__()
        self.project = NonLocalProjection(channels)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)
        # starts as "keep the new projection": the step-0 head sees the same input at step 1
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.weight[:, :channels, 0, 0].copy_(torch.eye(channels))
            self.fuse.bias.zero_()
        self.spatial = nn.Conv2d(channels, 1, 1)  # mean over the outputs of w_sp * v, then a sigmoid
        self.channel = nn.Linear(channels, channels)  # w_ch applied to GAP(v), then a tanh
        # A_CH starts at 0, so the structured attention starts as the identity too
        nn.init.zeros_(self.channel.weight)
        nn.init.zeros_(self.channel.bias)

    def forward(self, z, old_projected=None, *, backend="auto"):
        """Returns (the attended features z-bar, this model's projection of z)."""
        projected = self.project(z)
        v = projected if old_projected is None else self.fuse(torch.cat([projected, old_projected], 1))
        a_sp = torch.sigmoid(self.spatial(v)[:, 0])
        a_ch = torch.tanh(self.channel(v.mean((2, 3))))
        out = isf.structured_attention(v, a_ch.to(v.dtype), a_sp.to(v.dtype), backend=backend)
        return out, projected


# How the logits become classes (IncrementalSegmenter's ``output``, docs/TRAINER.md#sigmoid-methods):
# "softmax": channel c is class c, the prediction the argmax; the sigmoid heads score each channel on
# its own and have a one-channel first head, "sigmoid_unknown" SSUL's (channels: unknown, background,
# the classes; the unknown's probability is added to the background's, then the argmax) and
# "sigmoid_auxiliary" DKD's (channel 0 the auxiliary classifier, channel c >= 1 class c; the argmax of
# the classes, background where no class has probability > 0.5).
OUTPUTS = ("softmax", "sigmoid_unknown", "sigmoid_auxiliary")
DKD_BACKGROUND_PROBABILITY = 0.5


class IncrementalSegmenter(nn.Module):
    def __init__(
        self,
        backbone: str,
        classes_per_step,
        *,
        output_stride=16,
        head_channels=None,
        aspp_rates=None,
        caf=False,
        se_blocks=None,
        output="softmax",
        loss_backend="auto",
    ):
        """``caf``: with the fusion module; ``se_blocks``: with the attentive distillation's channel
        attentions (None: the same as ``caf``, as in checkpoints that predate the switch);
        ``output``: one of OUTPUTS (``classes_per_step`` then counts the channels of each head)."""
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if output != "softmax" and list(classes_per_step)[:1] != [1]:
            raise ValueError(f"output {output!r} needs a one-channel first head, got heads {list(classes_per_step)}")
        self.output = output
        self.backbone_name = backbone
        self.encoder = build_backbone(backbone, output_stride)
        small = backbone in ("tiny", "small")
        if head_channels is None:
            head_channels = 64 if small else 256
        if aspp_rates is None:
            scale = 16 // self.encoder.output_stride
            aspp_rates = (2, 4, 6) if small else tuple(r * scale for r in (6, 12, 18))
        cin = self.encoder.out_channels
        se_blocks = caf if se_blocks is None else se_blocks
        self.caf = ContinualAttentiveFusion(cin) if caf else None
        self.se_encoder = SqueezeExcitation(cin) if se_blocks else None
        self.se_features = SqueezeExcitation(head_channels) if se_blocks else None
        self.head = DeepLabV3Head(cin, head_channels, aspp_rates)
        self.classifier = IncrementalClassifier(
            head_channels, classes_per_step, detach_first_head=output == "sigmoid_auxiliary"
        )
        # backend of the fused structured-attention op in the CAF module (not part of config():
        # the trainer passes its --loss-backend to the new and the old model alike)
        self.loss_backend = loss_backend

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def config(self) -> dict:
        """What is needed to rebuild this model (stored in checkpoints)."""
        return {
            "backbone": self.backbone_name,
            "classes_per_step": self.classifier.classes_per_step,
            "output_stride": self.encoder.output_stride,
            "head_channels": self.classifier.in_channels,
            "aspp_rates": [b[0].dilation[0] for b in self.head.aspp.branches[1:]],
            "caf": self.caf is not None,
            "se_blocks": self.se_encoder is not None,
            "output": self.output,
        }

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The class of each pixel (B, H, W) from this model's ``logits`` (the rule of ``output``)."""
        if self.output == "softmax":
            return logits.argmax(1)
        probabilities = torch.sigmoid(logits.float())
        if self.output == "sigmoid_unknown":
            background = probabilities[:, 1:2] + probabilities[:, 0:1]
            return torch.cat([background, probabilities[:, 2:]], 1).argmax(1)
        best, classes = probabilities[:, 1:].max(1)
        return torch.where(best > DKD_BACKGROUND_PROBABILITY, classes + 1, 0)

    def add_fusion(self) -> None:
        """Add CAF's fusion module to a model trained without it; it starts as the identity (the
        projection, the fusion and the structured attention all do), so the model computes what it did."""
        device = self.classifier.heads[0].weight.device
        self.caf = ContinualAttentiveFusion(self.encoder.out_channels).to(device)

    def add_squeeze_excitation(self) -> None:
        """Add the attentive distillation's channel attentions (CAF eq. 5) to a model trained without them."""
        device = self.classifier.heads[0].weight.device
        self.se_encoder = SqueezeExcitation(self.encoder.out_channels).to(device)
        self.se_features = SqueezeExcitation(self.classifier.in_channels).to(device)

    def forward(self, images, old_projected=None, *, upsample=True, stages=False):
        """``old_projected``: the old model's ``projected`` output (CAF's fusion, training only);
        ``upsample=False``: the logits at the network's resolution (MATH.md#upsampling);
        ``stages=True``: the backbone stages' outputs too."""
        z, stage_outputs = self.encoder(images, stages=True)
        # without the fusion module the projection is the identity (the module's initial state)
        out = {"projected": z}
        if stages:
            out["stages"] = stage_outputs
        if self.caf is not None:
            z, out["projected"] = self.caf(z, old_projected, backend=self.loss_backend)
        h = self.head(z)
        logits = self.classifier(h)
        if upsample:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        out["logits"] = logits
        out["encoder"], out["features"] = z, h
        return out
