"""DeBERTa attention's backward, the band's share of the position gradients: the band kernel, the bucket fold
and the assembly of dpos_key / dpos_query (kernels/deberta.py has the math; deberta_backward.py the dQ and
dK/dV kernels, which hand over the runs' per-program sums).

The band kernel owns BLOCK_W band distances d0 + w of one head and a slice of every sequence's query blocks.
For queries i = i0 + a the keys j = i - d0 - w lie in the rectangle jstart + [0, BLOCK_M + BLOCK_W)
(jstart = i0 - d0 - BLOCK_W + 1) at column c(a, w) = a + BLOCK_W - 1 - w, so dS on those diagonals
([BLOCK_M, BLOCK_W]) is gathered from products over the rectangle: q.k and dO.v (Q K^T, dO V^T), P2C (K PQ^T,
down the columns), and C2P is a plain product (Q PK^T: the pos_key rows are the tile's own distances). Then
E_key[w] += sum_a dS[a, w] q_a and E_query[w] += sum_c dS[a(c, w), w] k_c (dS gathered back onto the
rectangle's keys), both as products with Q^T / K^T. Registers as in the dQ / dK-dV kernels (deberta_backward):
products unchained through a branch, skew indices made per tile.
"""
import torch
import triton
import triton.language as tl

from . import deberta as F  # block_config through the module: tests swap it for the GPU's
from .attention import _row_stats, _tile
from .deberta import _bhm, _fresh, _keep, _pos_rows, _sequence


