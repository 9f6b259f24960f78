"""Plain PyTorch references: the "torch" backend, the CPU fallback and the yardstick.

Each function computes in float32 (float64 when given float64, which is how the tests and
``fusedlm verify`` build their exact reference) and returns the input dtype, exactly the contract the
fused kernels meet. Autograd differentiates them as they stand.
"""
import math

import torch
import torch.nn.functional as F

from ._deberta_positions import relative_index


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm_ref(x, weight=None, eps=1e-6, offset=0.0, residual=None):
    """y = s / sqrt(mean(s^2) + eps) * (offset + weight), s = x (+ residual, added in x's dtype)."""
    s = x if residual is None else x + residual
    ct = _compute_dtype(s)
    sf = s.to(ct)
    y = sf * torch.rsqrt(sf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (offset + weight.to(ct))
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


def layer_norm_ref(x, weight=None, bias=None, eps=1e-5, residual=None):
    """y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias (biased variance), s as in rms_norm_ref."""
    s = x if residual is None else x + residual
    ct = _compute_dtype(s)
    sf = s.to(ct)
    mean = sf.mean(-1, keepdim=True)
    var = (sf - mean).square().mean(-1, keepdim=True)
    y = (sf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


def swiglu_ref(gate, up):
    """silu(gate) * up, computed in float32."""
    ct = _compute_dtype(gate)
    return (F.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def _rotate(x, interleaved):
    """The 90-degree turn of each rotary pair: (a, b) -> (-b, a)."""
    if interleaved:  # pairs (2i, 2i+1)
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # pairs (i, i + R/2): Hugging Face's rotate_half
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_one(x, cos, sin, interleaved):
    rotary = cos.shape[-1]
    ct = _compute_dtype(x)
    xr = x[..., :rotary].to(ct)
    out = (xr * cos.to(ct) + _rotate(xr, interleaved) * sin.to(ct)).to(x.dtype)
    return torch.cat((out, x[..., rotary:]), dim=-1) if rotary < x.shape[-1] else out


def rope_ref(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """Hugging Face Llama's apply_rotary_pos_emb, with partial rotary (the first R features turn)."""
    if cos.dim() == 2:  # (S, R) shared by the batch
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rope_one(q, cos, sin, interleaved), _rope_one(k, cos, sin, interleaved)


def band_mask(L, S, shift, window_size, device):
    """(L, S) bool: query i sees key j when i + shift - left <= j <= i + shift + right (local attention,
    window_size = (left, right), -1 = unbounded on that side); None when nothing is excluded."""
    if window_size is None or tuple(window_size) == (-1, -1):
        return None
    left, right = window_size
    rel = torch.arange(S, device=device)[None, :] - torch.arange(L, device=device)[:, None] - shift  # j - i - shift
    allowed = torch.ones(L, S, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= rel >= -left
    if right >= 0:
        allowed &= rel <= right
    return allowed


def sdpa_ref(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
             key_padding_mask=None, return_lse=False, window_size=None):
    """Math attention, the semantics of torch.nn.functional.scaled_dot_product_attention, plus padding.

    query (B, H, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev); query head h reads kv head
    h // (H // Hkv) (GQA; the op layer checks that it was asked for). attn_mask: bool (True = takes
    part) or float (added to the scores), broadcastable to (B, H, L, S). is_causal: query i sees keys
    j <= i (top-left), combined with attn_mask when both are given. key_padding_mask: bool (B, S),
    True = real token. window_size: (left, right), query i sees keys i - left <= j <= i + right (-1 =
    unbounded). scale: default 1 / sqrt(E). Dropout on the probabilities, kept ones scaled by
    1 / (1 - dropout_p), the mask drawn from torch's default generator on the device.

    A row that can attend to no key (every score masked or -inf) outputs zeros, gets zero gradient and
    lse = -inf; nothing here makes a NaN in the forward or the backward: the row maximum is detached and
    replaced by 0 in such rows, so exp(-inf - 0) = 0 and the normaliser, 0 there, is replaced by 1.
    Returns the output in query's dtype, and with ``return_lse`` also the natural-log log-sum-exp of
    the scaled, masked scores (B, H, L), float32 (float64 for float64 inputs).
    """
    ct = _compute_dtype(query)
    q, k, v = query.to(ct), key.to(ct), value.to(ct)
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv != H:  # GQA: each kv head serves H // Hkv consecutive query heads
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    L, S = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, L, S)
    allowed = None  # bool, broadcastable to (B, H, L, S)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask
        else:
            scores = scores + attn_mask.to(ct)
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        allowed = causal if allowed is None else allowed & causal
    band = band_mask(L, S, 0, window_size, q.device)
    if band is not None:
        allowed = band if allowed is None else allowed & band
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        allowed = kpm if allowed is None else allowed & kpm
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if S > 0:
        row_max = scores.detach().amax(dim=-1, keepdim=True)
    else:
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    empty = row_max == float("-inf")  # (B, H, L, 1): no key to attend to
    row_max = row_max.masked_fill(empty, 0.0)
    unnorm = torch.exp(scores - row_max)
    denom = unnorm.sum(dim=-1, keepdim=True)
    probs = unnorm / denom.masked_fill(empty, 1.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v).masked_fill(empty, 0.0).to(query.dtype)
    if not return_lse:
        return out
    lse = (row_max + torch.log(denom)).masked_fill(empty, float("-inf")).squeeze(-1)
    return out, lse


def varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, scale=None,
               return_lse=False, window_size=None, dropout_p=0.0):
    """Attention over packed sequences: q (total_q, H, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev).

    Sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] against k, v[cu_seqlens_k[b]:cu_seqlens_k[b+1]],
    nothing across sequences. ``causal`` aligns bottom-right: query i of a sequence with lengths
    (Lq, Lk) sees keys j <= i + Lk - Lq (FlashAttention's convention; the same as top-left when
    Lq == Lk); a row that sees no key outputs zeros. GQA whenever Hkv < H (Hkv divides H).
    window_size: (left, right), keys i + Lk - Lq - left <= j <= i + Lk - Lq + right (-1 = unbounded).
    dropout_p: as in sdpa_ref, drawn sequence by sequence from torch's generator.
    Loops over the sequences in Python (clarity over speed; max_seqlen_* are not needed here).
    Returns (total_q, H, Ev) in q's dtype, and with ``return_lse`` the lse (total_q, H) as in sdpa_ref.
    """
    total_q, H = q.shape[0], q.shape[1]
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        qb = q[q0:q1].transpose(0, 1).unsqueeze(0)  # (1, H, Lq, E)
        kb = k[k0:k1].transpose(0, 1).unsqueeze(0)
        vb = v[k0:k1].transpose(0, 1).unsqueeze(0)
        lq, lk = q1 - q0, k1 - k0
        mask = band_mask(lq, lk, lk - lq, (-1, 0) if causal else None, q.device)
        band = band_mask(lq, lk, lk - lq, window_size, q.device)
        if band is not None:
            mask = band if mask is None else mask & band
        res = sdpa_ref(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, scale=scale, return_lse=return_lse)
        out, lse = res if return_lse else (res, None)
        outs.append(out[0].transpose(0, 1))  # (Lq, H, Ev)
        if return_lse:
            lses.append(lse[0].transpose(0, 1))  # (Lq, H)
    covered = starts_q[-1] if starts_q else 0
    if covered < total_q:  # rows past the last sequence belong to none: zeros (the op layer rejects this)
        outs.append(q.new_zeros(total_q - covered, H, v.shape[-1]))
        if return_lse:
            lses.append(torch.full((total_q - covered, H), float("-inf"), dtype=_compute_dtype(q), device=q.device))
    out = torch.cat(outs) if outs else q.new_zeros(0, H, v.shape[-1])
    if not return_lse:
        return out
    lse = torch.cat(lses) if lses else torch.zeros(0, H, dtype=_compute_dtype(q), device=q.device)
    return out, lse


def deberta_ref(query, key, value, pos_key=None, pos_query=None, key_padding_mask=None, position_buckets=256,
                max_relative_positions=512, dropout_p=0.0, return_lse=False):
    """DeBERTa's disentangled attention by the book: (B, H, S, S) scores, then sdpa_ref.

    query, key, value (B, H, S, D); pos_key / pos_query (H, 2 span, D) or None. For query i and key j,
    with idx = clamp(bucket(i - j) + span, 0, 2 span - 1) (fusedlm._deberta_positions.relative_index) and
    s = 1 / sqrt(D (1 + #position terms)):

        score_ij = s * (q_i . k_j  +  q_i . pos_key[idx]  +  k_j . pos_query[idx])

    The two position terms enter sdpa_ref as a float mask (differentiable, so pos_key / pos_query get
    their gradients through it); key padding, rows with no real key (zeros, lse = -inf), dropout (torch's
    generator) and lse are sdpa_ref's. Returns out in query's dtype (and lse as sdpa_ref's).
    """

    ct = _compute_dtype(query)
    B, H, S, D = query.shape
    terms = (pos_key is not None) + (pos_query is not None)
    scale = 1.0 / math.sqrt(D * (1 + terms))
    bias = None
    if terms:
        idx = relative_index(S, position_buckets, max_relative_positions, query.device).expand(B, H, S, S)
        bias = torch.zeros((), dtype=ct, device=query.device)
        if pos_key is not None:  # c2p_ij = q_i . pos_key[idx(i, j)]
            bias = bias + torch.gather(query.to(ct) @ pos_key.to(ct).transpose(-1, -2), -1, idx)
        if pos_query is not None:  # p2c_ij = k_j . pos_query[idx(i, j)]: gather row j at idx(i, j), transpose
            p2c = key.to(ct) @ pos_query.to(ct).transpose(-1, -2)
            bias = bias + torch.gather(p2c, -1, idx.transpose(-1, -2)).transpose(-1, -2)
        bias = bias * scale
    return sdpa_ref(query, key, value, attn_mask=bias, dropout_p=dropout_p, scale=scale,
                    key_padding_mask=key_padding_mask, return_lse=return_lse)


def deberta_varlen_ref(q, k, v, pos_key, pos_query, cu_seqlens, position_buckets=256, max_relative_positions=512,
                       dropout_p=0.0, return_lse=False):
    """deberta_ref over packed sequences q, k, v (total, H, D): sequence b is rows
    cu_seqlens[b]:cu_seqlens[b+1], positions counted from its start, nothing across sequences.
    Returns (total, H, D) in q's dtype, and with ``return_lse`` the lse (total, H)."""
    starts = cu_seqlens.tolist()
    total, H, D = q.shape
    out = q.new_zeros(total, H, D)
    lse = torch.full((total, H), float("-inf"), dtype=_compute_dtype(q), device=q.device)
    outs, lses = [], []
    for s0, s1 in zip(starts[:-1], starts[1:]):
        one = [t[s0:s1].transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, L, D)
        res = deberta_ref(*one, pos_key, pos_query, None, position_buckets, max_relative_positions, dropout_p,
                          return_lse)
        o, l = res if return_lse else (res, None)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0].transpose(0, 1) if return_lse else None)
    if starts and starts[-1] > starts[0]:  # differentiable: the rows of every sequence, in order
        out = torch.cat([out[:starts[0]], *outs, out[starts[-1]:]])
        if return_lse:
            lse = torch.cat([lse[:starts[0]], *lses, lse[starts[-1]:]])
    return (out, lse) if return_lse else out


def _cache_rows(cache, block_table):
    """(B, capacity, Hkv, E): a contiguous cache as it stands, a paged pool gathered through its block table
    (entries past a sequence's blocks may hold anything: clamped into the pool, their keys are masked)."""
    if block_table is None:
        return cache
    blocks = block_table.long().clamp(0, cache.shape[0] - 1)  # (B, max_blocks)
    return cache[blocks].flatten(1, 2)  # (B, max_blocks * block_size, Hkv, E)


def _rotate_at(x, cos, sin, positions, interleaved):
    """x (B, L, heads, D) rotated at positions (B, L) of the (P, R) tables (clamped into them)."""
    p = positions.long().clamp(0, cos.shape[0] - 1)
    return _rope_one(x, cos[p].unsqueeze(2), sin[p].unsqueeze(2), interleaved)


def kv_cache_append_ref(k_cache, v_cache, cache_seqlens, k, v, cos=None, sin=None, interleaved=False,
                        block_table=None):
    """Writes k (after rotary when cos / sin are given) and v into the cache in place, sequence b's at
    positions cache_seqlens[b] + [0, Lnew): contiguous caches (B, S_max, Hkv, E) at [b, t], paged pools at
    [block_table[b, t // block_size], t % block_size]. Tensor ops only (no host synchronisation)."""
    B, Lnew = k.shape[0], k.shape[1]
    pos = cache_seqlens.long()[:, None] + torch.arange(Lnew, device=k.device)  # (B, Lnew)
    if cos is not None:
        k = _rotate_at(k, cos, sin, pos, interleaved)
    if block_table is None:
        rows = (torch.arange(B, device=k.device)[:, None].expand(B, Lnew), pos)
    else:
        bs = k_cache.shape[1]
        rows = (block_table.long().gather(1, pos // bs), pos % bs)
    k_cache.index_put_(rows, k.to(k_cache.dtype))
    v_cache.index_put_(rows, v.to(v_cache.dtype))


def kv_cache_ref(q, k_cache, v_cache, cache_seqlens, k=None, v=None, cos=None, sin=None, interleaved=False,
                 block_table=None, causal=True, scale=None, window_size=None, return_lse=False):
    """Attention of q (B, Lq, H, E) over a KV cache, after appending k / v (kv_cache_append_ref): sequence b
    has T_b = cache_seqlens[b] + Lnew keys, its query i sits at position T_b - Lq + i (rotated there when
    cos / sin are given) and sees key t < T_b when t <= that position (``causal``) and within
    ``window_size`` of it. Math attention over the whole capacity (sdpa_ref) with those rows masked; no
    host synchronisation. Returns (B, Lq, H, Ev) in q's dtype, and with ``return_lse`` (B, H, Lq)."""
    B, Lq = q.shape[0], q.shape[1]
    Lnew = 0
    if k is not None:
        kv_cache_append_ref(k_cache, v_cache, cache_seqlens, k, v, cos, sin, interleaved, block_table)
        Lnew = k.shape[1]
    total = cache_seqlens.long() + Lnew  # (B,) T_b
    qpos = total[:, None] - Lq + torch.arange(Lq, device=q.device)  # (B, Lq)
    if cos is not None:
        q = _rotate_at(q, cos, sin, qpos, interleaved)
    keys, values = _cache_rows(k_cache, block_table), _cache_rows(v_cache, block_table)
    t = torch.arange(keys.shape[1], device=q.device)[None, None, :]  # (1, 1, capacity)
    allowed = t < total[:, None, None]  # (B, Lq, capacity)
    # slots past a sequence's end may hold anything (a cache made with torch.empty): a probability of 0 times
    # a NaN there would still be NaN, so those values are zeroed (their scores are masked below)
    values = values.masked_fill(~allowed[:, 0, :, None, None], 0.0)
    rel = t - qpos[:, :, None]  # key position - query position
    left, right = window_size if window_size is not None else (-1, -1)
    if causal:
        allowed = allowed & (rel <= 0)
    if left >= 0:
        allowed = allowed & (rel >= -left)
    if right >= 0:
        allowed = allowed & (rel <= right)
    res = sdpa_ref(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=allowed[:, None],
                   scale=scale, enable_gqa=True, return_lse=return_lse)
    out, lse = res if return_lse else (res, None)
    out = out.transpose(1, 2)
    return (out, lse.float() if lse.dtype != torch.float64 else lse) if return_lse else out


def cross_entropy_rows(logits, target, ignore_index=-100, label_smoothing=0.0, softcap=None, z_loss=0.0):
    """Per-token loss of logits (n, V) (float32 or float64) against target (n,): -> (loss (n,), lse (n,)).

    With softcap c the logits are c tanh(logits / c) first (Gemma 2). loss = (1 - e) (lse - z_t) +
    e (lse - mean_j z_j) + z_loss lse^2 (torch's label smoothing e: the target's share 1 - e + e / V), and 0
    where target == ignore_index."""
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    keep = target != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    z_t = z.gather(-1, torch.where(keep, target, 0)[:, None])[:, 0]
    loss = (1.0 - label_smoothing) * (lse - z_t)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - z.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    return torch.where(keep, loss, torch.zeros_like(loss)), lse


def reduce_loss(rows, target, ignore_index, reduction):
    """rows (n,) -> "none": as they are, "sum", "mean": over the tokens not ignored (NaN when there is none,
    as torch's cross_entropy)."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (target != ignore_index).sum()


def linear_cross_entropy_ref(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                             label_smoothing=0.0, softcap=None, z_loss=0.0):
    """The language-model loss by the book: logits = hidden @ weight.T + bias (all of them, (N, V), in float32 or
    float64), then cross_entropy_rows and the reduction; autograd differentiates it. The yardstick (the torch
    backend, which never holds more than a slice of the logits, is fusedlm.ops.cross_entropy's)."""
    ct = _compute_dtype(hidden)
    h = hidden.reshape(-1, hidden.shape[-1]).to(ct)
    logits = h @ weight.to(ct).T
    if bias is not None:
        logits = logits + bias.to(ct)
    t = target.reshape(-1)
    rows, _ = cross_entropy_rows(logits, t, ignore_index, label_smoothing, softcap, z_loss)
    out = reduce_loss(rows, t, ignore_index, reduction)
    return out.reshape(target.shape) if reduction == "none" else out
