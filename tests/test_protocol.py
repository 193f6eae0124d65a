"""The class-incremental protocol: task tables, image selection, label lookup tables."""

import json
import os

import pytest
import torch
from torch.utils.data import Dataset

from incseg_fast.data import (
    IncrementalSubset,
    SyntheticSegmentation,
    classes_seen,
    eval_label_lut,
    get_task,
    old_classes,
    select_indices,
    train_label_lut,
)

# class counts per step, written out from docs/DATA.md#protocol (and MiB's / PLOP's tables)
EXPECTED_STEP_SIZES = {
    ("voc", "offline"): [21],
    ("voc", "19-1"): [20, 1],
    ("voc", "15-5"): [16, 5],
    ("voc", "15-1"): [16, 1, 1, 1, 1, 1],
    ("voc", "10-1"): [11] + [1] * 10,
    ("ade", "offline"): [151],
    ("ade", "100-50"): [101, 50],
    ("ade", "100-10"): [101, 10, 10, 10, 10, 10],
    ("ade", "50-50"): [51, 50, 50],
    ("ade", "100-5"): [101] + [5] * 10,
}


@pytest.mark.parametrize("dataset,task", sorted(EXPECTED_STEP_SIZES))
def test_task_tables_step_structure(dataset, task):
    steps = get_task(dataset, task)
    assert [len(s) for s in steps] == EXPECTED_STEP_SIZES[dataset, task]
    num_classes = 21 if dataset == "voc" else 151
    flat = [c for s in steps for c in s]
    assert len(flat) == len(set(flat))  # no class in two steps
    assert sorted(flat) == list(range(num_classes))  # union = every class
    assert 0 in steps[0]
    # classes come in dataset order, so ids stay contiguous step after step
    assert flat == list(range(num_classes))


def test_named_steps_by_hand():
    assert get_task("voc", "15-1")[1:] == [[16], [17], [18], [19], [20]]
    assert get_task("voc", "19-1")[1] == [20]
    assert get_task("ade", "100-10")[2] == list(range(111, 121))
    assert get_task("ade", "50-50")[1] == list(range(51, 101))


def test_synthetic_uses_voc_tables_and_aliases():
    assert get_task("synthetic", "15-5") == get_task("voc", "15-5")
    assert get_task("voc", "15-5s") == get_task("voc", "15-1")


def test_get_task_returns_fresh_lists():
    steps = get_task("voc", "15-5")
    steps[0].append(99)
    assert 99 not in get_task("voc", "15-5")[0]


def test_unknown_task_or_dataset():
    with pytest.raises(ValueError, match="task"):
        get_task("voc", "100-50")
    with pytest.raises(ValueError, match="dataset"):
        get_task("cityscapes", "15-5")


def test_classes_seen_and_old_classes():
    steps = get_task("voc", "15-1")
    assert classes_seen(steps, 0) == list(range(16))
    assert classes_seen(steps, 2) == list(range(18))
    assert old_classes(steps, 0) == 0
    assert old_classes(steps, 1) == 16
    assert old_classes(steps, 3) == 18
    with pytest.raises(ValueError, match="step"):
        old_classes(steps, 6)
    with pytest.raises(TypeError, match="step"):
        classes_seen(steps, 1.0)


def test_train_label_lut_15_5():
    steps = get_task("voc", "15-5")
    lut = train_label_lut(steps, 1)
    assert lut.dtype == torch.long and lut.shape == (256,)
    assert lut[0] == 0 and lut[5] == 0 and lut[15] == 0  # background and old classes
    assert [int(lut[c]) for c in range(16, 21)] == [16, 17, 18, 19, 20]
    assert lut[255] == 255
    assert lut[21] == 255 and lut[200] == 255  # ids outside the task are not trusted
    step0 = train_label_lut(steps, 0)
    assert [int(step0[c]) for c in (0, 3, 15, 16, 20, 255)] == [0, 3, 15, 0, 0, 255]


def test_train_label_lut_middle_step_hides_past_and_future():
    steps = get_task("voc", "15-1")
    lut = train_label_lut(steps, 2)  # learns class 17 only
    assert [int(lut[c]) for c in (0, 1, 16, 17, 18, 20, 255)] == [0, 0, 0, 17, 0, 0, 255]


def test_lut_with_other_ignore_index():
    steps = get_task("voc", "19-1")
    lut = train_label_lut(steps, 1, ignore_index=300)
    assert lut.shape == (301,) and lut[300] == 300 and lut[255] == 300 and lut[20] == 20


def test_eval_label_lut_both_protocols():
    steps = get_task("voc", "15-1")
    mib = eval_label_lut(steps, 1, protocol="mib")
    plop = eval_label_lut(steps, 1, protocol="plop")
    # seen: 0..16 keep their id; unseen 17..20: ignored (MiB) or background (PLOP)
    assert [int(mib[c]) for c in (0, 7, 16, 17, 20, 255, 21)] == [0, 7, 16, 255, 255, 255, 255]
    assert [int(plop[c]) for c in (0, 7, 16, 17, 20, 255, 21)] == [0, 7, 16, 0, 0, 255, 255]
    last = eval_label_lut(steps, 5, protocol="mib")
    assert torch.equal(last[:21], torch.arange(21))
    with pytest.raises(ValueError, match="protocol"):
        eval_label_lut(steps, 1, protocol="ilt")


