"""Flash attention, backward: the delta, dK/dV and dQ kernels and their launcher. The definitions (scores,
masks, causal alignment, window, dropout's counter) and the tile helpers are in attention.py (read it first).

With P = exp(z - lse) recomputed from the saved lse, dO the output gradient and
delta_i = sum_e dO_ie * out_ie (minus the gradient reaching lse_i, when lse is used):

    dV = P^T dO     dP = dO V^T     dS = P * (dP - delta)     dQ = s * dS K     dK = s * dS^T Q

in two kernels without atomics, so the result is deterministic: one program per key block and kv head
accumulates dK, dV over every query head of its GQA group and every query block; one per query block
and head accumulates dQ over the key blocks.

On sm_90 every half-precision product runs on wgmma, which takes M = 64 rows per warpgroup: the dK/dV
kernel therefore computes its tiles transposed (keys along the rows), so its own 64-key block is the M
of all four products.
"""
import torch
import triton
import triton.language as tl

from . import attention_configs as C  # through the module: tests and sm90_compile.py swap its functions
from .attention import (_bhm_strides, _dropout_keep, _geometry, _grid, _key_range, _mask_args, _program_block_and_head,
                        _real_keys, _row_stats, _row_strides, _scores, _seq_bounds, _tile, _tile_t, _window_key_range,
                        key_padding_range, precision, window_args)


@triton.jit
def _window_query_range(start_n, q_len, k_len, shift, win_left, win_right,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """attention._window_key_range for a key block (the dK/dV kernel): query i sees key j when
    j - shift - right <= i <= j - shift + left. Returns (lo, full_lo, full_hi, hi) over query positions;
    a key block running past k_len has no fully visible query block."""
    last = tl.minimum(start_n + BLOCK_N, k_len) - 1
    lo = tl.maximum(start_n - shift - win_right, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(q_len, tl.maximum(last - shift + win_left + 1, 0))
    full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift - win_right, 0), BLOCK_M) * BLOCK_M
    full_hi = tl.maximum(start_n - shift + win_left + 1, 0) // BLOCK_M * BLOCK_M
    if start_n + BLOCK_N > k_len:
        full_lo = hi
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _probs(a, b, m2, n2, q_len, k_len, shift, win_left, win_right, qk_scale, lse2,
           MASK, stride_mm, stride_mn, KPM,
           HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
           WINDOW: tl.constexpr, CHECK_BOUNDS: tl.constexpr, PRECISION: tl.constexpr):
    """P of a tile (either orientation, see _scores) recomputed from the saved lse (base 2, +inf for rows
    with nothing visible), lse2 broadcast along the query axis of the tile."""
    qk = _scores(a, b, m2, n2, q_len, k_len, shift, win_left, win_right, qk_scale, MASK, stride_mm, stride_mn, KPM,
                 HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW, CHECK_BOUNDS, PRECISION)
    return tl.math.exp2(qk - lse2)


