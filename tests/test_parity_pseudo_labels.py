"""Parity of every non-reference backend with incseg_fast.reference for the entropy pseudo-labels
(MATH.md#pseudo-labels): new labels (and the in-place form's, written into int64 labels), adaptive
factor and entropy histogram.

Each backend runs through the public API on fresh random inputs in each float dtype; the reference
runs on float64 copies of the same values. The outputs are decisions (a class, a threshold test, a
bin), so rounding can flip a pixel whose top two logits, or whose u and its threshold or bin edge,
are within rounding of each other: those pixels are counted from the float64 reference and
excused (float64 has none at these scales, so its histograms must be exactly equal); everything
else must match exactly.
"""

import pytest
import torch
from parity_support import device_for

import incseg_fast as isf
from incseg_fast import reference
from incseg_fast.vocabulary import FLOAT_DTYPES

# How close (in logits, and in u) a float64 decision may be to its boundary and still flip in a dtype.
MARGIN = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _case(generator, B, Co, yshape, size, dtype, device, label_dtype=torch.int64, ignore_index=255, classes=None):
    """(y in dtype, labels, thresholds): labels of the step's space (background 0, new classes >= Co, ignored)."""
    y = (torch.randn(B, Co, *yshape, generator=generator, dtype=torch.float64) * 2.5).to(dtype)
    H, W = size or yshape
    t = torch.randint(0, classes or Co + 3, (B, H, W), generator=generator)
    t[t < Co] = 0
    t[torch.rand(B, H, W, generator=generator) < 0.1] = ignore_index
    thresholds = 0.2 + 0.6 * torch.rand(Co, generator=generator)
    return y.to(device), t.to(device=device, dtype=label_dtype), thresholds.to(device)


def _close_calls(y, t, thresholds, size, dtype, ignore_index, bins=None):
    """Background pixels whose float64 decision is within MARGIN of flipping (B, H, W) bool."""
    logits = reference.upsample(y.double().cpu(), size)
    top2 = logits.topk(min(2, logits.shape[1]), dim=1).values
    near_tie = (top2[:, 0] - top2[:, -1] < MARGIN[dtype]) & (top2.shape[1] > 1)
    predicted, u = reference.predicted_class_and_entropy(y.double().cpu(), size)
    near = near_tie | ((u - thresholds.double().cpu()[predicted]).abs() < MARGIN[dtype])
    if bins is not None:
        # Inner bin edges only: u a hair below 0 or above 1 is clamped into the first or last bin anyway.
        scaled = u * bins
        edge = scaled.round()
        near |= ((scaled - edge).abs() < MARGIN[dtype] * bins) & (edge > 0) & (edge < bins)
    return near & reference.pseudo_background(t.cpu(), y.shape[1], ignore_index)


def _check_labels(backend, y, t, thresholds, size, dtype, ignore_index=255):
    labels, factor = isf.entropy_pseudo_labels(y, t, thresholds, ignore_index=ignore_index, size=size, backend=backend)
    expected, expected_factor = reference.entropy_pseudo_labels(
        y.double().cpu(), t.cpu(), thresholds.cpu(), ignore_index=ignore_index, size=size
    )
    assert labels.dtype == torch.int64 and factor.dtype == torch.float32
    assert labels.device == y.device and factor.device == y.device
    close = _close_calls(y, t, thresholds, size, dtype, ignore_index)
    background = reference.pseudo_background(t.cpu(), y.shape[1], ignore_index)
    assert close.sum() <= 0.05 * max(background.sum().item(), 1), "too many pixels at their boundary to test"
    assert torch.equal(labels.cpu()[~close], expected[~close])
    slack = close.sum(dim=(1, 2)).double() / (background.sum(dim=(1, 2)).double() + 1e-6)
    assert ((factor.cpu().double() - expected_factor.double()).abs() <= slack + 1e-7).all()
    if dtype == torch.float64:
        assert torch.equal(factor.cpu(), expected_factor)
    if t.dtype == torch.int64:  # the in-place form: the same labels and factor, written into t's copy
        written = t.clone()
        same, same_factor = isf.entropy_pseudo_labels_(
            y, written, thresholds, ignore_index=ignore_index, size=size, backend=backend
        )
        assert same is written and torch.equal(written, labels) and torch.equal(same_factor, factor)
    return labels


def _check_histogram(backend, y, t, size, dtype, bins, ignore_index=255):
    hist = isf.entropy_histogram(y, t, bins=bins, ignore_index=ignore_index, size=size, backend=backend)
    expected = reference.entropy_histogram(y.double().cpu(), t.cpu(), bins=bins, ignore_index=ignore_index, size=size)
    assert hist.dtype == torch.int64 and hist.shape == expected.shape
    no_thresholds = torch.full((y.shape[1],), -1.0)  # u < -1 never: only ties and bin edges count
    close = _close_calls(y, t, no_thresholds, size, dtype, ignore_index, bins=bins).sum().item()
    if dtype == torch.float64:
        assert close == 0
    assert (hist.cpu() - expected).abs().sum().item() <= 2 * close
    assert hist.sum().item() == expected.sum().item()


