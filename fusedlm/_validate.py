"""Input validation shared by every backend: one place, one wording.

Every failure names the argument and says what was expected and what was given. TypeError for a
value of the wrong kind (not a tensor, an integer dtype), ValueError for a wrong shape, rank, device
or a mismatch between arguments.
"""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the fused kernels compute in


def tensor(name, t, *, ndim=None, min_ndim=None, optional=False):
    """Check that ``t`` is a floating-point tensor (or None when ``optional``) of the given rank."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def same_device(**tensors):
    """All given (non-None) tensors on one device; returns that device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} (the device of {first_name}), got {t.device}")
    return first.device


def same_dtype(**tensors):
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} (the dtype of {first_name}), got {t.dtype}")


def shape(name, t, expected, what=""):
    """``t.shape`` equals ``expected``; ``what`` says where the expectation comes from."""
    if t is not None and tuple(t.shape) != tuple(expected):
        why = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{why}, got {tuple(t.shape)}")


def number(name, value, *, positive=False, non_negative=False):
    """A real Python/NumPy number (not a tensor, not a bool); returns it as a Python float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np

            if isinstance(value, (np.floating, np.integer)):
                value = float(value)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}") from None
    value = float(value)
    if value != value:
        raise ValueError(f"{name}: expected a number, got nan")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    if non_negative and not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value}")
    return value


def bool_mask(name, t):
    """A bool mask tensor (True = real token)."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
        what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a bool tensor (True = real token), got {what}")


def flag(name, value):
    """A Python bool (not a tensor, not an int)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def kernel_dtype_reason(*tensors):
    """Why a fused kernel cannot take these tensors (float64), or None."""
    for t in tensors:
        if t is not None and t.dtype not in KERNEL_DTYPES:
            return f"the fused kernels compute float16, bfloat16 and float32, got {t.dtype} (use backend='torch')"
    return None


def window(name, value):
    """None, or a local-attention window (left, right): two Python ints >= -1 (-1 = unbounded on that side).
    Returns a tuple, or None."""
    if value is None:
        return None
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in value))
    if not ok:
        raise ValueError(f"{name}: expected None or a pair (left, right) of ints >= -1 (-1 = unbounded), got {value!r}")
    return tuple(value)
