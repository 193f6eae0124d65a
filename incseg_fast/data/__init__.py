"""Datasets, transforms and the class-incremental protocol of the trainer (docs/DATA.md#protocol)."""

from . import transforms as T
from ._files import DataFileError
from .ade import ADE20KSegmentation
from .synthetic import SyntheticSegmentation
from .tasks import (
    IncrementalSubset,
    classes_seen,
    eval_label_lut,
    get_task,
    old_classes,
    select_indices,
    train_label_lut,
)
from .voc import VOCSegmentation

__all__ = [
    "ADE20KSegmentation",
    "DataFileError",
    "SyntheticSegmentation",
    "VOCSegmentation",
    "IncrementalSubset",
    "build_dataset",
    "default_transform",
    "classes_seen",
    "eval_label_lut",
    "get_task",
    "old_classes",
    "select_indices",
    "train_label_lut",
]

DATASETS = ("synthetic", "voc", "ade")


def default_transform(name, split, image_size):
    """The augmentation used when `build_dataset` gets no transform (normalisation is applied
    by the dataset afterwards). Real images: random scale 0.5-2, crop, flip for training; shorter
    side resized then centre crop for validation, so batches stack. Synthetic images are already
    rendered at `image_size` with varied object sizes: a flip for training, nothing for val."""
    if name == "synthetic":
        return T.RandomHorizontalFlip() if split == "train" else None
    if split == "train":
        return T.Compose([T.RandomScale(0.5, 2.0), T.RandomCrop(image_size), T.RandomHorizontalFlip()])
    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size)])


def build_dataset(name, split, root=None, image_size=64, transform=None, augment=True, **kw):
    """A dataset by name ("synthetic", "voc", "ade") and split ("train", "val").

    Without `transform`, `default_transform` is used (`augment=False`: no transform at all).
    Extra keywords go to the dataset class (synthetic: num_images, seed, cache; voc: augmented).
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if transform is None and augment:
        transform = default_transform(name, split, image_size)
    if name == "synthetic":
        return SyntheticSegmentation(split=split, image_size=image_size, transform=transform, **kw)
    if root is None:
        raise ValueError(f"root must name the directory that holds the {name!r} dataset")
    cls = VOCSegmentation if name == "voc" else ADE20KSegmentation
    return cls(root, split=split, transform=transform, **kw)