class FakeDataset(Dataset):
    """Images with known classes; each label is a 2x4 map holding exactly those ids (+ ignore)."""

    cache_key = "fake-v1"
    CLASSES = [{0, 1}, {0, 16}, {0, 3, 17}, {0, 18, 20}, {0, 5}, {0, 16}, {0}, {0, 2, 16, 19}]

    def __init__(self):
        self.calls = 0

    def __len__(self):
        return len(self.CLASSES)

    def classes_in(self, i):
        self.calls += 1
        return frozenset(self.CLASSES[i])

    def __getitem__(self, i):
        ids = sorted(self.CLASSES[i]) + [255]
        label = torch.tensor((ids * 8)[:8]).reshape(2, 4)
        return torch.full((3, 2, 4), float(i)), label


@pytest.mark.parametrize(
    "task,step,mode,expected",
    [
        ("15-5", 0, "overlapped", [0, 2, 4, 7]),
        ("15-5", 0, "disjoint", [0, 4]),  # 2 shows 17 and 7 shows 16, 19: future classes
        ("15-5", 1, "overlapped", [1, 2, 3, 5, 7]),
        ("15-5", 1, "disjoint", [1, 2, 3, 5, 7]),
        ("15-1", 1, "overlapped", [1, 5, 7]),
        ("15-1", 1, "disjoint", [1, 5]),  # 7 also shows 19
        ("15-1", 3, "overlapped", [3]),
        ("15-1", 3, "disjoint", []),  # image 3 (18) also shows the future 20
        ("15-1", 5, "disjoint", [3]),
        ("offline", 0, "disjoint", [0, 1, 2, 3, 4, 5, 7]),  # only the background-only image goes
    ],
)
def test_select_indices_hand_built(task, step, mode, expected):
    assert select_indices(FakeDataset(), get_task("voc", task), step, mode) == expected


def test_select_indices_cache(tmp_path):
    steps = get_task("voc", "15-1")
    data = FakeDataset()
    first = select_indices(data, steps, 1, "disjoint", cache_dir=str(tmp_path))
    calls = data.calls
    assert first == [1, 5] and calls == len(data)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2  # the per-image class table and this step's selection
    again = select_indices(data, steps, 1, "disjoint", cache_dir=str(tmp_path))
    assert again == first and data.calls == calls  # read back, not recomputed
    other = select_indices(data, steps, 1, "overlapped", cache_dir=str(tmp_path))
    assert other == [1, 5, 7] and data.calls == calls  # class table reused
    assert len(os.listdir(tmp_path)) == 3
    other_task = select_indices(data, get_task("voc", "15-5"), 1, "disjoint", cache_dir=str(tmp_path))
    assert other_task == [1, 2, 3, 5, 7]
    selection = [f for f in os.listdir(tmp_path) if "step1__disjoint" in f and "fake-v1" in f]
    assert len(selection) == 2  # keyed by task too
    with open(tmp_path / "fake-v1__classes.json") as f:
        assert json.load(f) == [sorted(c) for c in FakeDataset.CLASSES]


def test_select_indices_cache_needs_a_key(tmp_path):
    class NoKey(FakeDataset):
        cache_key = None

    with pytest.raises(ValueError, match="cache_key"):
        select_indices(NoKey(), get_task("voc", "15-5"), 1, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="mode"):
        select_indices(FakeDataset(), get_task("voc", "15-5"), 1, mode="overlap")


def test_incremental_subset_remaps_whole_label():
    data = FakeDataset()
    steps = get_task("voc", "15-5")
    subset = IncrementalSubset(data, [2, 3], train_label_lut(steps, 1))
    assert len(subset) == 2
    image, label = subset[0]  # raw ids 0, 3, 17, 255
    assert torch.equal(image, data[2][0])
    assert torch.equal(label, torch.tensor([[0, 0, 17, 255], [0, 0, 17, 255]]))
    _, label = subset[1]  # raw 0, 18, 20, 255
    assert torch.equal(label, torch.tensor([[0, 18, 20, 255], [0, 18, 20, 255]]))
    assert subset.classes_in(0) == {0, 17}

    evaluation = IncrementalSubset(data, [7], eval_label_lut(steps, 0, protocol="mib"))
    _, label = evaluation[0]  # raw 0, 2, 16, 19, 255 at step 0: 16 and 19 unseen
    assert torch.equal(label, torch.tensor([[0, 2, 255, 255], [255, 0, 2, 255]]))
    assert evaluation.classes_in(0) == {0, 2}
    with pytest.raises(TypeError, match="lut"):
        IncrementalSubset(data, [0], [0, 1, 2])


def test_synthetic_selection_against_rendered_labels():
    data = SyntheticSegmentation("train", num_images=120, image_size=32, seed=5)
    steps = get_task("synthetic", "15-5")
    overlapped = select_indices(data, steps, 1, "overlapped")
    disjoint0 = select_indices(data, steps, 0, "disjoint")
    overlapped0 = select_indices(data, steps, 0, "overlapped")
    assert set(disjoint0) < set(overlapped0)  # scenes mix old and new classes
    assert 0 < len(overlapped) < len(data)
    for i in overlapped[:10]:
        assert (data[i][1] >= 16).any()
    for i in disjoint0[:10]:
        present = data[i][1].unique()
        assert present.max() <= 15 and present.max() >= 1
    # the point of the overlapped setting: new-step images also show old objects
    with_old = [i for i in overlapped if any(1 <= c <= 15 for c in data.classes_in(i))]
    assert len(with_old) >= len(overlapped) // 3
