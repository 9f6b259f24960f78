"""DeBERTa attention's backward: the delta pass, the dQ and dK/dV kernels and the launcher of the whole
backward. The math, the tile kinds and the shared helpers are in kernels/deberta.py (read it first); the band's
share of the position gradients is in kernels/deberta_band.py.

Order: delta_i = dO_i . out_i - dlse_i (_deberta_bwd_delta), dQ (one program per query block), dK/dV
(persistent: P programs a head, which also collect the first / last run's shares of both position gradients
in P slots a head), the band kernel and the bucket fold (deberta_band).

Tiles and registers. A dQ (dK/dV) program keeps its block of 64 query rows (64 keys) for the whole loop over
the other side, one loop for every tile kind: a branch per tile picks the run terms (one pos_key / pos_query
row) or the window's products. What fits in 255 registers a thread (8 warps) decided the rest:

- Products whose result flows into another product are 'chained' for Triton, which then lays all 8 warps
  along the 64 rows: both warpgroups compute the same tile (twice the registers, twice the tensor-core
  work). Scores and dP pass through a branch before they are used, which hides the chain: their warps split
  the columns instead (_unchain).
- A window tile's products put the long window (W = 128) on the M side (PK Q^T: [W, 64], PQ K^T: [W, 32]) and
  are gathered down the columns; every index tensor of the skews is made inside the loop from a value the
  compiler cannot see through (_fresh): hoisted out of the loop, the skews' indices and the shuffles'
  bookkeeping held ~100 registers through it.
- The band's share of dQ (resp. dK) and the content product are one product: the window spans
  BLOCK_M + BLOCK_N - 1 distances of its W = 128 rows, and the spare rows hold the tile's own keys (resp.
  queries), so dQ += X Y with X the un-skewed dS next to dS itself and Y the window's pos_key rows next to
  K (dK += X Z with Z = [pos_query rows; Q]).
- dQ's share of the runs is made in the run tile's own product, dQ += dS (K + pos_key[run]), so nothing about
  the runs is left for the epilogue. Summed per row (float32, unrounded dS) and added by an epilogue product
  instead, its rows' address needed a value kept through the loop: Triton 3.6 spilled it (4 bytes at D = 64
  in float16 with padding and dropout, 12 at D = 40). The cost is precision: dS rounded to the input dtype
  (as the window tiles' position share and every content product already take it) times K + pos_key[run]
  rounded once. float16 dQ against float64 (S = 256, D = 64, distances clamped at 4, padding): 3.9e-4 ->
  4.5e-4 with |pos_key| ~ |k|, 1.08e-3 -> 1.09e-3 with |pos_key| = 10 |k| (the dtype's bound: 2e-3).
- dK/dV's runs' shares (dK_j += cs_j pos_query[run], the runs' dpos sums) and the runs' C2P / P2C per row go
  through small tensor-core products ([BLOCK, 16] x [16, BLOCK_D]) instead of elementwise outer products and
  reductions; except dK/dV's epilogue at D <= 64 with both terms, elementwise: the products' shared-memory
  addresses, constants the compiler makes at the kernel's start, were held through every item (spilled).
- Nothing dK/dV's prologue makes is reused after the loop: its epilogue makes the program ids, offsets and
  addresses again from _fresh copies (at D <= 64 it reads the program id anew: _item_program); dQ's epilogue,
  a store, reuses its prologue's (no spill on either Triton). The rows a loop loads are addressed from opaque
  offsets (else held through the loop: they spilled). Per-key values are formed per tile, not held: the
  padding flags, and a run tile's P2C (K times a tile of pos_query[run] rows, like C2P's pos_key[run] rows
  times Q^T).
- Nothing crosses dQ's blocks: a loop over several blocks a program would hold the inner loop's hoisted
  values through every block's prologue and epilogue (about 60 registers more); the runs' dpos_key sums,
  which need a slot per program, are made by the persistent dK/dV kernel (from dK's content part, _snapshot).
- No function is left as a call (noinline): ptxas then serialises every wgmma (its C7510 notice, recorded by
  tests/sm90_compile.py), each waiting for the one before.
num_stages is 1: Triton 3.6's software pipeliner fails on products inside the tile-kind branch.
"""
import torch
import triton
import triton.language as tl

from fusedlm._triton import num_programs

from . import attention
from . import deberta as F  # block_config through the module: tests swap it for the GPU's
from .attention import _row_stats, _tile, _tile_t
from .deberta import (_bhm, _col_runs, _fresh, _fresh_program_id, _fresh_range, _geometry, _keep, _masks, _new_out,
                      _pos_args, _pos_row, _pos_rows, _program, _real_keys, _row_runs, _sequence)
from .deberta_band import band_position_grads


