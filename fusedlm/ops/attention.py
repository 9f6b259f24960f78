"""scaled_dot_product_attention and varlen_attention: validation, dispatch, the Triton ops and autograd.

The kernels and the math are in fusedlm/kernels/attention.py (forward) and attention_backward.py. Two
ops serve the Triton backend, dense and packed alike: fusedlm::attention_fwd -> (out, lse) and
fusedlm::attention_bwd -> (dq, dk, dv); autograd on the first calls the second. The torch backend is fusedlm.reference.sdpa_ref / varlen_ref.
"""
from typing import Optional

import torch

from .. import _backend, _validate, reference

HEAD_DIMS = (16, 256)  # head dims the fused kernels take (E and Ev)


def _triton_ops():
    """Register fusedlm::attention_fwd / attention_bwd once, with autograd."""
    global _fwd_op
    if _fwd_op is not None:
        return _fwd_op
    from fusedlm.kernels import attention as K
    from fusedlm.kernels import attention_backward as KB

    from .._triton import launch, register_op, unit_stride

    def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                      key_padding_mask: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                      cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
                      causal: bool, bottom_right: bool, dropout_p: float, seed: Optional[torch.Tensor],
                      window_left: int = -1, window_right: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (B, H, L, E) or packed (total, H, E) attention -> (out, lse float32); window: -1 = unbounded."""
        return K.attention_fwd(launch, unit_stride(q), unit_stride(k), unit_stride(v), attn_mask, key_padding_mask,
                               unit_stride(cu_seqlens_q), unit_stride(cu_seqlens_k), max_seqlen_q, max_seqlen_k, scale, causal, bottom_right,
                               dropout_p, seed, (window_left, window_right))

    def attention_bwd(do: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                      cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                      max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool, bottom_right: bool,
                      dropout_p: float, seed: Optional[torch.Tensor], window_left: int = -1, window_right: int = -1
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dq, dk, dv); dlse: the gradient reaching lse (None when lse is unused)."""
        return KB.attention_bwd(launch, unit_stride(do), dlse, unit_stride(q), unit_stride(k), unit_stride(v), out,
                                lse, attn_mask, key_padding_mask, unit_stride(cu_seqlens_q), unit_stride(cu_seqlens_k), max_seqlen_q, max_seqlen_k, scale,
                                causal, bottom_right, dropout_p, seed, (window_left, window_right))

    fwd = register_op("attention_fwd", attention_fwd)
    bwd = register_op("attention_bwd", attention_bwd)

    def setup_context(ctx, inputs, output):
        (q, k, v, attn_mask, kpm, cu_q, cu_k, max_q, max_k, scale, causal, bottom_right, dropout_p, seed,
         window_left, window_right) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, seed)
        ctx.args = (max_q, max_k, scale, causal, bottom_right, dropout_p)
        ctx.window = (window_left, window_right)
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, seed = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 16
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        max_q, max_k, scale, causal, bottom_right, dropout_p = ctx.args
        dq, dk, dv = bwd(dout, dlse, q, k, v, out, lse, attn_mask, kpm, cu_q, cu_k, max_q, max_k, scale, causal,
                         bottom_right, dropout_p, seed, *ctx.window)
        return (dq, dk, dv) + (None,) * 13

    fwd.register_autograd(backward, setup_context=setup_context)
    _fwd_op = fwd
    return fwd


_fwd_op = None


def _head_dim_reason(e, ev):
    lo, hi = HEAD_DIMS
    if not (lo <= e <= hi and lo <= ev <= hi):
        return f"the fused kernels take head dims {lo}..{hi}, got E={e}, Ev={ev}"
    return None


def _triton_reason(tensors, e, ev, attn_mask):
    return (_validate.kernel_dtype_reason(*tensors) or _head_dim_reason(e, ev)
            or ("the fused kernels do not differentiate attn_mask (use backend='torch')"
                if attn_mask is not None and attn_mask.requires_grad else None))


