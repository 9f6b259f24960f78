"""How a Triton kernel becomes a registered torch op.

On a CUDA device an op is a ``torch.library.triton_op``: its Python body allocates outputs and
launches kernels through ``wrap_triton``, so torch.compile sees the kernels themselves (no graph
break) and the same body, run on fake tensors, is the op's fake (meta) kernel.

Under TRITON_INTERPRET=1 (CPU tests) ``triton.jit`` returns an interpreted function that
``wrap_triton`` cannot trace, so the op is an opaque ``torch.library.custom_op`` instead, with the same
body registered as its fake kernel; ``launch`` skips the kernel on fake tensors there. Both ways the op
has one schema, autograd and a fake kernel, and passes ``torch.library.opcheck``.
"""
import functools

import torch
from torch._subclasses.fake_tensor import is_fake

from ._backend import triton_interpret


def register_op(name, fn):
    """Register ``fn`` (annotated Python function, returns new tensors only) as op ``fusedlm::name``."""
    qualname = f"fusedlm::{name}"
    if triton_interpret():
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fn)
    else:
        op = torch.library.triton_op(qualname, fn, mutates_args=())
    return op


def launch(kernel, grid, *args, **meta):
    """Launch a Triton kernel from inside a registered op's body."""
    if triton_interpret():
        if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            return  # fake kernel run under the interpreter: shapes only, nothing to compute
        kernel[grid](*args, **meta)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def empty(device, dtype=torch.float32):
    """A zero-size placeholder for an output slot that this call does not produce (a new tensor each
    time: an op may not return two aliased outputs)."""
    return torch.empty(0, device=device, dtype=dtype)


def unit_stride(t):
    """``t`` with unit stride along its last dim (the kernels' contract), copied only if needed; None passes."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device, rows):
    """Programs for a persistent row loop: two per SM on a GPU, a handful on the interpreter."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(rows, 2 * _sm_count(index)))
    return max(1, min(rows, 4))