@triton.jit
def _item(CU, item, NM, SMAX, VARLEN: tl.constexpr):
    """Work item ``item`` = b NM + block of a persistent program: (batch, first row, length, block index)."""
    start, seq_len = _sequence(CU, item // NM, SMAX, VARLEN)
    return (item // NM).to(tl.int64), start, seq_len, item % NM


@triton.jit
def _unchain(x, cond):
    """x itself, routed through a branch on a runtime condition: Triton's layout choice for the product that
    made x stops at the branch, so it does not see that x feeds another product (see the module docstring)."""
    if cond:
        x = x + 0.0
    return x


@triton.jit
def _window_rows(POS, OWN, IDX, dmin, own0, SMAX, L, offs_d, D, stride_posr, stride_own, window,
                 SPARE: tl.constexpr, W: tl.constexpr):
    """[W, BLOCK_D]: row w < W - SPARE is POS[idx(dmin + w)] (the window's embedding rows), row W - SPARE + c
    is OWN[own0 + c] (the tile's own keys / queries, zeros past L). Loaded for window tiles only."""
    offs_w = tl.arange(0, W)
    own = offs_w >= W - SPARE
    dc = tl.minimum(tl.maximum(dmin + offs_w, 1 - SMAX), SMAX - 1)
    r = tl.load(IDX + (dc + SMAX - 1), mask=tl.where(window, ~own, False), other=0)
    j = own0 + offs_w - (W - SPARE)
    row = tl.where(own, OWN + j.to(tl.int64) * stride_own, POS + r.to(tl.int64) * stride_posr)
    # (masks joined to the scalar ``window`` by a where: the interpreter's & of the two gives integers)
    ok = tl.where(window, ~own | (j < L), False)
    return tl.load(row[:, None] + offs_d[None, :], mask=(offs_d[None, :] < D) & ok[:, None], other=0.0)


@triton.jit
def _run_rows(POS, IDX_LO, IDX_HI, offs_d, D, stride_posr):
    """[16, BLOCK_D]: rows 0, 1 are POS[IDX_LO], rows 2, 3 POS[IDX_HI], zeros after (the partner of _run_sums)."""
    offs_r = tl.arange(0, 16)
    r = tl.where(offs_r < 2, IDX_LO, IDX_HI)
    return tl.load(POS + r[:, None].to(tl.int64) * stride_posr + offs_d[None, :],
                   mask=(offs_r[:, None] < 4) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _run_sums(s_lo, s_hi, dtype):
    """[len(s), 16] in ``dtype``: columns 0 + 1 carry s_lo as two terms (the value and its rounding error, so
    the pair is exact to ~2^-16 in half precision), columns 2 + 3 s_hi, zeros after: times _run_rows this is
    s_lo pos[IDX_LO] + s_hi pos[IDX_HI] on the tensor cores."""
    col = tl.arange(0, 16)[None, :]
    lo = s_lo.to(dtype).to(tl.float32)
    hi = s_hi.to(dtype).to(tl.float32)
    r = tl.where(col == 0, lo[:, None], tl.where(col == 1, (s_lo - lo)[:, None], 0.0))
    return tl.where(col == 2, hi[:, None], tl.where(col == 3, (s_hi - hi)[:, None], r)).to(dtype)


@triton.jit
def _add_run_sums(SLOT, side_stride, sums, offs_d):
    """sums [BLOCK_D, 16] from products with _run_sums: the first run's total (columns 0 + 1) added to SLOT, the
    last run's (columns 2 + 3) to SLOT + side_stride (then a barrier: the next read of an element may come from
    another thread)."""
    col = tl.arange(0, 16)[None, :]
    tl.store(SLOT + offs_d, tl.load(SLOT + offs_d) + tl.sum(tl.where(col < 2, sums, 0.0), 1))
    tl.store(SLOT + side_stride + offs_d,
             tl.load(SLOT + side_stride + offs_d) + tl.sum(tl.where((col >= 2) & (col < 4), sums, 0.0), 1))
    tl.debug_barrier()


@triton.jit
def _add_run_sums_elementwise(SLOT, side_stride, s_lo, s_hi, x, offs_d):
    """_add_run_sums' sums made elementwise: sum_j s_lo_j x_j added to SLOT, sum_j s_hi_j x_j to
    SLOT + side_stride (x [N, BLOCK_D] float32). Each sum is made just before its store (both first kept two
    [BLOCK_D] vectors live: Triton 3.6 spilled 28-32 bytes more)."""
    tl.store(SLOT + offs_d, tl.load(SLOT + offs_d) + tl.sum(s_lo[:, None] * x, 0))
    tl.store(SLOT + side_stride + offs_d, tl.load(SLOT + side_stride + offs_d) + tl.sum(s_hi[:, None] * x, 0))
    tl.debug_barrier()  # the next read of an element may come from another thread


@triton.jit
def _run_terms(x, RUN_ROWS, PRECISION: tl.constexpr):
    """(x . pos[IDX_LO], x . pos[IDX_HI]) for each row of x [N, BLOCK_D], from one [N, 16] product with the
    run rows (columns 0 and 2)."""
    t = tl.dot(x, tl.trans(RUN_ROWS), input_precision=PRECISION)
    col = tl.arange(0, 16)[None, :]
    return tl.sum(tl.where(col == 0, t, 0.0), 1), tl.sum(tl.where(col == 2, t, 0.0), 1)


@triton.jit
def _deberta_bwd_delta(
    O, DO, DLSE, DELTA, CU,  # DELTA: float32, lse's layout
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
    stride_gb, stride_gh, stride_gm,  # DLSE (any strides: autograd may expand zeros)
    H, SMAX, D, VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO_id out_id - dlse_i (a gradient reaching lse adds dlse_i P_ij to dz_ij), for the
    dQ / dK-dV / band kernels: a pass of its own keeps the out tile and its float32 products out of the dQ
    kernel's registers."""
    b, h, start, L = _program(CU, H, SMAX, VARLEN)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    o = _tile(O + (b * stride_ob + h * stride_oh + start * stride_om), offs_m, L, stride_om, offs_d, D)
    do = _tile(DO + (b * stride_dob + h * stride_doh + start * stride_dom), offs_m, L, stride_dom, offs_d, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + (b * stride_gb + h * stride_gh + start * stride_gm) + offs_m.to(tl.int64) * stride_gm,
                         mask=row_ok, other=0.0)
    tl.store(DELTA + (b * stride_lb + h * stride_lh + start * stride_lm) + offs_m.to(tl.int64) * stride_lm, delta,
             mask=row_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, c_lo, c_hi, K, V, PK, PQ, IDX, KPM, SEED, stride_kn, stride_vn,
              stride_pkr, stride_pqr, start_m, offs_m, offs_d, D, L, SMAX, IDX_LO, IDX_HI, hi_end,
              lo_start, kv_end, qk_scale, b, h, H, dropout_p, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
              HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              W: tl.constexpr, PRECISION: tl.constexpr):
    """dQ (unscaled) of one query block over the key blocks [0, kv_end), its C2P share included: a window
    tile's through the window product, a run tile's through the tile's own product (below). Key blocks before
    hi_end lie in the last run, from lo_start in the first, the window tiles between (_row_runs)."""
    offs_nb = tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, W)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + offs_nb
        kT = _tile_t(K, offs_n, L, stride_kn, offs_d, D)
        vT = _tile_t(V, offs_n, L, stride_vn, offs_d, D)
        dmin = start_m - start_n - (BLOCK_N - 1)  # the window's first distance
        window = (start_n >= hi_end) & (start_n < lo_start)
        last = start_n < hi_end
        # the tile's own query / key / window offsets through an opaque move, every iteration (see _dkdv_tiles)
        fa = _fresh(tl.arange(0, BLOCK_M))
        fc = _fresh(offs_nb)
        fw = _fresh(offs_w)
        # loaded outside the branch (masked to window tiles): Triton's pipeliner keeps loads out of branches
        if HAS_C2P:  # Y: the window's pos_key rows; in its spare rows the tile's keys
            y = _window_rows(PK, K, IDX, dmin, start_n, SMAX, L, offs_d, D, stride_pkr, stride_kn, window,
                             BLOCK_N, W)
            pk_run = _pos_row(PK, tl.where(last, IDX_HI, IDX_LO), offs_d, D, stride_pkr, True)
        if HAS_P2C:
            pq = _pos_rows(PQ, IDX, dmin + offs_w, SMAX, offs_d, D, stride_pqr, window)
            pq_run = _pos_row(PQ, tl.where(last, IDX_HI, IDX_LO), offs_d, D, stride_pqr, True)
        s = tl.dot(q, kT, input_precision=PRECISION)
        if window:
            if HAS_C2P:  # C2P_ij = (PK Q^T)[i - j - dmin, i - i0]: gathered down the columns, transposed
                skew_t = fa[None, :] - fc[:, None] + (BLOCK_N - 1)
                s += tl.trans(tl.gather(tl.dot(y, tl.trans(q), input_precision=PRECISION).to(q.dtype), skew_t,
                                        axis=0)).to(tl.float32)
            if HAS_P2C:  # P2C_ij = (PQ K^T)[i - j - dmin, j - j0]
                skew = fa[:, None] - fc[None, :] + (BLOCK_N - 1)
                s += tl.gather(tl.dot(pq, kT, input_precision=PRECISION).to(q.dtype), skew,
                               axis=0).to(tl.float32)
        else:  # a run: C2P is the row's c_run, P2C k_j . pos_query[run]
            if HAS_C2P:
                s += tl.where(last, c_hi, c_lo)[:, None]
            if HAS_P2C:
                s += tl.sum(kT.to(tl.float32) * pq_run[:, None], 0)[None, :]
        s = tl.where(_real_keys(KPM, offs_n, L, HAS_KPM)[None, :], s * qk_scale, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = _unchain(tl.dot(do, vT, input_precision=PRECISION), window)
        if DROPOUT:
            keep = _keep(SEED, b, h, H, SMAX, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if window and HAS_C2P:
            # X[a, w] = dS[a, c] at the key c of row a at distance dmin + w (every distance of the window, those
            # of the runs too), and X[a, W - BLOCK_N + c] = dS[a, c]: dQ += X Y is the position share and dS K at once
            c = fa[:, None] + (BLOCK_N - 1) - fw[None, :]
            c = tl.where(fw[None, :] >= W - BLOCK_N, (fw - (W - BLOCK_N))[None, :], c)
            x = tl.where((c >= 0) & (c < BLOCK_N),
                         tl.gather(ds.to(q.dtype), tl.minimum(tl.maximum(c, 0), BLOCK_N - 1), axis=1), 0.0)
            dq = tl.dot(x.to(q.dtype), y, dq, input_precision=PRECISION)
        else:
            if HAS_C2P:  # a run tile: every key's C2P row is pos_key[run], so dQ += dS (K + pos_key[run])
                kT = (kT.to(tl.float32) + pk_run[:, None]).to(kT.dtype)
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _deberta_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,  # DELTA: float32 (lse's layout) from _deberta_bwd_delta
    PK, PQ, IDX, KPM, KV_END, CU, SEED,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,  # LSE and DELTA share strides
    stride_dqb, stride_dqh, stride_dqm,
    stride_pkh, stride_pkr, stride_pqh, stride_pqr, stride_kpb,
    H, SMAX, D, D_LO, D_HI, IDX_LO, IDX_HI,
    sm_scale, dropout_p,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of one query block (grid: batch x heads, query blocks) over every key block. No state crosses
    blocks (the runs' dpos_key sums come from the dK/dV kernel), so nothing is held between blocks either:
    a loop over several blocks a program would keep the inner loop's hoisted values through the block's
    prologue and epilogue (~60 registers a thread)."""
    b, h, start, L = _program(CU, H, SMAX, VARLEN)
    start_m = tl.program_id(1) * BLOCK_M
    if start_m >= L:
        return  # past this sequence's end (packed batches launch for the longest)
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    PK += h * stride_pkh
    PQ += h * stride_pqh
    qk_scale = sm_scale * 1.4426950408889634
    # the rows' addresses from an opaque range: without it, D = 40 spilled 8 bytes on Triton 3.6
    offs_m = start_m + _fresh(tl.arange(0, BLOCK_M))
    q = _tile(Q + (b * stride_qb + h * stride_qh + start * stride_qm), offs_m, L, stride_qm, offs_d, D)
    do = _tile(DO + (b * stride_dob + h * stride_doh + start * stride_dom), offs_m, L, stride_dom, offs_d, D)
    lse2, delta = _row_stats(LSE + (b * stride_lb + h * stride_lh + start * stride_lm),
                             DELTA + (b * stride_lb + h * stride_lh + start * stride_lm), offs_m, L, stride_lm)
    kv_end = tl.minimum(L, tl.load(KV_END + b)) if HAS_KPM else L
    hi_end, lo_start = _row_runs(start_m, kv_end, D_LO, D_HI, BLOCK_M, BLOCK_N)
    c_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_hi = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_C2P:  # the runs' C2P per row, q_i . pos_key[IDX_LO / IDX_HI]
        c_lo, c_hi = _run_terms(q, _run_rows(PK, IDX_LO, IDX_HI, offs_d, D, stride_pkr), PRECISION)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(
        dq, q, do, lse2, delta, c_lo, c_hi, K + (b * stride_kb + h * stride_kh + start * stride_kn),
        V + (b * stride_vb + h * stride_vh + start * stride_vn), PK, PQ, IDX, KPM + b * stride_kpb, SEED, stride_kn,
        stride_vn, stride_pkr, stride_pqr, start_m, offs_m, offs_d, D, L, SMAX, IDX_LO, IDX_HI, hi_end,
        lo_start, kv_end, qk_scale, b, h, H, dropout_p, HAS_C2P, HAS_P2C, HAS_KPM, DROPOUT, BLOCK_M, BLOCK_N, W,
        PRECISION)
    row_ok = offs_m < L
    DQb = DQ + (b * stride_dqb + h * stride_dqh + start * stride_dqm)
    tl.store(DQb + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _snapshot(SAT, side_stride, dk, SIGN_HI: tl.constexpr):
    """The runs' share of dpos_key from dK's content part: SAT (first run) and SAT + side_stride (last run) get
    + / - (SIGN_HI) the keys' sum of dk so far (see _dkdv_tiles)."""
    offs_d = tl.arange(0, dk.shape[1])
    total = tl.sum(dk, 0)
    if SIGN_HI:  # after the last run's tiles: its share, and minus it from the first run's slot
        tl.store(SAT + side_stride + offs_d, tl.load(SAT + side_stride + offs_d) + total)
        tl.store(SAT + offs_d, tl.load(SAT + offs_d) - total)
    else:  # after the first run's tiles too: the first run's slot ends with the difference
        tl.store(SAT + offs_d, tl.load(SAT + offs_d) + total)
    tl.debug_barrier()  # the next read of an element may come from another thread


@triton.jit
def _dkdv_tiles(dk, dv, cs_lo, cs_hi, k, v, KPM, Q, DO, LSE, DELTA, SATK, side_stride, PK, PQ, IDX,
                SEED, stride_qm, stride_dom, stride_lm, stride_pkr, stride_pqr, start_n, offs_n, offs_d, D, L, SMAX,
                IDX_LO, IDX_HI, lo_end, hi_start, qk_scale, b, h, H, dropout_p, HAS_C2P: tl.constexpr,
                HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DPOS_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr):
    """dK (unscaled) and dV of one key block over the query blocks [0, L), on transposed tiles (row = key,
    column = query), and the keys' sums of dS over the run tiles (cs_lo / cs_hi). Query blocks before lo_end lie
    in the first run, from hi_start in the last (_col_runs).

    The blocks go last run, first run, window: the runs' share of dpos_key, s sum over the run tiles of dS^T Q
    summed over the keys, is then dK's content part summed over the keys, read twice (_snapshot) where the
    tile kind changes. (The band kernel takes the window tiles' pairs.)"""
    offs_mb = tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, W)
    n_lo = tl.cdiv(lo_end, BLOCK_M)
    n_hi = tl.cdiv(L - hi_start, BLOCK_M)
    for t in range(0, tl.cdiv(L, BLOCK_M)):
        start_m = tl.where(t < n_hi, hi_start + t * BLOCK_M,
                           tl.where(t < n_hi + n_lo, (t - n_hi) * BLOCK_M, lo_end + (t - n_hi - n_lo) * BLOCK_M))
        offs_m = start_m + offs_mb
        rows_m = start_m + _fresh(offs_mb)  # (opaque: the rows' addresses are made per tile, not held)
        qT = _tile_t(Q, rows_m, L, stride_qm, offs_d, D)  # [BLOCK_D, BLOCK_M]
        do = _tile(DO, rows_m, L, stride_dom, offs_d, D)  # [BLOCK_M, BLOCK_D]
        lse2, delta = _row_stats(LSE, DELTA, rows_m, L, stride_lm)
        dmin = start_m - start_n - (BLOCK_N - 1)
        window = t >= n_hi + n_lo
        first = t >= n_hi
        # the tile's own query / key / window offsets through an opaque move, every iteration: the skews' index
        # tensors are built from these alone, so no part of them is loop-invariant (LLVM reassociates sums and
        # would hoist the invariant part, a [64, 128] index tensor held through the loop)
        fa = _fresh(offs_mb)
        fc = _fresh(tl.arange(0, BLOCK_N))
        fw = _fresh(offs_w)
        if HAS_P2C:  # Z: the window's pos_query rows; in its spare rows the tile's queries
            zr = _window_rows(PQ, Q, IDX, dmin, start_m, SMAX, L, offs_d, D, stride_pqr, stride_qm, window,
                              BLOCK_M, W)
        sT = tl.dot(k, qT, input_precision=PRECISION)
        if window:
            if HAS_C2P:  # C2P^T[c, a] = (PK Q^T)[a - c + BLOCK_N - 1, a]
                pk = _pos_rows(PK, IDX, dmin + fw, SMAX, offs_d, D, stride_pkr, True)
                skew = fa[None, :] - fc[:, None] + (BLOCK_N - 1)
                sT += tl.gather(tl.dot(pk, qT, input_precision=PRECISION).to(k.dtype), skew, axis=0).to(tl.float32)
            if HAS_P2C:  # P2C^T[c, a] = (Z K^T)[a - c + BLOCK_N - 1, c]: gathered down the columns, transposed
                skew_t = fa[:, None] - fc[None, :] + (BLOCK_N - 1)
                sT += tl.trans(tl.gather(tl.dot(zr, tl.trans(k), input_precision=PRECISION).to(k.dtype), skew_t,
                                         axis=0)).to(tl.float32)
        else:
            if HAS_C2P:  # q_i . pos_key[run] for every key: a tile of pos_key[run] rows times Q^T (added, not
                # accumulated by the product: fed to a product, sT would be 'chained')
                r_run = tl.where(first, IDX_LO, IDX_HI).to(tl.int64)
                pk_run = tl.load(PK + r_run * stride_pkr + (0 * offs_n)[:, None] + offs_d[None, :],
                                 mask=offs_d[None, :] < D, other=0.0)
                sT += _unchain(tl.dot(pk_run, qT, input_precision=PRECISION), first)
            if HAS_P2C:  # k_j . pos_query[run] for every query: K times a tile of pos_query[run] rows (made
                # here, not held through the loop as per-key values)
                r_run = tl.where(first, IDX_LO, IDX_HI).to(tl.int64)
                pq_run = tl.load(PQ + r_run * stride_pqr + (0 * offs_m)[:, None] + offs_d[None, :],
                                 mask=offs_d[None, :] < D, other=0.0)
                sT += _unchain(tl.dot(k, tl.trans(pq_run), input_precision=PRECISION), first)
        # the keys' padding flags loaded per tile (a 64-byte read from L1), not held through the loop
        sT = tl.where(_real_keys(KPM, offs_n, L, HAS_KPM)[:, None], sT * qk_scale, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        dpT = _unchain(tl.dot(v, tl.trans(do), input_precision=PRECISION), window)  # [BLOCK_N, BLOCK_M]
        if DROPOUT:
            keepT = _keep(SEED, b, h, H, SMAX, rows_m[None, :], offs_n[:, None], dropout_p)
            pdT = tl.where(keepT, pT / (1.0 - dropout_p), 0.0)
            dpT = tl.where(keepT, dpT / (1.0 - dropout_p), 0.0)
        else:
            pdT = pT
        dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if window and HAS_P2C:
            # X[c, w] = dS^T[c, a] at the query a of key c at distance dmin + w (every distance of the window), and
            # X[c, W - BLOCK_M + a] = dS^T[c, a]: dK += X Z is the position share and dS^T Q at once
            a = fc[:, None] + fw[None, :] - (BLOCK_N - 1)
            a = tl.where(fw[None, :] >= W - BLOCK_M, (fw - (W - BLOCK_M))[None, :], a)
            x = tl.where((a >= 0) & (a < BLOCK_M),
                         tl.gather(dsT.to(k.dtype), tl.minimum(tl.maximum(a, 0), BLOCK_M - 1), axis=1), 0.0)
            dk = tl.dot(x.to(k.dtype), zr, dk, input_precision=PRECISION)
        else:
            if HAS_P2C and not window:  # a run tile: the keys' sums of dS, times pos_query[run] at the end
                cs = tl.sum(dsT, 1)
                cs_lo += tl.where(first, cs, 0.0)
                cs_hi += tl.where(first, 0.0, cs)
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
        if DPOS_K:
            if t == n_hi - 1:
                _snapshot(SATK, side_stride, dk, True)
            if t == n_hi + n_lo - 1:
                _snapshot(SATK, side_stride, dk, False)
    return dk, dv, cs_lo, cs_hi


@triton.jit
def _item_program(BLOCK_D: tl.constexpr):
    """The program id for a work item's prologue or epilogue, opaque to the compiler. At BLOCK_D <= 64 read anew
    from its special register (a copy of the value read at the kernel's start kept that value live through
    every item: ptxas spilled it, 4 bytes packed with dropout on Triton 3.9); at BLOCK_D >= 128 a copy of it
    (there, reading it anew put spill traffic in the tile loop at D = 128 on Triton 3.9)."""
    if BLOCK_D <= 64:
        pid = _fresh_program_id()
    else:
        pid = _fresh(tl.program_id(0))
    return pid


@triton.jit
def _dkdv_item(Q, K, V, DO, LSE, DELTA, DK, DV, SATK, SATQ, PK, PQ, IDX, KPM, KV_END, CU, SEED,
               stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
               stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
               stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
               stride_pkh, stride_pkr, stride_pqh, stride_pqr, stride_kpb,
               H, NM, P, SMAX, D, D_LO, D_HI, IDX_LO, IDX_HI, sm_scale, dropout_p, item, HAS_C2P: tl.constexpr,
               HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
               DPOS_K: tl.constexpr, DPOS_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV of the work item ``item`` (a key block of one sequence) of this program, and its runs' shares of
    dpos_key / dpos_query added to the program's slots in SATK / SATQ (first run; last run H P BLOCK_D further).

    Registers: the item's ids, offsets and addresses are made from an opaque program id (_item_program) and
    opaque copies of the ranges (_fresh), once for the prologue and again for the epilogue. Made once, the compiler held them (and the
    shared-memory addresses it derives from them) through the loop over query tiles and from one item to the
    next: they spilled. (As a non-inlined call instead, ptxas serialises every wgmma: its C7510 notice.)"""
    pid = _item_program(BLOCK_D)
    h = (pid // P).to(tl.int64)
    b, start, L, n = _item(CU, item, NM, SMAX, VARLEN)
    start_n = n * BLOCK_N
    if start_n < L:
        qk_scale = tl.cast(sm_scale, tl.float32) * 1.4426950408889634
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        side_stride = H * P * BLOCK_D
        Kb = K + (b * stride_kb + h * stride_kh + start * stride_kn)
        # K / V's rows from an opaque copy of the block's offsets: their row-times-stride addresses (loop
        # invariant) were hoisted out of the item loop and held through it
        rows_n = start_n + _fresh(tl.arange(0, BLOCK_N))
        k = _tile(Kb, rows_n, L, stride_kn, offs_d, D)
        v = _tile(V + (b * stride_vb + h * stride_vh + start * stride_vn), rows_n, L, stride_vn, offs_d, D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        cs_lo = tl.zeros([BLOCK_N], dtype=tl.float32)
        cs_hi = tl.zeros([BLOCK_N], dtype=tl.float32)
        kv_end = tl.minimum(L, tl.load(KV_END + b)) if HAS_KPM else L
        if start_n < kv_end:  # a block of padding only: its gradients are zeros
            if BLOCK_D <= 64:
                # the runs' bounds from opaque copies: a part of them that depends on the band alone was made before
                # the items and held (spilled, packed with dropout on Triton 3.6); at BLOCK_D >= 128 this put spill
                # traffic in the tile loop at D = 128 on Triton 3.9
                lo_end, hi_start = _col_runs(start_n, L, _fresh(D_LO), _fresh(D_HI), BLOCK_M, BLOCK_N)
            else:
                lo_end, hi_start = _col_runs(start_n, L, D_LO, D_HI, BLOCK_M, BLOCK_N)
            dk, dv, cs_lo, cs_hi = _dkdv_tiles(
                dk, dv, cs_lo, cs_hi, k, v, KPM + b * stride_kpb, Q + (b * stride_qb + h * stride_qh + start * stride_qm),
                DO + (b * stride_dob + h * stride_doh + start * stride_dom),
                LSE + (b * stride_lb + h * stride_lh + start * stride_lm),
                DELTA + (b * stride_lb + h * stride_lh + start * stride_lm), SATK + (h * P + pid % P) * BLOCK_D,
                side_stride, PK + h * stride_pkh, PQ + h * stride_pqh, IDX, SEED, stride_qm, stride_dom, stride_lm,
                stride_pkr, stride_pqr, start_n, offs_n, offs_d, D, L, SMAX, IDX_LO, IDX_HI, lo_end, hi_start,
                qk_scale, b, h, H, tl.cast(dropout_p, tl.float32), HAS_C2P, HAS_P2C, HAS_KPM, DROPOUT, DPOS_K, BLOCK_M,
                BLOCK_N, W, PRECISION)
        # the epilogue's ids, offsets and addresses anew (see above)
        pid = _item_program(BLOCK_D)
        h = (pid // P).to(tl.int64)
        b, start, L, n = _item(CU, _fresh(item), NM, SMAX, VARLEN)
        offs_d = _fresh_range(BLOCK_D)
        offs_n = n * BLOCK_N + _fresh(tl.arange(0, BLOCK_N))
        if HAS_P2C:  # the runs' share: dK_j += cs_j pos_query[run]; of dpos_query: sum_j cs_j k_j
            if BLOCK_D <= 64 and HAS_C2P:
                # elementwise (float32, exact), from the two rows and a K tile loaded here. As products (below),
                # their shared-memory addresses, constants of the kernel, were made at its start and held through
                # every item: ptxas spilled them (both terms at D = 64: 8-12 bytes on Triton 3.6 and 3.9). With P2C
                # alone (Triton 3.6: 16 bytes as products, 44 elementwise) or at BLOCK_D >= 128 (D = 128: 28 as
                # products, 36 elementwise, some in the tile loop) the products spill less.
                PQh = PQ + h * stride_pqh
                pq_lo = _pos_row(PQh, _fresh(IDX_LO), offs_d, D, stride_pqr, True)
                pq_hi = _pos_row(PQh, _fresh(IDX_HI), offs_d, D, stride_pqr, True)
                dk += cs_lo[:, None] * pq_lo[None, :] + cs_hi[:, None] * pq_hi[None, :]
                if DPOS_Q:
                    kf = _tile(K + (b * stride_kb + h * stride_kh + start * stride_kn), offs_n, L, stride_kn, offs_d,
                               D).to(tl.float32)
                    _add_run_sums_elementwise(SATQ + (h * P + pid % P) * BLOCK_D, H * P * BLOCK_D, cs_lo, cs_hi, kf,
                                              offs_d)
            else:
                r = _run_sums(cs_lo, cs_hi, k.dtype)
                dk = tl.dot(r, _run_rows(PQ + h * stride_pqh, IDX_LO, IDX_HI, offs_d, D, stride_pqr), dk,
                            input_precision=PRECISION)
                if DPOS_Q:
                    _add_run_sums(SATQ + (h * P + pid % P) * BLOCK_D, H * P * BLOCK_D,
                                  tl.dot(tl.trans(k), r, input_precision=PRECISION), offs_d)
        kv_ok = (offs_n < L)[:, None] & (offs_d[None, :] < D)
        DKb = DK + (b * stride_dkb + h * stride_dkh + start * stride_dkn)
        DVb = DV + (b * stride_dvb + h * stride_dvh + start * stride_dvn)
        tl.store(DKb + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :],
                 (dk * tl.cast(sm_scale, tl.float32)).to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DVb + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=kv_ok)


@triton.jit
def _deberta_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, SATK, SATQ,  # SAT*: float32 (2, H, P, BLOCK_D), the runs' dpos_key / query sums
    PK, PQ, IDX, KPM, KV_END, CU, SEED,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,  # LSE and DELTA share strides
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_pkh, stride_pkr, stride_pqh, stride_pqr, stride_kpb,
    B, H, NM, P, SMAX, D, D_LO, D_HI, IDX_LO, IDX_HI,  # NM key blocks a sequence, P programs a head
    sm_scale, dropout_p,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, DPOS_K: tl.constexpr, DPOS_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK and dV of key blocks of one head over every query block; with DPOS_K / DPOS_Q the first / last run's
    share of dpos_key / dpos_query. Persistent: P programs a head take the (sequence, key block) items p,
    p + P, ..., so the runs' sums need P slots a head, whatever the batch and the sequence length. Every
    product has the key block or the window as its M dimension (K Q^T, dV += P^T dO, dK += X Z, PK Q^T,
    Z K^T): BLOCK_N = 64 per warpgroup keeps them on Hopper's wgmma."""
    h = (tl.program_id(0) // P).to(tl.int64)
    p = tl.program_id(0) % P
    offs_d = tl.arange(0, BLOCK_D)
    side_stride = H * P * BLOCK_D
    for side in range(2):  # this program's slots: SAT*[side, h, p, :]
        if DPOS_K:
            tl.store(SATK + (h * P + p) * BLOCK_D + side * side_stride + offs_d, tl.zeros([BLOCK_D], dtype=tl.float32))
        if DPOS_Q:
            tl.store(SATQ + (h * P + p) * BLOCK_D + side * side_stride + offs_d, tl.zeros([BLOCK_D], dtype=tl.float32))
    tl.debug_barrier()
    for item in range(p, B * NM, P):
        _dkdv_item(Q, K, V, DO, LSE, DELTA, DK, DV, SATK, SATQ, PK, PQ, IDX, KPM, KV_END, CU, SEED,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   stride_pkh, stride_pkr, stride_pqh, stride_pqr, stride_kpb,
                   H, NM, P, SMAX, D, D_LO, D_HI, IDX_LO, IDX_HI, sm_scale, dropout_p, item, HAS_C2P, HAS_P2C,
                   HAS_KPM, VARLEN, DROPOUT, DPOS_K, DPOS_Q, BLOCK_M, BLOCK_N, BLOCK_D, W, PRECISION)


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
    delta = torch.empty_like(lse)  # written by _deberta_bwd_delta, read by the dQ, dK/dV and band kernels
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

    launch(_deberta_bwd_delta, (B * H, triton.cdiv(max_seqlen, 64)),
           out, do, dlse if dlse is not None else lse, delta, cu_seqlens if varlen else lse,
           *_bhm(out, varlen), *_bhm(do, varlen), *_bhm(lse, varlen),
           *(_bhm(dlse, varlen) if dlse is not None else (0, 0, 0)), H, max_seqlen, D, VARLEN=varlen,
           HAS_DLSE=dlse is not None, BLOCK_M=64, BLOCK_D=cfg_dq["BLOCK_D"])
    launch(_deberta_bwd_dq, (B * H, triton.cdiv(max_seqlen, cfg_dq["BLOCK_M"])),
           q, k, v, do, lse, delta, dq, *common,
           *io, *_bhm(do, varlen), *_bhm(lse, varlen), *_bhm(dq, varlen), *pos_strides, kpb,
           H, *scalars, **flags, **cfg_dq)
    nn, programs = persistent(cfg_dkdv, "BLOCK_N")
    sat_k = run_sums(grad_pos_key, programs, cfg_dkdv)
    sat_q = run_sums(grad_pos_query, programs, cfg_dkdv)
    launch(_deberta_bwd_dkdv, (H * programs,),
           q, k, v, do, lse, delta, dk, dv, sat_k if sat_k is not None else lse, sat_q if sat_q is not None else lse,
           *common, *io, *_bhm(do, varlen), *_bhm(lse, varlen), *_bhm(dk, varlen), *_bhm(dv, varlen), *pos_strides,
           kpb, B, H, nn, programs, *scalars, DPOS_K=grad_pos_key, DPOS_Q=grad_pos_query, **flags, **cfg_dkdv)
    if not (grad_pos_key or grad_pos_query):
        return dq, dk, dv, None, None
    dpk, dpq = band_position_grads(launch, q, k, v, do, lse, delta, pos_key, pos_query, common, io, pos_strides, kpb,
                                   varlen, B, H, D, max_seqlen, scale, dropout_p, band, rel_idx, sat_k, sat_q, flags,
                                   (cfg_dkdv["BLOCK_M"], cfg_dkdv["BLOCK_N"]))
    return dq, dk, dv, dpk, dpq
