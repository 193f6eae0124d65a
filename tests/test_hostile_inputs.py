"""A battery of hostile inputs to the public API (incseg_fast.*) and the drop-in modules (incseg_fast.losses).

Every case must either succeed with a defined result (finite where the math is finite, not finite
where an input holds NaN) or raise ValueError/TypeError whose message names the argument as the
caller wrote it (BackendUnavailableError where the backend cannot run). Each backend's cases run in
one subprocess (this file run as a script), which prints one JSON line per case: a segfault or an
abort then fails that case instead of the test run, and the subprocess restarts after it.
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import incseg_fast as isf
from incseg_fast import _backends, losses, ops
from incseg_fast._backends import BackendUnavailableError

CASES = {}  # name -> (run(backend) -> result, expectation)
FINITE, NOT_FINITE = "finite", "not finite"  # expectations of a call that succeeds


def case(name, expect):
    """Register `run(backend)` as case `name`; expect FINITE, NOT_FINITE or the argument an error must name."""

    def register(run):
        assert name not in CASES, name
        CASES[name] = (run, expect)
        return run

    return register


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def _logits(B=2, C=5, H=3, W=4, seed=3, dtype=torch.float32):
    return torch.randn(B, C, H, W, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _labels(B=2, C=5, H=3, W=4, seed=4):
    return torch.randint(0, C, (B, H, W), generator=_gen(seed))


def _teacher(B=2, Co=3, H=3, W=4, seed=5):
    return torch.randn(B, Co, H, W, generator=_gen(seed))


def _features(B=2, C=4, H=3, W=5, seed=6, scale=1.0):
    g = _gen(seed)
    return (
        scale * torch.randn(B, C, H, W, generator=g),
        scale * torch.randn(B, C, H, W, generator=g),
        torch.rand(B, C, generator=g),
        torch.rand(B, C, generator=g),
    )


def _ce(backend, x=None, t=None, old_classes=3, **kwargs):
    return isf.unbiased_cross_entropy(
        _logits() if x is None else x, _labels() if t is None else t, old_classes, backend=backend, **kwargs
    )


def _kd(backend, x=None, y=None, name="unbiased_knowledge_distillation", **kwargs):
    return getattr(isf, name)(_logits() if x is None else x, _teacher() if y is None else y, backend=backend, **kwargs)


def _incremental(backend, x=None, t=None, y=None, old_classes=3, **kwargs):
    x = _logits() if x is None else x
    return isf.incremental_loss(
        x,
        _labels() if t is None else t,
        _teacher() if y is None else y,
        old_classes=old_classes,
        backend=backend,
        **kwargs,
    )


def _ad(backend, f=None, g=None, a=None, b=None, **kwargs):
    defaults = _features()
    args = [d if v is None else v for d, v in zip(defaults, (f, g, a, b), strict=True)]
    return isf.attentive_distillation(*args, backend=backend, **kwargs)


def _sab(backend, v=None, a_ch=None, a_sp=None):
    g = _gen(7)
    v = torch.randn(2, 4, 3, 5, generator=g) if v is None else v
    a_ch = torch.rand(2, 4, generator=g) if a_ch is None else a_ch
    a_sp = torch.rand(2, 3, 5, generator=g) if a_sp is None else a_sp
    return isf.structured_attention(v, a_ch, a_sp, backend=backend)


# ---- wrong types: non-tensors, wrong tensor dtypes ----
case("x is a list", "x")(lambda be: _ce(be, x=_logits().tolist()))
case("x is None", "x")(lambda be: isf.knowledge_distillation(None, _teacher(), backend=be))
case("x is a string", "x")(lambda be: _kd(be, x="logits"))
case("x is a numpy array", "x")(lambda be: _kd(be, x=_logits().numpy()))
case("x is int64", "x")(lambda be: _ce(be, x=_labels().unsqueeze(1).expand(2, 5, 3, 4)))
case("x is complex", "x")(lambda be: _ce(be, x=_logits().to(torch.complex64)))
case("x is bool", "x")(lambda be: _ce(be, x=_logits() > 0))
case("t is a list", "t")(lambda be: _ce(be, t=_labels().tolist()))
case("t is float", "t")(lambda be: _ce(be, t=_labels().float()))
case("t is bool", "t")(lambda be: _ce(be, t=_labels() > 2))
case("t is int16", "t")(lambda be: _ce(be, t=_labels().to(torch.int16)))
case("y is a numpy array", "y")(lambda be: _kd(be, y=_teacher().numpy()))
case("y is float16 with float32 x", "y")(lambda be: _kd(be, y=_teacher().half()))
case("mask is a list", "mask")(lambda be: _kd(be, mask=[[1.0]]))
case("mask is int64", "mask")(lambda be: _kd(be, mask=_labels()))
case("gamma is a list", "gamma")(lambda be: _kd(be, name="balanced_knowledge_distillation", gamma=[1.0, 2.0]))
case("gamma is int64", "gamma")(lambda be: _kd(be, name="balanced_knowledge_distillation", gamma=torch.tensor([1, 2])))
case("f is a numpy array", "f")(lambda be: _ad(be, f=_features()[0].numpy()))
case("a is float64 with float32 f", "a")(lambda be: _ad(be, a=_features()[2].double()))
case("g is float16 with float32 f", "g")(lambda be: _ad(be, g=_features()[1].half()))
case("a_sp is a numpy array", "a_sp")(lambda be: _sab(be, a_sp=torch.rand(2, 3, 5).numpy()))
case("v is int32", "v")(lambda be: _sab(be, v=torch.randint(0, 9, (2, 4, 3, 5), dtype=torch.int32)))

# ---- wrong shapes and ranks ----
case("x is 3-D", "x")(lambda be: _ce(be, x=_logits()[0]))
case("x is 5-D", "x")(lambda be: _kd(be, x=_logits().unsqueeze(0)))
case("t is (B, H)", "t")(lambda be: _ce(be, t=_labels()[:, 0]))
case("t has a trailing 1", "t")(lambda be: _ce(be, t=_labels().unsqueeze(-1)))
case("y has another batch", "y")(lambda be: _kd(be, y=_teacher(B=3)))
case("y has another width", "y")(lambda be: _kd(be, y=_teacher(W=5)))
case("y has more channels than x", "y")(lambda be: _kd(be, y=_teacher(Co=6)))
case("y and old_classes disagree", "old_classes")(lambda be: _incremental(be, old_classes=4))
case("mask is (B, 1, H, W)", "mask")(lambda be: _kd(be, mask=torch.rand(2, 1, 3, 4)))
case("gamma is (B, 1)", "gamma")(lambda be: _kd(be, name="balanced_knowledge_distillation", gamma=torch.rand(2, 1)))
case("gamma has B + 1 values", "gamma")(lambda be: _kd(be, name="balanced_knowledge_distillation", gamma=torch.rand(3)))
case("g has another shape", "g")(lambda be: _ad(be, g=_features(H=4)[1]))
case("a is (B, C, 1)", "a")(lambda be: _ad(be, a=_features()[2].unsqueeze(-1)))
case("b is (C,)", "b")(lambda be: _ad(be, b=_features()[3][0]))
case("a_ch has C + 1 values", "a_ch")(lambda be: _sab(be, a_ch=torch.rand(2, 5)))
case("a_sp is (B, 2, H, W)", "a_sp")(lambda be: _sab(be, a_sp=torch.rand(2, 2, 3, 5)))
case("a_sp is (B, 1, H, W)", FINITE)(lambda be: _sab(be, a_sp=torch.rand(2, 1, 3, 5, generator=_gen(8))))

# ---- devices: a tensor on the meta device next to CPU tensors ----
case("t on the meta device", "t")(lambda be: _ce(be, t=_labels().to("meta")))
case("y on the meta device", "y")(lambda be: _kd(be, y=_teacher().to("meta")))
case("mask on the meta device", "mask")(lambda be: _kd(be, mask=torch.rand(2, 3, 4).to("meta")))
case("b on the meta device", "b")(lambda be: _ad(be, b=_features()[3].to("meta")))

# ---- ints: bool, float, str, tensor, huge and negative values ----
case("old_classes is a float", "old_classes")(lambda be: _ce(be, old_classes=3.0))
case("old_classes is a bool", "old_classes")(lambda be: _ce(be, old_classes=True))
case("old_classes is a string", "old_classes")(lambda be: _ce(be, old_classes="3"))
case("old_classes is a tensor", "old_classes")(lambda be: _ce(be, old_classes=torch.tensor(3)))
case("old_classes is 0", "old_classes")(lambda be: _ce(be, old_classes=0))
case("old_classes is negative", "old_classes")(lambda be: _ce(be, old_classes=-2))
case("old_classes is C + 1", "old_classes")(lambda be: _ce(be, old_classes=6))
case("old_classes is 2**63", "old_classes")(lambda be: _ce(be, old_classes=2**63))
case("old_classes is C", FINITE)(lambda be: _ce(be, old_classes=5))
case("ignore_index is a float", "ignore_index")(lambda be: _ce(be, ignore_index=255.0))
case("ignore_index is a bool", "ignore_index")(lambda be: _ce(be, ignore_index=False))
case("ignore_index is 2**70", "ignore_index")(lambda be: _ce(be, ignore_index=2**70))
case("ignore_index is int64's minimum", FINITE)(lambda be: _ce(be, ignore_index=-(2**63)))
case("ignore_index is -1 with uint8 labels", FINITE)(lambda be: _ce(be, t=_labels().to(torch.uint8), ignore_index=-1))

# ---- floats: NaN, inf, wrong types ----
case("alpha is NaN", "alpha")(lambda be: _kd(be, alpha=math.nan))
case("alpha is inf", "alpha")(lambda be: _kd(be, alpha=math.inf))
case("alpha is a string", "alpha")(lambda be: _kd(be, alpha="1"))
case("alpha is a bool", "alpha")(lambda be: _kd(be, alpha=True))
case("alpha is a complex", "alpha")(lambda be: _kd(be, alpha=1j))
case("alpha is None", "alpha")(lambda be: _kd(be, alpha=None))
case("alpha of 1e39 with float32 logits", "alpha")(lambda be: _kd(be, alpha=1e39))
case("alpha of 1e39 with float64 logits", "alpha")(
    lambda be: _kd(be, x=_logits(dtype=torch.float64), y=_teacher().double(), alpha=1e39)
)
case("alpha of 1e30", FINITE)(lambda be: _kd(be, alpha=1e30))
case("alpha is a numpy float32", FINITE)(lambda be: _kd(be, alpha=np.float32(0.5)))
case("old_classes is a numpy int64", FINITE)(lambda be: _ce(be, old_classes=np.int64(3)))
case("alpha is 0", FINITE)(lambda be: _kd(be, alpha=0.0))
case("alpha is negative", FINITE)(lambda be: _kd(be, alpha=-2.5))
case("gamma holds NaN", "gamma")(
    lambda be: _kd(be, name="balanced_knowledge_distillation", gamma=torch.tensor([1.0, math.nan]))
)
case("gamma holds inf", "gamma")(
    lambda be: _kd(be, name="balanced_knowledge_distillation", gamma=torch.tensor([math.inf, 1.0]))
)
case("gamma is negative", "gamma")(
    lambda be: _kd(be, name="balanced_knowledge_distillation", gamma=torch.tensor([0.5, -1.0]))
)

# ---- strings and flags ----
case("reduction is None", "reduction")(lambda be: _kd(be, reduction=None))
case("reduction is upper case", "reduction")(lambda be: _ce(be, reduction="MEAN"))
case("reduction 'none' for attention", "reduction")(lambda be: _ad(be, reduction="none"))
case("ce is unknown", "ce")(lambda be: _incremental(be, ce="focal"))
case("kd is None", "kd")(lambda be: _incremental(be, kd=None))
case("kd without y", "y")(lambda be: isf.incremental_loss(_logits(), _labels(), None, old_classes=3, backend=be))
case("detach_spatial is 1", "detach_spatial")(lambda be: _ad(be, detach_spatial=1))
case("backend is an int", "backend")(lambda be: _ce(1))
case("backend is unknown", "backend")(lambda be: _ce("gpu"))
case("backend cuda for CPU tensors", "backend")(lambda be: _ce("cuda"))

# ---- labels out of range ----
case("label equals C", "t")(lambda be: _ce(be, t=_labels().index_fill(2, torch.tensor([1]), 5)))
case("label is -1", "t")(lambda be: _ce(be, t=_labels().index_fill(1, torch.tensor([0]), -1)))
case("label is int32's maximum", "t")(
    lambda be: _ce(be, t=_labels().to(torch.int32).index_fill(0, torch.tensor([1]), 2**31 - 1))
)
case("label 255 without ignore_index 255", "t")(
    lambda be: _ce(be, t=_labels().index_fill(2, torch.tensor([0]), 255), ignore_index=-100)
)

# ---- the teacher must be a constant ----
case("y requires grad", "y")(lambda be: _kd(be, y=_teacher().requires_grad_()))

# ---- empty tensors and sizes at limits ----
case("empty batch", FINITE)(lambda be: _incremental(be, x=_logits(B=0), t=_labels(B=0), y=_teacher(B=0)))
case("empty height, reduction none", FINITE)(lambda be: _ce(be, x=_logits(H=0), t=_labels(H=0), reduction="none"))
case("empty width distillation", FINITE)(lambda be: _kd(be, x=_logits(W=0), y=_teacher(W=0), reduction="sum"))
case("no channels at all", "old_classes")(lambda be: _ce(be, x=_logits(C=0), t=_labels(C=1), old_classes=1))
case("attention over zero channels", FINITE)(lambda be: _ad(be, *_features(C=0)))
case("attention over an empty batch", FINITE)(lambda be: _ad(be, *_features(B=0)))
case("structured attention over zero pixels", FINITE)(
    lambda be: _sab(be, v=torch.randn(2, 4, 0, 5), a_sp=torch.rand(2, 0, 5))
)
case("one class, one pixel", FINITE)(
    lambda be: _incremental(
        be,
        x=_logits(B=1, C=1, H=1, W=1),
        t=torch.zeros(1, 1, 1, dtype=torch.int64),
        y=_teacher(B=1, Co=1, H=1, W=1),
        old_classes=1,
    )
)
case("many classes on few pixels", FINITE)(
    lambda be: _incremental(
        be,
        x=_logits(B=1, C=300, H=1, W=2),
        t=_labels(B=1, C=300, H=1, W=2),
        y=_teacher(B=1, Co=200, H=1, W=2),
        old_classes=200,
    )
)
case("logits of 1e36", FINITE)(lambda be: _incremental(be, x=1e36 * torch.tanh(_logits())))
case("x expanded with stride 0", FINITE)(lambda be: _ce(be, x=_logits(B=1, H=1, W=1).expand(2, 5, 3, 4)))
case("features of 1e20 overflow the loss", NOT_FINITE)(lambda be: _ad(be, *_features(scale=1e20), reduction="sum"))
case("features of 1e-30", FINITE)(lambda be: _ad(be, *_features(scale=1e-30)[:2], *_features()[2:]))

# ---- NaN inside the tensors ----
case("NaN logit", NOT_FINITE)(lambda be: _incremental(be, x=_logits().index_fill(3, torch.tensor([2]), math.nan)))
case("NaN teacher logit", NOT_FINITE)(lambda be: _kd(be, y=_teacher().index_fill(1, torch.tensor([0]), math.nan)))
case("+inf teacher logit", NOT_FINITE)(lambda be: _kd(be, y=_teacher().index_fill(2, torch.tensor([1]), math.inf)))
case("NaN feature", NOT_FINITE)(lambda be: _ad(be, f=_features()[0].index_fill(3, torch.tensor([4]), math.nan)))
case("NaN mask weight", NOT_FINITE)(
    lambda be: _kd(be, mask=torch.rand(2, 3, 4).index_fill(2, torch.tensor([3]), math.nan))
)


# ---- size= with masked classes and non-finite logits (MATH.md#upsampling), gradients included ----
def _with_grad(loss_of, x):
    """The loss of `loss_of(x)` and dL/dx, both checked for finiteness."""
    x = x.clone().requires_grad_()
    loss = loss_of(x)
    (loss if loss.dim() == 0 else loss.sum()).backward()
    return loss.detach(), x.grad


def _masked(channel_fill, H=3, W=4):
    """Logits whose new class 4 is -inf where `channel_fill` (a (H, W) bool) is true."""
    x = _logits(H=H, W=W)
    x[:, 4][channel_fill.expand(2, H, W)] = -math.inf
    return x


_EVERYWHERE = torch.ones(3, 4, dtype=torch.bool)
_SOME_PIXELS = torch.rand(3, 4, generator=_gen(9)) < 0.5
for _kd_name in ("knowledge_distillation", "unbiased_knowledge_distillation", "balanced_knowledge_distillation"):
    for _size, _label in (((3, 4), "at x's own size"), ((7, 9), "upsampled")):
        case(f"{_kd_name}, masked class {_label}", FINITE)(
            lambda be, name=_kd_name, size=_size: _with_grad(
                lambda x: _kd(be, x=x, name=name, size=size), _masked(_EVERYWHERE)
            )
        )
for _size, _label in (((3, 4), "at x's own size"), ((7, 9), "upsampled"), ((5, 4), "upsampled rows only")):
    case(f"cross-entropy, masked class {_label}", FINITE)(
        lambda be, size=_size: _with_grad(
            lambda x: _ce(be, x=x, t=_labels(C=4, H=size[0], W=size[1]), size=size), _masked(_EVERYWHERE)
        )
    )
case("incremental loss, class masked at some pixels, upsampled", FINITE)(
    lambda be: _with_grad(
        lambda x: sum(_incremental(be, x=x, t=_labels(C=4, H=6, W=8), kd="balanced", size=(6, 8))),
        _masked(_SOME_PIXELS),
    )
)
case("every logit of one pixel -inf but the background, upsampled", FINITE)(
    lambda be: _with_grad(
        lambda x: _ce(be, x=x, t=torch.zeros(2, 5, 7, dtype=torch.int64), size=(5, 7)),
        _logits().index_fill(1, torch.tensor([1, 2, 3, 4]), -math.inf),
    )
)
case("NaN logit upsampled", NOT_FINITE)(
    lambda be: _with_grad(
        lambda x: _ce(be, x=x, t=_labels(H=7, W=9), size=(7, 9)),
        _logits().index_put(
            (torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), torch.tensor([2])), torch.tensor(math.nan)
        ),
    )
)


def _far_teacher(H=3, W=4):
    """A teacher whose class 1 leads the background by 95: γ = e^95 overflows float32, q_0 underflows."""
    y = _teacher(H=H, W=W)
    y[:, 1] += 95
    return y


case("balanced distillation of a teacher 95 above its background", FINITE)(
    lambda be: _with_grad(lambda x: _kd(be, x=x, y=_far_teacher(), name="balanced_knowledge_distillation"), _logits())
)
case("balanced distillation of a teacher 95 above its background, upsampled", FINITE)(
    lambda be: _with_grad(
        lambda x: _kd(be, x=x, y=_far_teacher(H=2, W=2), name="balanced_knowledge_distillation", size=(3, 4)),
        _logits(),
    )
)


# ---- the drop-in modules name their own arguments ----
def _module(cls, *args, backend, **kwargs):
    return getattr(losses, cls)(*args, backend=backend, **kwargs)


case("module inputs is a list", "inputs")(
    lambda be: _module("UnbiasedCrossEntropy", 3, backend=be)(_logits().tolist(), _labels())
)
case("module targets are float", "targets")(
    lambda be: _module("UnbiasedCrossEntropy", 3, backend=be)(_logits(), _labels().float())
)
case("module old_cl is a string", "old_cl")(
    lambda be: _module("UnbiasedCrossEntropy", "3", backend=be)(_logits(), _labels())
)
case("module old_cl is too large", "old_cl")(
    lambda be: _module("UnbiasedCrossEntropy", 9, backend=be)(_logits(), _labels())
)
case("module float mask for cross-entropy", "mask")(
    lambda be: _module("UnbiasedCrossEntropy", 3, backend=be)(_logits(), _labels(), mask=torch.rand(2, 3, 4))
)
case("module bool mask of another shape", "mask")(
    lambda be: _module("UnbiasedCrossEntropy", 3, backend=be)(_logits(), _labels(), mask=torch.rand(2, 3, 5) > 0.5)
)
case("module reduction is unknown", "reduction")(
    lambda be: _module("KnowledgeDistillationLoss", "avg", backend=be)(_logits(), _teacher())
)
case("module alpha is a string", "alpha")(
    lambda be: _module("UnbiasedKnowledgeDistillationLoss", alpha="2", backend=be)(_logits(), _teacher())
)
case("module teacher has more channels", "targets")(
    lambda be: _module("BalancedKnowledgeDistillationLoss", backend=be)(_logits(), _teacher(Co=7))
)
case("module teacher requires grad", "targets")(
    lambda be: _module("KnowledgeDistillationLoss", backend=be)(_logits(), _teacher().requires_grad_())
)
case("module channels is 0", "channels")(lambda be: _module("AttentiveDistillationLoss", 0, backend=be))
case("module channels is a float", "channels")(lambda be: _module("AttentiveDistillationLoss", 4.0, backend=be))
case("module reduction_ratio is 0", "reduction_ratio")(
    lambda be: _module("AttentiveDistillationLoss", 4, reduction_ratio=0, backend=be)
)
case("module reduction_ratio is negative", "reduction_ratio")(
    lambda be: _module("AttentiveDistillationLoss", 4, reduction_ratio=-16, backend=be)
)
case("module features of another channel count", "inputs")(
    lambda be: _module("AttentiveDistillationLoss", 5, backend=be)(*_features()[:2])
)
case("module targets is None", "targets")(
    lambda be: _module("AttentiveDistillationLoss", 4, backend=be)(_features()[0], None)
)
case("module detach_spatial is a string", "detach_spatial")(
    lambda be: _module("AttentiveDistillationLoss", 4, detach_spatial="no", backend=be)(*_features()[:2])
)


# ---------------------------------------------------------------------------------------------
# Running the cases: in this process (the subprocess's side) and from pytest.
# ---------------------------------------------------------------------------------------------


def outcome(backend, name):
    """What case `name` did on `backend`: {"result": "finite"|"not finite"|"raised", ...}."""
    run, _ = CASES[name]
    try:
        result = run(backend)
        if isinstance(result, torch.nn.Module):
            return {"result": FINITE}
        tensors = result if isinstance(result, tuple) else (result,)
        finite = all(bool(torch.isfinite(t).all()) for t in tensors)
        return {"result": FINITE if finite else NOT_FINITE}
    except (ValueError, TypeError, BackendUnavailableError) as error:
        return {"result": "raised", "type": type(error).__name__, "message": str(error)}
    except Exception as error:  # noqa: BLE001  (any other exception is the fault being looked for)
        return {"result": "other exception", "type": type(error).__name__, "message": str(error)[:300]}


def main(backend, first):
    """Run the cases from index `first` on, one JSON line each; a "start" line before each (crash attribution)."""
    torch.set_num_threads(1)
    for index, name in enumerate(list(CASES)[first:], start=first):
        print(json.dumps({"start": index}), flush=True)
        print(json.dumps({"index": index, **outcome(backend, name)}), flush=True)


def run_battery(backend, script=__file__, names=None, timeout=300):
    """Every case's outcome on `backend`, from subprocesses running `script` (whose cases are `names`,
    this file's by default); a case that kills its process is "crashed" and the next process goes on
    after it."""
    names = list(CASES) if names is None else names
    # The cases build CPU tensors, so Triton runs in its interpreter even where there is a GPU.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path), TRITON_INTERPRET="1")
    outcomes, first = {}, 0
    while first < len(names):
        process = subprocess.run(
            [sys.executable, script, backend, str(first)], capture_output=True, text=True, env=env, timeout=timeout
        )
        started = first
        for line in process.stdout.splitlines():
            record = json.loads(line)
            started = record.get("start", started)
            if "index" in record:
                outcomes[record["index"]] = record
        if len(outcomes) == len(names):
            break
        outcomes[started] = {
            "result": "crashed",
            "message": f"exit status {process.returncode}: {process.stderr[-500:]}",
        }
        first = started + 1
    return {names[i]: record for i, record in outcomes.items()}


CRASHING_SCRIPT = """
import os, sys
import test_hostile_inputs as battery
battery.CASES.clear()
battery.case("before", battery.FINITE)(lambda backend: battery._ce(backend))
battery.case("aborts", battery.FINITE)(lambda backend: os.abort())
battery.case("after", battery.FINITE)(lambda backend: battery._ce(backend))
battery.main(sys.argv[1], int(sys.argv[2]))
"""


def test_a_case_that_aborts_fails_alone(tmp_path):
    """The harness itself: an abort is that case's "crashed" outcome, and the cases after it still run."""
    script = tmp_path / "crashing_cases.py"
    script.write_text(CRASHING_SCRIPT)
    outcomes = run_battery("reference", script=str(script), names=["before", "aborts", "after"])
    assert outcomes["before"]["result"] == FINITE and outcomes["after"]["result"] == FINITE
    assert outcomes["aborts"]["result"] == "crashed"


