"""deberta_attention: DeBERTa's disentangled attention. Validation, dispatch, the Triton ops with their
autograd, the relative-position buckets and the torch reference.

The kernels and the math are in fusedlm/kernels/deberta.py. Three ops are registered:
fusedlm::deberta_relative_index (the int32 table idx(d) = clamp(bucket(d) + span, 0, 2 span - 1) over
relative distances d = -(S-1)..(S-1), computed on the CPU and copied to the device; an opaque op so that
torch.compile never re-derives the buckets with another logarithm), and for the Triton backend
fusedlm::deberta_fwd -> (out, lse) and fusedlm::deberta_bwd -> (dq, dk, dv, dpos_key, dpos_query);
autograd on the first calls the second. The torch backend is deberta_attention_ref below.

Buckets. make_log_bucket_position below is Hugging Face's function, operation for operation and in the
same float32 arithmetic (tests/test_deberta.py checks it equals transformers' for every distance up to
well past 8192), so that the index equals the reference code's bit for bit: a ceil of a value a hair
off an integer could go the other way in another implementation. transformers is not imported here.
The table is always built on the CPU: the buckets are those of Hugging Face's function run on the CPU.

Dropout on the attention probabilities is not implemented: ``dropout_p`` other than 0 raises ValueError.
"""
import functools
import math
from typing import Optional

import torch

from .. import _backend, _validate

HEAD_DIMS = (16, 256)  # head dims the fused kernels take


# ---------------------------------------------------------------------------------------------------
# Relative positions


def make_log_bucket_position(relative_pos, bucket_size: int, max_position: int):
    """Hugging Face's make_log_bucket_position (transformers.models.deberta_v2), same ops, same float32
    math: distances below bucket_size // 2 in magnitude stay as they are, longer ones get log buckets
    up to bucket_size - 1 at max_position - 1 (and past it beyond; the caller clamps)."""
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where((relative_pos < mid) & (relative_pos > -mid),
                          torch.tensor(mid - 1).type_as(relative_pos), torch.abs(relative_pos))
    ratio = torch.tensor((max_position - 1) / mid, dtype=torch.float32)
    log_pos = torch.ceil(torch.log(abs_pos.to(torch.float32) / mid) / torch.log(ratio) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign)


def attention_span(position_buckets: int, max_relative_positions: int) -> int:
    """span: pos_key / pos_query have 2 * span rows."""
    return position_buckets if position_buckets > 0 else max_relative_positions


@functools.lru_cache(maxsize=32)
def _index_table_cpu(seq_len: int, position_buckets: int, max_relative_positions: int) -> torch.Tensor:
    span = attention_span(position_buckets, max_relative_positions)
    d = torch.arange(-(seq_len - 1), seq_len, dtype=torch.long)
    if position_buckets > 0:
        d = make_log_bucket_position(d, position_buckets, max_relative_positions).to(torch.long)
    return torch.clamp(d + span, 0, 2 * span - 1).to(torch.int32)


@torch.library.custom_op("fusedlm::deberta_relative_index", mutates_args=())
def relative_index_table(seq_len: int, position_buckets: int, max_relative_positions: int,
                         device: torch.device) -> torch.Tensor:
    """int32 (2 seq_len - 1,): entry d + seq_len - 1 is idx(d) = clamp(bucket(d) + span, 0, 2 span - 1),
    for query i and key j at distance d = i - j. Cached per size on the CPU, copied to ``device``."""
    table = _index_table_cpu(seq_len, position_buckets, max_relative_positions)
    return table.to(device, copy=True)


@relative_index_table.register_fake
def _(seq_len, position_buckets, max_relative_positions, device):
    return torch.empty(max(2 * seq_len - 1, 0), dtype=torch.int32, device=device)


def relative_index(seq_len, position_buckets, max_relative_positions, device):
    """(S, S) int64 matrix idx(i, j) (the reference's; the kernels read the 1-D table)."""
    table = relative_index_table(seq_len, position_buckets, max_relative_positions, device)
    pos = torch.arange(seq_len, device=device)
    return table[(pos[:, None] - pos[None, :]) + seq_len - 1].long()


# ---------------------------------------------------------------------------------------------------
# Reference (the torch backend)


def deberta_attention_ref(query, key, value, pos_key=None, pos_query=None, key_padding_mask=None,
                          position_buckets=256, max_relative_positions=512):
    """The textbook computation in float32 (float64 for float64 input), an (S, S) score matrix, returned
    in query's dtype. A query row with no real key outputs zeros."""
    ct = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = query.to(ct), key.to(ct), value.to(ct)
    B, H, S, D = q.shape
    terms = (pos_key is not None) + (pos_query is not None)
    scores = q @ k.transpose(-1, -2)
    if terms:
        idx = relative_index(S, position_buckets, max_relative_positions, q.device).expand(B, H, S, S)
    if pos_key is not None:  # c2p_ij = q_i . pos_key[idx(i, j)]
        scores = scores + torch.gather(q @ pos_key.to(ct).transpose(-1, -2), -1, idx)
    if pos_query is not None:  # p2c_ij = k_j . pos_query[idx(i, j)]: gather row j at idx(i, j), transpose
        p2c = k @ pos_query.to(ct).transpose(-1, -2)
        scores = scores + torch.gather(p2c, -1, idx.transpose(-1, -2)).transpose(-1, -2)
    scores = scores / math.sqrt(D * (1 + terms))
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        empty = ~key_padding_mask.any(dim=-1)[:, None, None, None]
        probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v).to(query.dtype)


