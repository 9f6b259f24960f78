"""deberta_attention and deberta_varlen_attention: DeBERTa's disentangled attention. Validation, dispatch and
the Triton ops with their autograd. The torch backend is fusedlm.reference.deberta_ref / deberta_varlen_ref;
the relative-position buckets (Hugging Face's log buckets, the index table, the bucket runs) are in
fusedlm/_deberta_positions.py, re-exported here.

The kernels and the math are in fusedlm/kernels/deberta.py (Triton) and csrc/deberta.cu (CUDA C++). Per
backend two ops are registered, fusedlm::deberta_fwd -> (out, lse) and fusedlm::deberta_bwd -> (dq, dk, dv,
dpos_key, dpos_query) (the cuda backend's named *_cuda, around fusedlm_C::deberta_fwd / deberta_bwd), serving
dense and packed batches; autograd on the first calls the second (fusedlm::deberta_relative_index, the
bucket table, is registered with the positions).

Dropout on the attention probabilities: as scaled_dot_product_attention (a seed drawn from torch's
generator of the device; the Triton kernels regenerate the Philox mask in the backward).
"""
import math
from typing import Optional

import torch

from .. import _backend, _validate, reference
from .._deberta_positions import (NEVER, attention_span, make_log_bucket_position, relative_band,  # noqa: F401
                                  relative_index, relative_index_table)

HEAD_DIMS = (16, 256)  # head dims the fused kernels take


# ---------------------------------------------------------------------------------------------------
# Triton ops


def _kernels(backend):
    """(fwd, bwd, register) of a backend: its kernels' entry points, and how its ops are registered."""
    if backend == "triton":
        from fusedlm.kernels import deberta as K
        from fusedlm.kernels import deberta_backward as KB

        from .._triton import empty, launch, register_op, unit_stride

        def fwd(q, k, v, pos_key, pos_query, kpm, cu, rel_idx, max_seqlen, scale, dropout_p, seed, band):
            return K.deberta_fwd(launch, unit_stride(q), unit_stride(k), unit_stride(v), unit_stride(pos_key),
                                 unit_stride(pos_query), kpm, cu, rel_idx, max_seqlen, scale, dropout_p, seed, band)

        def bwd(do, dlse, q, k, v, pos_key, pos_query, out, lse, kpm, cu, rel_idx, max_seqlen, scale, dropout_p,
                seed, grad_pk, grad_pq, band):
            dq, dk, dv, dpk, dpq = KB.deberta_bwd(
                launch, unit_stride(do), dlse, unit_stride(q), unit_stride(k), unit_stride(v), unit_stride(pos_key),
                unit_stride(pos_query), out, lse, kpm, cu, rel_idx, max_seqlen, scale, dropout_p, seed, grad_pk,
                grad_pq, band)
            return (dq, dk, dv, dpk if dpk is not None else empty(q.device, q.dtype),
                    dpq if dpq is not None else empty(q.device, q.dtype))

        return fwd, bwd, register_op
    from .. import _cuda

    return _cuda.deberta_fwd, _cuda.deberta_bwd, _cuda.register_op


def _ops(backend):
    """Register a backend's fusedlm::deberta_fwd / deberta_bwd (the cuda backend's: deberta_fwd_cuda /
    deberta_bwd_cuda) once, with autograd. Dense (B, H, S, D) and packed (total, H, D) batches share them:
    cu_seqlens is None for dense ones."""
    if backend in _fwd_ops:
        return _fwd_ops[backend]
    kernel_fwd, kernel_bwd, register_op = _kernels(backend)

    def deberta_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_key: Optional[torch.Tensor],
                    pos_query: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                    cu_seqlens: Optional[torch.Tensor], rel_idx: torch.Tensor, max_seqlen: int, scale: float,
                    dropout_p: float, seed: Optional[torch.Tensor], band: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out like q, lse float32 (B, H, S) or (total, H)). band: relative_band of the buckets."""
        return kernel_fwd(q, k, v, pos_key, pos_query, key_padding_mask, cu_seqlens, rel_idx, max_seqlen, scale,
                          dropout_p, seed, band)

    def deberta_bwd(do: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, pos_key: Optional[torch.Tensor], pos_query: Optional[torch.Tensor],
                    out: torch.Tensor, lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                    cu_seqlens: Optional[torch.Tensor], rel_idx: torch.Tensor, max_seqlen: int, scale: float,
                    dropout_p: float, seed: Optional[torch.Tensor], grad_pos_key: bool, grad_pos_query: bool,
                    band: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dq, dk, dv, dpos_key, dpos_query); an empty tensor for a position gradient not asked for."""
        return kernel_bwd(do, dlse, q, k, v, pos_key, pos_query, out, lse, key_padding_mask, cu_seqlens, rel_idx,
                          max_seqlen, scale, dropout_p, seed, grad_pos_key, grad_pos_query, band)

    fwd = register_op("deberta_fwd", deberta_fwd)
    bwd = register_op("deberta_bwd", deberta_bwd)

    def setup_context(ctx, inputs, output):
        q, k, v, pos_key, pos_query, kpm, cu, rel_idx, max_seqlen, scale, dropout_p, seed, band = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, pos_key, pos_query, out, lse, kpm, cu, rel_idx, seed)
        ctx.args = (max_seqlen, scale, dropout_p)
        ctx.band = band
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse):
        q, k, v, pos_key, pos_query, out, lse, kpm, cu, rel_idx, seed = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 13
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        grad_pk = pos_key is not None and ctx.needs_input_grad[3]
        grad_pq = pos_query is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dpk, dpq = bwd(dout, dlse, q, k, v, pos_key, pos_query, out, lse, kpm, cu, rel_idx, *ctx.args,
                                   seed, grad_pk, grad_pq, ctx.band)
        return (dq, dk, dv, dpk if grad_pk else None, dpq if grad_pq else None) + (None,) * 8

    fwd.register_autograd(backward, setup_context=setup_context)
    _fwd_ops[backend] = fwd
    return fwd