@triton.jit
def _rows_at(PTR, pos, n_pos, stride, offs_d, D):
    """[len(pos), BLOCK_D] rows at positions pos that may be negative (zeros outside [0, n_pos))."""
    ok = (pos >= 0) & (pos < n_pos)
    return tl.load(PTR + pos[:, None].to(tl.int64) * stride + offs_d[None, :],
                   mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _unchain(x, cond):
    """x, routed through a branch so that Triton does not see the product that made x feed another (see
    deberta_backward): its warps split the columns instead of duplicating the rows in both warpgroups."""
    if cond:
        x = x + 0.0
    return x


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
    sequence's query blocks (see the module docstring)."""
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
    PK += h * stride_pkh
    PQ += h * stride_pqh
    # E_key^T, E_query^T of this block of distances: this program's slots, added to per item (read-modify-write:
    # carried in registers through the loop they would be held through every item's products). A barrier after
    # each write: the next read of an element may come from another thread of the program.
    out = (h * stride_eh + g * stride_eg) + (dblk * BLOCK_W + offs_w[None, :]).to(tl.int64) * BLOCK_D + offs_d[:, None]
    if DPOS_K:
        tl.store(EK + out, tl.zeros([BLOCK_D, BLOCK_W], dtype=tl.float32))
    if DPOS_Q:
        tl.store(EQ + out, tl.zeros([BLOCK_D, BLOCK_W], dtype=tl.float32))
    tl.debug_barrier()
    for item in range(g, B * NM, G):
        start, L = _sequence(CU, item // NM, SMAX, VARLEN)
        b = (item // NM).to(tl.int64)
        i0 = (item % NM) * BLOCK_M
        kv_end = tl.minimum(L, tl.load(KV_END + b)) if HAS_KPM else L
        jstart = i0 - d0 - (BLOCK_W - 1)
        if (i0 < L) & (jstart + BLOCK_M + BLOCK_W > 0) & (jstart < kv_end):
            z = _fresh(i0) - i0  # 0 the compiler cannot see: the skews' indices are made per item
            col = offs_a[:, None] + (BLOCK_W - 1) - offs_w[None, :] + z  # [BLOCK_M, BLOCK_W] column of (a, w)
            offs_m = i0 + offs_a
            offs_j = jstart + offs_r
            q = _tile(Q + b * stride_qb + h * stride_qh + start * stride_qm, offs_m, L, stride_qm, offs_d, D)
            do = _tile(DO + b * stride_dob + h * stride_doh + start * stride_dom, offs_m, L, stride_dom, offs_d, D)
            k = _rows_at(K + b * stride_kb + h * stride_kh + start * stride_kn, offs_j, L, stride_kn, offs_d, D)
            v = _rows_at(V + b * stride_vb + h * stride_vh + start * stride_vn, offs_j, L, stride_vn, offs_d, D)
            rows = b * stride_lb + h * stride_lh + start * stride_lm
            lse2, delta = _row_stats(LSE + rows, DELTA + rows, offs_m, L, stride_lm)
            # the rectangle's keys that exist and are not padding, masked before the skew (a [BLOCK_M +
            # BLOCK_W] row of flags, not a [BLOCK_M, BLOCK_W] gathered load): -inf in q.k is -inf in s
            real = (offs_j >= 0) & (offs_j < L)
            if HAS_KPM:
                real &= tl.load(KPM + b * stride_kpb + offs_j, mask=real, other=0) != 0
            qk = tl.where(real[None, :], _unchain(tl.dot(q, tl.trans(k), input_precision=PRECISION), L > 0),
                          float("-inf"))
            s = tl.gather(qk, col, axis=1)
            ok = (offs_m[:, None] < L) & w_ok[None, :]
            if HAS_C2P:  # the tile's own distances: a plain product
                pk = _pos_rows(PK, IDX, d0 + offs_w, SMAX, offs_d, D, stride_pkr, True)
                s += _unchain(tl.dot(q, tl.trans(pk), input_precision=PRECISION), L > 0).to(q.dtype).to(tl.float32)
            if HAS_P2C:
                pq = _pos_rows(PQ, IDX, d0 + offs_w, SMAX, offs_d, D, stride_pqr, True)
                s += tl.gather(tl.dot(k, tl.trans(pq), input_precision=PRECISION).to(k.dtype), col,
                               axis=0).to(tl.float32)
            s = tl.where(ok, s * qk_scale, float("-inf"))
            p = tl.math.exp2(s - lse2[:, None])
            dp = tl.gather(_unchain(tl.dot(do, tl.trans(v), input_precision=PRECISION), L > 0), col, axis=1)
            if DROPOUT:
                keep = _keep(SEED, b, h, H, SMAX, offs_m[:, None], jstart + col, dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None]) * sm_scale  # [BLOCK_M, BLOCK_W]: s dS_ij on the diagonals d0 + w
            if DPOS_K:  # E_key[w] += sum_a dS[a, w] q_a
                tl.store(EK + out, tl.dot(tl.trans(q), ds.to(q.dtype), tl.load(EK + out), input_precision=PRECISION))
            if DPOS_Q:  # E_query[w] += sum_c dS[a(c, w), w] k_c, a(c, w) = c - BLOCK_W + 1 + w
                a = offs_r[:, None] - (BLOCK_W - 1) + offs_w[None, :] + z  # [BLOCK_M + BLOCK_W, BLOCK_W]
                dsr = tl.where((a >= 0) & (a < BLOCK_M),
                               tl.gather(ds.to(k.dtype), tl.minimum(tl.maximum(a, 0), BLOCK_M - 1), axis=0), 0.0)
                tl.store(EQ + out, tl.dot(tl.trans(k), dsr.to(k.dtype), tl.load(EQ + out), input_precision=PRECISION))
            tl.debug_barrier()


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


def band_position_grads(launch, q, k, v, do, lse, delta, pos_key, pos_query, common, io, pos_strides, kpb, varlen,
                        B, H, D, max_seqlen, scale, dropout_p, band, rel_idx, sat_k, sat_q, flags):
    """(dpos_key or None, dpos_query or None): the band kernel's per-distance sums, folded into buckets with
    the runs' per-program sums sat_k / sat_q (None for a gradient not asked for) of the dQ / dK-dV kernels.
    common, io, pos_strides, kpb, flags: the backward launcher's kernel arguments."""
    grad_pos_key, grad_pos_query = sat_k is not None, sat_q is not None
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
    return dpk, dpq
