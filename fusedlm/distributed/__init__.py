"""Context parallelism: attention over a sequence split across the ranks of a torch.distributed group.

    context_parallel_attention(q, k, v, *, group=None, is_causal=False, scale=None, layout="zigzag",
                               strategy="ring", backend=None)
    context_parallel_varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, group=None, causal=False, scale=None,
                                      backend=None)

Each rank passes its shard and gets its shard of the output, equal to fusedlm's attention over the whole
sequence; autograd gives each rank the gradients of its shard (the backward communicates as well). Every
block attention is fusedlm's own public attention (``backend`` passed through: torch, triton, ...) with
``return_lse=True``. Communication is torch.distributed's (NCCL on GPUs, gloo on CPU): batch_isend_irecv
around the ring (_ring.py), all_to_all_single for Ulysses (_ulysses.py); which rank holds which tokens is in
layout.py, what it costs in plan.py. Importing this module needs no initialised process group; calling it does.
"""
import torch
import torch.distributed as dist

from .. import _validate
from ..ops.attention import scaled_dot_product_attention, varlen_attention
from ._comm import Transport
from ._ring import DenseBlocks, RingAttention, VarlenBlocks, resolve_backend
from ._ulysses import ulysses_attention
from .layout import LAYOUTS, shard, shard_positions, shard_varlen, varlen_shard_indices, varlen_shard_positions
from .training import global_mean, shard_lm_batch

STRATEGIES = ("ring", "ulysses")

__all__ = ["context_parallel_attention", "context_parallel_varlen_attention", "shard", "shard_varlen",
           "shard_positions", "varlen_shard_indices", "varlen_shard_positions", "shard_lm_batch", "global_mean",
           "LAYOUTS", "STRATEGIES"]


def _transport(group):
    if dist.is_available() and group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("group: expected a process group this rank belongs to, got GroupMember.NON_GROUP_MEMBER "
                         "(what torch.distributed.new_group returns on a rank outside its ranks)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: expected an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group first), got none initialised")
    return Transport(group)


def _check_qkv(q, k, v, ndim, seq_dim, head_dim):
    """Shapes of one rank's q, k, v; returns (H, Hkv, n, E) with n the local tokens."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(name, t, ndim=ndim)
    _validate.same_dtype(q=q, k=k, v=v)
    _validate.same_device(q=q, k=k, v=v)
    H, n, E, Hkv = q.shape[head_dim], q.shape[seq_dim], q.shape[-1], k.shape[head_dim]
    want_k = list(q.shape)
    want_k[head_dim] = Hkv
    _validate.shape("k", k, want_k, "q's with Hkv heads")
    want_v = list(want_k)
    want_v[-1] = v.shape[-1]
    _validate.shape("v", v, want_v, "k's up to the head dim")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"k: expected a number of heads dividing q's {H} (GQA), got {Hkv}")
    return H, Hkv, n, E


def _scale(scale, E):
    return E ** -0.5 if scale is None else _validate.number("scale", scale)


def context_parallel_attention(q, k, v, *, group=None, is_causal=False, scale=None, layout="zigzag", strategy="ring",
                               backend=None):
    """Attention over a sequence of L tokens split across the W ranks of ``group``.

    q (B, H, L/W, E), k (B, Hkv, L/W, E), v (B, Hkv, L/W, Ev): this rank's shard (float16 / bfloat16 / float32,
    float64 on the torch backend); GQA whenever H % Hkv == 0. Every rank passes shards of the same shapes.
    layout: which tokens a rank holds. "contiguous": rank r holds positions [r L/W, (r+1) L/W). "zigzag" (L
    divisible by 2W): the sequence cut into 2W chunks, rank r holds chunk r followed by chunk 2W-1-r, which gives
    every rank the same causal work (fusedlm.distributed.shard cuts a full tensor so).
    strategy: "ring": the K/V shards pass around the ring (batch_isend_irecv, the next step's transfer posted
    before the current block computes), partial results merged through their log-sum-exp, fully masked causal
    steps skipped; the backward sends the K/V round again with the dK/dV accumulators. "ulysses": all-to-all
    from sequence shards to head shards (H divisible by W; K/V heads repeated when Hkv is not), one local
    attention over the whole sequence, all-to-all back.
    is_causal: query position i sees key positions j <= i (global positions). scale: default 1/sqrt(E).
    backend: the fusedlm backend of every block attention (None: the process default).
    Returns this rank's shard of the output, (B, H, L/W, Ev) in q's dtype; equal to
    ``fusedlm.scaled_dot_product_attention`` over the gathered sequence, and with W = 1 it is that call.
    """
    E = _check_qkv(q, k, v, 4, 2, 1)[3]
    _validate.flag("is_causal", is_causal)
    _validate.choice("layout", layout, LAYOUTS)
    _validate.choice("strategy", strategy, STRATEGIES)
    scale = _scale(scale, E)
    transport = _transport(group)
    return _dense(q, k, v, transport, is_causal, scale, layout, strategy, backend)


def _dense(q, k, v, transport, is_causal, scale, layout, strategy, backend):
    """context_parallel_attention on a given transport (a real one, or plan.py's dry run)."""
    W, H, n = transport.world, q.shape[1], q.shape[2]
    for name, t in (("q", q), ("k", k), ("v", v)):
        transport.check_device(name, t)
    if W == 1:
        return scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=H != k.shape[1],
                                            backend=backend)
    if layout == "zigzag" and n % 2:
        raise ValueError(f"q: expected a shard length divisible by 2 (layout='zigzag' cuts the sequence into 2W = "
                         f"{2 * W} chunks, so L = {W} x the shard length must be divisible by {2 * W}), got {n}")
    if strategy == "ulysses" and H % W:
        raise ValueError(f"q: expected a number of heads divisible by the group size {W} (strategy='ulysses' "
                         f"gives each rank H / W heads), got {H}")
    # the blocks' backend chosen (or refused) here, on every rank alike, before anything is sent
    backend = resolve_backend("scaled_dot_product_attention", q, k, v, backend)
    if strategy == "ulysses":
        return ulysses_attention(q, k, v, transport, is_causal, layout, scale, backend)
    return RingAttention.apply(q, k, v, DenseBlocks(n, scale, backend), transport, is_causal, layout)