@triton.jit
def _attn_bwd_delta(
    O, DO, DLSE, DELTA, CU_Q,  # out, dO, the gradient reaching lse (optional), delta (float32, lse's layout)
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    stride_gb, stride_gh, stride_gm, stride_lb, stride_lh, stride_lm,  # dlse and delta (= lse) row strides
    H, Lq, EV,
    VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """delta_i = sum_e dO_ie * out_ie (- dlse_i) in float32, one program per query block and head: one
    read of out and dO, no float32 copies of them."""
    m_block, bh = _program_block_and_head(tl.cdiv(Lq, BLOCK_M))
    start_m = m_block * BLOCK_M
    b = bh // H
    h = (bh % H).to(tl.int64)
    q_start, q_len, _, _ = _seq_bounds(CU_Q, CU_Q, b, Lq, Lq, VARLEN)
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    q0 = q_start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    o = _tile(O + b64 * stride_ob + h * stride_oh + q0 * stride_om, offs_m, q_len, stride_om, offs_ev, EV)
    do = _tile(DO + b64 * stride_dob + h * stride_doh + q0 * stride_dom, offs_m, q_len, stride_dom, offs_ev, EV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = offs_m.to(tl.int64)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b64 * stride_gb + h * stride_gh + (q0 + rows) * stride_gm, mask=offs_m < q_len,
                         other=0.0)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + (q0 + rows) * stride_lm, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, MASK, KPM, offs_n, offs_e, offs_ev, E, EV,
                 m_lo, m_hi, q_len, k_len, shift, win_left, win_right, qk_scale, stride_qm, stride_dom, stride_lm,
                 stride_mm, stride_mn, GROUP, stride_qh, stride_doh, stride_lh, stride_mh,
                 seed, bh, max_q, max_k, dropout_p,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr, DROPOUT: tl.constexpr, CHECK_BOUNDS: tl.constexpr, BLOCK_M: tl.constexpr,
                 PRECISION: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, GQA: tl.constexpr):
    """Accumulate dK (DO_DK), dV (DO_DV) of one key block over the query blocks [m_lo, m_hi) of the GROUP query
    heads that share its kv head (Q, DO, LSE, DELTA, MASK and bh at the first of them; GQA: GROUP > 1).

    With GQA, one flat loop over (head, query block) rather than a loop over heads around the query loops:
    nested, the sm_90 compiles held ~60 more registers a thread than one head's (E = 64 causal 32 x 64: 231
    against 170 on Triton 3.6, 222 against 175 on 3.9; packed E = 128 32 x 64 w8: 252 | 233 against 194 |
    177 flat), and every head drained and refilled the software pipeline. Without GQA the plain query loop:
    the flat one's head arithmetic costs a single head 5 to 19 registers on 3.9.

    Everything is computed transposed, keys along the rows ([BLOCK_N, BLOCK_M] tiles: P^T = exp(k q^T - lse),
    dP^T = v dO^T), so that all four products have the key block as their M dimension: with BLOCK_N = 64
    each one runs on Hopper's wgmma, whatever BLOCK_M is (wgmma needs M = 64 per warpgroup). dV needs P only;
    dK needs P and dP (so v). An accumulator not asked for is returned as it came.
    """
    offs_mb = tl.arange(0, BLOCK_M)
    if GQA:  # iteration it: head g = it // n_it, query block it % n_it
        n_it = tl.maximum(tl.cdiv(m_hi - m_lo, BLOCK_M), 0)
        it_lo, it_hi, it_step = 0, GROUP * n_it, 1
    else:
        it_lo, it_hi, it_step = m_lo, m_hi, BLOCK_M
    for it in range(it_lo, it_hi, it_step):
        if GQA:
            g = it // n_it
            start_m = m_lo + (it - g * n_it) * BLOCK_M
            g64 = g.to(tl.int64)
            Qg, DOg, MASKg, bhg = Q + g64 * stride_qh, DO + g64 * stride_doh, MASK + g64 * stride_mh, bh + g
            LSEg, DELTAg = LSE + g64 * stride_lh, DELTA + g64 * stride_lh
        else:
            start_m = it
            Qg, DOg, LSEg, DELTAg, MASKg, bhg = Q, DO, LSE, DELTA, MASK, bh
        offs_m = start_m + offs_mb
        qT = _tile_t(Qg, offs_m, q_len, stride_qm, offs_e, E)  # [BLOCK_E, BLOCK_M]
        do = _tile(DOg, offs_m, q_len, stride_dom, offs_ev, EV)  # [BLOCK_M, BLOCK_EV]
        lse2, delta = _row_stats(LSEg, DELTAg, offs_m, q_len, stride_lm)
        pT = _probs(k, qT, offs_m[None, :], offs_n[:, None], q_len, k_len, shift, win_left, win_right, qk_scale,
                    lse2[None, :], MASKg, stride_mm, stride_mn, KPM, HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW,
                    CHECK_BOUNDS, PRECISION)
        if DO_DK:
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        if DROPOUT:
            keep = _dropout_keep(seed, bhg, offs_m[None, :], offs_n[:, None], max_q, max_k, dropout_p)
            pdT = tl.where(keep, pT / (1.0 - dropout_p), 0.0)
            if DO_DK:
                dpT = tl.where(keep, dpT / (1.0 - dropout_p), 0.0)
        else:
            pdT = pT
        if DO_DV:
            dv += tl.dot(pdT.to(do.dtype), do, input_precision=PRECISION)
        if DO_DK:
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_program(
    n_block, bkv,
    Q, K, V, DO, LSE, DELTA, DK, DV,
    MASK, KPM, KV_RANGE, CU_Q, CU_K, SEED,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,  # LSE and DELTA share strides
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_kpb,
    H, GROUP, Lq, Lk, E, EV,
    sm_scale, dropout_p, win_left, win_right,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "tf32x3" for float32 inputs (see precision)
    GQA: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
):
    """dK (DO_DK) and dV (DO_DV) of key block n_block of kv head bkv (batch x kv head): summed over the GQA
    group's query heads and all queries. Padding-only key blocks store zeros."""
    start_n = n_block * BLOCK_N
    HKV = H // GROUP
    b = bkv // HKV
    kvh = bkv % HKV
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, Lq, Lk, VARLEN)
    if start_n >= k_len:
        return
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    kv_ok = offs_n < k_len
    K += b64 * stride_kb + kvh.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    V += b64 * stride_vb + kvh.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    k = _tile(K, offs_n, k_len, stride_kn, offs_e, E)  # [BLOCK_N, BLOCK_E]
    # An accumulator this program does not own is a [1, 1] stand-in that _dkdv_blocks hands back untouched.
    if DO_DK:
        v = _tile(V, offs_n, k_len, stride_vn, offs_ev, EV)  # [BLOCK_N, BLOCK_EV]: dP^T = v dO^T
        dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    else:
        v = k  # unused
        dk = tl.zeros([1, 1], dtype=tl.float32)
    if DO_DV:
        dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=tl.float32)
    else:
        dv = tl.zeros([1, 1], dtype=tl.float32)
    shift = k_len - q_len if BOTTOM_RIGHT else 0
    kv_begin, kv_end = _real_keys(KV_RANGE, b, k_len, HAS_KPM)
    seed = tl.load(SEED) if DROPOUT else 0
    qk_scale = sm_scale * 1.4426950408889634
    # Queries that can see this key block: with causal, i >= start_n - shift. From m_masked on, every
    # query of a block sees every key of this one (i >= start_n + BLOCK_N - 1 - shift), unless the key
    # block runs past the sequence end.
    # With a window: [lo, m_masked) and [m_full_hi, m_hi) are the partial query blocks at the band's two
    # edges, [m_masked, m_full_hi) the fully visible ones; no other query block is visited.
    if WINDOW:
        lo, m_masked, m_full_hi, m_hi = _window_query_range(start_n, q_len, k_len, shift, win_left, win_right,
                                                            BLOCK_M, BLOCK_N)
    else:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M if CAUSAL else 0
        if start_n + BLOCK_N > k_len:
            m_masked = q_len
        elif CAUSAL:
            m_masked = tl.maximum(start_n + BLOCK_N - 1 - shift + BLOCK_M - 1, 0) // BLOCK_M * BLOCK_M
        else:
            m_masked = 0
        m_full_hi = q_len
        m_hi = q_len
    if (start_n < kv_end) & (start_n + BLOCK_N > kv_begin):  # else padding only: zero gradients
        h = kvh * GROUP  # the group's first query head; _dkdv_blocks walks the GROUP heads
        bh = b * H + h
        Qh = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
        DOh = DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + q_start.to(tl.int64) * stride_dom
        row0 = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_lm
        MASKh = MASK + b64 * stride_mb + h.to(tl.int64) * stride_mh
        # Query blocks on the causal diagonal (or facing a partial key block) need the per-element
        # test; the ones wholly below it do not.
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE + row0, DELTA + row0, MASKh, KPM + b64 * stride_kpb,
                              offs_n, offs_e, offs_ev, E, EV, lo, tl.minimum(m_masked, m_hi), q_len, k_len,
                              shift, win_left, win_right, qk_scale, stride_qm, stride_dom, stride_lm, stride_mm,
                              stride_mn, GROUP, stride_qh, stride_doh, stride_lh, stride_mh, seed, bh, Lq, Lk,
                              dropout_p, HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW,
                              DROPOUT, True, BLOCK_M, PRECISION, DO_DK, DO_DV, GQA)
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE + row0, DELTA + row0, MASKh, KPM + b64 * stride_kpb,
                              offs_n, offs_e, offs_ev, E, EV, tl.maximum(m_masked, lo), m_full_hi, q_len, k_len,
                              shift, win_left, win_right, qk_scale, stride_qm, stride_dom, stride_lm, stride_mm,
                              stride_mn, GROUP, stride_qh, stride_doh, stride_lh, stride_mh, seed, bh, Lq, Lk,
                              dropout_p, HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW,
                              DROPOUT, False, BLOCK_M, PRECISION, DO_DK, DO_DV, GQA)
        if WINDOW:  # the query blocks on the band's far edge
            dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE + row0, DELTA + row0, MASKh,
                                  KPM + b64 * stride_kpb, offs_n, offs_e, offs_ev, E, EV, m_full_hi, m_hi, q_len,
                                  k_len, shift, win_left, win_right, qk_scale, stride_qm, stride_dom, stride_lm,
                                  stride_mm, stride_mn, GROUP, stride_qh, stride_doh, stride_lh, stride_mh, seed, bh,
                                  Lq, Lk, dropout_p, HAS_MASK, MASK_BOOL, HAS_KPM,
                                  CAUSAL, WINDOW, DROPOUT, True, BLOCK_M, PRECISION, DO_DK, DO_DV, GQA)
    if DO_DK:
        dk = dk * sm_scale
        DK += b64 * stride_dkb + kvh.to(tl.int64) * stride_dkh + k_start.to(tl.int64) * stride_dkn
        tl.store(DK + offs_n[:, None].to(tl.int64) * stride_dkn + offs_e[None, :], dk.to(DK.dtype.element_ty),
                 mask=kv_ok[:, None] & (offs_e[None, :] < E))
    if DO_DV:
        DV += b64 * stride_dvb + kvh.to(tl.int64) * stride_dvh + k_start.to(tl.int64) * stride_dvn
        tl.store(DV + offs_n[:, None].to(tl.int64) * stride_dvn + offs_ev[None, :], dv.to(DV.dtype.element_ty),
                 mask=kv_ok[:, None] & (offs_ev[None, :] < EV))


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    MASK, KPM, KV_RANGE, CU_Q, CU_K, SEED,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,  # LSE and DELTA share strides
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_kpb,
    H, GROUP, Lq, Lk, E, EV,
    sm_scale, dropout_p, win_left, win_right,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "tf32x3" for float32 inputs (see precision)
    SPLIT: tl.constexpr = False,  # two programs a key block, one for dV, one for dK (see dkdv_split)
    GQA: tl.constexpr = False,  # GROUP > 1: one flat loop over the group's heads and query blocks (_dkdv_blocks)
):
    """dK, dV of one key block of one kv head: summed over the GQA group's query heads and all queries.

    SPLIT: two programs a key block (adjacent, so they read the same query tiles while L2 has them), the
    even one for dV (needs P: k q^T and P^T dO), the odd one for dK (needs P and dP: k q^T, v dO^T, dS^T q).
    Each holds one [BLOCK_N, E] float32 accumulator instead of two, for 5 products a key and query block
    instead of 4 (attention_configs.dkdv_split: at head dim 256 the two accumulators alone are 128 registers
    a thread on 8 warps).
    """
    if SPLIT:
        n_block2, bkv = _program_block_and_head(tl.cdiv(Lk, BLOCK_N) * 2)
        if n_block2 % 2 == 0:
            _dkdv_program(n_block2 // 2, bkv, Q, K, V, DO, LSE, DELTA, DK, DV, MASK, KPM, KV_RANGE, CU_Q, CU_K, SEED,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                          stride_vn, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm, stride_dkb,
                          stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_mb, stride_mh, stride_mm,
                          stride_mn, stride_kpb, H, GROUP, Lq, Lk, E, EV, sm_scale, dropout_p, win_left, win_right,
                          CAUSAL, WINDOW, BOTTOM_RIGHT, VARLEN, HAS_MASK, MASK_BOOL, HAS_KPM, DROPOUT, BLOCK_M, BLOCK_N,
                          BLOCK_E, BLOCK_EV, PRECISION, GQA, False, True)
        else:
            _dkdv_program(n_block2 // 2, bkv, Q, K, V, DO, LSE, DELTA, DK, DV, MASK, KPM, KV_RANGE, CU_Q, CU_K, SEED,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                          stride_vn, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm, stride_dkb,
                          stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_mb, stride_mh, stride_mm,
                          stride_mn, stride_kpb, H, GROUP, Lq, Lk, E, EV, sm_scale, dropout_p, win_left, win_right,
                          CAUSAL, WINDOW, BOTTOM_RIGHT, VARLEN, HAS_MASK, MASK_BOOL, HAS_KPM, DROPOUT, BLOCK_M, BLOCK_N,
                          BLOCK_E, BLOCK_EV, PRECISION, GQA, True, False)
    else:
        n_block, bkv = _program_block_and_head(tl.cdiv(Lk, BLOCK_N))
        _dkdv_program(n_block, bkv, Q, K, V, DO, LSE, DELTA, DK, DV, MASK, KPM, KV_RANGE, CU_Q, CU_K, SEED, stride_qb,
                      stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                      stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm, stride_dkb, stride_dkh,
                      stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_mb, stride_mh, stride_mm, stride_mn,
                      stride_kpb, H, GROUP, Lq, Lk, E, EV, sm_scale, dropout_p, win_left, win_right, CAUSAL, WINDOW,
                      BOTTOM_RIGHT, VARLEN, HAS_MASK, MASK_BOOL, HAS_KPM, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV,
                      PRECISION, GQA, True, True)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, K, V, MASK, KPM, offs_m, offs_e, offs_ev, E, EV, n_lo, n_hi, q_len, k_len,
               shift, win_left, win_right, qk_scale, stride_kn, stride_vn, stride_mm, stride_mn, seed, bh, max_q, max_k,
               dropout_p,
               HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr, DROPOUT: tl.constexpr, CHECK_BOUNDS: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [n_lo, n_hi)."""
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_nb
        kT = _tile_t(K, offs_n, k_len, stride_kn, offs_e, E)
        vT = _tile_t(V, offs_n, k_len, stride_vn, offs_ev, EV)
        p = _probs(q, kT, offs_m[:, None], offs_n[None, :], q_len, k_len, shift, win_left, win_right, qk_scale,
                   lse2[:, None], MASK, stride_mm, stride_mn, KPM,
                   HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW, CHECK_BOUNDS, PRECISION)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], max_q, max_k, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    MASK, KPM, KV_RANGE, CU_Q, CU_K, SEED,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_kpb,
    H, GROUP, Lq, Lk, E, EV,
    sm_scale, dropout_p, win_left, win_right,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "tf32x3" for float32 inputs (see precision)
):
    """dQ of one query block of one head, over the key blocks it can see."""
    m_block, bh = _program_block_and_head(tl.cdiv(Lq, BLOCK_M))
    start_m = m_block * BLOCK_M
    b = bh // H
    h = bh % H
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, Lq, Lk, VARLEN)
    if start_m >= q_len:
        return
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    b64 = b.to(tl.int64)
    kvh = (h // GROUP).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < q_len
    Q += b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    DO += b64 * stride_dob + h.to(tl.int64) * stride_doh + q_start.to(tl.int64) * stride_dom
    K += b64 * stride_kb + kvh * stride_kh + k_start.to(tl.int64) * stride_kn
    V += b64 * stride_vb + kvh * stride_vh + k_start.to(tl.int64) * stride_vn
    MASK += b64 * stride_mb + h.to(tl.int64) * stride_mh
    KPM += b64 * stride_kpb
    row0 = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_lm
    q = _tile(Q, offs_m, q_len, stride_qm, offs_e, E)
    do = _tile(DO, offs_m, q_len, stride_dom, offs_ev, EV)
    lse2, delta = _row_stats(LSE + row0, DELTA + row0, offs_m, q_len, stride_lm)
    shift = k_len - q_len if BOTTOM_RIGHT else 0
    kv_begin, kv_end = _real_keys(KV_RANGE, b, k_len, HAS_KPM)
    if WINDOW:
        lo, full_lo, n_full, hi = _window_key_range(start_m, q_len, kv_begin, kv_end, shift, win_left, win_right,
                                                    BLOCK_M, BLOCK_N)
    else:
        n_full, hi = _key_range(start_m, q_len, k_len, kv_end, shift, CAUSAL, BLOCK_M, BLOCK_N)
        lo = kv_begin // BLOCK_N * BLOCK_N
        full_lo = lo
    seed = tl.load(SEED) if DROPOUT else 0
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    # As in the forward: (with a window, the band's left-edge blocks,) key blocks every query of the tile
    # sees, then the diagonal / band edge / last blocks.
    if WINDOW:
        dq = _dq_blocks(dq, q, do, lse2, delta, K, V, MASK, KPM, offs_m, offs_e, offs_ev, E, EV, lo, full_lo, q_len,
                        k_len, shift, win_left, win_right, qk_scale, stride_kn, stride_vn, stride_mm, stride_mn, seed,
                        bh, Lq, Lk, dropout_p, HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW, DROPOUT, True, BLOCK_N,
                        PRECISION)
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, MASK, KPM, offs_m, offs_e, offs_ev, E, EV, full_lo, n_full, q_len,
                    k_len, shift, win_left, win_right, qk_scale, stride_kn, stride_vn, stride_mm, stride_mn, seed, bh,
                    Lq, Lk, dropout_p, HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW, DROPOUT, False, BLOCK_N, PRECISION)
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, MASK, KPM, offs_m, offs_e, offs_ev, E, EV,
                    tl.maximum(n_full, full_lo), hi, q_len, k_len, shift, win_left, win_right, qk_scale, stride_kn,
                    stride_vn, stride_mm, stride_mn, seed, bh, Lq, Lk, dropout_p, HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL,
                    WINDOW, DROPOUT, True, BLOCK_N, PRECISION)
    dq = dq * sm_scale
    DQ += b64 * stride_dqb + h.to(tl.int64) * stride_dqh + q_start.to(tl.int64) * stride_dqm
    tl.store(DQ + offs_m[:, None].to(tl.int64) * stride_dqm + offs_e[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_e[None, :] < E))


# The backward through the autotuner (FUSEDLM_AUTOTUNE=1): see attention_configs.py.
_attn_bwd_dkdv_tuned = C._tuned(_attn_bwd_dkdv, C._BWD_CANDIDATES, backward=True)
_attn_bwd_dq_tuned = C._tuned(_attn_bwd_dq, C._BWD_CANDIDATES, backward=True)


def attention_bwd(launch, do, dlse, q, k, v, out, lse, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                  max_q, max_k, scale, causal, bottom_right, dropout_p, seed, window=None):
    """-> (dq, dk, dv), new tensors shaped like q, k, v. ``dlse``: the gradient reaching lse, or None."""
    varlen, B, H, Hkv, Lq, Lk, E, Ev = _geometry(q, k, v, cu_seqlens_q, max_q, max_k)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0 and dk.numel() == 0 and dv.numel() == 0:
        return dq, dk, dv
    if B == 0 or Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse_strides = _row_strides(lse, varlen)
    dummy = lse
    cfg = C.block_config(E, Ev, causal, q.dtype, q.device, backward=True)
    dq_cfg, dkdv_cfg = cfg, C.dkdv_config(cfg)
    if dropout_p > 0:  # the Philox keep mask's registers: smaller loop blocks (see dropout_config)
        dq_cfg, dkdv_cfg = C.dropout_config(dq_cfg, "dq", q.dtype), C.dropout_config(dkdv_cfg, "dkdv", q.dtype)
    # delta_i = sum_e dO_ie * out_ie. A gradient reaching lse adds dlse_i * P_ij to dz_ij
    # (d lse_i / d z_ij = P_ij), i.e. dS = P * (dP - (delta - dlse)): folded into delta.
    delta = torch.empty_like(lse)
    launch(_attn_bwd_delta, _grid(Lq, cfg["BLOCK_M"], B * H),
           out, do, dlse if dlse is not None else lse, delta, cu_seqlens_q if varlen else lse,
           *_bhm_strides(out, varlen), *_bhm_strides(do, varlen),
           *(_row_strides(dlse, varlen) if dlse is not None else (0, 0, 0)), *lse_strides,
           H, Lq, Ev, VARLEN=varlen, HAS_DLSE=dlse is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_EV=cfg["BLOCK_EV"],
           num_warps=4)
    kv_range = key_padding_range(key_padding_mask) if key_padding_mask is not None else None
    mask_ptrs, mask_strides, mask_flags = _mask_args(attn_mask, key_padding_mask, kv_range, B, H, Lq, Lk, dummy)
    common_ptrs = (*mask_ptrs, cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
                   seed if seed is not None else dummy)
    in_strides = (*_bhm_strides(q, varlen), *_bhm_strides(k, varlen), *_bhm_strides(v, varlen),
                  *_bhm_strides(do, varlen), *lse_strides)
    win_left, win_right, has_window = window_args(window, causal, Lq, Lk)
    scalars = (H, H // Hkv, Lq, Lk, E, Ev, float(scale), float(dropout_p), win_left, win_right)
    flags = dict(CAUSAL=causal, WINDOW=has_window, BOTTOM_RIGHT=bottom_right, VARLEN=varlen, DROPOUT=dropout_p > 0,
                 **mask_flags, PRECISION=precision(q))
    split = C.dkdv_split(dkdv_cfg)  # two programs a key block (dV, dK) at head dim 256
    C._launch_blocks(launch, _attn_bwd_dkdv, _attn_bwd_dkdv_tuned,
                     lambda bm, bn: _grid(Lk, bn, B * Hkv * (2 if split else 1)),
                     (q, k, v, do, lse, delta, dk, dv, *common_ptrs, *in_strides, *_bhm_strides(dk, varlen),
                      *_bhm_strides(dv, varlen), *mask_strides, *scalars), dkdv_cfg,
                     dict(flags, SPLIT=split, GQA=H != Hkv), q.device)
    C._launch_blocks(launch, _attn_bwd_dq, _attn_bwd_dq_tuned, lambda bm, bn: _grid(Lq, bm, B * H),
                     (q, k, v, do, lse, delta, dq, *common_ptrs, *in_strides, *_bhm_strides(dq, varlen),
                      *mask_strides, *scalars), dq_cfg, flags, q.device)
    return dq, dk, dv
