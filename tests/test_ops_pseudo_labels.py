"""The entropy pseudo-label ops (torch.ops.incseg_fast*.entropy_pseudo_labels / entropy_histogram) as
torch custom ops: opcheck (schema, fake kernels, AOT dispatch), the ISA copies, the checks of a direct
call, and the public API's argument errors. Numerical parity is in test_parity_pseudo_labels.py."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.library import opcheck

import incseg_fast as isf
from incseg_fast import ops, reference

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="incseg_fast._C is not built")

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
NAMESPACES = (ops.COMPILED_NAMESPACE, ops.CUDA_EMULATOR_NAMESPACE)


def _inputs(generator, dtype=torch.float32, B=2, Co=4, hw=(5, 6), size=None, label_dtype=torch.int64):
    y = torch.randn(B, Co, *hw, generator=generator, dtype=torch.float64).mul(2).to(dtype)
    H, W = size or hw
    t = torch.randint(0, Co + 3, (B, H, W), generator=generator)
    t[t < Co] = 0
    t[0, 0, 0] = 255
    return y, t.to(label_dtype), 0.2 + 0.6 * torch.rand(Co, generator=generator)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", (None, [9, 11]), ids=("same", "size"))
def test_opcheck_entropy_pseudo_labels(generator, namespace, dtype, size):
    y, t, thresholds = _inputs(generator, dtype, size=size)
    op = getattr(torch.ops, namespace).entropy_pseudo_labels.default
    opcheck(op, (y, t, thresholds), {"ignore_index": 255, "size": size})


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("size", (None, [9, 11]), ids=("same", "size"))
def test_opcheck_entropy_pseudo_labels_in_place(generator, namespace, size):
    y, t, thresholds = _inputs(generator, size=size)
    op = getattr(torch.ops, namespace).entropy_pseudo_labels_.default
    opcheck(op, (y, t, thresholds), {"ignore_index": 255, "size": size})


def _peak_bytes(call):
    """The most bytes the CPU allocator held at once during call(), above what it held before."""
    with torch.profiler.profile(profile_memory=True) as prof:
        call()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_in_place_pseudo_labels_allocate_no_labels_map(generator):
    y, t, thresholds = _inputs(generator, B=2, hw=(16, 16), size=[96, 96])
    labels_map = t.numel() * t.element_size()
    copy = _peak_bytes(lambda: isf.entropy_pseudo_labels(y, t, thresholds, size=(96, 96), backend="cpu"))
    in_place = _peak_bytes(lambda: isf.entropy_pseudo_labels_(y, t, thresholds, size=(96, 96), backend="cpu"))
    assert copy >= labels_map and in_place < labels_map / 2


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda t: t.int(), TypeError, "t must be int64 to take the pseudo-labels in place, got torch.int32"),
        (lambda t: t.transpose(1, 2), ValueError, "t must be contiguous to take the pseudo-labels in place"),
    ],
)
def test_in_place_pseudo_labels_need_int64_contiguous_labels(generator, change, error, message):
    y, t, thresholds = _inputs(generator, hw=(5, 5))
    with pytest.raises(error, match=message):
        isf.entropy_pseudo_labels_(y, change(t), thresholds)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("change", (lambda t: t.byte(), lambda t: t.transpose(1, 2)), ids=("uint8", "strided"))
def test_direct_in_place_calls_are_checked(generator, namespace, change):
    y, t, thresholds = _inputs(generator, hw=(5, 5))
    with pytest.raises((ValueError, TypeError, RuntimeError), match="to take the pseudo-labels in place"):
        getattr(torch.ops, namespace).entropy_pseudo_labels_(y, change(t), thresholds, ignore_index=255)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("label_dtype", (torch.int64, torch.int32, torch.uint8), ids=str)
@pytest.mark.parametrize("size", (None, [9, 11]), ids=("same", "size"))
def test_opcheck_entropy_histogram(generator, namespace, label_dtype, size):
    y, t, _ = _inputs(generator, size=size, label_dtype=label_dtype)
    op = getattr(torch.ops, namespace).entropy_histogram.default
    opcheck(op, (y, t), {"bins": 7, "ignore_index": 255, "size": size})


def test_outputs_do_not_depend_on_the_thread_count(generator):
    y, t, thresholds = _inputs(generator, B=3, Co=6, hw=(40, 50))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((*isf.entropy_pseudo_labels(y, t, thresholds), isf.entropy_histogram(y, t)))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_y_may_require_grad_and_gets_none(generator):
    y, t, thresholds = _inputs(generator)
    y.requires_grad_(True)
    labels, factor = isf.entropy_pseudo_labels(y, t, thresholds, backend="cpu")
    assert not labels.requires_grad and not factor.requires_grad


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda y, t, th: torch.ops.incseg_fast.entropy_pseudo_labels(y[0], t, th, ignore_index=255), "y must be"),
        (
            lambda y, t, th: torch.ops.incseg_fast.entropy_pseudo_labels(y, t[:, :2], th, ignore_index=255),
            "labels must",
        ),
        (lambda y, t, th: torch.ops.incseg_fast.entropy_pseudo_labels(y, t, th[:2], ignore_index=255), "thresholds"),
        (
            lambda y, t, th: torch.ops.incseg_fast.entropy_pseudo_labels(y, t, th.double(), ignore_index=255),
            "thresholds must be float32",
        ),
        (lambda y, t, th: torch.ops.incseg_fast.entropy_pseudo_labels(y, t.float(), th, ignore_index=255), "labels"),
        (
            lambda y, t, th: torch.ops.incseg_fast.entropy_histogram(y, t, bins=0, ignore_index=255),
            "bins must be",
        ),
        (
            lambda y, t, th: torch.ops.incseg_fast_cuda_emulator.entropy_histogram(
                y, t, bins=3, ignore_index=255, size=[2, 2]
            ),
            "size",
        ),
    ],
)
def test_direct_calls_are_checked(generator, call, message):
    y, t, thresholds = _inputs(generator)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        call(y, t, thresholds)


@pytest.mark.parametrize("isa", ("baseline", "avx2", "avx512"))
def test_every_isa_copy_matches_reference(isa):
    """Each compiled copy of the CPU loops (INCSEG_CPU_ISA caps it, read once per process) agrees with the
    float64 reference on float64 logits, with and without size=."""
    script = textwrap.dedent("""
        import torch
        import incseg_fast as isf
        from incseg_fast import reference
        g = torch.Generator().manual_seed(3)
        for size in (None, (23, 29)):
            y = torch.randn(2, 7, 17, 19, generator=g, dtype=torch.float64) * 2
            H, W = size or (17, 19)
            t = torch.randint(0, 10, (2, H, W), generator=g)
            t[t < 7] = 0
            th = torch.rand(7, generator=g)
            got = isf.entropy_pseudo_labels(y, t, th, size=size, backend="cpu")
            want = reference.entropy_pseudo_labels(y, t, th, size=size)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), size
            hist = isf.entropy_histogram(y, t, bins=50, size=size, backend="cpu")
            assert torch.equal(hist, reference.entropy_histogram(y, t, bins=50, size=size)), size
        print("parity ok")
    """)
    environment = dict(os.environ, INCSEG_CPU_ISA=isa)
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity ok" in result.stdout


# ---- the public API's argument errors (they name the argument as written) ----


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(y=torch.zeros(2, 4, 5)), ValueError, "y must be 4-D"),
        (dict(y=torch.zeros(2, 4, 5, 6, dtype=torch.int64)), TypeError, "y must be float16"),
        (dict(y=torch.zeros(2, 0, 5, 6)), ValueError, "at least one channel"),
        (dict(t=torch.zeros(2, 5, 6)), TypeError, "t must be an int64"),
        (dict(t=torch.zeros(2, 5, 7, dtype=torch.int64)), ValueError, r"t must have shape \(B, H, W\)"),
        (dict(t=torch.full((2, 5, 6), -1)), ValueError, "t has label -1"),
        (dict(thresholds=torch.ones(3)), ValueError, r"thresholds must have one threshold per old class"),
        (dict(thresholds=torch.ones(4, dtype=torch.int64)), TypeError, "thresholds must be a floating tensor"),
        (dict(thresholds=[0.5] * 4), TypeError, "thresholds must be a torch.Tensor"),
        (dict(size=(4, 6)), ValueError, "size=.* is smaller than y's resolution"),
        (dict(size=5), TypeError, "size must be None or a pair"),
        (dict(ignore_index=2.5), TypeError, "ignore_index must be an int"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
    ],
)
def test_entropy_pseudo_labels_argument_errors(change, error, message):
    arguments = dict(y=torch.zeros(2, 4, 5, 6), t=torch.zeros(2, 5, 6, dtype=torch.int64), thresholds=torch.ones(4))
    arguments.update(change)
    options = {k: arguments.pop(k) for k in ("size", "ignore_index", "backend") if k in arguments}
    with pytest.raises(error, match=message):
        isf.entropy_pseudo_labels(arguments["y"], arguments["t"], arguments["thresholds"], **options)


def test_negative_ignore_index_is_allowed_in_labels(generator):
    y, t, thresholds = _inputs(generator)
    t[0, 1, 1] = -1
    labels, _ = isf.entropy_pseudo_labels(y, t, thresholds, ignore_index=-1)
    assert labels[0, 1, 1].item() == -1


@pytest.mark.parametrize(
    "bins, error, message", [(0, ValueError, "bins must be >= 1"), (2.0, TypeError, "bins must be an int")]
)
def test_entropy_histogram_bins_errors(bins, error, message):
    with pytest.raises(error, match=message):
        isf.entropy_histogram(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.int64), bins=bins)


@pytest.mark.parametrize(
    "hist, error, message",
    [
        (torch.ones(5), ValueError, r"hist must be \(Co, bins\)"),
        (torch.ones(2, 0), ValueError, r"hist must be \(Co, bins\) with bins >= 1"),
        (torch.ones(2, 3, dtype=torch.bool), TypeError, "hist must be an integer or floating tensor"),
        (-torch.ones(2, 3), ValueError, "hist must hold counts >= 0"),
        ("counts", TypeError, "hist must be a torch.Tensor"),
    ],
)
def test_histogram_medians_errors(hist, error, message):
    with pytest.raises(error, match=message):
        isf.histogram_medians(hist)


def test_histogram_medians_is_the_reference(generator):
    hist = torch.randint(0, 9, (5, 11), generator=generator)
    hist[2] = 0
    assert torch.equal(isf.histogram_medians(hist), reference.histogram_medians(hist))


def test_torch_compile_fullgraph_matches_eager(generator):
    y, t, thresholds = _inputs(generator, hw=(9, 11))

    def relabel(y, t, thresholds):
        labels, factor = isf.entropy_pseudo_labels(y, t, thresholds)
        histogram = isf.entropy_histogram(y, t, bins=8)
        written, same_factor = isf.entropy_pseudo_labels_(y, t.clone(), thresholds)
        return labels, factor, histogram, written, same_factor

    compiled = torch.compile(relabel, fullgraph=True)
    for got, want in zip(compiled(y, t, thresholds), relabel(y, t, thresholds), strict=True):
        assert torch.equal(got, want)
