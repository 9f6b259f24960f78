"""DeBERTa attention's backward: the dQ, dK/dV and band kernels, the bucket fold, and their launcher.
The math, the tile kinds and the shared helpers are in kernels/deberta.py (read it first).
"""
import torch
import triton
import triton.language as tl

from . import attention
from . import deberta as F  # block_config through the module: tests swap it for the GPU's
from fusedlm._triton import num_programs

from .attention import _row_stats, _tile, _tile_t
from .deberta import (_bhm, _col_runs, _dot_rows, _geometry, _keep, _masks, _new_out, _pos_args, _pos_row,
                      _pos_rows, _real_keys, _row_runs, _scores, _sequence, _window_t)


@triton.jit
def _dq_blocks(dq, rs_lo, rs_hi, q, do, lse2, delta, c_run, pq_run, K, V, PK, PQ, IDX, KPM, SEED, stride_kn,
               stride_vn, stride_pkr, stride_pqr, start_m, offs_m, offs_d, D, L, SMAX, D_LO, D_HI, lo, hi, qk_scale,
               b, h, H, dropout_p, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr,
               DROPOUT: tl.constexpr, WINDOW: tl.constexpr, LAST_RUN: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr):
    """dQ over key blocks [lo, hi) (unscaled), and the rows' sums of dS over the first / last run."""
    offs_nb = tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, W)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        kT = _tile_t(K, offs_n, L, stride_kn, offs_d, D)
        vT = _tile_t(V, offs_n, L, stride_vn, offs_d, D)
        s = _scores(q, kT, c_run, pq_run, PK, PQ, IDX, KPM, offs_m, offs_n, start_m, start_n, L, SMAX, offs_d, D,
                    stride_pkr, stride_pqr, qk_scale, HAS_C2P, HAS_P2C, HAS_KPM, WINDOW, BLOCK_M, BLOCK_N, W,
                    PRECISION)
        dmin = start_m - start_n - (BLOCK_N - 1)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(SEED, b, h, H, SMAX, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
        if WINDOW:
            if HAS_C2P:
                # un-skew: Dw[a, w] = dS[a, c] with c the key at distance dmin + w; band distances go through the
                # window's rows now, the runs' through the row sums (and pos_key[IDX_LO / IDX_HI] at the end)
                dw = dmin + offs_w
                c = offs_m[:, None] - dw[None, :] - start_n  # key (in the block) of row i at distance dw
                dsw = tl.where((c >= 0) & (c < BLOCK_N),
                               tl.gather(ds.to(kT.dtype), tl.minimum(tl.maximum(c, 0), BLOCK_N - 1), axis=1), 0.0)
                band = (dw > D_LO) & (dw < D_HI)
                pk = _pos_rows(PK, IDX, dw, SMAX, offs_d, D, stride_pkr)  # loaded again: a short live range
                dq += tl.dot(tl.where(band[None, :], dsw, 0.0).to(pk.dtype), pk, input_precision=PRECISION)
                rs_lo += tl.sum(tl.where(dw[None, :] <= D_LO, dsw, 0.0), 1)
                rs_hi += tl.sum(tl.where(dw[None, :] >= D_HI, dsw, 0.0), 1)
        else:
            if LAST_RUN:
                rs_hi += tl.sum(ds, 1)
            else:
                rs_lo += tl.sum(ds, 1)
    return dq, rs_lo, rs_hi


@triton.jit
def _item(CU, item, NM, SMAX, VARLEN: tl.constexpr):
    """Work item ``item`` = b NM + block of a persistent program: (batch, first row, length, block index)."""
    start, seq_len = _sequence(CU, item // NM, SMAX, VARLEN)
    return (item // NM).to(tl.int64), start, seq_len, item % NM


@triton.jit
def _deberta_bwd_dq(
    Q, K, V, O, DO, DLSE, LSE, DELTA, DQ, SAT,  # DELTA: written here (float32, lse's layout)
    PK, PQ, IDX, KPM, KV_END, CU, SEED,  # SAT: float32 (2, H, P, BLOCK_D), the runs' dpos_key sums
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh, stride_lm, stride_gb, stride_gh, stride_gm,  # LSE and DELTA; DLSE
    stride_dqb, stride_dqh, stride_dqm,
    stride_pkh, stride_pkr, stride_pqh, stride_pqr, stride_kpb,
    B, H, NM, P, SMAX, D, D_LO, D_HI, IDX_LO, IDX_HI,  # NM query blocks a sequence, P programs a head
    sm_scale, dropout_p,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_DLSE: tl.constexpr, DPOS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr,
):
    """delta and dQ of query blocks of one head over every key block; with DPOS the first / last run's share
    of dpos_key. Persistent: P programs a head take the (sequence, query block) items p, p + P, ..., so the
    runs' sums need P slots a head, whatever the batch and the sequence length."""
    h = (tl.program_id(0) // P).to(tl.int64)
    p = tl.program_id(0) % P
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    PK += h * stride_pkh
    PQ += h * stride_pqh
    qk_scale = sm_scale * 1.4426950408889634
    sat_lo = tl.zeros([BLOCK_D], dtype=tl.float32)
    sat_hi = tl.zeros([BLOCK_D], dtype=tl.float32)
    for item in range(p, B * NM, P):
        b, start, L, m = _item(CU, item, NM, SMAX, VARLEN)
        start_m = m * BLOCK_M
        if start_m < L:  # blocks past a sequence's end (packed batches count blocks for the longest): none
            # the runs' embedding rows, loaded per item (cached; held across the loop they would take registers)
            pk_hi = _pos_row(PK, IDX_HI, offs_d, D, stride_pkr, HAS_C2P)
            pk_lo = _pos_row(PK, IDX_LO, offs_d, D, stride_pkr, HAS_C2P)
            pq_hi = _pos_row(PQ, IDX_HI, offs_d, D, stride_pqr, HAS_P2C)
            pq_lo = _pos_row(PQ, IDX_LO, offs_d, D, stride_pqr, HAS_P2C)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < L
            Kb = K + (b * stride_kb + h * stride_kh + start * stride_kn)
            Vb = V + (b * stride_vb + h * stride_vh + start * stride_vn)
            rows = b * stride_lb + h * stride_lh + start * stride_lm
            KPMb = KPM + b * stride_kpb
            q = _tile(Q + (b * stride_qb + h * stride_qh + start * stride_qm), offs_m, L, stride_qm, offs_d, D)
            do = _tile(DO + (b * stride_dob + h * stride_doh + start * stride_dom), offs_m, L, stride_dom, offs_d, D)
            # delta_i = sum_d dO_id out_id (- dlse_i: a gradient reaching lse adds dlse_i P_ij to dz_ij).
            o = _tile(O + (b * stride_ob + h * stride_oh + start * stride_om), offs_m, L, stride_om, offs_d, D)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            if HAS_DLSE:  # any strides (autograd may expand zeros)
                dlse_row = DLSE + (b * stride_gb + h * stride_gh + start * stride_gm)
                delta -= tl.load(dlse_row + offs_m.to(tl.int64) * stride_gm, mask=row_ok, other=0.0)
            tl.store(DELTA + rows + offs_m.to(tl.int64) * stride_lm, delta, mask=row_ok)
            lse = tl.load(LSE + rows + offs_m.to(tl.int64) * stride_lm, mask=row_ok, other=float("-inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # P = 0 on empty rows
            kv_end = tl.minimum(L, tl.load(KV_END + b)) if HAS_KPM else L
            hi_end, lo_start = _row_runs(start_m, kv_end, D_LO, D_HI, BLOCK_M, BLOCK_N)
            c_hi = _dot_rows(q, pk_hi)
            c_lo = _dot_rows(q, pk_lo)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            rs_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
            rs_hi = tl.zeros([BLOCK_M], dtype=tl.float32)
            dq, rs_lo, rs_hi = _dq_blocks(dq, rs_lo, rs_hi, q, do, lse2, delta, c_hi, pq_hi, Kb, Vb, PK, PQ, IDX, KPMb,
                                          SEED, stride_kn, stride_vn, stride_pkr, stride_pqr, start_m, offs_m, offs_d,
                                          D, L, SMAX, D_LO, D_HI, 0, hi_end, qk_scale, b, h, H, dropout_p, HAS_C2P,
                                          HAS_P2C, HAS_KPM, DROPOUT, False, True, BLOCK_M, BLOCK_N, W, PRECISION)
            dq, rs_lo, rs_hi = _dq_blocks(dq, rs_lo, rs_hi, q, do, lse2, delta, c_hi, pq_hi, Kb, Vb, PK, PQ, IDX, KPMb,
                                          SEED, stride_kn, stride_vn, stride_pkr, stride_pqr, start_m, offs_m, offs_d,
                                          D, L, SMAX, D_LO, D_HI, hi_end, lo_start, qk_scale, b, h, H, dropout_p,
                                          HAS_C2P, HAS_P2C, HAS_KPM, DROPOUT, True, True, BLOCK_M, BLOCK_N, W,
                                          PRECISION)
            dq, rs_lo, rs_hi = _dq_blocks(dq, rs_lo, rs_hi, q, do, lse2, delta, c_lo, pq_lo, Kb, Vb, PK, PQ, IDX, KPMb,
                                          SEED, stride_kn, stride_vn, stride_pkr, stride_pqr, start_m, offs_m, offs_d,
                                          D, L, SMAX, D_LO, D_HI, lo_start, kv_end, qk_scale, b, h, H, dropout_p,
                                          HAS_C2P, HAS_P2C, HAS_KPM, DROPOUT, False, False, BLOCK_M, BLOCK_N, W,
                                          PRECISION)
            if HAS_C2P:  # the runs' share: dQ_i += rs pos_key[run]; of dpos_key: sum_i rs_i q_i
                dq += rs_lo[:, None] * pk_lo[None, :] + rs_hi[:, None] * pk_hi[None, :]
                if DPOS:
                    qf = q.to(tl.float32)
                    sat_lo += tl.sum(rs_lo[:, None] * qf, 0)
                    sat_hi += tl.sum(rs_hi[:, None] * qf, 0)
            dq = dq * sm_scale
            DQb = DQ + (b * stride_dqb + h * stride_dqh + start * stride_dqm)
            tl.store(DQb + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                     mask=row_ok[:, None] & (offs_d[None, :] < D))
    if DPOS:  # SAT[side, h, p, :]
        slot = SAT + (h * P + p) * BLOCK_D + offs_d
        tl.store(slot, sat_lo * sm_scale)
        tl.store(slot + H * P * BLOCK_D, sat_hi * sm_scale)


@triton.jit
def _dkdv_blocks(dk, dv, cs_lo, cs_hi, k, v, real, c_run, p_run, Q, DO, LSE, DELTA, rows, PK, PQ, IDX, SEED,
                 stride_qm, stride_dom, stride_lm, stride_pkr, stride_pqr, start_n, offs_n, offs_d, D, L, SMAX,
                 D_LO, D_HI, lo, hi, qk_scale, b, h, H, dropout_p,
                 HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr,
                 LAST_RUN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr,
                 PRECISION: tl.constexpr):
    """dK (unscaled), dV over query blocks [lo, hi) on transposed tiles (row = key, column = query), and the
    keys' sums of dS over the first / last run. c_run: the run's pos_key row; p_run: its P2C per key."""
    offs_mb = tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, W)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_mb
        qT = _tile_t(Q, offs_m, L, stride_qm, offs_d, D)  # [BLOCK_D, BLOCK_M]
        do = _tile(DO, offs_m, L, stride_dom, offs_d, D)  # [BLOCK_M, BLOCK_D]
        lse2, delta = _row_stats(LSE + rows, DELTA + rows, offs_m, L, stride_lm)
        sT = tl.dot(k, qT, input_precision=PRECISION)
        dmin = start_m - start_n - (BLOCK_N - 1)
        if WINDOW:
            sT += _window_t(qT, k, PK, PQ, IDX, offs_m, offs_n, dmin, SMAX, offs_d, D, stride_pkr, stride_pqr,
                            HAS_C2P, HAS_P2C, BLOCK_M, BLOCK_N, W, PRECISION)
        else:
            if HAS_C2P:
                sT += tl.sum(qT.to(tl.float32) * c_run[:, None], 0)[None, :]
            if HAS_P2C:
                sT += p_run[:, None]
        sT = tl.where(real[:, None], sT * qk_scale, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        if DROPOUT:
            keepT = _keep(SEED, b, h, H, SMAX, offs_m[None, :], offs_n[:, None], dropout_p)
            pdT = tl.where(keepT, pT / (1.0 - dropout_p), 0.0)
            dpT = tl.where(keepT, dpT / (1.0 - dropout_p), 0.0)
        else:
            pdT = pT
        dv += tl.dot(pdT.to(do.dtype), do, input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        if WINDOW:
            if HAS_P2C:
                # un-skew: DwT[c, w] = dS^T[c, a] with a the query of key c at distance dmin + w
                dw = dmin + offs_w
                a = offs_n[:, None] + dw[None, :] - start_m  # query (in the block) of key j at distance dw
                dsw = tl.where((a >= 0) & (a < BLOCK_M),
                               tl.gather(dsT.to(k.dtype), tl.minimum(tl.maximum(a, 0), BLOCK_M - 1), axis=1), 0.0)
                band = (dw > D_LO) & (dw < D_HI)
                pq = _pos_rows(PQ, IDX, dw, SMAX, offs_d, D, stride_pqr)  # loaded again: a short live range
                dk += tl.dot(tl.where(band[None, :], dsw, 0.0).to(pq.dtype), pq, input_precision=PRECISION)
                cs_lo += tl.sum(tl.where(dw[None, :] <= D_LO, dsw, 0.0), 1)
                cs_hi += tl.sum(tl.where(dw[None, :] >= D_HI, dsw, 0.0), 1)
        else:
            if LAST_RUN:
                cs_hi += tl.sum(dsT, 1)
            else:
                cs_lo += tl.sum(dsT, 1)
    return dk, dv, cs_lo, cs_hi


@triton.jit
def _deberta_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, SAT,  # SAT: float32 (2, H, P, BLOCK_D), the runs' dpos_query sums
    PK, PQ, IDX, KPM, KV_END, CU, SEED,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,  # LSE and DELTA share strides
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_pkh, stride_pkr, stride_pqh, stride_pqr, stride_kpb,
    B, H, NM, P, SMAX, D, D_LO, D_HI, IDX_LO, IDX_HI,  # NM key blocks a sequence, P programs a head
    sm_scale, dropout_p,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, DPOS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK and dV of key blocks of one head over every query block; with DPOS the first / last run's share of
    dpos_query. Persistent as the dQ kernel: P programs a head, P slots of run sums."""
    h = (tl.program_id(0) // P).to(tl.int64)
    p = tl.program_id(0) % P
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    PK += h * stride_pkh
    PQ += h * stride_pqh
    qk_scale = sm_scale * 1.4426950408889634
    sat_lo = tl.zeros([BLOCK_D], dtype=tl.float32)
    sat_hi = tl.zeros([BLOCK_D], dtype=tl.float32)
    for item in range(p, B * NM, P):
        b, start, L, n = _item(CU, item, NM, SMAX, VARLEN)
        start_n = n * BLOCK_N
        if start_n < L:
            pk_hi = _pos_row(PK, IDX_HI, offs_d, D, stride_pkr, HAS_C2P)  # per item, as in the dQ kernel
            pk_lo = _pos_row(PK, IDX_LO, offs_d, D, stride_pkr, HAS_C2P)
            pq_hi = _pos_row(PQ, IDX_HI, offs_d, D, stride_pqr, HAS_P2C)
            pq_lo = _pos_row(PQ, IDX_LO, offs_d, D, stride_pqr, HAS_P2C)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_ok = offs_n < L
            Qb = Q + (b * stride_qb + h * stride_qh + start * stride_qm)
            DOb = DO + (b * stride_dob + h * stride_doh + start * stride_dom)
            rows = b * stride_lb + h * stride_lh + start * stride_lm
            # Every product has the key block as its M dimension (sT = K Q^T, dV += P^T dO, dK += dS^T Q,
            # K PQ^T, DwT PQ), so BLOCK_N = 64 per warpgroup keeps them on Hopper's wgmma.
            k = _tile(K + (b * stride_kb + h * stride_kh + start * stride_kn), offs_n, L, stride_kn, offs_d, D)
            v = _tile(V + (b * stride_vb + h * stride_vh + start * stride_vn), offs_n, L, stride_vn, offs_d, D)
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            cs_lo = tl.zeros([BLOCK_N], dtype=tl.float32)
            cs_hi = tl.zeros([BLOCK_N], dtype=tl.float32)
            kv_end = tl.minimum(L, tl.load(KV_END + b)) if HAS_KPM else L
            real = _real_keys(KPM + b * stride_kpb, offs_n, L, HAS_KPM)
            if start_n < kv_end:  # a block of padding only: its gradients are zeros
                lo_end, hi_start = _col_runs(start_n, L, D_LO, D_HI, BLOCK_M, BLOCK_N)
                p_lo = _dot_rows(k, pq_lo)
                p_hi = _dot_rows(k, pq_hi)
                dk, dv, cs_lo, cs_hi = _dkdv_blocks(dk, dv, cs_lo, cs_hi, k, v, real, pk_lo, p_lo, Qb, DOb, LSE, DELTA,
                                                    rows, PK, PQ, IDX, SEED, stride_qm, stride_dom, stride_lm,
                                                    stride_pkr, stride_pqr, start_n, offs_n, offs_d, D, L, SMAX, D_LO,
                                                    D_HI, 0, lo_end, qk_scale, b, h, H, dropout_p, HAS_C2P, HAS_P2C,
                                                    DROPOUT, False, False, BLOCK_M, BLOCK_N, W, PRECISION)
                dk, dv, cs_lo, cs_hi = _dkdv_blocks(dk, dv, cs_lo, cs_hi, k, v, real, pk_lo, p_lo, Qb, DOb, LSE, DELTA,
                                                    rows, PK, PQ, IDX, SEED, stride_qm, stride_dom, stride_lm,
                                                    stride_pkr, stride_pqr, start_n, offs_n, offs_d, D, L, SMAX, D_LO,
                                                    D_HI, lo_end, hi_start, qk_scale, b, h, H, dropout_p, HAS_C2P,
                                                    HAS_P2C, DROPOUT, True, False, BLOCK_M, BLOCK_N, W, PRECISION)
                dk, dv, cs_lo, cs_hi = _dkdv_blocks(dk, dv, cs_lo, cs_hi, k, v, real, pk_hi, p_hi, Qb, DOb, LSE, DELTA,
                                                    rows, PK, PQ, IDX, SEED, stride_qm, stride_dom, stride_lm,
                                                    stride_pkr, stride_pqr, start_n, offs_n, offs_d, D, L, SMAX, D_LO,
                                                    D_HI, hi_start, L, qk_scale, b, h, H, dropout_p, HAS_C2P, HAS_P2C,
                                                    DROPOUT, False, True, BLOCK_M, BLOCK_N, W, PRECISION)
            if HAS_P2C:  # the runs' share: dK_j += cs pos_query[run]; of dpos_query: sum_j cs_j k_j
                dk += cs_lo[:, None] * pq_lo[None, :] + cs_hi[:, None] * pq_hi[None, :]
                if DPOS:
                    kf = k.to(tl.float32)
                    sat_lo += tl.sum(cs_lo[:, None] * kf, 0)
                    sat_hi += tl.sum(cs_hi[:, None] * kf, 0)
            dk = dk * sm_scale
            DKb = DK + (b * stride_dkb + h * stride_dkh + start * stride_dkn)
            DVb = DV + (b * stride_dvb + h * stride_dvh + start * stride_dvn)
            tl.store(DKb + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
                     mask=kv_ok[:, None] & (offs_d[None, :] < D))
            tl.store(DVb + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
                     mask=kv_ok[:, None] & (offs_d[None, :] < D))
    if DPOS:  # SAT[side, h, p, :]
        slot = SAT + (h * P + p) * BLOCK_D + offs_d
        tl.store(slot, sat_lo * sm_scale)
        tl.store(slot + H * P * BLOCK_D, sat_hi * sm_scale)


@triton.jit
def _rows_at(PTR, pos, n_pos, stride, offs_d, D):
    """[len(pos), BLOCK_D] rows at positions pos that may be negative (zeros outside [0, n_pos))."""
    ok = (pos >= 0) & (pos < n_pos)
    return tl.load(PTR + pos[:, None].to(tl.int64) * stride + offs_d[None, :],
                   mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _deberta_bwd_dpos(
    Q, K, V, DO, LSE, DELTA, EK, EQ,  # EK / EQ: float32 (G, H, band blocks * BLOCK_W, D) per-distance sums
    PK, PQ, IDX, KPM, KV_END, CU, SEED,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
    stride_pkh, stride_pkr, stride_pqh, stride_pqr, stride_kpb, stride_eg, stride_eh,
    B, H, SMAX, D, D_LO, NB, NDB, G, NM,  # sequences, heads, longest, head dim; band start - 1 and length;
    sm_scale, dropout_p,                 # band blocks, slices, query blocks per sequence
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, DPOS_K: tl.constexpr, DPOS_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """The band's share of dpos_key / dpos_query: one head, BLOCK_W band distances d0 + w, slice g of every
    sequence's query blocks. For queries i = i0 + a the keys j = i - d0 - w lie in the rectangle
    jstart + [0, BLOCK_M + BLOCK_W) (jstart = i0 - d0 - BLOCK_W + 1) at column c(a, w) = a + BLOCK_W - 1 - w:
    the [BLOCK_M, BLOCK_W] diagonals of dS are gathered from products over the rectangle."""
    pid = tl.program_id(0)
    g = pid % G
    dblk = (pid // G) % NDB
    h = (pid // G // NDB).to(tl.int64)
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    d0 = D_LO + 1 + dblk * BLOCK_W
    offs_w = tl.arange(0, BLOCK_W)
    offs_a = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_M + BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    w_ok = offs_w < NB - dblk * BLOCK_W
    col = offs_a[:, None] + (BLOCK_W - 1) - offs_w[None, :]  # [BLOCK_M, BLOCK_W] rectangle column of (a, w)
    row = offs_r[:, None] - (BLOCK_W - 1) + offs_w[None, :]  # [BLOCK_M + BLOCK_W, BLOCK_W] query of (c, w)
    row_in = (row >= 0) & (row < BLOCK_M)
    row = tl.minimum(tl.maximum(row, 0), BLOCK_M - 1)
    PK += h * stride_pkh
    PQ += h * stride_pqh
    pk = tl.zeros([BLOCK_W, BLOCK_D], dtype=Q.dtype.element_ty)  # the band's rows [BLOCK_W, BLOCK_D]
    pq = tl.zeros([BLOCK_W, BLOCK_D], dtype=Q.dtype.element_ty)
    if HAS_C2P:
        pk = _pos_rows(PK, IDX, d0 + offs_w, SMAX, offs_d, D, stride_pkr)
    if HAS_P2C:
        pq = _pos_rows(PQ, IDX, d0 + offs_w, SMAX, offs_d, D, stride_pqr)
    ek = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)
    eq = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)
    for item in range(g, B * NM, G):
        b, start, L, m = _item(CU, item, NM, SMAX, VARLEN)
        i0 = m * BLOCK_M
        kv_end = tl.minimum(L, tl.load(KV_END + b)) if HAS_KPM else L
        jstart = i0 - d0 - (BLOCK_W - 1)
        if (i0 < L) & (jstart + BLOCK_M + BLOCK_W > 0) & (jstart < kv_end):
            offs_m = i0 + offs_a
            offs_j = jstart + offs_r
            q = _tile(Q + b * stride_qb + h * stride_qh + start * stride_qm, offs_m, L, stride_qm, offs_d, D)
            do = _tile(DO + b * stride_dob + h * stride_doh + start * stride_dom, offs_m, L, stride_dom, offs_d, D)
            k = _rows_at(K + b * stride_kb + h * stride_kh + start * stride_kn, offs_j, L, stride_kn, offs_d, D)
            v = _rows_at(V + b * stride_vb + h * stride_vh + start * stride_vn, offs_j, L, stride_vn, offs_d, D)
            rows = b * stride_lb + h * stride_lh + start * stride_lm
            lse2, delta = _row_stats(LSE + rows, DELTA + rows, offs_m, L, stride_lm)
            j = jstart + col  # [BLOCK_M, BLOCK_W] key of (a, w)
            ok = (offs_m[:, None] < L) & (j >= 0) & (j < L) & w_ok[None, :]
            if HAS_KPM:
                ok &= tl.load(KPM + b * stride_kpb + j, mask=ok, other=0) != 0
            s = tl.gather(tl.dot(q, tl.trans(k), input_precision=PRECISION), col, axis=1)
            if HAS_C2P:
                s += tl.dot(q, tl.trans(pk), input_precision=PRECISION).to(q.dtype).to(tl.float32)
            if HAS_P2C:
                s += tl.gather(tl.dot(k, tl.trans(pq), input_precision=PRECISION).to(k.dtype), col,
                               axis=0).to(tl.float32)
            s = tl.where(ok, s * qk_scale, float("-inf"))
            p = tl.math.exp2(s - lse2[:, None])
            dp = tl.gather(tl.dot(do, tl.trans(v), input_precision=PRECISION), col, axis=1)
            if DROPOUT:
                keep = _keep(SEED, b, h, H, SMAX, offs_m[:, None], j, dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_W]: dS_ij on the diagonals d0 + w
            if DPOS_K:  # E_key[w] += sum_a dS[a, w] q_a
                ek += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
            if DPOS_Q:  # E_query[w] += sum_c dS[row(c, w), w] k_c
                dsr = tl.where(row_in, tl.gather(ds, row, axis=0), 0.0)  # [BLOCK_M + BLOCK_W, BLOCK_W]
                eq += tl.dot(tl.trans(dsr).to(k.dtype), k, input_precision=PRECISION)
    out = (h * stride_eh + g * stride_eg) + (dblk * BLOCK_W + offs_w[:, None]).to(tl.int64) * BLOCK_D + offs_d[None, :]
    if DPOS_K:
        tl.store(EK + out, ek * sm_scale)
    if DPOS_Q:
        tl.store(EQ + out, eq * sm_scale)


@triton.jit
def _dpos_fold(E, RUNS, STARTS, OUT, stride_eg, stride_eh, stride_rs, stride_rh, stride_oh, stride_or,
               G, D, TWO_SPAN, IDX_LO, IDX_HI, HAS_BAND: tl.constexpr, BLOCK_D: tl.constexpr):
    """dpos[h, r] = sum over the G slices and the band distances STARTS[r] .. STARTS[r + 1] - 1 of E (a run
    of idx = r), plus the first / last run's sum at IDX_LO / IDX_HI: one program per head and bucket, in a
    fixed order."""
    h = tl.program_id(0) // TWO_SPAN
    r = tl.program_id(0) % TWO_SPAN
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BAND:
        first = tl.load(STARTS + r)
        end = tl.load(STARTS + r + 1)
        for g in range(G):
            for n in range(first, end):
                acc += tl.load(E + g * stride_eg + h * stride_eh + n * BLOCK_D + offs_d)
    acc += tl.where(r == IDX_LO, tl.load(RUNS + h * stride_rh + offs_d), 0.0)
    acc += tl.where(r == IDX_HI, tl.load(RUNS + stride_rs + h * stride_rh + offs_d), 0.0)
    tl.store(OUT + h * stride_oh + r * stride_or + offs_d, acc.to(OUT.dtype.element_ty), mask=offs_d < D)


# The band kernel slices the batch up to about one wave of an H100 / H200 (132 SMs) only: each slice is
# another float32 (H, band, D) buffer.
_BAND_PROGRAMS = 128


def _position_grads(launch, sat, e, rel_idx, band, first, max_seqlen, pos, nb):
    """dpos (pos's shape and dtype) from the runs' per-program sums (2, H, P, BLOCK_D) and the band's
    per-distance sums e (G, H, blocks * BLOCK_W, BLOCK_D) or None; distances -> buckets by _dpos_fold."""
    _, _, idx_lo, idx_hi = band
    H, two_span, d = pos.shape
    runs = sat.sum(dim=2)  # (2, H, BLOCK_D): a torch reduction, fixed order
    out = torch.empty_like(pos)
    if nb > 0:  # STARTS[r]: the band distances with idx < r (idx is non-decreasing over the band)
        band_idx = rel_idx.narrow(0, first + max_seqlen - 1, nb)
        starts = torch.searchsorted(band_idx, torch.arange(two_span + 1, device=pos.device, dtype=torch.int32))
        e_ptr, e_strides, slices = e, (e.stride(0), e.stride(1)), e.shape[0]
    else:
        starts, e_ptr, e_strides, slices = runs, runs, (0, 0), 0
    assert e is None or e.shape[-1] == runs.shape[-1], "the fold reads both with one BLOCK_D"
    launch(_dpos_fold, (H * two_span,), e_ptr, runs, starts, out, *e_strides, runs.stride(0), runs.stride(1),
                out.stride(0), out.stride(1), slices, d, two_span, idx_lo, idx_hi, HAS_BAND=nb > 0,
                BLOCK_D=runs.shape[-1])
    return out


def deberta_bwd(launch, do, dlse, q, k, v, pos_key, pos_query, out, lse, key_padding_mask, cu_seqlens, rel_idx,
                max_seqlen, scale, dropout_p, seed, grad_pos_key, grad_pos_query, band):
    """-> (dq, dk, dv, dpos_key or None, dpos_query or None), in the inputs' dtypes. ``dlse``: the gradient
    reaching lse, or None. The position gradients are computed only when asked for."""
    B, H, D, varlen = _geometry(q, cu_seqlens)
    dq, dk, dv = _new_out(q, varlen), _new_out(k, varlen), _new_out(v, varlen)
    grad_pos_key = grad_pos_key and pos_key is not None
    grad_pos_query = grad_pos_query and pos_query is not None
    if q.numel() == 0 or B == 0 or max_seqlen == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return (dq, dk, dv, torch.zeros_like(pos_key) if grad_pos_key else None,
                torch.zeros_like(pos_query) if grad_pos_query else None)
    delta = torch.empty_like(lse)  # written by the dQ kernel, read by the dK/dV and band kernels
    kpm, kv_end, kpb = _masks(key_padding_mask, lse)
    (pk, pq), pos_strides = _pos_args(pos_key, pos_query, q)
    cfg_dq = F.block_config(D, q.dtype, q.device, "dq")
    cfg_dkdv = F.block_config(D, q.dtype, q.device, "dkdv")
    flags = dict(HAS_C2P=pos_key is not None, HAS_P2C=pos_query is not None, HAS_KPM=key_padding_mask is not None,
                 VARLEN=varlen, DROPOUT=dropout_p > 0, PRECISION=attention.precision(q))
    common = (pk, pq, rel_idx, kpm, kv_end, cu_seqlens if varlen else lse, seed if seed is not None else lse)
    io = (*_bhm(q, varlen), *_bhm(k, varlen), *_bhm(v, varlen))
    scalars = (max_seqlen, D, *band, float(scale), float(dropout_p))

    def persistent(cfg, block):
        """(blocks a sequence, programs a head P): two programs an SM in all, rounded down to whole heads (no
        partial wave), each taking every P-th item; on the interpreter a few (several items a program)."""
        nblocks = triton.cdiv(max_seqlen, cfg[block])
        return nblocks, max(1, min(B * nblocks, num_programs(q.device, B * nblocks * H) // H))

    def run_sums(wanted, programs, cfg):
        """float32 (2, H, P, BLOCK_D): each program's sums of the runs' dpos shares (every program writes its own)."""
        return torch.empty(2, H, programs, cfg["BLOCK_D"], device=q.device) if wanted else None

    nm, programs = persistent(cfg_dq, "BLOCK_M")
    sat_k = run_sums(grad_pos_key, programs, cfg_dq)
    launch(_deberta_bwd_dq, (H * programs,),
           q, k, v, out, do, dlse if dlse is not None else lse, lse, delta, dq,
           sat_k if sat_k is not None else lse, *common,
           *io, *_bhm(out, varlen), *_bhm(do, varlen), *_bhm(lse, varlen),
           *(_bhm(dlse, varlen) if dlse is not None else (0, 0, 0)), *_bhm(dq, varlen), *pos_strides, kpb,
           B, H, nm, programs, *scalars, HAS_DLSE=dlse is not None, DPOS=grad_pos_key, **flags, **cfg_dq)
    nn, programs = persistent(cfg_dkdv, "BLOCK_N")
    sat_q = run_sums(grad_pos_query, programs, cfg_dkdv)
    launch(_deberta_bwd_dkdv, (H * programs,),
           q, k, v, do, lse, delta, dk, dv, sat_q if sat_q is not None else lse, *common,
           *io, *_bhm(do, varlen), *_bhm(lse, varlen), *_bhm(dk, varlen), *_bhm(dv, varlen), *pos_strides, kpb,
           B, H, nn, programs, *scalars, DPOS=grad_pos_query, **flags, **cfg_dkdv)
    if not (grad_pos_key or grad_pos_query):
        return dq, dk, dv, None, None
    # the band's distances within this table: first .. first + nb - 1
    first = max(band[0] + 1, 1 - max_seqlen)
    nb = max(min(band[1] - 1, max_seqlen - 1) - first + 1, 0)
    ek = eq = None
    if nb > 0:
        cfg = F.block_config(D, q.dtype, q.device, "dpos")
        nm, ndb = triton.cdiv(max_seqlen, cfg["BLOCK_M"]), triton.cdiv(nb, cfg["BLOCK_W"])
        slices = max(1, min(B * nm, triton.cdiv(_BAND_PROGRAMS, H * ndb)))
        shape = (slices, H, ndb * cfg["BLOCK_W"], cfg["BLOCK_D"])
        ek = torch.empty(shape, device=q.device) if grad_pos_key else None
        eq = torch.empty(shape, device=q.device) if grad_pos_query else None
        dummy = ek if ek is not None else eq
        launch(_deberta_bwd_dpos, (H * ndb * slices,),
               q, k, v, do, lse, delta, ek if ek is not None else dummy, eq if eq is not None else dummy, *common,
               *io, *_bhm(do, varlen), *_bhm(lse, varlen), *pos_strides, kpb, dummy.stride(0), dummy.stride(1),
               B, H, max_seqlen, D, first - 1, nb, ndb, slices, nm, float(scale), float(dropout_p),
               DPOS_K=grad_pos_key, DPOS_Q=grad_pos_query, **flags, **cfg)
    dpk = _position_grads(launch, sat_k, ek, rel_idx, band, first, max_seqlen, pos_key, nb) if grad_pos_key else None
    dpq = (_position_grads(launch, sat_q, eq, rel_idx, band, first, max_seqlen, pos_query, nb) if grad_pos_query
           else None)
    return dq, dk, dv, dpk, dpq
