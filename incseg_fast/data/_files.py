"""Shared reader for datasets stored as image files plus palette/greyscale label PNGs."""

import hashlib
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .._errors import first_line
from .transforms import Normalize, with_saliency


def _pil_image():
    try:
        from PIL import Image
    except ImportError as error:  # Pillow is only needed for the real datasets
        raise ImportError("reading VOC/ADE20K images needs Pillow: pip install Pillow") from error
    return Image


# the last bytes of a complete file; a file without them is decoded in full before it is reported
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


class DataFileError(ValueError):
    """A dataset file that cannot be read or does not match its pair; the message names the file."""


def require_path(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _decode(path, what, read):
    """``read(the opened PIL image)``; any failure becomes a DataFileError naming ``path``."""
    image_module = _pil_image()
    try:
        with image_module.open(path) as img:
            return read(img)
    except FileNotFoundError:
        raise DataFileError(f"{what} {path} does not exist") from None
    except image_module.UnidentifiedImageError:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise DataFileError(f"{what} {path} is {'empty (0 bytes)' if empty else 'not an image file'}") from None
    except Exception as error:  # whatever a decoder raises (OSError, SyntaxError, ...): name the file
        raise DataFileError(f"{what} {path} cannot be read: {first_line(error)}") from error


def _check_label_mode(path, mode):
    if mode not in ("P", "L"):
        raise DataFileError(f"label {path} must be a palette or greyscale PNG of class ids, got mode {mode}")


def load_image(path):
    """float32 (3, H, W) in [0, 1]."""
    array = _decode(path, "image", lambda img: np.array(img.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


def load_label(path):
    """int64 (H, W) class ids, read from a palette ("P") or greyscale ("L") PNG."""
    mode, array = _decode(path, "label", lambda img: (img.mode, np.array(img, dtype=np.uint8)))
    _check_label_mode(path, mode)
    return torch.from_numpy(array).long()


def _check_saliency_mode(path, mode):
    if mode not in ("L", "1"):
        raise DataFileError(f"saliency map {path} must be a greyscale PNG (0 = not salient), got mode {mode}")


def load_saliency(path):
    """bool (H, W): the pixels a greyscale saliency map marks (any value above 0, as SSUL reads it)."""
    mode, array = _decode(path, "saliency map", lambda img: (img.mode, np.array(img, dtype=np.uint8)))
    _check_saliency_mode(path, mode)
    return torch.from_numpy(array) > 0


def _ends_with_marker(path, marker) -> bool:
    with open(path, "rb") as f:
        f.seek(max(os.path.getsize(path) - 32, 0))
        return marker in f.read()


def inspect_file(path, what):
    """(width, height) and mode of an image file, from its header: cheap, but a file that lacks
    its format's end marker is decoded in full, so that only files the reader fails on are reported."""
    size, mode, image_format = _decode(path, what, lambda img: (img.size, img.mode, img.format))
    marker = _END_MARKERS.get(image_format)
    if marker is not None and not _ends_with_marker(path, marker):
        _decode(path, what, lambda img: img.load())
    return size, mode


class FileSegmentation(Dataset):
    """(image path, label path) pairs; subclasses fill `self.pairs` and may set `label_lut`
    (a LongTensor applied to every raw label, e.g. ADE's void -> ignore in evaluation).
    With ``saliency_paths`` (one greyscale PNG per pair) each item is (image, label, saliency)."""

    label_lut = None
    ignore_index = 255

    def __init__(self, pairs, name, transform=None, normalize=True, saliency_paths=None):
        self.pairs = pairs
        self.saliency_paths = saliency_paths
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

    def check_files(self, indices):
        """Check the files of the images ``indices`` before a step reads them for minutes: each
        exists, is a complete image (``inspect_file``), the label is a palette or greyscale PNG of
        its image's size. Raises DataFileError naming the first bad file and counting the others."""
        problems = []
        for i in indices:
            try:
                image_path, label_path = self.pairs[i]
                self._check_companion(label_path, image_path, "label", _check_label_mode)
                if self.saliency_paths is not None:
                    self._check_companion(self.saliency_paths[i], image_path, "saliency map", _check_saliency_mode)
            except DataFileError as error:
                problems.append(str(error))
        if problems:
            more = f" (and {len(problems) - 1} more bad files)" if len(problems) > 1 else ""
            raise DataFileError(problems[0] + more)

    @staticmethod
    def _check_companion(path, image_path, what, check_mode):
        """A file that goes with an image (its label, its saliency map): readable, of a mode that
        check_mode accepts, and the image's size."""
        (width, height), _ = inspect_file(image_path, "image")
        size, mode = inspect_file(path, what)
        check_mode(path, mode)
        if size != (width, height):
            raise DataFileError(f"{what} {path} is {size[1]}x{size[0]} but its image {image_path} is {height}x{width}")

    def _saliency(self, i, shape):
        saliency = load_saliency(self.saliency_paths[i])
        if saliency.shape != shape:
            raise DataFileError(
                f"saliency map {self.saliency_paths[i]} is {tuple(saliency.shape)} "
                f"but its image {self.pairs[i][0]} is {tuple(shape)}"
            )
        return saliency

    def __getitem__(self, i):
        image, label = load_image(self.pairs[i][0]), self._label(i)
        if image.shape[1:] != label.shape:
            raise DataFileError(
                f"image {self.pairs[i][0]} is {tuple(image.shape[1:])} but its label is {tuple(label.shape)}"
            )
        saliency = None if self.saliency_paths is None else self._saliency(i, label.shape)
        if saliency is not None:
            image, label, saliency = with_saliency(self.transform, image, label, saliency)
        elif self.transform is not None:
            image, label = self.transform(image, label)
        if self.normalize is not None:
            image, label = self.normalize(image, label)
        return (image, label) if saliency is None else (image, label, saliency)
