"""DeBERTa disentangled attention, forward and backward, flash-style: never an S x S matrix in memory.

For one head, queries q_i, keys k_j, values v_j (D features), the per-head relative embeddings
pos_key[r], pos_query[r] (r < 2 * span) and the relative index idx(i, j) = clamp(bucket(i - j) + span,
0, 2 span - 1) (the same index for both position terms, as the reference code gathers it):

    z_ij  = s * (q_i . k_j  +  C2P[i, idx(i, j)]  +  P2C[j, idx(i, j)])     s = 1 / sqrt(D (1 + #terms))
    C2P   = Q pos_key^T     P2C = K pos_query^T     (S, 2 span) per (batch, head), precomputed by the
                                                    host with torch matmuls: memory linear in S
    out_i = sum_j softmax_j(z_i)_j v_j   over the real keys (key padding mask); zeros for a row with none
    lse_i = log sum_j exp(z_ij)          (-inf for such a row)

The index comes from a 1-D int32 table over relative distances, IDX[d + S - 1] = idx(d) for
d = -(S-1)..(S-1), built on the host with Hugging Face's bucket function (fusedlm.ops.deberta), so the
kernels never evaluate a logarithm. Positions past the sequence end are clamped to S - 1 before the
lookup: the index of a padded row or column repeats that of the last real one.

Forward: the flash-attention forward of fusedlm/kernels/attention.py (online softmax in base 2, key
blocks in two stages, the key loop bounded by the last real key), with the two position terms gathered
per tile from C2P / P2C (a [BLOCK_M, BLOCK_N] gather each, rows of 2 span elements that stay in cache).

Backward, with P recomputed from the saved lse, delta_i = sum_e dO_ie out_ie and dS = P * (dP - delta):

    dV = P^T dO     dQ = s dS K + dC2P pos_key     dK = s dS^T Q + dP2C pos_query
    dC2P[i, r] = s * sum_{j: idx(i,j) = r} dS_ij     dP2C[j, r] = s * sum_{i: idx(i,j) = r} dS_ij
    dpos_key = sum_{b,i} dC2P^T Q                    dpos_query = sum_{b,j} dP2C^T K

The scatter into dC2P / dP2C is done without atomics, so the backward is deterministic (it has no
other path). bucket() is monotone, so for a fixed query row i the keys j with idx(i, j) = r form one
contiguous run (idx is non-increasing in j), and for a fixed key column j the queries form one run
(non-decreasing in i). The dQ kernel owns whole query rows and walks every key block in order; per
tile it computes a segmented prefix sum of dS along the keys (tl.associative_scan with a restart flag at
each run start), carries the open run's partial sum into the next tile, and stores each run's total
once, at its last key: a plain store to a distinct (i, r) address. The dK/dV kernel does the same for
dP2C along the queries. Cost: one segmented scan per tile and position term, two extra int32 table
gathers per tile (the neighbours' indices, to find run starts and ends), and zero-filled float32
dC2P / dP2C buffers of (B, H, S, 2 span) (entries no run reaches stay zero); the four products with
pos_key / pos_query are torch matmuls on those buffers.
"""
import torch
import triton
import triton.language as tl

from . import attention
from .attention import _tile, _tile_t


UP = tl.constexpr(1 << 16)  # backward table flag: idx(d) != idx(d + 1)
DOWN = tl.constexpr(1 << 17)  # backward table flag: idx(d) != idx(d - 1)


def run_table(rel_idx):
    """The backward's table: idx(d) with the two run-boundary flags UP and DOWN above, so a tile finds
    where its runs start and end from the one entry it gathers (made on the device, no host copy)."""
    t = rel_idx
    up = torch.ones_like(t, dtype=torch.bool)
    down = torch.ones_like(t, dtype=torch.bool)
    up[:-1] = t[:-1] != t[1:]
    down[1:] = t[1:] != t[:-1]
    return t | (up.to(torch.int32) << 16) | (down.to(torch.int32) << 17)


@triton.jit
def _seg_sum(av, af, bv, bf):
    """Combine of a segmented sum: restart at b when b starts a run. Associative."""
    return tl.where(bf != 0, bv, av + bv), af | bf