SHAPES = [
    # (B, Co, y's (h, w), size)
    (2, 5, (13, 17), None),
    (3, 21, (9, 11), None),  # VOC's 21 classes
    (2, 4, (5, 7), (13, 19)),  # size= with non-integer scales
    (2, 1, (7, 9), None),  # one old class: u = 0
    (2, 2, (4, 6), (11, 13)),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("B, Co, yshape, size", SHAPES)
def test_pseudo_labels_match_reference(backend, generator, dtype, B, Co, yshape, size):
    y, t, thresholds = _case(generator, B, Co, yshape, size, dtype, device_for(backend))
    _check_labels(backend, y, t, thresholds, size, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("B, Co, yshape, size", SHAPES)
def test_entropy_histogram_matches_reference(backend, generator, dtype, B, Co, yshape, size):
    y, t, _ = _case(generator, B, Co, yshape, size, dtype, device_for(backend))
    _check_histogram(backend, y, t, size, dtype, bins=37)


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
def test_label_dtypes(backend, generator, label_dtype):
    y, t, thresholds = _case(generator, 2, 6, (9, 10), None, torch.float32, device_for(backend), label_dtype)
    labels = _check_labels(backend, y, t, thresholds, None, torch.float32)
    new_class = t.long() >= 6
    assert torch.equal(labels[new_class], t.long()[new_class])  # new classes and ignored pixels keep their label
    _check_histogram(backend, y, t, None, torch.float32, bins=100)


def test_ignore_index_below_old_classes_is_not_background(backend, generator):
    y, t, thresholds = _case(generator, 2, 5, (8, 9), None, torch.float64, device_for(backend), ignore_index=3)
    t[:, :2] = 4  # an old-class id < Co that is not the ignore label: background too
    labels = _check_labels(backend, y, t, thresholds, None, torch.float64, ignore_index=3)
    assert (labels[t == 3] == 3).all()
    _check_histogram(backend, y, t, None, torch.float64, bins=10, ignore_index=3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ties_take_the_lowest_class(backend, generator, dtype):
    # Integer logits in {0, 1, 2}: exact in every dtype, with many exact ties; θ = 2 > u makes every
    # background pixel confident, so the labels are k̂ itself.
    device = device_for(backend)
    y = torch.randint(0, 3, (2, 5, 6, 7), generator=generator).to(device=device, dtype=dtype)
    t = torch.zeros(2, 6, 7, dtype=torch.int64, device=device)
    thresholds = torch.full((5,), 2.0, device=device)
    labels, factor = isf.entropy_pseudo_labels(y, t, thresholds, backend=backend)
    assert torch.equal(labels.cpu(), y.double().cpu().argmax(dim=1))
    torch.testing.assert_close(factor.cpu(), torch.full((2,), 42 / (42 + 1e-6), dtype=torch.float32))


def test_minus_infinity_logits(backend, generator):
    device = device_for(backend)
    y, t, thresholds = _case(generator, 2, 5, (7, 8), None, torch.float32, device)
    y[:, 3] = -torch.inf  # a class the old model excludes: probability 0
    y[0, 0, 0, 0] = -torch.inf  # the first channel of a pixel too
    _check_labels(backend, y, t, thresholds, None, torch.float32)
    _check_histogram(backend, y, t, None, torch.float32, bins=20)


def test_histograms_of_batches_add_up(backend, generator):
    y, t, _ = _case(generator, 4, 5, (6, 7), None, torch.float64, device_for(backend))
    whole = isf.entropy_histogram(y, t, bins=16, backend=backend)
    parts = isf.entropy_histogram(y[:2], t[:2], bins=16, backend=backend) + isf.entropy_histogram(
        y[2:], t[2:], bins=16, backend=backend
    )
    assert torch.equal(whole, parts)


def test_empty_batch(backend):
    device = device_for(backend)
    y = torch.zeros(0, 3, 4, 5, device=device)
    t = torch.zeros(0, 4, 5, dtype=torch.int64, device=device)
    labels, factor = isf.entropy_pseudo_labels(y, t, torch.ones(3, device=device), backend=backend)
    assert labels.shape == (0, 4, 5) and factor.shape == (0,)
    assert isf.entropy_pseudo_labels_(y, t, torch.ones(3, device=device), backend=backend)[1].shape == (0,)
    assert torch.equal(isf.entropy_histogram(y, t, bins=4, backend=backend).cpu(), torch.zeros(3, 4, dtype=torch.int64))
