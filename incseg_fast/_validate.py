"""Argument checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, value or
device) with a message naming the argument, before any kernel runs.
"""

import math
import numbers

import torch

from .reference import ignored
from .vocabulary import FLOAT_DTYPES, LABEL_DTYPES, WIDER_TEACHER_DTYPE, accumulation_dtype

INT64_RANGE = (-(2**63), 2**63 - 1)


def tensor(value, name):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def float_tensor(value, name, ndim):
    tensor(value, name)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def same_device_dtype(value, name, ref, ref_name):
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}; they must match")


def teacher_dtype(value, name, student, student_name):
    """A frozen teacher's tensor: the student's device, and its dtype or the wider one of
    WIDER_TEACHER_DTYPE (MATH.md#teacher-dtype)."""
    same_device(value, name, student, student_name)
    wider = WIDER_TEACHER_DTYPE.get(student.dtype)
    if value.dtype in (student.dtype, wider):
        return
    allowed = f"{student.dtype} like {student_name}" + (f" or {wider} (mixed precision)" if wider else "")
    cast = (
        f"{name}.to({student_name}.dtype)"
        if wider is None or value.dtype.itemsize < wider.itemsize
        else f"{name}.to({wider})"
    )
    raise TypeError(
        f"{name} has dtype {value.dtype} but {student_name} has {student.dtype}; {name} must be {allowed}: pass {cast}"
    )


def same_device(value, name, ref, ref_name):
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")