@triton.jit
def _rel_idx(IDX, i, j, L, SMAX):
    """idx(i, j) for broadcastable positions i, j in a sequence of length L; positions are clamped into
    [0, L) (a row or column past the end repeats the last one's index). The table is centred on SMAX - 1."""
    ic = tl.minimum(tl.maximum(i, 0), L - 1)
    jc = tl.minimum(tl.maximum(j, 0), L - 1)
    return tl.load(IDX + (ic - jc + SMAX - 1))


@triton.jit
def _program(CU, H, H0, HC, SMAX, VARLEN: tl.constexpr):
    """This program's (batch, head, head within the chunk, first row, length) from axis 0 of the grid:
    batch x chunk heads there (axis 0 has no 65535 cap); packed sequences start at CU[b]."""
    bhl = tl.program_id(0)
    b = bhl // HC
    hl = bhl % HC
    if VARLEN:
        start = tl.load(CU + b)
        seq_len = tl.load(CU + b + 1) - start
    else:
        start = 0
        seq_len = SMAX
    return b.to(tl.int64), (H0 + hl).to(tl.int64), hl.to(tl.int64), start.to(tl.int64), seq_len


@triton.jit
def _keep(SEED, b, h, H, SMAX, i, j, dropout_p):
    """Dropout's keep mask at broadcastable query / key positions i, j (within the sequence): Philox
    uniforms >= p at the 64-bit counter ((b H + h) SMAX + i) SMAX + j, so the backward regenerates it."""
    return tl.rand(tl.load(SEED), ((b * H + h) * SMAX + i.to(tl.int64)) * SMAX + j.to(tl.int64)) >= dropout_p


