"""kv_cache_attention: attention over a KV cache for generation (forward only): validation, dispatch and the
Triton ops.

The kernels and the math are in fusedlm/kernels/kv_cache.py. Two ops serve the Triton backend:
fusedlm::kv_cache_append writes the new keys / values into the cache in place (rotary fused into the write)
and returns the turned queries; fusedlm::kv_cache_attention_fwd -> (out, lse) reads the cache (split-KV).
The torch backend is fusedlm.reference.kv_cache_ref. Nothing here reads a tensor's values on a GPU (no host
synchronisation: a decode step can be captured in a CUDA graph); on CPU the lengths are checked against the
cache's capacity.
"""
from typing import Optional

import torch

from .. import _backend, _validate, reference

HEAD_DIMS = (1, 256)  # head dims the Triton kernels take (E and Ev)


def _triton_ops():
    """Register fusedlm::kv_cache_append / kv_cache_attention_fwd once; returns both."""
    global _ops
    if _ops is not None:
        return _ops
    from fusedlm.kernels import kv_cache as K

    from .._triton import empty, launch, register_op, unit_stride

    def kv_cache_append(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                        k: Optional[torch.Tensor], v: Optional[torch.Tensor], cos: Optional[torch.Tensor],
                        sin: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
                        interleaved: bool) -> torch.Tensor:
        """Writes k / v into the caches in place; -> q turned by cos / sin at its positions (an empty
        placeholder when there is no rotary)."""
        cos, sin = (t.contiguous() if t is not None else None for t in (cos, sin))  # one row stride for both
        # (the kernels index the lengths and the block table's rows with unit strides: tiny copies if not)
        q_rot = K.kv_cache_append(launch, unit_stride(q), k_cache, v_cache, cache_seqlens.contiguous(), unit_stride(k),
                                  unit_stride(v), cos, sin, _contiguous(block_table), interleaved)
        return q_rot if q_rot is not None else empty(q.device, q.dtype)

    def kv_cache_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor],
                               key_padding_mask: Optional[torch.Tensor], n_new: int, causal: bool, scale: float,
                               window_left: int, window_right: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out (B, Lq, H, Ev), lse float32 (B, H, Lq)) over cache_seqlens[b] + n_new keys a sequence
        (those where key_padding_mask, bool (B, capacity), is True)."""
        return K.kv_cache_fwd(launch, unit_stride(q), k_cache, v_cache, cache_seqlens.contiguous(),
                              _contiguous(block_table), n_new, causal, scale, (window_left, window_right),
                              unit_stride(key_padding_mask))

    _ops = (register_op("kv_cache_append", kv_cache_append, mutates_args=("k_cache", "v_cache")),
            register_op("kv_cache_attention_fwd", kv_cache_attention_fwd))
    return _ops


_ops = None


def _contiguous(t):
    return t.contiguous() if t is not None else None


def _check(q, k_cache, v_cache, cache_seqlens, k, v, cos, sin, interleaved, block_table, causal, window_size):
    """Checks the arguments; returns (capacity, Lnew, window or None)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _validate.tensor(name, t, ndim=4)
    B, Lq, H, E = q.shape
    paged = block_table is not None
    if paged:
        _validate.index_tensor("block_table", block_table, 2)
        if block_table.shape[0] != B:
            raise ValueError(f"block_table: expected {B} rows (the batch of q), got shape {tuple(block_table.shape)}")
        capacity = block_table.shape[1] * k_cache.shape[1]
        what = "(num_blocks, block_size, Hkv, E) (a paged pool)"
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache: expected batch {B} (that of q) in dimension 0, got shape {tuple(k_cache.shape)}")
        capacity = k_cache.shape[1]
        what = "(B, S_max, Hkv, E)"
    Hkv = k_cache.shape[2]
    _validate.shape("k_cache", k_cache, (*k_cache.shape[:3], E), f"{what}, E = {E} the head dim of q")
    _validate.shape("v_cache", v_cache, (*k_cache.shape[:3], v_cache.shape[3]), "that of k_cache but the last dim")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"k_cache: expected a number of heads dividing q's {H} (GQA), got {Hkv}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit stride on the last dim (any other strides), got strides "
                             f"{tuple(t.stride())}")
    _validate.index_tensor("cache_seqlens", cache_seqlens, 1)
    _validate.shape("cache_seqlens", cache_seqlens, (B,), "one length per sequence of q")
    if (k is None) != (v is None):
        raise ValueError(f"k, v: expected both or neither, got k={'None' if k is None else 'a tensor'} and "
                         f"v={'None' if v is None else 'a tensor'}")
    Lnew = 0
    if k is not None:
        _validate.tensor("k", k, ndim=4)
        _validate.tensor("v", v, ndim=4)
        Lnew = k.shape[1]
        _validate.shape("k", k, (B, Lnew, Hkv, E), "(B, Lnew, Hkv, E) of q and the cache")
        _validate.shape("v", v, (B, Lnew, Hkv, v_cache.shape[3]), "(B, Lnew, Hkv, Ev) of k and v_cache")
    _validate.same_dtype(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    if (cos is None) != (sin is None):
        raise ValueError("cos, sin: expected both or neither")
    if cos is not None:
        _validate.tensor("cos", cos, ndim=2)
        _validate.tensor("sin", sin, ndim=2)
        _validate.shape("sin", sin, cos.shape, "the shape of cos")
        rotary = cos.shape[1]
        if rotary % 2 != 0 or not 2 <= rotary <= E:
            raise ValueError(f"cos: expected (P, R) with R even and 2 <= R <= E = {E}, got shape {tuple(cos.shape)}")
    _validate.flag("interleaved", interleaved)
    _validate.flag("causal", causal)
    window = _validate.window("window_size", window_size)
    device = _validate.same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k=k, v=v,
                                   cos=cos, sin=sin, block_table=block_table)
    if _validate.check_varlen_values(device) and not torch.compiler.is_compiling():  # (traced: values unknown)
        _check_values(cache_seqlens, Lnew, capacity, block_table, k_cache.shape[0], cos)
    return capacity, Lnew, window