_fwd_ops = {}


def _triton_ops():
    return _ops("triton")


# ---------------------------------------------------------------------------------------------------
# Public functions


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
    return value


def _check_positions(position_buckets, max_relative_positions):
    _check_int("position_buckets", position_buckets)
    _check_int("max_relative_positions", max_relative_positions)
    if position_buckets <= 0:
        if max_relative_positions < 1:
            raise ValueError(f"max_relative_positions: expected >= 1 when position_buckets <= 0 (the span), "
                             f"got {max_relative_positions}")
        return max_relative_positions
    if position_buckets < 2:
        raise ValueError(f"position_buckets: expected <= 0 (no buckets) or >= 2, got {position_buckets}")
    mid = position_buckets // 2
    if max_relative_positions <= mid + 1:  # Hugging Face's log buckets divide by log((max - 1) / mid)
        raise ValueError(f"max_relative_positions: expected > position_buckets // 2 + 1 = {mid + 1} with log "
                         f"buckets, got {max_relative_positions}")
    return position_buckets


def _check_pos(query, heads, head_dim, pos_key, pos_query, position_buckets, max_relative_positions):
    """pos_key / pos_query: None or (H, 2 span, D) in query's dtype."""
    span = _check_positions(position_buckets, max_relative_positions)
    for name, t in (("pos_key", pos_key), ("pos_query", pos_query)):
        _validate.tensor(name, t, ndim=3, optional=True)
        if t is not None:
            _validate.same_dtype(query=query, **{name: t})
            which = "position_buckets" if position_buckets > 0 else "max_relative_positions"
            _validate.shape(name, t, (heads, 2 * span, head_dim), f"(H, 2*span, D) with span = {which} = {span}")


