"""The class-incremental protocol (docs/DATA.md#protocol): task tables, image selection, label remapping.

A task is a list of steps; each step is the list of class ids it adds (step 0 includes the
background 0). Class ids are the dataset's own ids: every table here adds classes in dataset
order, so a class keeps its id through all steps and "remapping" only hides classes.
"""

import hashlib
import json
import os

import torch
from torch.utils.data import Dataset

from .._atomic import write_atomic

__all__ = [
    "TASKS",
    "get_task",
    "classes_seen",
    "old_classes",
    "image_class_table",
    "select_indices",
    "train_label_lut",
    "eval_label_lut",
    "IncrementalSubset",
]


def _split(first_last, step_size, num_classes):
    """Classes 0..first_last in step 0, then the rest in steps of `step_size`."""
    steps = [list(range(first_last + 1))]
    for start in range(first_last + 1, num_classes, step_size):
        steps.append(list(range(start, min(start + step_size, num_classes))))
    return steps


VOC_CLASSES = 21  # background + 20 objects
ADE_CLASSES = 151  # 0 ("void", trained as background) + 150 objects

TASKS = {
    "voc": {
        "offline": [list(range(VOC_CLASSES))],
        "19-1": _split(19, 1, VOC_CLASSES),
        "15-5": _split(15, 5, VOC_CLASSES),
        "15-1": _split(15, 1, VOC_CLASSES),
        "10-1": _split(10, 1, VOC_CLASSES),
    },
    "ade": {
        "offline": [list(range(ADE_CLASSES))],
        "100-50": _split(100, 50, ADE_CLASSES),
        "100-10": _split(100, 10, ADE_CLASSES),
        "50-50": _split(50, 50, ADE_CLASSES),
        "100-5": _split(100, 5, ADE_CLASSES),
    },
}
# MiB calls the one-class-per-step 15-5 protocol "15-5s".
_TASK_ALIASES = {"15-5s": "15-1"}
# The synthetic dataset has VOC's 21 classes and uses VOC's tables.
_DATASET_TABLES = {"voc": "voc", "synthetic": "voc", "ade": "ade"}


def get_task(dataset, task):
    """Class ids per step for `task` of `dataset` ("voc", "synthetic" or "ade"), as fresh lists."""
    if dataset not in _DATASET_TABLES:
        raise ValueError(f"dataset must be one of {sorted(_DATASET_TABLES)}, got {dataset!r}")
    table = TASKS[_DATASET_TABLES[dataset]]
    name = _TASK_ALIASES.get(task, task)
    if name not in table:
        raise ValueError(f"task {task!r} is not defined for {dataset!r}; choose one of {sorted(table)}")
    return [list(classes) for classes in table[name]]


def _check_step(steps, step):
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if not 0 <= step < len(steps):
        raise ValueError(f"step must be in [0, {len(steps)}) for this task, got {step}")


def classes_seen(steps, step):
    """Sorted class ids learned at steps 0..`step`."""
    _check_step(steps, step)
    return sorted(c for classes in steps[: step + 1] for c in classes)


def old_classes(steps, step):
    """Number of classes seen before `step` (Co of the losses; 0 at step 0)."""
    _check_step(steps, step)
    return sum(len(classes) for classes in steps[:step])


def _num_classes(steps):
    return sum(len(classes) for classes in steps)


def _lut_size(steps, ignore_index):
    return max(_num_classes(steps), ignore_index + 1)


def train_label_lut(steps, step, ignore_index=255):
    """lut[raw label] for training at `step`: current classes keep their id, old and future
    classes become background 0, ignore stays ignore, ids outside the task become ignore."""
    _check_step(steps, step)
    lut = torch.full((_lut_size(steps, ignore_index),), ignore_index, dtype=torch.long)
    lut[: _num_classes(steps)] = 0
    current = torch.tensor(steps[step], dtype=torch.long)
    lut[current] = current
    return lut


def eval_label_lut(steps, step, protocol="mib", ignore_index=255):
    """lut[raw label] for evaluation after `step`: seen classes keep their id; not-yet-seen
    classes are ignored ("mib") or count as background ("plop"); other ids become ignore."""
    _check_step(steps, step)
    if protocol not in ("mib", "plop"):
        raise ValueError(f"protocol must be 'mib' or 'plop', got {protocol!r}")
    unseen_value = ignore_index if protocol == "mib" else 0
    lut = torch.full((_lut_size(steps, ignore_index),), ignore_index, dtype=torch.long)
    lut[: _num_classes(steps)] = unseen_value
    seen = torch.tensor(classes_seen(steps, step), dtype=torch.long)
    lut[seen] = seen
    return lut


def _dataset_key(dataset):
    key = getattr(dataset, "cache_key", None)
    if key is None:
        raise ValueError("cache_dir needs a dataset with a `cache_key` attribute (a string naming its contents)")
    return key


def _steps_digest(steps):
    return hashlib.sha1(json.dumps(steps).encode()).hexdigest()[:12]


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, value):
    write_atomic(path, json.dumps(value))  # a reader never sees a half-written cache file


def image_class_table(dataset, cache_dir=None):
    """[sorted class ids of image i] for every image, from `dataset.classes_in` (cached on disk
    when `cache_dir` is given, since real datasets read every label file to build it)."""
    path = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"{_dataset_key(dataset)}__classes.json")
        if os.path.exists(path):
            return _read_json(path)
    table = [sorted(dataset.classes_in(i)) for i in range(len(dataset))]
    if path is not None:
        _write_json(path, table)
    return table


def select_indices(dataset, steps, step, mode="overlapped", cache_dir=None, ignore_index=255):
    """Indices of the training images for `step` (MiB's filtering).

    overlapped: images with at least one current non-background class (old and future classes
    may appear, labelled as background). disjoint: additionally every class in the image is
    background, old or current (images showing a future class are dropped).
    """
    _check_step(steps, step)
    if mode not in ("overlapped", "disjoint"):
        raise ValueError(f"mode must be 'overlapped' or 'disjoint', got {mode!r}")
    path = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        name = f"{_dataset_key(dataset)}__task-{_steps_digest(steps)}__step{step}__{mode}.json"
        path = os.path.join(cache_dir, name)
        if os.path.exists(path):
            return _read_json(path)
    current = set(steps[step]) - {0}
    allowed = set(classes_seen(steps, step)) | {0, ignore_index}
    indices = []
    for i, classes in enumerate(image_class_table(dataset, cache_dir)):
        classes = set(classes)
        if not classes & current:
            continue
        if mode == "disjoint" and not classes <= allowed:
            continue
        indices.append(i)
    if path is not None:
        _write_json(path, indices)
    return indices


class IncrementalSubset(Dataset):
    """The images `indices` of `dataset`, with labels remapped through `lut` (one gather on the
    whole label tensor)."""

    def __init__(self, dataset, indices, lut, ignore_index=255):
        if not isinstance(lut, torch.Tensor) or lut.dtype != torch.long or lut.dim() != 1:
            raise TypeError("lut must be a 1-D int64 tensor (from train_label_lut or eval_label_lut)")
        self.dataset = dataset
        self.indices = list(indices)
        self.lut = lut
        self.ignore_index = ignore_index

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label, *saliency = self.dataset[self.indices[i]]  # a saliency map, when the dataset has one
        return (image, self.lut[label], *saliency)

    def classes_in(self, i):
        """Classes of image i after remapping (ignore excluded)."""
        mapped = {int(self.lut[c]) for c in self.dataset.classes_in(self.indices[i])}
        return frozenset(mapped - {self.ignore_index})
