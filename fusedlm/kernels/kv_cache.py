"""Attention over a KV cache (generation): the append kernel, the split-KV attention kernel and the combine
kernel, and their launchers.

Sequence b has T_b = cache_seqlens[b] + Lnew keys once the Lnew new ones are written; its query i sits at
position p_i = T_b - Lq + i and sees key t < T_b when t <= p_i (causal) and p_i - left <= t <= p_i + right
(window, -1 = unbounded). Per query row, with scale s:

    z_t  = s * q_i . k_t       out_i = sum_t softmax(z)_t v_t       lse_i = log sum_t exp(z_t)

Append (_kvc_append, one program per (sequence, row, head)): the new key row, turned by rotary at its
position cache_seqlens[b] + j when cos / sin are given, and the value row are stored straight into the
cache slot (contiguous: [b, t]; paged: [block_table[b, t // block_size], t % block_size]); query rows are
turned at p_i into a new tensor in the same launch. Rotary of feature d < R (HF's rotate_half pairs d and
d +- R/2; interleaved pairs 2i, 2i + 1): x_d cos_d + sign_d x_partner(d) sin_d, sign -1 on the first of a
pair, in float32.

Split-KV ("flash-decoding", _kvc_fwd): a decode step has one query row per head, so one program per
(sequence, head) would leave most SMs idle while it streams a long cache. Here the keys of each sequence are
cut into SPLITS chunks of cdiv(T_b - first, SPLITS) keys (first: 0, or with a window the first key the
sequence's first query sees; rounded up to BLOCK_N; made on the device from T_b, so no
host synchronisation and no work past a sequence's end whatever the cache's capacity), one program each.
All G = H / Hkv query heads of one K/V head and the Lq query rows are the M rows of one program's tile (row
m = i G + g), so each cache byte is read once per K/V head. A program keeps the online softmax of the
attention kernel (base-2 scores, running max m and sum l) and writes its partial result normalised, o_s =
acc_s / l_s, with lse2_s = m_s + log2 l_s. The combine (_kvc_combine, one program per (b, h, i)) merges
them through their log-sum-exp:

    M = max_s lse2_s,  w_s = 2^(lse2_s - M),  out = sum_s w_s o_s / sum_s w_s,  lse = (M + log2 sum_s w_s) ln 2

With one split the fwd kernel writes out and lse itself. Scratch: (B, H, Lq, SPLITS, Ev) float32 partials
and (B, H, Lq, SPLITS) lse, nothing of the cache's size.
"""
import torch
import triton
import triton.language as tl

from fusedlm._triton import num_programs

from .attention import LOG2E, precision

LN2 = tl.constexpr(0.6931471805599453)  # (a constexpr global: kernels may read it)


@triton.jit
def _rotate_row(X, offs, D, R, COS, SIN, INTERLEAVED: tl.constexpr):
    """Row X[0:D] in float32, its first R features turned by the rotary row COS / SIN (see the docstring)."""
    x = tl.load(X + offs, mask=offs < D, other=0.0).to(tl.float32)
    rot = offs < R
    if INTERLEAVED:
        partner = offs ^ 1
        first = (offs % 2) == 0
    else:
        half = R // 2
        first = offs < half
        partner = tl.where(first, offs + half, offs - half)
    xp = tl.load(X + partner, mask=rot, other=0.0).to(tl.float32)
    c = tl.load(COS + offs, mask=rot, other=1.0).to(tl.float32)
    s = tl.load(SIN + offs, mask=rot, other=0.0).to(tl.float32)
    return tl.where(rot, x * c + tl.where(first, -xp, xp) * s, x)


