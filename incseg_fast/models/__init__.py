"""Segmentation models: torchvision-named ResNets, DeepLabV3 and MiB's incremental classifier."""

from .deeplab import (
    ASPP,
    ContinualAttentiveFusion,
    DeepLabV3Head,
    IncrementalClassifier,
    IncrementalSegmenter,
    NonLocalProjection,
    SqueezeExcitation,
)
from .resnet import BACKBONES, ResNet, build_backbone, load_pretrained

__all__ = [
    "ASPP",
    "BACKBONES",
    "ContinualAttentiveFusion",
    "DeepLabV3Head",
    "IncrementalClassifier",
    "IncrementalSegmenter",
    "NonLocalProjection",
    "ResNet",
    "SqueezeExcitation",
    "build_backbone",
    "load_pretrained",
]
