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
from .attention import _row_stats, _tile_t
from .deberta import _bhm, _fresh, _keep, _pos_rows, _sequence


@triton.jit
def _rows_at(PTR, pos, n_pos, stride, offs_d, D):
    """[len(pos), BLOCK_D] rows at positions pos that may be negative (zeros outside [0, n_pos))."""
    ok = (pos >= 0) & (pos < n_pos)
    return tl.load(PTR + pos[:, None].to(tl.int64) * stride + offs_d[None, :],
                   mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _real_rows(KPM, j, L, HAS_KPM: tl.constexpr):
    """Keys j (any integers) that exist and are not padding."""
    real = (j >= 0) & (j < L)
    if HAS_KPM:
        real &= tl.load(KPM + j, mask=real, other=0) != 0
    return real


@triton.jit
def _dkdv_window(i, j, D_LO, D_HI, TILE_M: tl.constexpr, TILE_N: tl.constexpr):
    """True where the pair (query i, key j) falls in a window tile of the dK/dV kernel (its [TILE_M queries,
    TILE_N keys] tiles, classified as _col_runs does): the tile's largest distance is past D_LO and its smallest
    before D_HI. The dK/dV kernel sums the runs' dpos shares over its run tiles only; the band kernel takes the
    pairs of its window tiles."""
    start_m = i // TILE_M * TILE_M
    start_n = j // TILE_N * TILE_N
    return (start_m + TILE_M - 1 - start_n > D_LO) & (start_m - start_n - (TILE_N - 1) < D_HI)


@triton.jit
def _band_item(EK, EQ, Q, K, V, DO, LSE, DELTA, KPM, PK, PQ, IDX, SEED, stride_qm, stride_kn, stride_vn, stride_dom,
               stride_lm, stride_pkr, stride_pqr, b, h, H, SMAX, L, D, D_LO, D_HI, i0, d0, nw, sm_scale, dropout_p,
               HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
               DPOS_K: tl.constexpr, DPOS_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
               BLOCK_D: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, PRECISION: tl.constexpr):
    """One item of the band kernel: query block i0 of one sequence (pointers at its first row) against the
    distances d0 + w (w < nw), added to the program's E_key^T / E_query^T at EK / EQ ([BLOCK_D, BLOCK_W], rows
    BLOCK_D apart; the sums go through memory, read and written per item). Its ranges, and the program's head and
    slot (made in the item loop), come from opaque copies (_fresh): made once, the compiler hoisted them and what
    it derives from them (the skews' indices, the rows' addresses) out of the item loop and held them through it
    (~120 registers a thread). (A non-inlined call would do the same, but ptxas then serialises every wgmma.)"""
    R: tl.constexpr = BLOCK_M + BLOCK_W
    qk_scale = sm_scale * 1.4426950408889634
    offs_w = _fresh(tl.arange(0, BLOCK_W))
    offs_a = _fresh(tl.arange(0, BLOCK_M))
    offs_c = _fresh(tl.arange(0, R))
    offs_d = tl.arange(0, BLOCK_D)  # (not opaque: the rows' loads along it stay 16-byte vectors)
    w_ok = offs_w < nw
    jstart = i0 - d0 - (BLOCK_W - 1)
    z = _fresh(i0) - i0  # 0 the compiler cannot see: the skews' indices are made per item
    c_wa = offs_a[None, :] + (BLOCK_W - 1) - offs_w[:, None] + z  # [BLOCK_W, BLOCK_M]: rectangle row
    offs_m = i0 + offs_a
    offs_j = jstart + offs_c
    qT = _tile_t(Q, offs_m, L, stride_qm, offs_d, D)
    doT = _tile_t(DO, offs_m, L, stride_dom, offs_d, D)
    k = _rows_at(K, offs_j, L, stride_kn, offs_d, D)  # [R, BLOCK_D]
    v = _rows_at(V, offs_j, L, stride_vn, offs_d, D)
    lse2, delta = _row_stats(LSE, DELTA, offs_m, L, stride_lm)
    # the rectangle's keys that exist and are not padding are masked before the skew (-inf in q.k is -inf
    # in s): a row of flags, not a [BLOCK_W, BLOCK_M] gathered load
    if HAS_C2P:
        # [K; PK]: the rectangle's keys, below them this block's pos_key rows (zeros after): one product
        # gives q.k (rows c) and C2P (rows R + w), both gathered onto [w, a]
        offs_s = tl.arange(0, 2 * R)
        is_pk = offs_s >= R
        pk_ok = is_pk & (offs_s < R + BLOCK_W)
        dc = tl.minimum(tl.maximum(d0 + offs_s - R, 1 - SMAX), SMAX - 1)
        r = tl.load(IDX + (dc + SMAX - 1), mask=pk_ok, other=0)
        js = jstart + offs_s
        ptr = tl.where(is_pk, PK + r.to(tl.int64) * stride_pkr, K + js.to(tl.int64) * stride_kn)
        ok_s = tl.where(is_pk, pk_ok, (js >= 0) & (js < L))
        kk = tl.load(ptr[:, None] + offs_d[None, :], mask=ok_s[:, None] & (offs_d[None, :] < D), other=0.0)
        kq = tl.dot(kk, qT, input_precision=PRECISION)  # [2R, BLOCK_M]
        real = is_pk | _real_rows(KPM, js, L, HAS_KPM)
        s = tl.gather(tl.where(real[:, None], kq, float("-inf")), c_wa, axis=0)
        w_wa = tl.broadcast_to(offs_w[:, None] + R + z, [BLOCK_W, BLOCK_M])
        s += tl.gather(kq, w_wa, axis=0).to(k.dtype).to(tl.float32)  # rounded as Hugging Face's C2P is
    else:
        real = _real_rows(KPM, offs_j, L, HAS_KPM)
        s = tl.gather(tl.where(real[:, None], tl.dot(k, qT, input_precision=PRECISION), float("-inf")),
                      c_wa, axis=0)
    if HAS_P2C:  # P2C[a, w] = (K PQ^T)[c, w]: gathered on [a, w], transposed
        pq = _pos_rows(PQ, IDX, d0 + offs_w, SMAX, offs_d, D, stride_pqr, True)
        c_aw = offs_a[:, None] + (BLOCK_W - 1) - offs_w[None, :] + z
        s += tl.trans(tl.gather(tl.dot(k, tl.trans(pq), input_precision=PRECISION).to(k.dtype), c_aw,
                                axis=0)).to(tl.float32)
    i = offs_m[None, :]
    ok = (i < L) & w_ok[:, None] & _dkdv_window(i, jstart + c_wa, D_LO, D_HI, TILE_M, TILE_N)
    p = tl.math.exp2(tl.where(ok, s * qk_scale, float("-inf")) - lse2[None, :])
    dp = tl.gather(tl.dot(v, doT, input_precision=PRECISION), c_wa, axis=0)
    if DROPOUT:
        keep = _keep(SEED, b, h, H, SMAX, i, jstart + c_wa, dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[None, :]) * sm_scale  # [BLOCK_W, BLOCK_M]: s dS_ij on the diagonals d0 + w
    out = offs_w[None, :] * BLOCK_D + _fresh(tl.arange(0, BLOCK_D))[:, None]  # (made per item, not held)
    if DPOS_K:  # E_key[w] += sum_a dS[a, w] q_a
        tl.store(EK + out, tl.dot(qT, tl.trans(ds.to(k.dtype)), tl.load(EK + out), input_precision=PRECISION))
    if DPOS_Q:  # E_query[w] += sum_c dS[a(c, w), w] k_c, a(c, w) = c - BLOCK_W + 1 + w
        a = offs_c[None, :] - (BLOCK_W - 1) + offs_w[:, None] + z  # [BLOCK_W, R]
        dsr = tl.where((a >= 0) & (a < BLOCK_M),
                       tl.gather(ds.to(k.dtype), tl.minimum(tl.maximum(a, 0), BLOCK_M - 1), axis=1), 0.0)
        tl.store(EQ + out, tl.dot(tl.trans(k), tl.trans(dsr.to(k.dtype)), tl.load(EQ + out),
                                  input_precision=PRECISION))
    # the next item's read of an element may come from another thread of the program
    tl.debug_barrier()


@triton.jit
def _deberta_bwd_dpos(
    Q, K, V, DO, LSE, DELTA, EK, EQ,  # EK / EQ: float32 (G, H, distance blocks * BLOCK_W, BLOCK_D) per-distance sums
    PK, PQ, IDX, KPM, KV_END, CU, SEED,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
    stride_pkh, stride_pkr, stride_pqh, stride_pqr, stride_kpb, stride_eg, stride_eh,
    B, H, SMAX, D, D_LO, D_HI, DFIRST, NB, NDB, G, NM,  # sequences, heads, longest, head dim; the runs; the
    sm_scale, dropout_p,                             # distances DFIRST .. + NB - 1 in NDB blocks; slices; query blocks
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, DPOS_K: tl.constexpr, DPOS_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, PRECISION: tl.constexpr,  # TILE_*: the dK/dV kernel's tile
):
    """The band's share of dpos_key / dpos_query: one head, BLOCK_W distances d0 + w, slice g of every
    sequence's query blocks (see the module docstring). Tiles are [distance w, query a]."""
    pid = tl.program_id(0)
    g = pid % G
    dblk = (pid // G) % NDB
    h = (pid // G // NDB).to(tl.int64)
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    R: tl.constexpr = BLOCK_M + BLOCK_W  # the rectangle's keys
    offs_w = tl.arange(0, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    # E_key^T, E_query^T of this block of distances: this program's slots, added to per item
    slot = (h * stride_eh + g * stride_eg) + dblk * BLOCK_W * BLOCK_D
    out = offs_w[None, :] * BLOCK_D + offs_d[:, None]
    if DPOS_K:
        tl.store(EK + slot + out, tl.zeros([BLOCK_D, BLOCK_W], dtype=tl.float32))
    if DPOS_Q:
        tl.store(EQ + slot + out, tl.zeros([BLOCK_D, BLOCK_W], dtype=tl.float32))
    tl.debug_barrier()
    for item in range(g, B * NM, G):
        # the program's head / slot made again per item from an opaque copy of its id: hoisted out of the loop,
        # they and everything derived from them were held through every item
        pid = _fresh(tl.program_id(0))
        h = (pid // G // NDB).to(tl.int64)
        dblk = (pid // G) % NDB
        d0 = DFIRST + dblk * BLOCK_W
        slot = (h * stride_eh + (pid % G) * stride_eg) + dblk * BLOCK_W * BLOCK_D
        start, L = _sequence(CU, item // NM, SMAX, VARLEN)
        b = (item // NM).to(tl.int64)
        i0 = (item % NM) * BLOCK_M
        kv_end = tl.minimum(L, tl.load(KV_END + b)) if HAS_KPM else L
        jstart = i0 - d0 - (BLOCK_W - 1)
        if (i0 < L) & (jstart + R > 0) & (jstart < kv_end):
            _band_item(EK + slot, EQ + slot, Q + b * stride_qb + h * stride_qh + start * stride_qm,
                                K + b * stride_kb + h * stride_kh + start * stride_kn,
                                V + b * stride_vb + h * stride_vh + start * stride_vn,
                                DO + b * stride_dob + h * stride_doh + start * stride_dom,
                                LSE + (b * stride_lb + h * stride_lh + start * stride_lm),
                                DELTA + (b * stride_lb + h * stride_lh + start * stride_lm), KPM + b * stride_kpb,
                                PK + h * stride_pkh, PQ + h * stride_pqh, IDX, SEED, stride_qm, stride_kn, stride_vn, stride_dom, stride_lm, stride_pkr,
                                stride_pqr, b, h, H, SMAX, L, D, D_LO, D_HI, i0, d0, NB - dblk * BLOCK_W, sm_scale,
                                dropout_p, HAS_C2P, HAS_P2C, HAS_KPM, DROPOUT, DPOS_K, DPOS_Q, BLOCK_M, BLOCK_W, BLOCK_D,
                                TILE_M, TILE_N, PRECISION)


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


def _position_grads(launch, sat, e, rel_idx, band, first, max_seqlen, pos, nb, scale):
    """dpos (pos's shape and dtype) from the runs' per-program sums (2, H, P, BLOCK_D), unscaled, and the band's
    per-distance sums e (G, H, blocks * BLOCK_W, BLOCK_D) or None; distances -> buckets by _dpos_fold."""
    _, _, idx_lo, idx_hi = band
    H, two_span, d = pos.shape
    runs = sat.sum(dim=2) * scale  # (2, H, BLOCK_D): a torch reduction, fixed order
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
                        B, H, D, max_seqlen, scale, dropout_p, band, rel_idx, sat_k, sat_q, flags, dkdv_tile):
    """(dpos_key or None, dpos_query or None): the band kernel's per-distance sums, folded into buckets with
    the runs' per-program sums sat_k / sat_q (None for a gradient not asked for) of the dK/dV kernel.
    common, io, pos_strides, kpb, flags: the backward launcher's kernel arguments; dkdv_tile: the dK/dV kernel's
    (BLOCK_M, BLOCK_N), whose window tiles' pairs this kernel takes."""
    grad_pos_key, grad_pos_query = sat_k is not None, sat_q is not None
    # the distances of the dK/dV kernel's window tiles within this table: the band and as far on either side as
    # such a tile reaches past it (its distances span BLOCK_M + BLOCK_N - 1): first .. first + nb - 1
    reach = dkdv_tile[0] + dkdv_tile[1] - 2
    first = max(band[0] + 1 - reach, 1 - max_seqlen)
    nb = max(min(band[1] - 1 + reach, max_seqlen - 1) - first + 1, 0)
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
               B, H, max_seqlen, D, band[0], band[1], first, nb, ndb, slices, nm, float(scale), float(dropout_p),
               DPOS_K=grad_pos_key, DPOS_Q=grad_pos_query, TILE_M=dkdv_tile[0], TILE_N=dkdv_tile[1], **flags, **cfg)
    dpk = (_position_grads(launch, sat_k, ek, rel_idx, band, first, max_seqlen, pos_key, nb, scale) if grad_pos_key
           else None)
    dpq = (_position_grads(launch, sat_q, eq, rel_idx, band, first, max_seqlen, pos_query, nb, scale)
           if grad_pos_query else None)
    return dpk, dpq