@pytest.fixture(scope="module")
def battery():
    """Outcomes per backend, computed once (one subprocess per backend) on first use."""
    cache = {}

    def outcomes(backend):
        if backend not in cache:
            cache[backend] = run_battery(backend)
        return cache[backend]

    return outcomes


# The backends that take CPU tensors (validation is the same Python code for "cuda").
@pytest.fixture(params=["reference", "cpu", "triton", "cuda_emulator"])
def battery_backend(request):
    if request.param == "triton":  # the subprocess runs it in the interpreter (see run_battery)
        usable = _backends.TRITON_INSTALLED and ops.HAS_EXTENSION
        reason = None if usable else "triton or the extension (its op schemas) is missing"
    else:
        reason = _backends.unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param!r} is not available here: {reason}")
    return request.param


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(battery, battery_backend, name):
    record = battery(battery_backend)[name]
    expect = CASES[name][1]
    if expect in (FINITE, NOT_FINITE):
        assert record["result"] == expect, f"expected a {expect} result, got {record}"
        return
    assert record["result"] == "raised", f"expected an error naming {expect!r}, got {record}"
    assert record["type"] in ("ValueError", "TypeError", "BackendUnavailableError"), record
    assert re.search(rf"(?<![\w.']){re.escape(expect)}(?!\w)", record["message"]), (
        f"the message does not name {expect!r}: {record['message']}"
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