def _cuda_reason(query, head_dim):
    """Why the cuda backend's kernels (csrc/deberta.cu) cannot take this call, or None."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"the cuda DeBERTa kernels take float16 or bfloat16 (tensor cores), got {query.dtype}"
    if not 16 <= head_dim <= 64:
        return f"the cuda DeBERTa kernels take head dims 16..64 (every DeBERTa model's 64 among them), got D={head_dim}"
    return None


def _select(op, backend, query, pos_key, pos_query, head_dim):
    lo, hi = HEAD_DIMS
    dim_reason = None if lo <= head_dim <= hi else f"the fused kernels take head dims {lo}..{hi}, got D={head_dim}"
    return _backend.select(op, backend, query.device, {
        "triton": _validate.kernel_dtype_reason(query, pos_key, pos_query) or dim_reason,
        "cuda": _cuda_reason(query, head_dim),
    })


def deberta_attention(query, key, value, pos_key=None, pos_query=None, *, key_padding_mask=None,
                      position_buckets=256, max_relative_positions=512, dropout_p=0.0, return_lse=False,
                      backend=None):
    """DeBERTa-v2/v3 disentangled self-attention (Hugging Face ``DisentangledSelfAttention`` with
    ``relative_attention=True``), fused: no (S, S) matrix on the triton backend.

    query, key, value: (B, H, S, D), float16 / bfloat16 / float32 (float64 on the torch backend).
    pos_key, pos_query: (H, 2 * span, D) per-head projected relative embeddings (Hugging Face:
    ``key_proj(rel_embeddings)`` / ``query_proj(rel_embeddings)`` with share_att_key, else
    ``pos_key_proj`` / ``pos_query_proj``), span = position_buckets if > 0 else max_relative_positions.
    pos_key enables the content-to-position term, pos_query the position-to-content term; either may be
    None. For query i and key j, idx = clamp(bucket(i - j) + span, 0, 2 span - 1) with Hugging Face's
    log buckets (plain distance when position_buckets <= 0), and

        score_ij = (q_i.k_j + q_i.pos_key[idx] + k_j.pos_query[idx]) / sqrt(D * (1 + #terms)).

    key_padding_mask: bool (B, S), True = real token; padded keys get no attention, a query row with no
    real key outputs zeros (and gets zero gradient). Padded query rows are computed like any other
    (Hugging Face gives them uniform attention: compare on real rows only).
    dropout_p: dropout on the attention probabilities (kept ones scaled by 1 / (1 - p)), seeded from
    torch's generator of the device: the same seed gives the same mask, the backward uses it too.
    return_lse: also return the float32 log-sum-exp of the scaled scores, (B, H, S), -inf for a row with
    no real key; differentiable.
    Returns (B, H, S, D) in query's dtype. Gradients for query, key, value, pos_key and pos_query.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _validate.tensor(name, t, ndim=4)
    _validate.same_dtype(query=query, key=key, value=value)
    B, H, S, D = query.shape
    _validate.shape("key", key, (B, H, S, D), "that of query")
    _validate.shape("value", value, (B, H, S, D), "that of query")
    _check_pos(query, H, D, pos_key, pos_query, position_buckets, max_relative_positions)
    if key_padding_mask is not None:
        _validate.bool_mask("key_padding_mask", key_padding_mask)
        _validate.shape("key_padding_mask", key_padding_mask, (B, S), "(batch, sequence length)")
    _validate.same_device(query=query, key=key, value=value, pos_key=pos_key, pos_query=pos_query,
                          key_padding_mask=key_padding_mask)
    dropout_p = _validate.probability("dropout_p", dropout_p)
    _validate.flag("return_lse", return_lse)
    name = _select("deberta_attention", backend, query, pos_key, pos_query, D)
    if name == "torch":
        return reference.deberta_ref(query, key, value, pos_key, pos_query, key_padding_mask, position_buckets,
                                     max_relative_positions, dropout_p, return_lse)
    out, lse = _run(name, query, key, value, pos_key, pos_query, key_padding_mask, None, S, position_buckets,
                    max_relative_positions, dropout_p)
    return (out, lse) if return_lse else out


def deberta_varlen_attention(q, k, v, pos_key, pos_query, cu_seqlens, max_seqlen, *, position_buckets=256,
                             max_relative_positions=512, dropout_p=0.0, return_lse=False, backend=None):
    """deberta_attention over packed sequences with no padding (FlashAttention's varlen layout).

    q, k, v: (total, H, D); sequence b is rows cu_seqlens[b]:cu_seqlens[b+1] (int32 (B + 1,) offsets from
    0, as for varlen_attention) and attends only within itself, positions i, j counted from its start.
    max_seqlen: Python int, at least the longest sequence. pos_key, pos_query: (H, 2 span, D) or None,
    shared by every sequence. dropout_p, return_lse as in deberta_attention; lse is (total, H).
    Offsets on a CUDA device are trusted (checking them would cost a device sync); on CPU they are checked.
    Returns (total, H, D) in q's dtype; equal to deberta_attention on the padded batch, row for row.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(name, t, ndim=3)
    _validate.same_dtype(q=q, k=k, v=v)
    total, H, D = q.shape
    _validate.shape("k", k, (total, H, D), "that of q")
    _validate.shape("v", v, (total, H, D), "that of q")
    _check_pos(q, H, D, pos_key, pos_query, position_buckets, max_relative_positions)
    _validate.cu_seqlens("cu_seqlens", cu_seqlens, total)
    _validate.same_device(q=q, k=k, v=v, pos_key=pos_key, pos_query=pos_query, cu_seqlens=cu_seqlens)
    _validate.max_seqlen("max_seqlen", max_seqlen, cu_seqlens)
    dropout_p = _validate.probability("dropout_p", dropout_p)
    _validate.flag("return_lse", return_lse)
    name = _select("deberta_varlen_attention", backend, q, pos_key, pos_query, D)
    if name == "torch":
        return reference.deberta_varlen_ref(q, k, v, pos_key, pos_query, cu_seqlens, position_buckets,
                                            max_relative_positions, dropout_p, return_lse)
    out, lse = _run(name, q, k, v, pos_key, pos_query, None, cu_seqlens.contiguous(), max_seqlen,
                    position_buckets, max_relative_positions, dropout_p)
    return (out, lse) if return_lse else out


def _run(backend, q, k, v, pos_key, pos_query, key_padding_mask, cu_seqlens, max_seqlen, position_buckets,
         max_relative_positions, dropout_p):
    """The backend's registered op on a dense (cu_seqlens None) or packed batch -> (out, lse): the bucket table
    of the longest sequence, and the scale 1 / sqrt(D * (1 + number of position terms))."""
    terms = (pos_key is not None) + (pos_query is not None)
    rel_idx = relative_index_table(max_seqlen, position_buckets, max_relative_positions, q.device)
    band = list(relative_band(position_buckets, max_relative_positions))
    return _ops(backend)(q, k, v, pos_key, pos_query, key_padding_mask, cu_seqlens, rel_idx, max_seqlen,
                         1.0 / math.sqrt(q.shape[-1] * (1 + terms)), dropout_p, _validate.dropout_seed(dropout_p, q.device), band)


def deberta_attention_ref(query, key, value, pos_key=None, pos_query=None, key_padding_mask=None,
                          position_buckets=256, max_relative_positions=512):
    """The torch backend (fusedlm.reference.deberta_ref), without dropout: kept for callers of the old name."""
    return reference.deberta_ref(query, key, value, pos_key, pos_query, key_padding_mask, position_buckets,
                                 max_relative_positions)
