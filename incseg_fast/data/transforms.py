"""Joint (image, label) transforms on tensors.

image: float (3, H, W) in [0, 1] (before `Normalize`); label: int64 (H, W), 255 = ignore.
Random transforms draw from torch's global generator (or the one given), so DataLoader
workers, which torch seeds differently, augment differently.
"""

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "RandomScale",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "CenterCrop",
    "Normalize",
    "with_saliency",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_pair(image, label):
    if image.dim() != 3 or label.dim() != 2 or image.shape[1:] != label.shape:
        raise ValueError(
            f"expected image (C, H, W) and label (H, W) of the same size, "
            f"got {tuple(image.shape)} and {tuple(label.shape)}"
        )


def _resize_pair(image, label, size):
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    # Labels are ids: nearest neighbour ("nearest-exact" samples pixel centres symmetrically).
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, label


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label):
        for transform in self.transforms:
            image, label = transform(image, label)
        return image, label


class RandomScale:
    """Rescales by a factor drawn uniformly from [min_scale, max_scale]."""

    def __init__(self, min_scale=0.5, max_scale=2.0, generator=None):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale, self.generator = min_scale, max_scale, generator

    def __call__(self, image, label):
        _check_pair(image, label)
        u = torch.rand((), generator=self.generator).item()
        scale = self.min_scale + (self.max_scale - self.min_scale) * u
        h, w = label.shape
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        return _resize_pair(image, label, size)


class RandomCrop:
    """Crops a random `size` window; smaller inputs are first padded on the bottom/right with
    `fill` (image; the mean colour by default, i.e. 0 after normalisation) and `label_fill`."""

    def __init__(self, size, fill=IMAGENET_MEAN, label_fill=255, generator=None):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.fill = torch.tensor(fill, dtype=torch.float32)
        self.label_fill, self.generator = label_fill, generator

    def __call__(self, image, label):
        _check_pair(image, label)
        th, tw = self.size
        h, w = label.shape
        if h < th or w < tw:
            ph, pw = max(th, h), max(tw, w)
            padded = self.fill.to(image)[:, None, None].expand(image.shape[0], ph, pw).clone()
            padded[:, :h, :w] = image
            padded_label = label.new_full((ph, pw), self.label_fill)
            padded_label[:h, :w] = label
            image, label, h, w = padded, padded_label, ph, pw
        top = int(torch.randint(h - th + 1, (), generator=self.generator))
        left = int(torch.randint(w - tw + 1, (), generator=self.generator))
        return image[:, top : top + th, left : left + tw], label[top : top + th, left : left + tw]


class RandomHorizontalFlip:
    def __init__(self, p=0.5, generator=None):
        self.p, self.generator = p, generator

    def __call__(self, image, label):
        _check_pair(image, label)
        if torch.rand((), generator=self.generator).item() < self.p:
            return image.flip(-1), label.flip(-1)
        return image, label


class Resize:
    """Resizes so that the shorter side is `size` (int), or to exactly (H, W) (tuple)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, label):
        _check_pair(image, label)
        h, w = label.shape
        if isinstance(self.size, int):
            short = min(h, w)
            size = (max(1, round(h * self.size / short)), max(1, round(w * self.size / short)))
        else:
            size = tuple(self.size)
        return _resize_pair(image, label, size)


class CenterCrop:
    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, image, label):
        _check_pair(image, label)
        th, tw = self.size
        h, w = label.shape
        if h < th or w < tw:
            raise ValueError(f"CenterCrop{self.size} needs an input at least that large, got {(h, w)}")
        top, left = (h - th) // 2, (w - tw) // 2
        return image[:, top : top + th, left : left + tw], label[top : top + th, left : left + tw]


# a salient pixel's label carries this bit through a joint transform (labels are ids below it)
SALIENT_BIT = 256


def with_saliency(transform, image, label, saliency):
    """(image, label, saliency) after ``transform`` (a joint (image, label) transform, or None) moved
    the bool saliency map (H, W) exactly as it moved the label: the map rides in the label as a high
    bit, which the transforms carry since they move label ids and never mix them (pixels a crop pads
    are ignored and not salient)."""
    if transform is None:
        return image, label, saliency
    image, coded = transform(image, label + SALIENT_BIT * saliency.long())
    return image, coded % SALIENT_BIT, coded >= SALIENT_BIT


class Normalize:
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, image, label):
        return (image - self.mean.to(image)) / self.std.to(image), label
