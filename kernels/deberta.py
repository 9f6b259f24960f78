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
from .attention import _row_stats, _tile, _tile_t



@triton.jit
def _seg_sum(av, af, bv, bf):
    """Combine of a segmented sum: restart at b when b starts a run. Associative."""
    return tl.where(bf != 0, bv, av + bv), af | bf


@triton.jit
def _rel_idx(IDX, i, j, S):
    """idx(i, j) for broadcastable position tensors i, j; positions are clamped into [0, S)."""
    ic = tl.minimum(tl.maximum(i, 0), S - 1)
    jc = tl.minimum(tl.maximum(j, 0), S - 1)
    return tl.load(IDX + (ic - jc + S - 1))


@triton.jit
def _scores(q, kT, idx, offs_m, offs_n, S, qk_scale, C2P, stride_cm, P2C, stride_pn, KPM,
            HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr,
            CHECK_BOUNDS: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 scores of a [BLOCK_M, BLOCK_N] tile, -inf where the key is padding or past the end.

    q: [BLOCK_M, BLOCK_D], kT: [BLOCK_D, BLOCK_N]; idx: the tile's relative indices; C2P / P2C point at
    this (batch, head)'s (S, 2 span) products, KPM at this batch's key padding row.
    """
    s = tl.dot(q, kT, input_precision=PRECISION)
    if HAS_C2P or HAS_P2C:
        inb = (offs_m[:, None] < S) & (offs_n[None, :] < S)
        if HAS_C2P:
            s += tl.load(C2P + offs_m[:, None].to(tl.int64) * stride_cm + idx, mask=inb, other=0.0).to(tl.float32)
        if HAS_P2C:
            s += tl.load(P2C + offs_n[None, :].to(tl.int64) * stride_pn + idx, mask=inb, other=0.0).to(tl.float32)
    s = s * qk_scale
    if HAS_KPM:
        real = tl.load(KPM + offs_n, mask=offs_n < S, other=0)
        s = tl.where(real[None, :] != 0, s, float("-inf"))
    if CHECK_BOUNDS:
        s = tl.where(offs_n[None, :] < S, s, float("-inf"))
    return s


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K, V, C2P, P2C, IDX, KPM, stride_kn, stride_vn, stride_cm, stride_pn,
                offs_m, offs_d, D, S, lo, hi, qk_scale,
                HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr,
                CHECK_BOUNDS: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi): returns the updated (acc, l_i, m_i)."""
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        kT = _tile_t(K, offs_n, S, stride_kn, offs_d, D)
        idx = 0
        if HAS_C2P or HAS_P2C:
            idx = _rel_idx(IDX, offs_m[:, None], offs_n[None, :], S)
        s = _scores(q, kT, idx, offs_m, offs_n, S, qk_scale, C2P, stride_cm, P2C, stride_pn, KPM,
                    HAS_C2P, HAS_P2C, HAS_KPM, CHECK_BOUNDS, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, offs_n, S, stride_vn, offs_d, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _deberta_fwd(
    Q, K, V, O, LSE,  # q, k, v (B, H, S, D), last dim contiguous; out like q; lse float32 (B, H, S)
    C2P, P2C, IDX,  # (B, H, S, 2 span) position products (or a dummy when absent), int32 index table
    KPM, KV_END,  # key padding (uint8, True = real), per-batch end of the real keys (int32)
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm,
    stride_cb, stride_ch, stride_cm, stride_pb, stride_ph, stride_pn, stride_kpb,
    H, S, D,  # heads, sequence length, head dim
    sm_scale,  # float32: 1 / sqrt(D (1 + #terms))
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32 inputs (no TF32 rounding)
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    sm_scale = tl.cast(sm_scale, tl.float32)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    C2P += b * stride_cb + h * stride_ch
    P2C += b * stride_pb + h * stride_ph
    KPM += b * stride_kpb
    q = _tile(Q, offs_m, S, stride_qm, offs_d, D)
    kv_end = tl.minimum(S, tl.load(KV_END + b)) if HAS_KPM else S
    n_full = kv_end // BLOCK_N * BLOCK_N
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, C2P, P2C, IDX, KPM, stride_kn, stride_vn, stride_cm,
                                stride_pn, offs_m, offs_d, D, S, 0, n_full, qk_scale,
                                HAS_C2P, HAS_P2C, HAS_KPM, False, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, C2P, P2C, IDX, KPM, stride_kn, stride_vn, stride_cm,
                                stride_pn, offs_m, offs_d, D, S, n_full, kv_end, qk_scale,
                                HAS_C2P, HAS_P2C, HAS_KPM, True, BLOCK_N, PRECISION)
    empty = l_i == 0.0  # no real key: zeros out, lse = -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    O += b * stride_ob + h * stride_oh
    tl.store(O + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))
    LSE += b * stride_lb + h * stride_lh
    tl.store(LSE + offs_m.to(tl.int64) * stride_lm, lse, mask=row_ok)


@triton.jit
def _deberta_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DP2C,  # DK float32, DV like v, DP2C float32 zeros (B, H, S, 2 span)
    C2P, P2C, IDX, KPM, KV_END,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,  # LSE and DELTA share strides
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_cb, stride_ch, stride_cm, stride_pb, stride_ph, stride_pn, stride_kpb,  # DP2C strides = P2C's
    H, S, D,
    sm_scale,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV and the dP2C rows of one key block of one head, over every query block in order."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    sm_scale = tl.cast(sm_scale, tl.float32)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = offs_n < S
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    LSE += b * stride_lb + h * stride_lh
    DELTA += b * stride_lb + h * stride_lh
    C2P += b * stride_cb + h * stride_ch
    P2C += b * stride_pb + h * stride_ph
    DP2C += b * stride_pb + h * stride_ph
    KPM += b * stride_kpb
    kT = _tile_t(K, offs_n, S, stride_kn, offs_d, D)  # [BLOCK_D, BLOCK_N]
    vT = _tile_t(V, offs_n, S, stride_vn, offs_d, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    carry = tl.zeros([BLOCK_N], dtype=tl.float32)  # partial sum of each column's open run (dP2C)
    kv_end = tl.minimum(S, tl.load(KV_END + b)) if HAS_KPM else S
    qk_scale = sm_scale * 1.4426950408889634
    last_row = tl.cdiv(S, BLOCK_M) * BLOCK_M - 1  # the last query the loop visits closes every open run
    if start_n < kv_end:  # a block of padding only: its gradients are zeros
        for start_m in range(0, S, BLOCK_M):
            offs_m = start_m + offs_mb
            q = _tile(Q, offs_m, S, stride_qm, offs_d, D)
            do = _tile(DO, offs_m, S, stride_dom, offs_d, D)
            lse2, delta = _row_stats(LSE, DELTA, offs_m, S, stride_lm)
            idx = 0
            if HAS_C2P or HAS_P2C:
                idx = _rel_idx(IDX, offs_m[:, None], offs_n[None, :], S)
            s = _scores(q, kT, idx, offs_m, offs_n, S, qk_scale, C2P, stride_cm, P2C, stride_pn, KPM,
                        HAS_C2P, HAS_P2C, HAS_KPM, True, PRECISION)
            p = tl.math.exp2(s - lse2[:, None])
            dp = tl.dot(do, vT, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
            if HAS_P2C:
                # Column j's queries with one index form a run (idx non-decreasing in i): segmented sum.
                prev = _rel_idx(IDX, offs_m[:, None] - 1, offs_n[None, :], S)
                nxt = _rel_idx(IDX, offs_m[:, None] + 1, offs_n[None, :], S)
                first = (idx != prev) | (offs_m[:, None] == 0)
                last = (idx != nxt) | (offs_m[:, None] == last_row)
                val = ds + tl.where((offs_mb[:, None] == 0) & (first == 0), carry[None, :], 0.0)
                seg, _ = tl.associative_scan((val, first.to(tl.int32)), 0, _seg_sum)
                tl.store(DP2C + offs_n[None, :].to(tl.int64) * stride_pn + idx, seg * sm_scale,
                         mask=last & kv_ok[None, :])
                carry = tl.sum(tl.where(offs_mb[:, None] == BLOCK_M - 1, seg, 0.0), 0)
    dk = dk * sm_scale
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    tl.store(DK + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _deberta_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, DC2P,  # DQ float32, DC2P float32 zeros (B, H, S, 2 span)
    C2P, P2C, IDX, KPM, KV_END,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_cb, stride_ch, stride_cm, stride_pb, stride_ph, stride_pn, stride_kpb,  # DC2P strides = C2P's
    H, S, D,
    sm_scale,
    HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ and the dC2P rows of one query block of one head, over the key blocks in order."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    sm_scale = tl.cast(sm_scale, tl.float32)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    LSE += b * stride_lb + h * stride_lh
    DELTA += b * stride_lb + h * stride_lh
    C2P += b * stride_cb + h * stride_ch
    DC2P += b * stride_cb + h * stride_ch
    P2C += b * stride_pb + h * stride_ph
    KPM += b * stride_kpb
    q = _tile(Q, offs_m, S, stride_qm, offs_d, D)
    do = _tile(DO, offs_m, S, stride_dom, offs_d, D)
    lse2, delta = _row_stats(LSE, DELTA, offs_m, S, stride_lm)
    kv_end = tl.minimum(S, tl.load(KV_END + b)) if HAS_KPM else S
    last_col = tl.cdiv(kv_end, BLOCK_N) * BLOCK_N - 1  # the last key the loop visits closes every open run
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    carry = tl.zeros([BLOCK_M], dtype=tl.float32)  # partial sum of each row's open run (dC2P)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + offs_nb
        kT = _tile_t(K, offs_n, S, stride_kn, offs_d, D)
        vT = _tile_t(V, offs_n, S, stride_vn, offs_d, D)
        idx = 0
        if HAS_C2P or HAS_P2C:
            idx = _rel_idx(IDX, offs_m[:, None], offs_n[None, :], S)
        s = _scores(q, kT, idx, offs_m, offs_n, S, qk_scale, C2P, stride_cm, P2C, stride_pn, KPM,
                    HAS_C2P, HAS_P2C, HAS_KPM, True, PRECISION)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
        if HAS_C2P:
            # Row i's keys with one index form a run (idx non-increasing in j): segmented sum.
            prev = _rel_idx(IDX, offs_m[:, None], offs_n[None, :] - 1, S)
            nxt = _rel_idx(IDX, offs_m[:, None], offs_n[None, :] + 1, S)
            first = (idx != prev) | (offs_n[None, :] == 0)
            last = (idx != nxt) | (offs_n[None, :] == last_col)
            val = ds + tl.where((offs_nb[None, :] == 0) & (first == 0), carry[:, None], 0.0)
            seg, _ = tl.associative_scan((val, first.to(tl.int32)), 1, _seg_sum)
            tl.store(DC2P + offs_m[:, None].to(tl.int64) * stride_cm + idx, seg * sm_scale,
                     mask=last & row_ok[:, None])
            carry = tl.sum(tl.where(offs_nb[None, :] == BLOCK_N - 1, seg, 0.0), 1)
    dq = dq * sm_scale
    DQ += b * stride_dqb + h * stride_dqh
    tl.store(DQ + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------------
# Host launchers. q, k, v are (B, H, S, D) with unit stride in the last dim; pos_key / pos_query
# (H, 2 span, D) or None; rel_idx the int32 (2 S - 1,) table; key_padding_mask bool (B, S) or None.


def block_config(d, dtype, device, backward=False):
    """Block shapes and warps for head dim d: the non-causal attention kernels' (one table to tune)."""
    cfg = attention.block_config(d, d, False, dtype, device, backward)
    cfg["BLOCK_D"] = cfg.pop("BLOCK_E")
    del cfg["BLOCK_EV"]
    return cfg


def _products(q, k, pos_key, pos_query):
    """C2P = Q pos_key^T and P2C = K pos_query^T, (B, H, S, 2 span) in the inputs' dtype (as Hugging Face)."""
    c2p = torch.matmul(q, pos_key.transpose(-1, -2)) if pos_key is not None else None
    p2c = torch.matmul(k, pos_query.transpose(-1, -2)) if pos_query is not None else None
    return c2p, p2c


def _common(q, c2p, p2c, key_padding_mask, dummy):
    """Pointers, strides and flags shared by the three kernels."""
    c = c2p if c2p is not None else dummy
    p = p2c if p2c is not None else dummy
    cs = c2p.stride()[:3] if c2p is not None else (0, 0, 0)
    ps = p2c.stride()[:3] if p2c is not None else (0, 0, 0)
    if key_padding_mask is not None:
        kpm, kpb = key_padding_mask.view(torch.uint8), key_padding_mask.stride(0)
        _, kv_end = attention.key_padding_bounds(key_padding_mask)  # one past the last real key
    else:
        kpm, kv_end, kpb = dummy, dummy, 0
    flags = dict(HAS_C2P=c2p is not None, HAS_P2C=p2c is not None, HAS_KPM=key_padding_mask is not None,
                 PRECISION=attention.precision(q))
    return (c, p, kpm, kv_end), (*cs, *ps, kpb), flags


def _new_like_layout(q, dtype=None):
    """A new (B, H, S, D) tensor laid out like q ((B, S, H, D) memory, as Hugging Face produces, or not)."""
    B, H, S, D = q.shape
    dtype = dtype or q.dtype
    if q.transpose(1, 2).is_contiguous():
        return torch.empty(B, S, H, D, device=q.device, dtype=dtype).transpose(1, 2)
    return torch.empty(B, H, S, D, device=q.device, dtype=dtype)


def deberta_fwd(launch, q, k, v, pos_key, pos_query, key_padding_mask, rel_idx, scale):
    """-> (out like q, lse float32 (B, H, S))."""
    B, H, S, D = q.shape
    out = _new_like_layout(q)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    c2p, p2c = _products(q, k, pos_key, pos_query)
    (c, p, kpm, kv_end), pstrides, flags = _common(q, c2p, p2c, key_padding_mask, lse)
    cfg = block_config(D, q.dtype, q.device)
    launch(_deberta_fwd, (triton.cdiv(S, cfg["BLOCK_M"]), B * H),
           q, k, v, out, lse, c, p, rel_idx, kpm, kv_end,
           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride(), *pstrides,
           H, S, D, float(scale), **flags, **cfg)
    return out, lse


def deberta_bwd(launch, do, q, k, v, pos_key, pos_query, out, lse, key_padding_mask, rel_idx, scale):
    """-> (dq, dk, dv, dpos_key or None, dpos_query or None), in the inputs' dtypes."""
    B, H, S, D = q.shape
    dq, dk = _new_like_layout(q, torch.float32), _new_like_layout(k, torch.float32)
    dv = torch.empty_like(v)
    if q.numel() == 0:
        zeros = [torch.zeros_like(t) if t is not None else None for t in (pos_key, pos_query)]
        return dq.to(q.dtype), dk.to(k.dtype), dv, *zeros
    # delta_i = sum_e dO_ie out_ie, one cheap pass in float32, laid out as lse.
    delta = (do.float() * out.float()).sum(-1).contiguous()
    c2p, p2c = _products(q, k, pos_key, pos_query)
    two_span = next((t.shape[1] for t in (pos_key, pos_query) if t is not None), 0)
    dc2p = torch.zeros(B, H, S, two_span, device=q.device, dtype=torch.float32) if c2p is not None else None
    dp2c = torch.zeros(B, H, S, two_span, device=q.device, dtype=torch.float32) if p2c is not None else None
    (c, p, kpm, kv_end), pstrides, flags = _common(q, c2p, p2c, key_padding_mask, lse)
    cfg = block_config(D, q.dtype, q.device, backward=True)
    io_strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *lse.stride())
    launch(_deberta_bwd_dkdv, (triton.cdiv(S, cfg["BLOCK_N"]), B * H),
           q, k, v, do, lse, delta, dk, dv, dp2c if dp2c is not None else lse, c, p, rel_idx, kpm, kv_end,
           *io_strides, *dk.stride()[:3], *dv.stride()[:3], *pstrides, H, S, D, float(scale), **flags, **cfg)
    launch(_deberta_bwd_dq, (triton.cdiv(S, cfg["BLOCK_M"]), B * H),
           q, k, v, do, lse, delta, dq, dc2p if dc2p is not None else lse, c, p, rel_idx, kpm, kv_end,
           *io_strides, *dq.stride()[:3], *pstrides, H, S, D, float(scale), **flags, **cfg)
    dpos_key = dpos_query = None
    if dc2p is not None:  # dQ += dC2P pos_key; dpos_key = sum over batch and queries of dC2P^T Q
        dq += torch.matmul(dc2p, pos_key.float())
        dpos_key = torch.matmul(dc2p.transpose(-1, -2), q.float()).sum(0).to(pos_key.dtype)
    if dp2c is not None:
        dk += torch.matmul(dp2c, pos_query.float())
        dpos_query = torch.matmul(dp2c.transpose(-1, -2), k.float()).sum(0).to(pos_query.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv, dpos_key, dpos_query
