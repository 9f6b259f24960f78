"""Peak memory an op *allocates*, measured on the CPU without running a kernel.

The host launchers of the Triton kernels run on ``device="meta"`` tensors (shapes and strides, no data)
with a launch function that does nothing, under ``LiveBytes``, a TorchDispatchMode that sees every aten
op below autograd. What is counted: the storage of each fresh output (a schema return without alias_info:
not a view, not in-place), once per storage, from its creation until the last tensor on it dies (a
finalizer on the tensor object: PyTorch keeps a tensor's Python object alive while its TensorImpl lives,
and a view keeps its base alive). Not counted: tensors made before the mode (the inputs), the kernels'
registers / shared memory, library workspaces (cuBLAS), the CUDA caching allocator's rounding and
fragmentation, and temporaries a C++ kernel makes without dispatching an op.
"""
import math
import weakref

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

MiB = 2**20


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as mem: ...``, then mem.peak: the most bytes alive at once of the storages
    allocated inside; mem.current: those still alive (kept up to date after the block, too)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live = {}  # storage id -> [tracked tensors on it, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rets = func._schema.returns
        outs = out if len(rets) > 1 else (out,)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for ret, o in zip(rets, outs):
            if ret.alias_info is None:  # a view or an in-place result allocates nothing
                for t in tree_leaves(o):
                    if isinstance(t, torch.Tensor):
                        self._track(t, inputs)
        return out

    def _track(self, t, inputs):
        key = t.untyped_storage()._cdata
        if key in self._live:  # e.g. aten._unsafe_view of a fresh mm output (matmul): same storage
            self._live[key][0] += 1
        elif key in inputs:  # an untracked input passed through as a "new" result: nothing allocated
            return
        else:
            nbytes = t.untyped_storage().nbytes()
            self._live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)  # must not hold t itself

    def _release(self, key):
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[key]


def _skip(kernel, grid, *args, **meta):
    """The launch function: the kernels write into buffers the launcher allocated, so skipping them
    changes nothing the tracker sees."""


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _inputs(B, H, S, D, dtype, packed):
    """q, k, v, dout (dense (B, H, S, D) or packed (B S, H, D)) and cu_seqlens (B sequences of S) or None."""
    shape = (B * S, H, D) if packed else (B, H, S, D)
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device="meta") if packed else None
    return [_meta(shape, dtype) for _ in range(4)], cu


def flash_peak_bytes(B, H, S, D, dtype=torch.bfloat16, packed=False):
    """Peak bytes fusedlm's flash attention (kernels/attention.py, attention_backward.py) allocates over
    forward + backward: non-causal, no mask, no dropout, no gradient reaching lse. out and lse stay alive
    through the backward (autograd saves them); dq, dk, dv and the backward's temporaries (delta) count too."""
    from fusedlm.kernels import attention as A
    from fusedlm.kernels import attention_backward as AB

    (q, k, v, do), cu = _inputs(B, H, S, D, dtype, packed)
    geo = (None, None, cu, cu, S, S, 1.0 / math.sqrt(D), False, False, 0.0, None)  # ... causal, bottom_right, p, seed
    with LiveBytes() as mem:
        out, lse = A.attention_fwd(_skip, q, k, v, *geo)
        grads = AB.attention_bwd(_skip, do, None, q, k, v, out, lse, *geo)
        del out, lse, grads
    return mem.peak


