"""ConfusionMatrix against confusion matrices and metrics computed by hand."""

import pytest
import torch

from incseg_fast.metrics import ConfusionMatrix


def _three_class_case():
    # pairs (target, pred): (0,0)x3 (0,1) (1,1) (1,2) (2,2)x2 (2,0), plus one ignored pixel
    target = torch.tensor([[0, 0, 0, 0, 1], [1, 2, 2, 2, 255]])
    pred = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 2, 0, 2]])
    return pred, target


def test_three_class_matrix_by_hand():
    cm = ConfusionMatrix(3)
    cm.update(*_three_class_case())
    # rows = ground truth, columns = prediction
    assert cm.matrix.tolist() == [[3, 1, 0], [0, 1, 1], [1, 0, 2]]


def test_three_class_metrics_by_hand():
    cm = ConfusionMatrix(3)
    cm.update(*_three_class_case())
    r = cm.compute(old_classes=2)
    # IoU: class 0 = 3 / (4 + 4 - 3) = 60 %, class 1 = 1 / (2 + 2 - 1) = 33.3 %, class 2 = 2 / (3 + 3 - 2) = 50 %
    assert r["iou"] == pytest.approx([60.0, 100 / 3, 50.0])
    assert r["miou_all"] == pytest.approx((60 + 100 / 3 + 50) / 3)
    assert r["miou_old"] == pytest.approx((60 + 100 / 3) / 2)
    assert r["miou_new"] == pytest.approx(50.0)
    assert r["mpa"] == pytest.approx(100 * 6 / 9)
    # per-class accuracy 3/4, 1/2, 2/3
    assert r["mca"] == pytest.approx(100 * (3 / 4 + 1 / 2 + 2 / 3) / 3)


def test_class_that_never_occurs_and_class_only_predicted():
    # class 3 never appears; class 2 is only predicted (never in the ground truth)
    target = torch.tensor([0, 0, 1, 1, 1, 0])
    pred = torch.tensor([0, 2, 1, 1, 0, 0])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    r = cm.compute(old_classes=2)
    # class 0: tp 2, gt 3, pred 3 -> 2/4; class 1: tp 2, gt 3, pred 2 -> 2/3; class 2: tp 0, union 1 -> 0
    assert r["iou"][:3] == pytest.approx([50.0, 200 / 3, 0.0])
    assert r["iou"][3] is None
    assert r["miou_all"] == pytest.approx((50 + 200 / 3 + 0) / 3)
    assert r["miou_new"] == pytest.approx(0.0)  # class 2 occurs (predicted), class 3 does not
    assert r["mca"] == pytest.approx(100 * (2 / 3 + 2 / 3) / 2)  # only classes with ground truth
    assert r["mpa"] == pytest.approx(100 * 4 / 6)


def test_empty_groups_give_none():
    cm = ConfusionMatrix(3)
    cm.update(*_three_class_case())
    r = cm.compute(old_classes=3)
    assert r["miou_new"] is None and r["miou_old"] == pytest.approx(r["miou_all"])
    empty = ConfusionMatrix(3).compute(old_classes=1)
    assert empty == {"iou": [None] * 3, "miou_all": None, "miou_old": None, "miou_new": None, "mpa": None, "mca": None}


def test_batches_accumulate_and_match_a_direct_count(generator):
    n, shape = 5, (3, 7, 9)
    target = torch.randint(0, n, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < 0.2] = 255
    pred = torch.randint(0, n, shape, generator=generator)
    expected = torch.zeros(n, n, dtype=torch.long)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist(), strict=True):
        if t != 255:
            expected[t, p] += 1
    cm = ConfusionMatrix(n)
    for b in range(shape[0]):
        cm.update(pred[b], target[b])
    assert torch.equal(cm.matrix, expected)
    whole = ConfusionMatrix(n)
    whole.update(pred.int(), target.to(torch.uint8))  # any integer dtype
    assert torch.equal(whole.matrix, expected)
    cm.reset()
    assert cm.matrix.sum() == 0


def test_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(TypeError, match="pred"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="pred"):
        cm.update(torch.tensor([0, -1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=2)
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="old_classes"):
        cm.compute(old_classes=4)
    with pytest.raises(TypeError, match="old_classes"):
        cm.compute(old_classes=1.5)
