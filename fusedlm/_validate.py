"""Input validation shared by every backend: one place, one wording.

Every failure names the argument and says what was expected and what was given. TypeError for a
value of the wrong kind (not a tensor, an integer dtype), ValueError for a wrong shape, rank, device
or a mismatch between arguments.
"""
import os

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


def probability(name, p):
    """A dropout probability: a number in [0, 1); returned as a float."""
    p = number(name, p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {p}")
    return p


def check_varlen_values(device):
    """Whether to check the values of cu_seqlens / max_seqlen: always on CPU (free), on a GPU only with
    env FUSEDLM_CHECK_VARLEN=1, because reading the verdict back costs one device synchronisation.
    Unchecked, bad offsets give garbage rows (or reads out of bounds), not an error."""
    return device.type == "cpu" or os.environ.get("FUSEDLM_CHECK_VARLEN", "0") == "1"


def cu_seqlens(name, cu, total):
    """int32 (B + 1,) offsets of packed sequences, from 0 to ``total`` (values checked where that is free)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name}: expected a 1-D tensor of B + 1 >= 1 offsets, got shape {tuple(cu.shape)}")
    if check_varlen_values(cu.device):
        # Reduced on cu's device to one flag: a single small read back, whatever B is.
        bad = (cu[0] != 0) | (cu[-1] != total) | (cu[1:] < cu[:-1]).any()
        if bool(bad):
            shown = cu.tolist() if cu.numel() <= 32 else f"{cu[:16].tolist()} ... {cu[-16:].tolist()}"
            raise ValueError(f"{name}: expected non-decreasing offsets from 0 to {total} (the packed length), "
                             f"got {shown}")


def max_seqlen(name, value, cu):
    """A Python int >= 0, at least the longest sequence of ``cu`` (checked where that is free)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{name}: expected a Python int >= 0, got {value!r}")
    if check_varlen_values(cu.device) and cu.shape[0] > 1:
        longest = int((cu[1:] - cu[:-1]).max().item())
        if longest > value:
            raise ValueError(f"{name}: expected at least the longest sequence, {longest}, got {value}")


def dropout_seed(dropout_p, device):
    """A dropout seed drawn from torch's generator of ``device`` (torch.manual_seed reproduces it), made
    on the device as a tensor: no host-to-device copy, no sync, no graph break."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def index_tensor(name, t, ndim):
    """An int32 tensor of rank ``ndim`` (sequence lengths, block tables)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {t.dim()}-D with shape {tuple(t.shape)}")


def choice(name, value, options):
    """One of ``options`` (strings); returns it."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value