def _check_values(cache_seqlens, Lnew, capacity, block_table, num_blocks, cos):
    """The lengths against the capacity, the block table against the pool, the rotary table against the
    positions (one small read back: CPU, or FUSEDLM_CHECK_VARLEN=1 on a GPU)."""
    if cache_seqlens.numel() == 0:
        return
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0:
        raise ValueError(f"cache_seqlens: expected lengths >= 0, got {lo}")
    if hi + Lnew > capacity:
        raise ValueError(f"cache_seqlens: a sequence of {hi} tokens plus {Lnew} new ones passes the cache's "
                         f"capacity of {capacity} tokens")
    if block_table is not None and hi + Lnew > 0:
        bs = capacity // max(block_table.shape[1], 1)
        used = (torch.arange(block_table.shape[1], device=block_table.device)[None, :] * bs
                < (cache_seqlens + Lnew)[:, None])
        bad = used & ((block_table < 0) | (block_table >= num_blocks))
        if bool(bad.any()):
            raise ValueError(f"block_table: expected block indices in [0, {num_blocks}) (the pool's blocks) for "
                             f"every block a sequence uses, got {block_table[bad][:8].tolist()}")
    if cos is not None and hi + Lnew > cos.shape[0]:
        raise ValueError(f"cos: expected rows for positions up to {hi + Lnew - 1} (P >= {hi + Lnew}), got P = "
                         f"{cos.shape[0]}")


def _triton_reason(q, k_cache, v_cache, cos):
    lo, hi = HEAD_DIMS
    E, Ev = q.shape[-1], v_cache.shape[-1]
    return (_validate.kernel_dtype_reason(q, k_cache, v_cache, cos)
            or (None if lo <= E <= hi and lo <= Ev <= hi else
                f"the kernels take head dims {lo}..{hi}, got E={E}, Ev={Ev}"))