def integer(value, name, minimum=None, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def finite_float(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def teacher_scale(value, name="alpha"):
    """alpha: a finite float within float32's range, for every dtype. 1e39 is inf in float32 (and
    alpha * y NaN however small y is); the Triton kernels take alpha as two float32 parts even for
    float64 logits."""
    value = finite_float(value, name)
    if abs(value) > torch.finfo(torch.float32).max:
        raise ValueError(f"{name} must be within float32's range (|{name}| <= 3.4e38), got {value}")
    return value


def choice(value, name, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def logits(x, name="x"):
    return float_tensor(x, name, 4)


def output_size(size, x, name="size", x_name="x"):
    """``size=(H, W)`` of the fused upsampling (MATH.md#upsampling), or None. Returns (H, W) as a tuple
    of ints. Upsampling only: H >= h and W >= w for x (B, C, h, w)."""
    if size is None:
        return None
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2:
        raise TypeError(f"{name} must be None or a pair (H, W) of ints, got {size!r}")
    H, W = (integer(value, name) for value in size)
    if H < 1 or W < 1:
        raise ValueError(f"{name} must be (H, W) with H, W >= 1, got {(H, W)}")
    h, w = x.shape[2:]
    if h < 1 or w < 1:
        raise ValueError(f"{name}= upsamples {x_name}, which needs a resolution h, w >= 1; got {tuple(x.shape)}")
    if H < h or W < w:
        raise ValueError(
            f"{name}={(H, W)} is smaller than {x_name}'s resolution ({h}, {w}): "
            "the losses upsample only (downsampling is not supported)"
        )
    return H, W


def pixel_shape(x, size):
    """(B, H, W) of labels, masks and per-pixel losses: size's resolution when given, else x's own."""
    return (x.shape[0], *(x.shape[2:] if size is None else size))


def size_hint(value, name, x, size):
    """``: pass size=...`` when ``value`` (B, ..., H, W) is at a higher resolution than x and no size
    was given: a MiB-style trainer whose logits stay at the network's resolution (MATH.md#upsampling)."""
    if size is not None or value.dim() < 3 or value.shape[0] != x.shape[0]:
        return ""
    (H, W), (h, w) = value.shape[-2:], x.shape[2:]
    if (H, W) == (h, w) or H < h or W < w:
        return ""
    return f": pass size={name}.shape[-2:] to compute the loss at that resolution (the logits are upsampled to it)"


def teacher(y, x, name="y", x_name="x", size=None, size_name="size"):
    """Old-model logits (B, Co, H, W) with 1 <= Co <= C, on x's device, in x's dtype or the wider one of
    MATH.md#teacher-dtype (float32 for a 16-bit x, float64 for a float32 x); a constant.
    With ``size=(H, W)``, y may have any resolution (h', w') with 1 <= h' <= H, 1 <= w' <= W."""
    float_tensor(y, name, 4)
    teacher_dtype(y, name, x, x_name)
    B, C, H, W = x.shape
    if size is None and (y.shape[0] != B or y.shape[2:] != x.shape[2:]):
        raise ValueError(
            f"{name} must have shape (B, Co, H, W) = ({B}, Co, {H}, {W}) like {x_name}, got {tuple(y.shape)}"
            + (" (or pass size=(H, W), the labels' resolution, to upsample both to it)" if y.shape[0] == B else "")
        )
    if size is not None:
        if y.shape[0] != B:
            raise ValueError(f"{name} must have {x_name}'s batch size B={B}, got shape {tuple(y.shape)}")
        h, w = y.shape[2:]
        if not (1 <= h <= size[0] and 1 <= w <= size[1]):
            raise ValueError(
                f"{name} must have a resolution (h', w') with 1 <= h' <= H, 1 <= w' <= W for "
                f"{size_name}={tuple(size)} (downsampling is not supported), got shape {tuple(y.shape)}"
            )
    if not 1 <= y.shape[1] <= C:
        raise ValueError(f"{name} has Co={y.shape[1]} channels; need 1 <= Co <= C={C} (Co > C is not allowed)")
    if y.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} (the old model's logits) must not require grad: compute it under "
            "torch.no_grad() or pass y.detach(); distillation treats it as a constant"
        )
    return y


def old_classes(value, x, name="old_classes"):
    return integer(value, name, minimum=1, maximum=x.shape[1])


def labels(t, x, ignore_index, name="t", x_name="x", size=None):
    """Labels (B, H, W) of an integer dtype, each in [0, C) or equal to ignore_index; (H, W) = size if given."""
    tensor(t, name)
    if t.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be an int64, int32 or uint8 tensor of class indices, got {t.dtype}")
    C = x.shape[1]
    pixels = pixel_shape(x, size)
    if t.shape != pixels:
        hint = size_hint(t, name, x, size)
        raise ValueError(f"{name} must have shape (B, H, W) = {pixels}, got {tuple(t.shape)}{hint}")
    same_device(t, name, x, x_name)
    out_of_range = ((t < 0) | (t >= C)) & ~ignored(t, ignore_index)
    if torch.compiler.is_compiling():
        # A data-dependent branch cannot be traced; the compiled graph asserts instead
        # (RuntimeError at run time rather than ValueError, but never a silent wrong answer).
        torch._assert_async(
            torch.logical_not(out_of_range.any()),
            f"{name} has labels outside [0, {C}) that are not ignore_index={ignore_index}",
        )
    elif bool(out_of_range.any()):
        bad = t[out_of_range][0].item()
        raise ValueError(f"{name} has label {bad} outside [0, {C}) that is not ignore_index={ignore_index}")
    return t


def mask(m, x, name="mask", x_name="x", size=None):
    """Optional per-pixel weight (B, H, W), bool or float; returned as contiguous float32. (H, W) = size if given."""
    if m is None:
        return None
    tensor(m, name)
    if m.dtype != torch.bool and m.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a bool or floating tensor, got {m.dtype}")
    pixels = pixel_shape(x, size)
    if m.shape != pixels:
        hint = size_hint(m, name, x, size)
        raise ValueError(f"{name} must have shape (B, H, W) = {pixels}, got {tuple(m.shape)}{hint}")
    same_device(m, name, x, x_name)
    return m.detach().to(accumulation_dtype(x.dtype)).contiguous()


def gamma(g, x, name="gamma"):
    """Optional precomputed balanced-KD weight (B,); returned as float32 (float64 for float64 x)."""
    if g is None:
        return None
    tensor(g, name)
    if g.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {g.dtype}")
    if g.shape != (x.shape[0],):
        raise ValueError(f"{name} must have shape (B,) = ({x.shape[0]},), got {tuple(g.shape)}")
    same_device(g, name, x, "x")
    g = g.detach().to(accumulation_dtype(x.dtype)).contiguous()
    bad = ~(torch.isfinite(g) & (g >= 0))
    message = f"{name} must be finite and >= 0 (a ratio of probability masses)"
    if torch.compiler.is_compiling():
        torch._assert_async(torch.logical_not(bad.any()), message)
    elif bool(bad.any()):
        raise ValueError(f"{message}, got {g[bad][0].item()}")
    return g


def feature_pair(f, g, a, b, names=("f", "g", "a", "b")):
    """MATH.md#ad: f, g (B, C, H, W); a, b (B, C); one device. The student's f and a share a dtype; the
    teacher's g and b share f's or the wider one of MATH.md#teacher-dtype. ``names``: as the caller wrote them."""
    f_name, g_name, a_name, b_name = names
    float_tensor(f, f_name, 4)
    float_tensor(g, g_name, 4)
    teacher_dtype(g, g_name, f, f_name)
    if g.shape != f.shape:
        raise ValueError(f"{g_name} must have the same shape as {f_name} {tuple(f.shape)}, got {tuple(g.shape)}")
    for value, name, like, like_name in ((a, a_name, f, f_name), (b, b_name, g, g_name)):
        float_tensor(value, name, 2)
        same_device_dtype(value, name, like, like_name)
        if value.shape != f.shape[:2]:
            raise ValueError(f"{name} must have shape (B, C) = {tuple(f.shape[:2])}, got {tuple(value.shape)}")


def structured_attention_args(v, a_ch, a_sp):
    """MATH.md#sab: v (B, C, H, W), a_ch (B, C), a_sp (B, H, W) or (B, 1, H, W). Returns a_sp as (B, H, W)."""
    float_tensor(v, "v", 4)
    B, C, H, W = v.shape
    float_tensor(a_ch, "a_ch", 2)
    same_device_dtype(a_ch, "a_ch", v, "v")
    if a_ch.shape != (B, C):
        raise ValueError(f"a_ch must have shape (B, C) = ({B}, {C}), got {tuple(a_ch.shape)}")
    tensor(a_sp, "a_sp")
    if a_sp.dim() == 4 and a_sp.shape[1] == 1:
        a_sp = a_sp.squeeze(1)
    float_tensor(a_sp, "a_sp", 3)
    same_device_dtype(a_sp, "a_sp", v, "v")
    if a_sp.shape != (B, H, W):
        raise ValueError(f"a_sp must have shape (B, H, W) = ({B}, {H}, {W}), got {tuple(a_sp.shape)}")
    return a_sp


def pod_pair(new, old, names=("new", "old")):
    """MATH.md#local-pod: new (B, C, H, W), old (B, Co, H, W) with 1 <= Co <= C (Co < C: logits whose
    new classes are merged into the background), one dtype and device; old a constant."""
    new_name, old_name = names
    float_tensor(new, new_name, 4)
    float_tensor(old, old_name, 4)
    same_device_dtype(old, old_name, new, new_name)
    B, C, H, W = new.shape
    if old.shape[0] != B or old.shape[2:] != new.shape[2:]:
        raise ValueError(
            f"{old_name} must have shape (B, C, H, W) = ({B}, {C}, {H}, {W}) like {new_name}, got {tuple(old.shape)}"
        )
    if not 1 <= old.shape[1] <= C:
        raise ValueError(
            f"{old_name} has {old.shape[1]} channels; need 1 <= {old.shape[1]} <= {C} ({new_name}'s channels)"
        )
    if old.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{old_name} (the old model's features) must not require grad: compute it under torch.no_grad() "
            f"or pass {old_name}.detach(); the distillation treats it as a constant"
        )


def pod_scales(scales, new, name="scales", new_name="new", most=8):
    """A non-empty sequence of at most ``most`` ints, each in [1, min(H, W)] of ``new``; returned as a tuple."""
    if isinstance(scales, (str, bytes)) or not hasattr(scales, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(scales).__name__}")
    H, W = new.shape[2:]
    values = tuple(integer(s, f"{name}[{i}]") for i, s in enumerate(scales))
    if not 1 <= len(values) <= most:
        raise ValueError(f"{name} must hold 1 to {most} scales, got {len(values)}")
    for i, s in enumerate(values):
        if not 1 <= s <= min(H, W):
            raise ValueError(
                f"{name}[{i}]={s} must be in [1, min(H, W)] = [1, {min(H, W)}] for {new_name} of shape "
                f"{tuple(new.shape)}: a cell of ({H}//{s}) x ({W}//{s}) pixels would be empty"
            )
    return values


# ---- entropy pseudo-labels (MATH.md#pseudo-labels) ----


def step_labels(t, y, ignore_index, size, name="t", y_name="y"):
    """Labels (B, H, W) of the step's label space: integers >= 0 or ignore_index; (H, W) = size if given."""
    tensor(t, name)
    if t.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be an int64, int32 or uint8 tensor of class indices, got {t.dtype}")
    pixels = pixel_shape(y, size)
    if t.shape != pixels:
        raise ValueError(
            f"{name} must have shape (B, H, W) = {pixels}, got {tuple(t.shape)}{size_hint(t, name, y, size)}"
        )
    same_device(t, name, y, y_name)
    negative = (t < 0) & ~ignored(t, ignore_index)
    if torch.compiler.is_compiling():  # as in labels(): the compiled graph asserts instead
        torch._assert_async(torch.logical_not(negative.any()), f"{name} has labels < 0 that are not ignore_index")
    elif bool(negative.any()):
        raise ValueError(f"{name} has label {t[negative][0].item()} < 0 that is not ignore_index={ignore_index}")
    return t


def thresholds(value, y, name="thresholds", y_name="y"):
    """Per-class thresholds (Co,), any float dtype; returned as contiguous float32."""
    tensor(value, name)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    old_classes = y.shape[1]
    if value.shape != (old_classes,):
        raise ValueError(
            f"{name} must have one threshold per old class, shape (Co,) = ({old_classes},) for {y_name} "
            f"with {old_classes} channels, got {tuple(value.shape)}"
        )
    same_device(value, name, y, y_name)
    return value.detach().to(torch.float32).contiguous()


def histogram(value, name="hist"):
    """An (Co, bins) histogram of counts (an integer or float tensor, values >= 0)."""
    tensor(value, name)
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer or floating tensor of counts, got {value.dtype}")
    if value.dim() != 2 or value.shape[1] < 1:
        raise ValueError(f"{name} must be (Co, bins) with bins >= 1, got shape {tuple(value.shape)}")
    if bool((value < 0).any()):
        raise ValueError(f"{name} must hold counts >= 0, got {value[value < 0][0].item()}")
    return value


# ---------------------------------------------------------------------------------------------
# Sigmoid losses with composed targets (MATH.md#sigmoid-losses)
# ---------------------------------------------------------------------------------------------


def channel_weights(value, x, name):
    """pos_weight / channel_weight: None, a number for every channel, or (C,) floating values, all
    finite; returned as a constant (C,) tensor in x's accumulation dtype, or None."""
    if value is None:
        return None
    C = x.shape[1]
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.full((C,), finite_float(value, name), dtype=accumulation_dtype(x.dtype), device=x.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be None, a number or a (C,) tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.shape != (C,):
        raise ValueError(f"{name} must have shape (C,) = ({C},), one value per channel of x, got {tuple(value.shape)}")
    same_device(value, name, x, "x")
    if value.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} must not require grad: the loss has no gradient for it")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite")
    return value.to(accumulation_dtype(x.dtype)).contiguous()


def sigmoid_layout(negative_channels, label_channels_from, x):
    """0 <= negative_channels <= label_channels_from <= C (MATH.md#sigmoid-notation)."""
    C = x.shape[1]
    negative_channels = integer(negative_channels, "negative_channels", 0, C)
    label_channels_from = integer(label_channels_from, "label_channels_from", 0, C)
    if label_channels_from < negative_channels:
        raise ValueError(
            f"label_channels_from={label_channels_from} is below negative_channels={negative_channels}: "
            "channels [0, negative_channels) are negatives, [negative_channels, label_channels_from) soft targets"
        )
    return negative_channels, label_channels_from


def pseudo_threshold(value):
    """None (no pseudo-labels) or a threshold on the old model's sigmoid score in [0, 1]."""
    if value is None:
        return None
    value = finite_float(value, "pseudo_threshold")
    if not 0 <= value <= 1:
        raise ValueError(f"pseudo_threshold must be in [0, 1] (a sigmoid score), got {value}")
    return value
