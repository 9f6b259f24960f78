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


def register_op(name, fn, mutates_args=()):
    """Register ``fn`` (annotated Python function, returns new tensors only) as op ``fusedlm::name``;
    ``mutates_args``: the names of the arguments it writes in place (a KV cache)."""
    qualname = f"fusedlm::{name}"
    if triton_interpret():
        op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
        op.register_fake(fn)
    else:
        op = torch.library.triton_op(qualname, fn, mutates_args=mutates_args)
    return op


# CUDA's grid limits: axis 0 up to 2^31 - 1 blocks, axes 1 and 2 up to 65535. The launchers put every
# unbounded count (rows, batch x heads) on axis 0; check_grid turns a breach into a clear error instead of
# a launch failure.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(grid):
    """Raise ValueError when a launch grid passes CUDA's limits; returns the grid."""
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"launch grid {tuple(grid)}: axis {axis} has {size} blocks, CUDA allows at most {limit} "
                             f"(input too large for one launch)")
    return grid


def launch_device(args):
    """The CUDA device of a launch: that of its first CUDA tensor argument, or None (CPU, interpreter)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type == "cuda":
            return a.device
    return None


def launch(kernel, grid, *args, **meta):
    """Launch a Triton kernel from inside a registered op's body.

    Triton launches on the *current* CUDA device; with the tensors on cuda:1 and cuda:0 current that
    would run in the wrong context, so eager launches switch to the tensors' device first (torch's
    own ops do the same with a device guard). Fake tensors (tracing) launch nothing and need no guard.
    """
    if not callable(grid):
        check_grid(grid)
    if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        if triton_interpret():
            return  # fake kernel run under the interpreter: shapes only, nothing to compute
        torch.library.wrap_triton(kernel)[grid](*args, **meta)  # traced: the graph's own guard applies
        return
    runner = kernel[grid] if triton_interpret() else torch.library.wrap_triton(kernel)[grid]
    device = launch_device(args)
    if device is None or device.index is None or device.index == torch.cuda.current_device():
        runner(*args, **meta)
        return
    with torch.cuda.device(device):
        runner(*args, **meta)


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