def _cuda_reason(tensors, e, ev, attn_mask):
    """Why the cuda backend's kernels (csrc/attention.cu) cannot take this call, or None."""
    dtype = tensors[0].dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the cuda attention kernels take float16 or bfloat16 (tensor cores), got {dtype}"
    if not all(16 <= d <= 256 for d in (e, ev)):
        return f"the cuda attention kernels take head dims 16..256, got E={e}, Ev={ev}"
    if attn_mask is not None:
        return ("the cuda attention kernels take no attn_mask (causal, window_size and key_padding_mask are "
                "built in); use backend='triton' or 'torch'")
    return None


def _check_scale(scale, e):
    if scale is None:
        return e ** -0.5
    return _validate.number("scale", scale)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, key_padding_mask=None, window_size=None, return_lse=False,
                                 backend=None):
    """Fused attention, a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    query (B, H, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev); float16 / bfloat16 / float32.
    attn_mask: bool (True = takes part) or float (added to the scores), broadcastable to (B, H, L, S).
    is_causal: query i sees keys j <= i (top-left, as torch); combines with the masks.
    scale: default 1/sqrt(E). enable_gqa: H % Hkv == 0, query head h reads kv head h // (H // Hkv).
    key_padding_mask: bool (B, S), True = real token (Hugging Face's attention_mask == 1); handled in the
    kernel without building an (L, S) mask, and key blocks past the last real key are skipped.
    A query row with no key to attend to outputs zeros and gets zero gradient.
    window_size: (left, right) local attention as in FlashAttention: query i sees key j only when
    i - left <= j <= i + right (-1 = unbounded on that side); combines with is_causal and the masks.
    Mistral's sliding_window=W is (W - 1, 0) with is_causal=True. The kernels skip key blocks outside the band.
    dropout_p: dropout on the attention probabilities (seeded from torch's generator).
    return_lse: also return the float32 log-sum-exp of the scores, (B, H, L), -inf for empty rows.
    A short query over long keys (L <= 16, G L <= 64 query rows a K/V head, S >= 4 L: decode through a KV cache
    that hands over every key) with no mask but key padding, no dropout and no gradient wanted, runs the split-KV
    kernel of kv_cache_attention (the keys spread over many programs) on the Triton backend.
    Returns (B, H, L, Ev) in query's dtype (memory laid out like query's).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _validate.tensor(name, t, ndim=4)
    _validate.same_dtype(query=query, key=key, value=value)
    B, H, L, E = query.shape
    Bk, Hkv, S, Ek = key.shape
    _validate.shape("key", key, (B, Hkv, S, E), "batch and head dim of query")
    _validate.shape("value", value, (B, Hkv, S, value.shape[-1]), "batch, heads and length of key")
    Ev = value.shape[-1]
    if H != Hkv:
        if not enable_gqa:
            raise ValueError(f"key: expected {H} heads (those of query) unless enable_gqa=True, got {Hkv}")
        if Hkv == 0 or H % Hkv != 0:
            raise ValueError(f"key: expected a number of heads dividing query's {H} (GQA), got {Hkv}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: expected a bool or floating dtype, got {attn_mask.dtype}")
        try:
            if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, (B, H, L, S)) != (B, H, L, S):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"attn_mask: expected a shape broadcastable to (B, H, L, S) = {(B, H, L, S)}, "
                             f"got {tuple(attn_mask.shape)}") from None
    if key_padding_mask is not None:
        _validate.bool_mask("key_padding_mask", key_padding_mask)
        _validate.shape("key_padding_mask", key_padding_mask, (B, S), "(batch, key length)")
    _validate.same_device(query=query, key=key, value=value, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
    dropout_p = _validate.probability("dropout_p", dropout_p)
    _validate.flag("is_causal", is_causal)
    _validate.flag("enable_gqa", enable_gqa)
    window = _validate.window("window_size", window_size)
    scale = _check_scale(scale, E)
    name = _backend.select("scaled_dot_product_attention", backend, query.device, {
        "triton": _triton_reason((query, key, value), E, Ev, attn_mask),
        "cuda": _cuda_reason((query, key, value), E, Ev, attn_mask),
    })
    if name == "torch":
        return reference.sdpa_ref(query, key, value, attn_mask, dropout_p, is_causal, scale, H != Hkv,
                                  key_padding_mask, return_lse, window_size=window)
    if name == "cuda":
        from .. import _cuda

        out, lse = _cuda.attention(query, key, value, key_padding_mask, None, None, L, S, scale, is_causal, False,
                                   dropout_p, _validate.dropout_seed(dropout_p, query.device), window)
        return (out, lse) if return_lse else out
    from . import kv_cache  # (the decode kernel: a sibling op family)

    if kv_cache.split_kv_reason(query, key, value, attn_mask, dropout_p, is_causal, window) is None:
        out, lse = kv_cache.split_kv_sdpa(query, key, value, key_padding_mask, scale)
        return (out, lse) if return_lse else out
    out, lse = _triton_ops()(query, key, value, attn_mask, key_padding_mask, None, None, L, S, scale, is_causal,
                             False, dropout_p, _validate.dropout_seed(dropout_p, query.device), *(window or (-1, -1)))
    return (out, lse) if return_lse else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                     window_size=None, dropout_p=0.0, return_lse=False, backend=None):
    """Attention over packed sequences with no padding (FlashAttention's varlen interface).

    q (total_q, H, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev); Hkv divides H (GQA).
    cu_seqlens_q / cu_seqlens_k: int32 (B + 1,) offsets from 0; sequence b is q[cu_q[b]:cu_q[b+1]] and
    attends only to k[cu_k[b]:cu_k[b+1]]. max_seqlen_*: Python ints, at least the longest sequence.
    causal: query i of a sequence sees keys j <= i + S_b - L_b (aligned bottom-right when lengths differ).
    window_size: (left, right), query i sees keys i + shift - left <= j <= i + shift + right, shift = S_b - L_b
    (-1 = unbounded on that side); combines with causal.
    dropout_p: dropout on the attention probabilities as in scaled_dot_product_attention (seeded from
    torch's generator; the same seed gives the same mask, forward and backward).
    Offsets on a CUDA device are trusted (checking them costs a device sync); set FUSEDLM_CHECK_VARLEN=1 to
    check them there too (a ValueError instead of garbage rows). On CPU they are always checked.
    return_lse: also return the float32 log-sum-exp, (total_q, H).
    Returns (total_q, H, Ev) in q's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(name, t, ndim=3)
    _validate.same_dtype(q=q, k=k, v=v)
    total_q, H, E = q.shape
    total_k, Hkv, Ek = k.shape
    _validate.shape("k", k, (total_k, Hkv, E), "head dim of q")
    _validate.shape("v", v, (total_k, Hkv, v.shape[-1]), "length and heads of k")
    Ev = v.shape[-1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"k: expected a number of heads dividing q's {H} (GQA), got {Hkv}")
    _validate.cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q)
    _validate.cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_k: expected shape {tuple(cu_seqlens_q.shape)} (that of cu_seqlens_q), "
                         f"got {tuple(cu_seqlens_k.shape)}")
    _validate.same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    _validate.max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q)
    _validate.max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k)
    _validate.flag("causal", causal)
    window = _validate.window("window_size", window_size)
    dropout_p = _validate.probability("dropout_p", dropout_p)
    scale = _check_scale(scale, E)
    name = _backend.select("varlen_attention", backend, q.device, {
        "triton": _triton_reason((q, k, v), E, Ev, None),
        "cuda": _cuda_reason((q, k, v), E, Ev, None),
    })
    if name == "torch":
        return reference.varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                    return_lse, window_size=window, dropout_p=dropout_p)
    if name == "cuda":
        from .. import _cuda

        out, lse = _cuda.attention(q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                   causal, True, dropout_p, _validate.dropout_seed(dropout_p, q.device), window)
        return (out, lse) if return_lse else out
    out, lse = _triton_ops()(q, k, v, None, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                             causal, True, dropout_p, _validate.dropout_seed(dropout_p, q.device), *(window or (-1, -1)))
    return (out, lse) if return_lse else out
