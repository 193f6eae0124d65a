"""Shared reader for datasets stored as image files plus palette/greyscale label PNGs."""
import hashlib
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import Normalize


def _pil_image():
    try:
        from PIL import Image
    except ImportError as error:  # Pillow is only needed for the real datasets
        raise ImportError("reading VOC/ADE20K images needs Pillow: pip install Pillow") from error
    return Image


def require_path(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_image(path):
    """float32 (3, H, W) in [0, 1]."""
    with _pil_image().open(path) as img:
        array = np.array(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


def load_label(path):
    """int64 (H, W) class ids, read from a palette ("P") or greyscale ("L") PNG."""
    with _pil_image().open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"label {path} must be a palette or greyscale PNG of class ids, got mode {img.mode}")
        array = np.array(img, dtype=np.uint8)
    return torch.from_numpy(array).long()


class FileSegmentation(Dataset):
    """(image path, label path) pairs; subclasses fill `self.pairs` and may set `label_lut`
    (a LongTensor applied to every raw label, e.g. ADE's void -> ignore in evaluation)."""

    label_lut = None
    ignore_index = 255

    def __init__(self, pairs, name, transform=None, normalize=True):
        self.pairs = pairs
        self.transform = transform
        self.normalize = Normalize() if normalize else None
        digest = hashlib.sha1("\n".join(p for pair in pairs for p in pair).encode()).hexdigest()[:12]
        self.cache_key = f"{name}-n{len(pairs)}-{digest}"
        self._classes = {}

    def __len__(self):
        return len(self.pairs)

    def _label(self, i):
        label = load_label(self.pairs[i][1])
        return label if self.label_lut is None else self.label_lut[label]

    def classes_in(self, i):
        """Class ids present in label i (ignore excluded), read from the label file once."""
        if i not in self._classes:
            self._classes[i] = frozenset(self._label(i).unique().tolist()) - {self.ignore_index}
        return self._classes[i]

    def __getitem__(self, i):
        image, label = load_image(self.pairs[i][0]), self._label(i)
        if image.shape[1:] != label.shape:
            raise ValueError(f"image {self.pairs[i][0]} is {tuple(image.shape[1:])} "
                             f"but its label is {tuple(label.shape)}")
        if self.transform is not None:
            image, label = self.transform(image, label)
        if self.normalize is not None:
            image, label = self.normalize(image, label)
        return image, label