@triton.jit
def _scores(q, kT, idx, offs_m, offs_n, L, qk_scale, C2P, stride_cm, P2C, stride_pn, KPM,
            HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr,
            CHECK_BOUNDS: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 scores of a [BLOCK_M, BLOCK_N] tile, -inf where the key is padding or past the end.

    q: [BLOCK_M, BLOCK_D], kT: [BLOCK_D, BLOCK_N]; idx: the tile's relative indices; C2P / P2C point at
    this sequence's (L, 2 span) products, KPM at this batch's key padding row.
    """
    s = tl.dot(q, kT, input_precision=PRECISION)
    if HAS_C2P or HAS_P2C:
        inb = (offs_m[:, None] < L) & (offs_n[None, :] < L)
        if HAS_C2P:
            s += tl.load(C2P + (offs_m[:, None] * stride_cm + idx), mask=inb, other=0.0).to(tl.float32)
        if HAS_P2C:
            s += tl.load(P2C + (offs_n[None, :] * stride_pn + idx), mask=inb, other=0.0).to(tl.float32)
    s = s * qk_scale
    if HAS_KPM:
        real = tl.load(KPM + offs_n, mask=offs_n < L, other=0)
        s = tl.where(real[None, :] != 0, s, float("-inf"))
    if CHECK_BOUNDS:
        s = tl.where(offs_n[None, :] < L, s, float("-inf"))
    return s


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K, V, C2P, P2C, IDX, KPM, SEED, stride_kn, stride_vn, stride_cm, stride_pn,
                offs_m, offs_d, D, L, SMAX, lo, hi, qk_scale, b, h, H, dropout_p,
                HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                CHECK_BOUNDS: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi): returns the updated (acc, l_i, m_i)."""
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        kT = _tile_t(K, offs_n, L, stride_kn, offs_d, D)
        idx = 0
        if HAS_C2P or HAS_P2C:
            idx = _rel_idx(IDX, offs_m[:, None], offs_n[None, :], L, SMAX)
        s = _scores(q, kT, idx, offs_m, offs_n, L, qk_scale, C2P, stride_cm, P2C, stride_pn, KPM,
                    HAS_C2P, HAS_P2C, HAS_KPM, CHECK_BOUNDS, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser sums the undropped probabilities
        if DROPOUT:
            keep = _keep(SEED, b, h, H, SMAX, offs_m[:, None], offs_n[None, :], dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = _tile(V, offs_n, L, stride_vn, offs_d, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _deberta_fwd(
    Q, K, V, O, LSE,  # q, k, v, out: (B, H, S, D) or packed (total, H, D), last dim contiguous; lse float32
    C2P, P2C, IDX,  # this head chunk's (L, 2 span) position products per sequence (or a dummy), index table
    KPM, KV_END, CU, SEED,  # key padding (uint8) and per-batch end of the real keys; cu_seqlens; dropout seed
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm,  # (batch, head, row); batch 0 if packed
    stride_cb, stride_ch, stride_cm, stride_pb, stride_ph, stride_pn, stride_kpb,  # C2P / P2C: chunk-local head
    H, H0, HC, SMAX, D,  # heads, this chunk's first head and head count, longest sequence, head dim
    sm_scale, dropout_p,  # float32: 1 / sqrt(D (1 + #terms)); dropout rate
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32 inputs (no TF32 rounding)
):
    b, h, hl, start, L = _program(CU, H, H0, HC, SMAX, VARLEN)
    start_m = tl.program_id(1) * BLOCK_M
    if start_m >= L:
        return  # past this sequence's end (packed batches launch for the longest)
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    Q += b * stride_qb + h * stride_qh + start * stride_qm
    K += b * stride_kb + h * stride_kh + start * stride_kn
    V += b * stride_vb + h * stride_vh + start * stride_vn
    C2P += b * stride_cb + hl * stride_ch + start * stride_cm
    P2C += b * stride_pb + hl * stride_ph + start * stride_pn
    KPM += b * stride_kpb
    q = _tile(Q, offs_m, L, stride_qm, offs_d, D)
    kv_end = tl.minimum(L, tl.load(KV_END + b)) if HAS_KPM else L
    n_full = kv_end // BLOCK_N * BLOCK_N
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, C2P, P2C, IDX, KPM, SEED, stride_kn, stride_vn, stride_cm,
                                stride_pn, offs_m, offs_d, D, L, SMAX, 0, n_full, qk_scale, b, h, H, dropout_p,
                                HAS_C2P, HAS_P2C, HAS_KPM, DROPOUT, False, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, C2P, P2C, IDX, KPM, SEED, stride_kn, stride_vn, stride_cm,
                                stride_pn, offs_m, offs_d, D, L, SMAX, n_full, kv_end, qk_scale, b, h, H, dropout_p,
                                HAS_C2P, HAS_P2C, HAS_KPM, DROPOUT, True, BLOCK_N, PRECISION)
    empty = l_i == 0.0  # no real key: zeros out, lse = -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    O += b * stride_ob + h * stride_oh + start * stride_om
    tl.store(O + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))
    LSE += b * stride_lb + h * stride_lh + start * stride_lm
    tl.store(LSE + offs_m.to(tl.int64) * stride_lm, lse, mask=row_ok)


@triton.jit
def _row_stats(LSE, DELTA, pos, n_pos, stride):
    """Saved lse in base 2 (+inf for a row with no real key, so its P is 0) and delta of rows ``pos``."""
    lse = tl.load(LSE + pos.to(tl.int64) * stride, mask=pos < n_pos, other=float("-inf"))
    delta = tl.load(DELTA + pos.to(tl.int64) * stride, mask=pos < n_pos, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), delta


@triton.jit
def _add_pos_product(acc, DBUF, stride_row, offs_rows, rows_ok, POS, stride_pos, offs_d, D,
                     TWO_SPAN, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """acc += DBUF[rows, :] @ POS: the rows' (already complete) float32 position-gradient rows times the
    (2 span, D) embeddings, BLOCK_R columns at a time. The rows were stored by this program: the barrier
    makes every thread's stores visible to the others first."""
    tl.debug_barrier()
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, TWO_SPAN, BLOCK_R):
        r = r0 + offs_r
        g = tl.load(DBUF + offs_rows[:, None].to(tl.int64) * stride_row + r[None, :],
                    mask=rows_ok[:, None] & (r[None, :] < TWO_SPAN), other=0.0)
        pos = _tile(POS, r, TWO_SPAN, stride_pos, offs_d, D)
        acc += tl.dot(g.to(pos.dtype), pos, input_precision=PRECISION)
    return acc


@triton.jit
def _deberta_bwd_dq(
    Q, K, V, O, DO, DLSE, LSE, DELTA, DQ, DC2P,  # DELTA: written here (float32, lse's layout); DC2P zeros
    C2P, P2C, POS_KEY, IDX, KPM, KV_END, CU, SEED,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh, stride_lm, stride_gb, stride_gh, stride_gm,  # LSE and DELTA; DLSE
    stride_dqb, stride_dqh, stride_dqm,
    stride_cb, stride_ch, stride_cm, stride_pb, stride_ph, stride_pn, stride_kpb,  # DC2P strides = C2P's
    stride_posh, stride_posr,
    H, H0, HC, SMAX, D, TWO_SPAN,
    sm_scale, dropout_p,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """delta, dQ and the dC2P rows of one query block of one head, over the key blocks in order."""
    b, h, hl, start, L = _program(CU, H, H0, HC, SMAX, VARLEN)
    start_m = tl.program_id(1) * BLOCK_M
    if start_m >= L:
        return
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    Q += b * stride_qb + h * stride_qh + start * stride_qm
    K += b * stride_kb + h * stride_kh + start * stride_kn
    V += b * stride_vb + h * stride_vh + start * stride_vn
    rows = b * stride_lb + h * stride_lh + start * stride_lm
    C2P += b * stride_cb + hl * stride_ch + start * stride_cm
    DC2P += b * stride_cb + hl * stride_ch + start * stride_cm
    P2C += b * stride_pb + hl * stride_ph + start * stride_pn
    KPM += b * stride_kpb
    q = _tile(Q, offs_m, L, stride_qm, offs_d, D)
    do = _tile(DO + b * stride_dob + h * stride_doh + start * stride_dom, offs_m, L, stride_dom, offs_d, D)
    # delta_i = sum_d dO_id out_id (- dlse_i: a gradient reaching lse adds dlse_i P_ij to dz_ij).
    o = _tile(O + b * stride_ob + h * stride_oh + start * stride_om, offs_m, L, stride_om, offs_d, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        DLSE += b * stride_gb + h * stride_gh + start * stride_gm  # any strides (autograd may expand zeros)
        delta -= tl.load(DLSE + offs_m.to(tl.int64) * stride_gm, mask=row_ok, other=0.0)
    tl.store(DELTA + rows + offs_m.to(tl.int64) * stride_lm, delta, mask=row_ok)
    lse2, _delta = _row_stats(LSE + rows, DELTA + rows, offs_m, L, stride_lm)  # delta: as computed above
    kv_end = tl.minimum(L, tl.load(KV_END + b)) if HAS_KPM else L
    last_col = tl.cdiv(kv_end, BLOCK_N) * BLOCK_N - 1  # the last key the loop visits closes every open run
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    carry = tl.zeros([BLOCK_M], dtype=tl.float32)  # partial sum of each row's open run (dC2P)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + offs_nb
        kT = _tile_t(K, offs_n, L, stride_kn, offs_d, D)
        vT = _tile_t(V, offs_n, L, stride_vn, offs_d, D)
        idx = 0
        if HAS_C2P or HAS_P2C:
            entry = _rel_idx(IDX, offs_m[:, None], offs_n[None, :], L, SMAX)
            idx = entry & 0xFFFF
        s = _scores(q, kT, idx, offs_m, offs_n, L, qk_scale, C2P, stride_cm, P2C, stride_pn, KPM,
                    HAS_C2P, HAS_P2C, HAS_KPM, True, PRECISION)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(SEED, b, h, H, SMAX, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
        if HAS_C2P:
            # Row i's keys with one index form a run (idx non-increasing in j): segmented sum.
            # (key j - 1 is at distance d + 1, key j + 1 at d - 1; past the end positions are clamped)
            first = (((entry & UP) != 0) & (offs_n[None, :] < L)) | (offs_n[None, :] == 0)
            last = (((entry & DOWN) != 0) & (offs_n[None, :] < L - 1)) | (offs_n[None, :] == last_col)
            val = ds + tl.where((offs_nb[None, :] == 0) & (first == 0), carry[:, None], 0.0)
            seg, _ = tl.associative_scan((val, first.to(tl.int32)), 1, _seg_sum)
            tl.store(DC2P + (offs_m[:, None] * stride_cm + idx), seg * sm_scale,
                     mask=last & row_ok[:, None])
            carry = tl.sum(tl.where(offs_nb[None, :] == BLOCK_N - 1, seg, 0.0), 1)
    dq = dq * sm_scale
    if HAS_C2P:  # dQ += dC2P pos_key, the rows just completed
        dq = _add_pos_product(dq, DC2P, stride_cm, offs_m, row_ok, POS_KEY + h * stride_posh, stride_posr,
                              offs_d, D, TWO_SPAN, BLOCK_N, PRECISION)
    DQ += b * stride_dqb + h * stride_dqh + start * stride_dqm
    tl.store(DQ + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _deberta_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DP2C,  # DP2C float32 zeros, P2C's layout
    C2P, P2C, POS_QUERY, IDX, KPM, KV_END, CU, SEED,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,  # LSE and DELTA share strides
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_cb, stride_ch, stride_cm, stride_pb, stride_ph, stride_pn, stride_kpb,  # DP2C strides = P2C's
    stride_posh, stride_posr,
    H, H0, HC, SMAX, D, TWO_SPAN,
    sm_scale, dropout_p,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV and the dP2C rows of one key block of one head, over every query block in order."""
    b, h, hl, start, L = _program(CU, H, H0, HC, SMAX, VARLEN)
    start_n = tl.program_id(1) * BLOCK_N
    if start_n >= L:
        return
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = offs_n < L
    Q += b * stride_qb + h * stride_qh + start * stride_qm
    K += b * stride_kb + h * stride_kh + start * stride_kn
    V += b * stride_vb + h * stride_vh + start * stride_vn
    DO += b * stride_dob + h * stride_doh + start * stride_dom
    rows = b * stride_lb + h * stride_lh + start * stride_lm
    C2P += b * stride_cb + hl * stride_ch + start * stride_cm
    P2C += b * stride_pb + hl * stride_ph + start * stride_pn
    DP2C += b * stride_pb + hl * stride_ph + start * stride_pn
    KPM += b * stride_kpb
    # Every product has the key block as its M dimension (sT = K Q^T, dV += P^T dO, dK += dS^T Q), so
    # BLOCK_N = 64 per warpgroup keeps them on Hopper's wgmma while the query block stays small.
    k = _tile(K, offs_n, L, stride_kn, offs_d, D)  # [BLOCK_N, BLOCK_D]
    v = _tile(V, offs_n, L, stride_vn, offs_d, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    carry = tl.zeros([BLOCK_N], dtype=tl.float32)  # partial sum of each key's open run (dP2C)
    kv_end = tl.minimum(L, tl.load(KV_END + b)) if HAS_KPM else L
    qk_scale = sm_scale * 1.4426950408889634
    last_row = tl.cdiv(L, BLOCK_M) * BLOCK_M - 1  # the last query the loop visits closes every open run
    if HAS_KPM:
        real = tl.load(KPM + offs_n, mask=kv_ok, other=0) != 0
    else:
        real = kv_ok
    if start_n < kv_end:  # a block of padding only: its gradients are zeros
        for start_m in range(0, L, BLOCK_M):
            offs_m = start_m + offs_mb
            qT = _tile_t(Q, offs_m, L, stride_qm, offs_d, D)  # [BLOCK_D, BLOCK_M]
            do = _tile(DO, offs_m, L, stride_dom, offs_d, D)  # [BLOCK_M, BLOCK_D]
            lse2, delta = _row_stats(LSE + rows, DELTA + rows, offs_m, L, stride_lm)
            # transposed tile: row = key j (offs_n), column = query i (offs_m)
            sT = tl.dot(k, qT, input_precision=PRECISION)
            idx = 0
            if HAS_C2P or HAS_P2C:
                entry = _rel_idx(IDX, offs_m[None, :], offs_n[:, None], L, SMAX)
                idx = entry & 0xFFFF
                inb = (offs_n[:, None] < L) & (offs_m[None, :] < L)
                if HAS_C2P:
                    sT += tl.load(C2P + (offs_m[None, :] * stride_cm + idx), mask=inb, other=0.0).to(tl.float32)
                if HAS_P2C:
                    sT += tl.load(P2C + (offs_n[:, None] * stride_pn + idx), mask=inb, other=0.0).to(tl.float32)
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
            if HAS_P2C:
                # Key j's queries with one index form a run (idx non-decreasing in i): segmented sum.
                # (query i - 1 is at distance d - 1, query i + 1 at d + 1)
                first = (((entry & DOWN) != 0) & (offs_m[None, :] < L)) | (offs_m[None, :] == 0)
                last = (((entry & UP) != 0) & (offs_m[None, :] < L - 1)) | (offs_m[None, :] == last_row)
                val = dsT + tl.where((offs_mb[None, :] == 0) & (first == 0), carry[:, None], 0.0)
                seg, _ = tl.associative_scan((val, first.to(tl.int32)), 1, _seg_sum)
                tl.store(DP2C + (offs_n[:, None] * stride_pn + idx), seg * sm_scale, mask=last & kv_ok[:, None])
                carry = tl.sum(tl.where(offs_mb[None, :] == BLOCK_M - 1, seg, 0.0), 1)
    dk = dk * sm_scale
    if HAS_P2C:  # dK += dP2C pos_query, the columns just completed
        dk = _add_pos_product(dk, DP2C, stride_pn, offs_n, kv_ok, POS_QUERY + h * stride_posh, stride_posr,
                              offs_d, D, TWO_SPAN, BLOCK_M, PRECISION)
    DK += b * stride_dkb + h * stride_dkh + start * stride_dkn
    DV += b * stride_dvb + h * stride_dvh + start * stride_dvn
    tl.store(DK + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_ok[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------------
# Host launchers. Dense tensors are (B, H, S, D), packed ones (total, H, D) with int32 cu_seqlens; both
# are seen by the kernels through (batch, head, row) strides (batch stride 0 when packed, rows from
# cu_seqlens[b]). pos_key / pos_query are (H, 2 span, D) or None; rel_idx the int32 (2 max_seqlen - 1,)
# table; key_padding_mask bool (B, S) or None (dense only).

# The position products (and their float32 gradients) live for one chunk of heads at a time: a chunk is
# as many heads as fit this many bytes (at least one), so their memory stays near that of one input.
CHUNK_BYTES = 64 * 2**20


def block_config(d, dtype, device, kernel="fwd"):
    """Block shapes and warps of ``kernel`` ("fwd", "dq" or "dkdv") for head dim d.

    Chosen on the sm_90 compile (tests/sm90_compile.py): besides the attention tiles these kernels hold
    the relative-index tile and two gathered position tiles, so the key block (forward, dQ) or the query
    block (dK/dV) is halved to 32 to stay within 255 registers without spilling, while every product keeps
    an M dimension of 64 per warpgroup (wgmma; the dK/dV kernel works on transposed tiles for that).
    On the interpreter one small config (speed of the NumPy emulation matters, not occupancy).
    """
    bd = max(16, triton.next_power_of_2(d))
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=bd, num_warps=4, num_stages=1)
    # (BLOCK_M, BLOCK_N, warps, stages) per kernel; sm_90 registers / spill bytes of each in the comments
    if dtype == torch.float32:  # no tensor cores for "ieee" float32 dots: small tiles, no spills
        table = dict(fwd=(32, 32, 4, 2), dq=(32, 16, 4, 2), dkdv=(16, 32, 4, 2))
    elif bd <= 64:  # DeBERTa-v3's D = 64: 252 / 254 / 254 registers, 0 spills, all wgmma
        table = dict(fwd=(128, 32, 8, 3), dq=(64, 32, 4, 2), dkdv=(32, 64, 4, 2))
    else:  # D = 128: 239 / 254 / 255 registers, 0 / 0 / 8 bytes spilled, all wgmma; D = 256 spills
        table = dict(fwd=(64, 32, 8, 3), dq=(64, 16, 8, 2), dkdv=(16, 64, 8, 2))
    bm, bn, warps, stages = table[kernel]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)


def _bhm(t, varlen):
    """(batch, head, row) strides of a dense (B, H, S, ...) / (B, H, S) or packed (total, H, ...) tensor."""
    return (0, t.stride(1), t.stride(0)) if varlen else tuple(t.stride()[:3])


class _Geometry:
    """Batch, heads, longest sequence and head dim of a dense or packed call, and its head chunks."""

    def __init__(self, q, pos_key, pos_query, cu_seqlens, max_seqlen, backward):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.B, (total, self.H, self.D) = cu_seqlens.shape[0] - 1, q.shape
            rows = total
        else:
            self.B, self.H, _, self.D = q.shape
            rows = self.B * max_seqlen
        self.S = max_seqlen
        self.two_span = next((t.shape[1] for t in (pos_key, pos_query) if t is not None), 0)
        terms = (pos_key is not None) + (pos_query is not None)
        per_head = rows * self.two_span * terms * (q.element_size() + (4 if backward else 0))
        self.chunk = self.H if per_head == 0 else max(1, min(self.H, CHUNK_BYTES // per_head))

    def chunks(self):
        return [(h0, min(self.H, h0 + self.chunk)) for h0 in range(0, self.H, self.chunk)]

    def products(self, q, pos, h0, h1):
        """(rows, 2 span) products of q's (or k's) heads h0:h1 with pos (C2P = Q pos_key^T, P2C = K
        pos_query^T) in the inputs' dtype (as Hugging Face), and their (batch, head, row) strides."""
        if pos is None:
            return None, (0, 0, 0)
        pos = pos[h0:h1].transpose(-1, -2)
        if self.varlen:
            c = torch.matmul(q[:, h0:h1].transpose(0, 1), pos)  # (heads, total, 2 span)
            return c, (0, c.stride(0), c.stride(1))
        c = torch.matmul(q[:, h0:h1], pos)  # (B, heads, S, 2 span)
        return c, tuple(c.stride()[:3])


def _masks(key_padding_mask, dummy):
    """Key padding as a contiguous uint8 row per batch and the end of each row's real keys, or dummies."""
    if key_padding_mask is None:
        return dummy, dummy, 0
    kpm = key_padding_mask.contiguous().view(torch.uint8)
    _, kv_end = attention.key_padding_bounds(key_padding_mask)  # one past the last real key
    return kpm, kv_end, kpm.stride(0)


def _new_out(q, varlen):
    """A new tensor shaped like q, laid out like it ((B, S, H, D) memory, as Hugging Face produces, or not)."""
    if not varlen and q.transpose(1, 2).is_contiguous():
        B, H, S, D = q.shape
        return q.new_empty(B, S, H, D).transpose(1, 2)
    return torch.empty_like(q)


def deberta_fwd(launch, q, k, v, pos_key, pos_query, key_padding_mask, cu_seqlens, rel_idx, max_seqlen, scale,
                dropout_p, seed):
    """-> (out like q, lse float32 (B, H, S) or (total, H))."""
    g = _Geometry(q, pos_key, pos_query, cu_seqlens, max_seqlen, backward=False)
    out = _new_out(q, g.varlen)
    lse = torch.empty(q.shape[:-1] if g.varlen else q.shape[:-1], device=q.device, dtype=torch.float32)
    if out.numel() == 0 or g.B == 0 or g.S == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    kpm, kv_end, kpb = _masks(key_padding_mask, lse)
    cfg = block_config(g.D, q.dtype, q.device, "fwd")
    for h0, h1 in g.chunks():
        c2p, cs = g.products(q, pos_key, h0, h1)
        p2c, ps = g.products(k, pos_query, h0, h1)
        launch(_deberta_fwd, (g.B * (h1 - h0), triton.cdiv(g.S, cfg["BLOCK_M"])),
               q, k, v, out, lse, c2p if c2p is not None else lse, p2c if p2c is not None else lse, rel_idx,
               kpm, kv_end, cu_seqlens if g.varlen else lse, seed if seed is not None else lse,
               *_bhm(q, g.varlen), *_bhm(k, g.varlen), *_bhm(v, g.varlen), *_bhm(out, g.varlen),
               *_bhm(lse, g.varlen), *cs, *ps, kpb, g.H, h0, h1 - h0, g.S, g.D, float(scale), float(dropout_p),
               HAS_C2P=c2p is not None, HAS_P2C=p2c is not None, HAS_KPM=key_padding_mask is not None,
               VARLEN=g.varlen, DROPOUT=dropout_p > 0, PRECISION=attention.precision(q), **cfg)
        del c2p, p2c
    return out, lse


def _pos_grad(dbuf, x, g, h0, h1):
    """sum over batch and rows of dbuf^T x for heads h0:h1 in float32: (heads, 2 span, D)."""
    if g.varlen:  # dbuf (heads, total, 2 span), x (total, H, D)
        return torch.matmul(dbuf.transpose(-1, -2), x[:, h0:h1].transpose(0, 1).float())
    return torch.matmul(dbuf.transpose(-1, -2), x[:, h0:h1].float()).sum(0)


def deberta_bwd(launch, do, dlse, q, k, v, pos_key, pos_query, out, lse, key_padding_mask, cu_seqlens, rel_idx,
                max_seqlen, scale, dropout_p, seed, grad_pos_key, grad_pos_query):
    """-> (dq, dk, dv, dpos_key or None, dpos_query or None), in the inputs' dtypes. ``dlse``: the gradient
    reaching lse, or None. The position gradients are computed only when asked for."""
    g = _Geometry(q, pos_key, pos_query, cu_seqlens, max_seqlen, backward=True)
    dq, dk, dv = _new_out(q, g.varlen), _new_out(k, g.varlen), _new_out(v, g.varlen)
    dpk = torch.zeros_like(pos_key, dtype=torch.float32) if grad_pos_key else None
    dpq = torch.zeros_like(pos_query, dtype=torch.float32) if grad_pos_query else None
    if q.numel() == 0 or g.B == 0 or g.S == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
    else:
        delta = torch.empty_like(lse)  # written by the dQ kernel, read by the dK/dV kernel
        kpm, kv_end, kpb = _masks(key_padding_mask, lse)
        cfg_dq = block_config(g.D, q.dtype, q.device, "dq")
        cfg_dkdv = block_config(g.D, q.dtype, q.device, "dkdv")
        io = (*_bhm(q, g.varlen), *_bhm(k, g.varlen), *_bhm(v, g.varlen))
        flags = dict(HAS_C2P=pos_key is not None, HAS_P2C=pos_query is not None,
                     HAS_KPM=key_padding_mask is not None, VARLEN=g.varlen, DROPOUT=dropout_p > 0,
                     PRECISION=attention.precision(q))
        pos_strides = tuple((t.stride(0), t.stride(1)) if t is not None else (0, 0) for t in (pos_key, pos_query))
        common = (run_table(rel_idx), kpm, kv_end, cu_seqlens if g.varlen else lse, seed if seed is not None else lse)
        for h0, h1 in g.chunks():
            c2p, cs = g.products(q, pos_key, h0, h1)
            p2c, ps = g.products(k, pos_query, h0, h1)
            dc2p = torch.zeros_like(c2p, dtype=torch.float32) if c2p is not None else None
            dp2c = torch.zeros_like(p2c, dtype=torch.float32) if p2c is not None else None
            ptrs = (c2p if c2p is not None else lse, p2c if p2c is not None else lse)
            scalars = (g.H, h0, h1 - h0, g.S, g.D, g.two_span, float(scale), float(dropout_p))
            grid = (g.B * (h1 - h0), triton.cdiv(g.S, cfg_dq["BLOCK_M"]))
            launch(_deberta_bwd_dq, grid,
                   q, k, v, out, do, dlse if dlse is not None else lse, lse, delta, dq,
                   dc2p if dc2p is not None else lse, *ptrs, pos_key if pos_key is not None else lse, *common,
                   *io, *_bhm(out, g.varlen), *_bhm(do, g.varlen), *_bhm(lse, g.varlen),
                   *(_bhm(dlse, g.varlen) if dlse is not None else (0, 0, 0)), *_bhm(dq, g.varlen), *cs, *ps, kpb, *pos_strides[0], *scalars, HAS_DLSE=dlse is not None, **flags, **cfg_dq)
            grid = (g.B * (h1 - h0), triton.cdiv(g.S, cfg_dkdv["BLOCK_N"]))
            launch(_deberta_bwd_dkdv, grid,
                   q, k, v, do, lse, delta, dk, dv, dp2c if dp2c is not None else lse, *ptrs,
                   pos_query if pos_query is not None else lse, *common,
                   *io, *_bhm(do, g.varlen), *_bhm(lse, g.varlen), *_bhm(dk, g.varlen), *_bhm(dv, g.varlen),
                   *cs, *ps, kpb, *pos_strides[1], *scalars, **flags, **cfg_dkdv)
            if dpk is not None:  # dpos_key = sum over batch and queries of dC2P^T Q
                dpk[h0:h1] = _pos_grad(dc2p, q, g, h0, h1)
            if dpq is not None:  # dpos_query = sum over batch and keys of dP2C^T K
                dpq[h0:h1] = _pos_grad(dp2c, k, g, h0, h1)
            del c2p, p2c, dc2p, dp2c
    return (dq, dk, dv, dpk.to(pos_key.dtype) if dpk is not None else None,
            dpq.to(pos_query.dtype) if dpq is not None else None)
