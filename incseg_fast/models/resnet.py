"""ResNet backbones whose parameter names match torchvision's, so that a torchvision ImageNet
state dict saved to a file loads directly (nothing is downloaded here).

The last stages trade stride for dilation to reach an output stride of 16 or 8, as in
torchvision's ``replace_stride_with_dilation`` (the layout DeepLabV3 and MiB use).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .._errors import first_line


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Feature extractor (no pooling / fc). ``out_channels`` is the width of the last stage.

    ``width`` scales every stage (64 = torchvision); ``light_stem`` replaces the 7x7/2 conv +
    max-pool stem by one 3x3/2 conv, for the small CPU variants on small images.
    """

    def __init__(self, block, layers, *, output_stride=16, width=64, light_stem=False):
        super().__init__()
        if output_stride not in (4, 8, 16, 32) or (output_stride == 4 and not light_stem):
            raise ValueError(
                f"output_stride must be 8, 16 or 32 (or 4 with the small variants' light stem), got {output_stride!r}"
            )
        self.inplanes = width
        self.dilation = 1
        if light_stem:
            self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # stages after the one that reaches the output stride keep the resolution and dilate
        stem_stride = 2 if light_stem else 4
        dilate = [stem_stride * 2 ** (i + 1) > output_stride for i in range(3)]
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2, dilate=dilate[2])
        self.out_channels = width * 8 * block.expansion
        self.output_stride = min(output_stride, stem_stride * 8)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x, *, stages: bool = False):
        """The last stage's output; with ``stages=True`` (output, [the four stages' outputs]) (PLOP's POD)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outputs.append(x)
        return (x, outputs) if stages else x


BACKBONES = {
    # name: (block, blocks per stage, width, light stem)
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64, False),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64, False),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 64, False),
    # small CPU variants for the synthetic demo and the tests
    "tiny": (BasicBlock, (1, 1, 1, 1), 16, True),
    "small": (BasicBlock, (1, 1, 1, 1), 32, True),
}


def build_backbone(name: str, output_stride: int = 16) -> ResNet:
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}")
    block, layers, width, light_stem = BACKBONES[name]
    return ResNet(block, layers, output_stride=output_stride, width=width, light_stem=light_stem)


def load_pretrained(backbone: ResNet, path: str | Path) -> None:
    """Load a torchvision ImageNet state dict (``torch.save(resnet.state_dict(), path)``).

    The classifier (``fc.*``) is dropped; every other key must match exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged, or more than tensors and plain data: name the file in one line
        raise ValueError(f"pretrained weights {path} cannot be loaded: {first_line(error)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained weights {path} hold a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    own = backbone.state_dict()
    # BatchNorm's num_batches_tracked is absent from some older torchvision files; harmless
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"pretrained state dict {path} does not match the backbone: "
            f"missing {_head(missing)}, unexpected {_head(unexpected)}, other shapes {_head(mismatched)}"
        )
    backbone.load_state_dict(state, strict=True)


def _head(keys, n=5):
    return str(keys[:n])[:-1] + (", ...]" if len(keys) > n else "]")