def deberta_peak_bytes(B, H, S, D, dtype=torch.bfloat16, span=256, terms=("c2p", "p2c"), packed=False):
    """Peak bytes fusedlm's DeBERTa attention (kernels/deberta.py) allocates over forward + backward, with
    pos_key / pos_query (H, 2 span, D) for the terms asked for and both their gradients; no padding, no
    dropout. Counted as flash_peak_bytes, plus whatever the DeBERTa launchers add (the band kernel's sums,
    the runs' per-program sums, dpos_*). The relative index table (2 S - 1 int32) is an input; the buckets
    are DeBERTa-v3's (position_buckets = span, max_relative_positions = 2 span)."""
    from fusedlm.kernels import deberta as K
    from fusedlm.ops.deberta import relative_band

    (q, k, v, do), cu = _inputs(B, H, S, D, dtype, packed)
    pos_key = _meta((H, 2 * span, D), dtype) if "c2p" in terms else None
    pos_query = _meta((H, 2 * span, D), dtype) if "p2c" in terms else None
    rel_idx = _meta((2 * S - 1,), torch.int32)
    band = relative_band(span, 2 * span)
    scale = 1.0 / math.sqrt(D * (1 + len(terms)))
    geo = (None, cu, rel_idx, S, scale, 0.0, None)  # key padding, cu_seqlens, table, max_seqlen, scale, p, seed
    # the per-program buffers are sized by the block shapes and the program count: take an H100 / H200's
    # (132 SMs, two programs each), not the interpreter's
    from fusedlm.kernels import deberta_backward as KB

    configs, programs = K.block_config, KB.num_programs
    K.block_config = lambda d, dtype, device, *args, **kw: configs(d, dtype, torch.device("cuda"), *args, **kw)
    KB.num_programs = lambda device, rows: max(1, min(rows, 2 * 132))
    try:
        return _deberta_peak(K, KB, q, k, v, do, pos_key, pos_query, geo, band)
    finally:
        K.block_config, KB.num_programs = configs, programs


def _deberta_peak(K, KB, q, k, v, do, pos_key, pos_query, geo, band):
    with LiveBytes() as mem:
        out, lse = K.deberta_fwd(_skip, q, k, v, pos_key, pos_query, *geo, band)
        grads = KB.deberta_bwd(_skip, do, None, q, k, v, pos_key, pos_query, out, lse, *geo,
                              pos_key is not None, pos_query is not None, band)
        del out, lse, grads
    return mem.peak


def budget_bytes(H, D, span=256):
    """Issue 8's allowance over flash attention, H * 2 span * D float32s (the size of one float32 position
    gradient: the O(H * 2 span * D) term of the target, with a constant of 4 bytes)."""
    return H * 2 * span * D * 4


def lce_peak_bytes(N, V, D, dtype=torch.bfloat16):
    """Peak bytes fusedlm.linear_cross_entropy's Triton path (ops/cross_entropy.py, kernels/cross_entropy.py)
    allocates over forward + backward for hidden (N, D), weight (V, D), no bias, every target counted: the
    per-token loss and lse, the token order, dh and dW, and the backward's chunk buffers (under CHUNK_BYTES).
    The backward runs every token chunk (the real one stops at the tokens that count: never more)."""
    from fusedlm.kernels import attention as KA
    from fusedlm.kernels import cross_entropy as K
    from fusedlm.ops import cross_entropy as O

    hidden, weight = _meta((N, D), dtype), _meta((V, D), dtype)
    target = _meta((N,), torch.int64)
    with LiveBytes() as mem:
        perm, n_valid = O._order(target, -100)
        loss, lse = K.lce_fwd(_skip, hidden, weight, None, target, perm, n_valid, None, 0.0, 0.0,
                              KA.precision(hidden))
        g = torch.empty_like(loss)

        def dz_fn(r0, nc, v0, vc):
            dz = torch.empty(nc, vc, device=hidden.device, dtype=hidden.dtype)
            K.lce_dz(_skip, dz, hidden, weight, None, target, perm, n_valid, lse, g, r0, v0, None, 0.0, 0.0,
                     KA.precision(hidden))
            return dz
        grads = O._backward(dz_fn, hidden, weight, None, perm, n_valid, (True, True, False), hidden.dtype,
                            skip_ignored=False)
        del loss, lse, g, grads, perm, n_valid
    return mem.peak


def logits_ce_peak_bytes(N, V, D, dtype=torch.bfloat16):
    """Peak bytes the logits path ``F.cross_entropy((hidden @ weight.T).float(), target)`` allocates over
    forward + backward (autograd on meta tensors, counted as lce_peak_bytes): the (N, V) logits in dtype and
    in float32, the saved log-softmax, its gradient, dh and dW."""
    import torch.nn.functional as F

    hidden = _meta((N, D), dtype).requires_grad_()
    weight = _meta((V, D), dtype).requires_grad_()
    target = _meta((N,), torch.int64)
    with LiveBytes() as mem:
        loss = F.cross_entropy((hidden @ weight.T).float(), target)
        grads = torch.autograd.grad(loss, [hidden, weight])
        del loss, grads
    return mem.peak