# ---------------------------------------------------------------------------------------------------
# Triton ops


def _triton_ops():
    """Register fusedlm::deberta_fwd / deberta_bwd once, with autograd."""
    global _fwd_op
    if _fwd_op is not None:
        return _fwd_op
    from fusedlm.kernels import deberta as K

    from .._triton import empty, launch, register_op, unit_stride

    def deberta_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_key: Optional[torch.Tensor],
                    pos_query: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                    rel_idx: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, S, D) q, k, v; (H, 2 span, D) pos_key / pos_query or None -> (out, lse float32 (B, H, S))."""
        return K.deberta_fwd(launch, unit_stride(q), unit_stride(k), unit_stride(v), pos_key, pos_query,
                             key_padding_mask,
                             rel_idx, scale)

    def deberta_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    pos_key: Optional[torch.Tensor], pos_query: Optional[torch.Tensor], out: torch.Tensor,
                    lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], rel_idx: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dq, dk, dv, dpos_key, dpos_query); an empty tensor for an absent position term."""
        dq, dk, dv, dpk, dpq = K.deberta_bwd(launch, unit_stride(do), unit_stride(q), unit_stride(k),
                                             unit_stride(v), pos_key, pos_query,
                                             out, lse, key_padding_mask, rel_idx, scale)

        return (dq, dk, dv, dpk if dpk is not None else empty(q.device, q.dtype),
                dpq if dpq is not None else empty(q.device, q.dtype))

    fwd = register_op("deberta_fwd", deberta_fwd)
    bwd = register_op("deberta_bwd", deberta_bwd)

    def setup_context(ctx, inputs, output):
        q, k, v, pos_key, pos_query, kpm, rel_idx, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, pos_key, pos_query, out, lse, kpm, rel_idx)
        ctx.scale = scale
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse):
        q, k, v, pos_key, pos_query, out, lse, kpm, rel_idx = ctx.saved_tensors
        if dout is None:  # lse is internal: only out carries a gradient
            return (None,) * 8
        dq, dk, dv, dpk, dpq = bwd(dout, q, k, v, pos_key, pos_query, out, lse, kpm, rel_idx, ctx.scale)
        return (dq, dk, dv, dpk if pos_key is not None else None, dpq if pos_query is not None else None,
                None, None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    _fwd_op = fwd
    return fwd


_fwd_op = None


# ---------------------------------------------------------------------------------------------------
# Public function


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


def _head_dim_reason(d):
    lo, hi = HEAD_DIMS
    return None if lo <= d <= hi else f"the fused kernels take head dims {lo}..{hi}, got D={d}"


def deberta_attention(query, key, value, pos_key=None, pos_query=None, *, key_padding_mask=None,
                      position_buckets=256, max_relative_positions=512, backend=None, dropout_p=0.0):
    """DeBERTa-v2/v3 disentangled self-attention (Hugging Face ``DisentangledSelfAttention`` with
    ``relative_attention=True``, dropout off), fused: no (S, S) matrix on the triton backend.

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
    dropout_p: must be 0 (dropout on the probabilities is not implemented).
    Returns (B, H, S, D) in query's dtype. Gradients for query, key, value, pos_key and pos_query.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _validate.tensor(name, t, ndim=4)
    _validate.same_dtype(query=query, key=key, value=value)
    B, H, S, D = query.shape
    _validate.shape("key", key, (B, H, S, D), "that of query")
    _validate.shape("value", value, (B, H, S, D), "that of query")
    span = _check_positions(position_buckets, max_relative_positions)
    for name, t in (("pos_key", pos_key), ("pos_query", pos_query)):
        _validate.tensor(name, t, ndim=3, optional=True)
        if t is not None:
            _validate.same_dtype(query=query, **{name: t})
            which = "position_buckets" if position_buckets > 0 else "max_relative_positions"
            _validate.shape(name, t, (H, 2 * span, D), f"(H, 2*span, D) with span = {which} = {span}")
    if key_padding_mask is not None:
        _validate.bool_mask("key_padding_mask", key_padding_mask)
        _validate.shape("key_padding_mask", key_padding_mask, (B, S), "(batch, sequence length)")
    _validate.same_device(query=query, key=key, value=value, pos_key=pos_key, pos_query=pos_query,
                          key_padding_mask=key_padding_mask)
    if _validate.number("dropout_p", dropout_p) != 0.0:
        raise ValueError(f"dropout_p: deberta_attention has no dropout on the attention probabilities "
                         f"(not implemented); expected 0.0, got {dropout_p}")
    name = _backend.select("deberta_attention", backend, query.device, {
        "triton": _validate.kernel_dtype_reason(query, pos_key, pos_query) or _head_dim_reason(D),
    })
    if name == "torch":
        return deberta_attention_ref(query, key, value, pos_key, pos_query, key_padding_mask, position_buckets,
                                     max_relative_positions)
    terms = (pos_key is not None) + (pos_query is not None)
    rel_idx = relative_index_table(S, position_buckets, max_relative_positions, query.device)
    out, _ = _triton_ops()(query, key, value, pos_key, pos_query, key_padding_mask, rel_idx,
                           1.0 / math.sqrt(D * (1 + terms)))
    return out