def context_parallel_varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, group=None, causal=False, scale=None,
                                      backend=None):
    """Attention over packed sequences (no padding) split across the W ranks of ``group``, ring strategy.

    q (total/W, H, E), k (total/W, Hkv, E), v (total/W, Hkv, Ev): this rank's tokens. Each sequence (every length
    divisible by 2W) is cut into 2W chunks and rank r holds, sequence after sequence, its chunks r and 2W-1-r
    (fusedlm.distributed.shard_varlen cuts a full packed tensor so); the local offsets are cu_seqlens / W.
    cu_seqlens: int32 (N + 1,), the *global* offsets (from 0 to total), the same on every rank.
    max_seqlen: a Python int, at least the longest global sequence. causal: query i of a sequence sees its keys
    j <= i (q and k lengths are equal, so top-left and bottom-right alignment agree). scale: default 1/sqrt(E).
    The lengths are checked on CPU, and on a GPU with FUSEDLM_CHECK_VARLEN=1 (a read back), as varlen_attention.
    Returns this rank's output (total/W, H, Ev) in q's dtype, equal to ``fusedlm.varlen_attention`` over the
    whole packed batch; with W = 1 it is that call.
    """
    _, _, n, E = _check_qkv(q, k, v, 3, 0, 1)
    _validate.flag("causal", causal)
    scale = _scale(scale, E)
    _validate.index_tensor("cu_seqlens", cu_seqlens, 1)  # kinds first; the values need W, from the group
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen: expected a Python int, got {type(max_seqlen).__name__} {max_seqlen!r}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen: expected a Python int >= 0, got {max_seqlen}")
    transport = _transport(group)
    W = transport.world
    _validate.cu_seqlens("cu_seqlens", cu_seqlens, n * W)
    _validate.same_device(q=q, cu_seqlens=cu_seqlens)
    _validate.max_seqlen("max_seqlen", max_seqlen, cu_seqlens)
    return _varlen(q, k, v, cu_seqlens, max_seqlen, transport, causal, scale, backend)


def _varlen(q, k, v, cu_seqlens, max_seqlen, transport, causal, scale, backend):
    W = transport.world
    for name, t in (("q", q), ("k", k), ("v", v)):
        transport.check_device(name, t)
    if W == 1:
        return varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal, scale=scale,
                                backend=backend)
    if _validate.check_varlen_values(cu_seqlens.device):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if bool((lengths % (2 * W) != 0).any()):
            raise ValueError(f"cu_seqlens: expected every sequence length divisible by 2W = {2 * W} (each sequence "
                             f"is cut into 2W chunks), got lengths {lengths.tolist()}")
    backend = resolve_backend("varlen_attention", q, k, v, backend)  # before anything is sent
    cu_local = torch.div(cu_seqlens, W, rounding_mode="floor").to(torch.int32)
    blocks = VarlenBlocks(cu_local, max_seqlen // W, q.shape[0], scale, backend)
    return RingAttention.apply(q, k, v, blocks, transport, causal, "zigzag")