@triton.jit
def _kvc_append(
    Q, QR, K, V, KC, VC, SEQ, BT, COS, SIN,
    stride_qb, stride_qm, stride_qh, stride_rb, stride_rm, stride_rh,  # QR: the turned queries (new tensor)
    stride_kb, stride_km, stride_kh, stride_vb, stride_vm, stride_vh,  # the new keys / values (B, Lnew, Hkv, .)
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,  # cache: [b, t] or [block, slot]
    stride_btb, stride_cos,
    HKV, LQ, LNEW, ROWS, E, EV, R, BLOCK_SIZE,
    ROTATE: tl.constexpr, APPEND: tl.constexpr, PAGED: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """Program (b * ROWS + row, head): query row ``row`` of head ``head`` turned into QR (ROTATE), and new key /
    value row ``row`` of K/V head ``head`` (< HKV) written into the cache (APPEND). ROWS = max(LQ, LNEW)."""
    b = tl.program_id(0) // ROWS
    row = tl.program_id(0) % ROWS
    h = tl.program_id(1)
    offs_e = tl.arange(0, BLOCK_E)
    seq = tl.load(SEQ + b)
    if ROTATE and row < LQ:
        pos = seq + LNEW - LQ + row  # p_i; turned at position 0 when negative (such a row sees no key)
        pos = tl.maximum(pos, 0).to(tl.int64)
        x = _rotate_row(Q + b.to(tl.int64) * stride_qb + row * stride_qm + h * stride_qh, offs_e, E, R,
                        COS + pos * stride_cos, SIN + pos * stride_cos, INTERLEAVED)
        tl.store(QR + b.to(tl.int64) * stride_rb + row * stride_rm + h * stride_rh + offs_e,
                 x.to(QR.dtype.element_ty), mask=offs_e < E)
    if APPEND and row < LNEW and h < HKV:
        t = seq + row  # the new key's position
        if PAGED:
            blk = tl.load(BT + b.to(tl.int64) * stride_btb + t // BLOCK_SIZE).to(tl.int64)
            slot_k = blk * stride_kcb + (t % BLOCK_SIZE) * stride_kct
            slot_v = blk * stride_vcb + (t % BLOCK_SIZE) * stride_vct
        else:
            slot_k = b.to(tl.int64) * stride_kcb + t.to(tl.int64) * stride_kct
            slot_v = b.to(tl.int64) * stride_vcb + t.to(tl.int64) * stride_vct
        KR = K + b.to(tl.int64) * stride_kb + row * stride_km + h * stride_kh
        if ROTATE:
            k = _rotate_row(KR, offs_e, E, R, COS + t.to(tl.int64) * stride_cos, SIN + t.to(tl.int64) * stride_cos,
                            INTERLEAVED)
        else:
            k = tl.load(KR + offs_e, mask=offs_e < E, other=0.0)
        tl.store(KC + slot_k + h.to(tl.int64) * stride_kch + offs_e, k.to(KC.dtype.element_ty), mask=offs_e < E)
        offs_v = tl.arange(0, BLOCK_EV)
        v = tl.load(V + b.to(tl.int64) * stride_vb + row * stride_vm + h * stride_vh + offs_v, mask=offs_v < EV)
        tl.store(VC + slot_v + h.to(tl.int64) * stride_vch + offs_v, v, mask=offs_v < EV)


@triton.jit
def _kvc_fwd(
    Q, KC, VC, SEQ, BT, KPM, O, LSE,  # O / LSE: the output (SPLITS = 1) or the partials (B, H, LQ, SPLITS, .)
    stride_qb, stride_qm, stride_qh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,  # cache: [b, t] or [block, slot]
    stride_btb, stride_kpb,  # KPM: uint8 (B, capacity), 0 = a key no query sees (scaled_dot_product_attention's)
    stride_ob, stride_om, stride_oh, stride_os,  # output (b, row, head) or partials (b, row, head, split)
    stride_lb, stride_lm, stride_lh, stride_ls,
    HKV, G, LQ, LNEW, E, EV, BLOCK_SIZE, N_MT, qk_scale, left, right,
    CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PAGED: tl.constexpr,
    HAS_KPM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (((b Hkv + kv head) N_MT + row tile), split): rows m = i G + g of the tile (query i, head
    kv head * G + g) against the split's chunk of sequence b's keys (see the module docstring)."""
    mt = tl.program_id(0) % N_MT
    bh = tl.program_id(0) // N_MT
    b = bh // HKV
    hk = bh % HKV
    split = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < G * LQ
    i = offs_m // G
    head = hk * G + offs_m % G
    offs_e = tl.arange(0, BLOCK_E)
    offs_v = tl.arange(0, BLOCK_EV)
    offs_n = tl.arange(0, BLOCK_N)
    total = tl.load(SEQ + b) + LNEW  # T_b
    qpos = total - LQ + i
    q = tl.load(Q + b64 * stride_qb + i[:, None].to(tl.int64) * stride_qm + head[:, None] * stride_qh
                + offs_e[None, :], mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    # this split's chunk of keys, then the rows' bounds: the last (first) row of the tile sees the most
    # (fewest) keys
    first = 0  # the sequence's first key any of its queries sees: the splits cut [first, T_b)
    if HAS_LEFT:
        first = tl.maximum(total - LQ - left, 0)
    chunk = tl.cdiv(tl.cdiv(total - first, SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, total)
    i_first = (mt * BLOCK_M) // G
    i_last = tl.minimum((mt * BLOCK_M + BLOCK_M - 1) // G, LQ - 1)
    if CAUSAL:
        hi = tl.minimum(hi, total - LQ + i_last + 1)
    if HAS_RIGHT:
        hi = tl.minimum(hi, total - LQ + i_last + right + 1)
    if HAS_LEFT:
        lo = tl.maximum(lo, total - LQ + i_first - left)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        t = start + offs_n
        tok = t < hi
        if HAS_KPM:
            tok = tok & (tl.load(KPM + b64 * stride_kpb + t, mask=tok, other=0) != 0)
        if PAGED:
            blk = tl.load(BT + b64 * stride_btb + t // BLOCK_SIZE, mask=tok, other=0).to(tl.int64)
            row_k = blk * stride_kcb + (t % BLOCK_SIZE) * stride_kct
            row_v = blk * stride_vcb + (t % BLOCK_SIZE) * stride_vct
        else:
            row_k = b64 * stride_kcb + t.to(tl.int64) * stride_kct
            row_v = b64 * stride_vcb + t.to(tl.int64) * stride_vct
        k = tl.load(KC + row_k[:, None] + hk.to(tl.int64) * stride_kch + offs_e[None, :],
                    mask=tok[:, None] & (offs_e[None, :] < E), other=0.0)
        v = tl.load(VC + row_v[:, None] + hk.to(tl.int64) * stride_vch + offs_v[None, :],
                    mask=tok[:, None] & (offs_v[None, :] < EV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = tok[None, :] & row_ok[:, None]
        rel = t[None, :] - qpos[:, None]  # key position - query position
        if CAUSAL:
            ok = ok & (rel <= 0)
        if HAS_LEFT:
            ok = ok & (rel >= -left)
        if HAS_RIGHT:
            ok = ok & (rel <= right)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2(-inf - 0) = 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_ptr = O + b64 * stride_ob + i[:, None].to(tl.int64) * stride_om + head[:, None] * stride_oh + offs_v[None, :]
    l_ptr = LSE + b64 * stride_lb + i.to(tl.int64) * stride_lm + head * stride_lh
    if SPLITS == 1:
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_v[None, :] < EV))
        tl.store(l_ptr, lse2 * LN2, mask=row_ok)
    else:
        tl.store(o_ptr + split * stride_os, out, mask=row_ok[:, None] & (offs_v[None, :] < EV))
        tl.store(l_ptr + split * stride_ls, lse2, mask=row_ok)


@triton.jit
def _kvc_combine(
    OP, LP, O, LSE,  # OP / LP: the partials (B, Lq, H, SPLITS, Ev) / (B, Lq, H, SPLITS), contiguous
    stride_ob, stride_om, stride_oh, stride_lb, stride_lm, stride_lh,
    H, LQ, EV, SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """Program (b LQ + i) H + h: the splits' partial results of one query row merged through their lse."""
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    i = (pid // H) % LQ
    b = pid // (H * LQ)
    offs_s = tl.arange(0, BLOCK_S)
    offs_v = tl.arange(0, BLOCK_EV)
    lse2 = tl.load(LP + pid * SPLITS + offs_s, mask=offs_s < SPLITS, other=float("-inf"))
    mx = tl.max(lse2, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.math.exp2(lse2 - mx)
    tot = tl.sum(w, 0)
    part = tl.load(OP + (pid * SPLITS + offs_s[:, None]) * EV + offs_v[None, :],
                   mask=(offs_s[:, None] < SPLITS) & (offs_v[None, :] < EV), other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(tot == 0.0, 1.0, tot)
    tl.store(O + b * stride_ob + i * stride_om + h * stride_oh + offs_v, out.to(O.dtype.element_ty),
             mask=offs_v < EV)
    tl.store(LSE + b * stride_lb + i * stride_lm + h * stride_lh,
             tl.where(tot == 0.0, float("-inf"), (mx + tl.math.log2(tl.where(tot == 0.0, 1.0, tot))) * LN2))


def _cache_strides(cache):
    """(outer, row, head) strides: [b, t, h] of a contiguous cache, [block, slot, h] of a paged pool."""
    return cache.stride(0), cache.stride(1), cache.stride(2)


def kv_cache_append(launch, q, k_cache, v_cache, cache_seqlens, k, v, cos, sin, block_table, interleaved):
    """Writes k / v (turned by cos / sin when given) into the cache in place; returns q turned at its
    positions when cos / sin are given, else None."""
    B, Lq, H, E = q.shape
    Hkv, Ev = k_cache.shape[2], v_cache.shape[3]
    Lnew = k.shape[1] if k is not None else 0
    rotate = cos is not None
    rows = max(Lq if rotate else 0, Lnew)
    q_rot = torch.empty_like(q, memory_format=torch.contiguous_format) if rotate else None
    if B == 0 or rows == 0:
        return q_rot
    dummy = q
    launch(_kvc_append, (B * rows, H if rotate else Hkv),
           q, q_rot if rotate else dummy, k if k is not None else dummy, v if v is not None else dummy,
           k_cache, v_cache, cache_seqlens, block_table if block_table is not None else cache_seqlens,
           cos if rotate else dummy, sin if rotate else dummy,
           q.stride(0), q.stride(1), q.stride(2), *(q_rot.stride()[:3] if rotate else (0, 0, 0)),
           *(k.stride()[:3] if k is not None else (0, 0, 0)), *(v.stride()[:3] if v is not None else (0, 0, 0)),
           *_cache_strides(k_cache), *_cache_strides(v_cache),
           block_table.stride(0) if block_table is not None else 0, cos.stride(0) if rotate else 0,
           Hkv, Lq, Lnew, rows, E, Ev, cos.shape[1] if rotate else 0, k_cache.shape[1],
           ROTATE=rotate, APPEND=k is not None, PAGED=block_table is not None, INTERLEAVED=interleaved,
           BLOCK_E=max(16, triton.next_power_of_2(E)), BLOCK_EV=max(16, triton.next_power_of_2(Ev)))
    return q_rot


def block_config(g_rows, e, ev, dtype, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). On a GPU the M tile is 64 rows, one warpgroup: wgmma takes
    M = 64 a warpgroup, so a decode step's G rows are padded to 64 (the products are ~64 FLOP a cache byte,
    under the H100's ~300 FLOP/byte ridge: the kernel stays bound by the cache's bytes). BLOCK_N smaller for
    wide heads and float32 (registers, and shared memory for the pipeline's key / value stages). Interpreter:
    M just above the rows (at least 16, tl.dot's minimum), small N."""
    if device.type != "cuda":
        return min(64, max(16, triton.next_power_of_2(g_rows))), 16, 4, 1
    wide = max(e, ev) > 128
    if dtype == torch.float32:
        return 64, (16 if wide else 32), 4, 2
    return 64, (32 if wide else 64), 4, 3


def num_splits(programs, capacity, block_n, device):
    """How many chunks each sequence's keys are cut into: enough programs for two a SM, each chunk at least
    256 keys (on the interpreter 2 blocks, so the tests see several splits), at most 64. From shapes only:
    the lengths stay on the device."""
    min_chunk = 256 if device.type == "cuda" else 2 * block_n
    most = max(1, min(64, triton.cdiv(max(capacity, 1), min_chunk)))
    target = num_programs(device, 1 << 30) if device.type == "cuda" else 4
    return max(1, min(most, triton.cdiv(target, max(programs, 1))))


def kv_cache_fwd(launch, q, k_cache, v_cache, cache_seqlens, block_table, n_new, causal, scale, window,
                 key_padding_mask=None, splits=None):
    """-> (out (B, Lq, H, Ev) in q's dtype, lse float32 (B, H, Lq)); window (left, right), -1 = unbounded;
    key_padding_mask bool (B, capacity), False = a key no query sees."""
    B, Lq, H, E = q.shape
    Hkv, Ev = k_cache.shape[2], v_cache.shape[3]
    G = H // Hkv
    out = q.new_empty(B, Lq, H, Ev)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    if B == 0 or Lq == 0 or H == 0:
        return out, lse
    capacity = k_cache.shape[1] * block_table.shape[1] if block_table is not None else k_cache.shape[1]
    bm, bn, warps, stages = block_config(G * Lq, E, Ev, q.dtype, q.device)
    n_mt = triton.cdiv(G * Lq, bm)
    if splits is None:
        splits = num_splits(B * Hkv * n_mt, capacity, bn, q.device)
    left, right = window
    if splits == 1:
        o, lp = out, lse
        o_strides = (out.stride(0), out.stride(1), out.stride(2), 0)
        l_strides = (lse.stride(0), lse.stride(2), lse.stride(1), 0)
    else:
        o = torch.empty(B, Lq, H, splits, Ev, device=q.device, dtype=torch.float32)
        lp = torch.empty(B, Lq, H, splits, device=q.device, dtype=torch.float32)
        o_strides, l_strides = o.stride()[:4], lp.stride()
    launch(_kvc_fwd, (B * Hkv * n_mt, splits),
           q, k_cache, v_cache, cache_seqlens, block_table if block_table is not None else cache_seqlens,
           key_padding_mask.view(torch.uint8) if key_padding_mask is not None else cache_seqlens, o, lp,
           q.stride(0), q.stride(1), q.stride(2), *_cache_strides(k_cache), *_cache_strides(v_cache),
           block_table.stride(0) if block_table is not None else 0,
           key_padding_mask.stride(0) if key_padding_mask is not None else 0, *o_strides, *l_strides,
           Hkv, G, Lq, n_new, E, Ev, k_cache.shape[1], n_mt, float(scale) * LOG2E, left, right,
           CAUSAL=causal, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, PAGED=block_table is not None,
           HAS_KPM=key_padding_mask is not None, SPLITS=splits,
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=max(16, triton.next_power_of_2(E)),
           BLOCK_EV=max(16, triton.next_power_of_2(Ev)), PRECISION=precision(q), num_warps=warps,
           num_stages=stages)
    if splits > 1:
        launch(_kvc_combine, (B * Lq * H,), o, lp, out, lse,
               out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(2), lse.stride(1),
               H, Lq, Ev, splits, BLOCK_S=triton.next_power_of_2(splits),
               BLOCK_EV=max(16, triton.next_power_of_2(Ev)))
    return out, lse