def kv_cache_attention(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, cos=None, sin=None, interleaved=False,
                       block_table=None, causal=True, scale=None, window_size=None, return_lse=False, backend=None):
    """Attention of new queries over a KV cache (generation: decode, speculative verification, chunked prefill).

    q (B, Lq, H, E); k_cache (B, S_max, Hkv, E), v_cache (B, S_max, Hkv, Ev), any strides with a unit stride on
    the last dim (transformers' (B, Hkv, S, E) caches pass as ``.transpose(1, 2)`` views); GQA when H % Hkv == 0.
    cache_seqlens int32 (B,) on q's device: the tokens each sequence already has in the cache (not modified).
    block_table int32 (B, max_blocks): a paged cache; k_cache / v_cache are then pools (num_blocks,
    block_size, Hkv, E) and token t of sequence b lives in block block_table[b, t // block_size], slot
    t % block_size.
    k, v (B, Lnew, Hkv, E / Ev): written into the cache in place at cache_seqlens[b] + [0, Lnew) (the keys after
    rotary when cos / sin are given), then attended with the cached tokens. Sequence b then has
    T_b = cache_seqlens[b] + Lnew keys and its query i sits at position T_b - Lq + i.
    cos, sin (P, R): rotary tables as for apply_rotary_pos_emb (``interleaved`` likewise), turning the queries
    and the new keys at those positions.
    causal: query i sees the keys at positions <= T_b - Lq + i (bottom-right); window_size (left, right) about
    the same position (-1 = unbounded). A query with no key gets zeros (lse -inf).
    scale: default 1/sqrt(E). Returns (B, Lq, H, Ev) in q's dtype, and with ``return_lse`` float32 (B, H, Lq).
    Forward only. Writing past the cache's capacity raises ValueError on CPU tensors (on a GPU the lengths
    stay on the device, unchecked unless FUSEDLM_CHECK_VARLEN=1).
    """
    capacity, Lnew, window = _check(q, k_cache, v_cache, cache_seqlens, k, v, cos, sin, interleaved, block_table,
                                    causal, window_size)
    E = q.shape[-1]
    scale = E ** -0.5 if scale is None else _validate.number("scale", scale)
    name = _backend.select("kv_cache_attention", backend, q.device,
                           {"triton": _triton_reason(q, k_cache, v_cache, cos)})
    if name == "torch":
        return reference.kv_cache_ref(q, k_cache, v_cache, cache_seqlens, k, v, cos, sin, interleaved, block_table,
                                      causal, scale, window, return_lse)
    append, attend = _triton_ops()
    if k is not None or cos is not None:
        q_rot = append(q, k_cache, v_cache, cache_seqlens, k, v, cos, sin, block_table, interleaved)
        if cos is not None:
            q = q_rot
    out, lse = attend(q, k_cache, v_cache, cache_seqlens, block_table, None, Lnew, causal, scale,
                      *(window or (-1, -1)))
    return (out, lse) if return_lse else out


def split_kv_reason(query, key, value, attn_mask, dropout_p, is_causal, window):
    """Why scaled_dot_product_attention's Triton path keeps its own kernel for this call, or None when the
    split-KV kernel serves it: a short query (L <= 16, G L <= 64 rows a K/V head) over keys at least four times
    longer (decode or speculative verification through a cache that hands over all its keys), no mask but key padding, no dropout, no causal or
    window (top-left, which a short query over a long cache does not use), no gradient (forward only)."""
    B, H, L, E = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if attn_mask is not None or dropout_p > 0 or is_causal or window is not None:
        return "a mask, dropout, causal or a window"
    if L > 16 or L * (H // Hkv) > 64 or S < 4 * L:
        return "not a short query over long keys"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "a gradient is wanted (the split-KV kernel is forward only)"
    return _triton_reason(query, key, value, None)


def split_kv_sdpa(query, key, value, key_padding_mask, scale):
    """scaled_dot_product_attention's inputs (B, H, L, E) / (B, Hkv, S, E) through the split-KV kernel (as
    (B, L, H, E) views, no copy): -> (out (B, H, L, Ev), lse float32 (B, H, L))."""
    from .._triton import unit_stride

    B, S = query.shape[0], key.shape[2]
    lengths = torch.full((B,), S, dtype=torch.int32, device=query.device)
    # the kernel reads a key / value row as contiguous features: a view with another last stride is copied
    key, value = unit_stride(key), unit_stride(value)
    out, lse = _triton_ops()[1](query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), lengths, None,
                                key_padding_mask, 0, False, scale, -1, -1)
    return out.transpose(1, 2), lse
