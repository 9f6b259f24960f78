"""Flash attention: dense, padded (key padding mask) and packed (varlen) batches, causal or not, GQA,
arbitrary bool/float masks, dropout. Never an L x S matrix in memory.

Three modules, imports one way (attention_configs <- attention <- attention_backward):
    attention.py           the math (here), the tile helpers both passes share, the forward kernel, the host
                           helpers both launchers share (strides, masks, window) and the forward launcher;
    attention_backward.py  the backward's math, its kernels (delta, dK/dV, dQ) and launcher;
    attention_configs.py   block shapes per head dim and dtype, the autotuning tables, the launch through them.

For one head, queries q_i (E features), keys k_j, values v_j (Ev features), scale s:

    z_ij  = s * q_i . k_j  (+ float mask_ij), or -inf where the key is masked out
    out_i = sum_j softmax_j(z_i)_j * v_j            (zeros where every z_ij is -inf)
    lse_i = log sum_j exp(z_ij)                     (-inf for such a row)

Forward (one program per query block and head): keys in blocks of BLOCK_N with the online softmax.
Scores are kept in base 2 (z * log2(e)) so each exponential is one exp2; the running maximum m_i, the
running sum l_i and the accumulator are rescaled by exp2(m_old - m_new) as the maximum grows. The
block loop runs in two stages: blocks wholly visible to every query of the tile (no bounds or causal
test), then the blocks on the causal diagonal or the sequence end (per-element test). A key padding
mask also bounds the loop to its first and last real keys, so leading and trailing padding cost nothing.

Dropout (rate p) multiplies P by keep_ij / (1 - p) after the softmax; keep_ij = uniform(seed, c_ij) >= p
with Triton's counter-based Philox generator and the 64-bit counter c_ij = ((b * H + h) * max_L + i) *
max_S + j (its two 32-bit halves as two Philox counter words), so forward and backward regenerate the
same mask, and the same seed gives the same result (attention_backward.py: dV = P_dropped^T dO, dP masked).

Launch grids are one axis (CUDA caps axes 1 and 2 at 65535): block index fastest, then batch x head.
On sm_90 every half-precision product runs on wgmma, which takes M = 64 rows per warpgroup (the dK/dV
kernel computes its tiles transposed for it, see attention_backward.py). float32 inputs multiply as 3xTF32
on the tensor cores (float32 accuracy).

Causal alignment: query i sees keys j <= i + shift, shift = 0 (top-left, torch's SDPA) or
S_b - L_b (bottom-right, FlashAttention's varlen convention, per sequence).

Local attention (WINDOW): query i sees keys i + shift - left <= j <= i + shift + right. The block loops
then run in three stages: the partial blocks on the band's left edge, the blocks inside it (no test), the
partial blocks on its right edge (or the diagonal); blocks outside the band are never loaded, so the cost
is O(L * (left + right)) instead of O(L * S). The dK/dV kernel bounds its query loop the same way.
"""
import os

import torch
import triton
import triton.language as tl

from . import attention_configs as C  # through the module: tests and sm90_compile.py swap its functions

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _tile(PTR, pos, n_pos, stride, feat, n_feat):
    """[len(pos), len(feat)] tile of rows ``pos`` (< n_pos) and features ``feat`` (< n_feat), zeros outside."""
    return tl.load(PTR + pos[:, None].to(tl.int64) * stride + feat[None, :],
                   mask=(pos[:, None] < n_pos) & (feat[None, :] < n_feat), other=0.0)


@triton.jit
def _tile_t(PTR, pos, n_pos, stride, feat, n_feat):
    """The same tile transposed: [len(feat), len(pos)] (keys and values as the right operand of a dot)."""
    return tl.load(PTR + pos[None, :].to(tl.int64) * stride + feat[:, None],
                   mask=(pos[None, :] < n_pos) & (feat[:, None] < n_feat), other=0.0)


@triton.jit
def _row_stats(LSE, DELTA, pos, n_pos, stride):
    """Saved lse in base 2 (+inf for a row with nothing visible, so its P is 0) and delta of rows ``pos``."""
    lse = tl.load(LSE + pos.to(tl.int64) * stride, mask=pos < n_pos, other=float("-inf"))
    delta = tl.load(DELTA + pos.to(tl.int64) * stride, mask=pos < n_pos, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), delta


@triton.jit
def _scores(a, b, m2, n2, q_len, k_len, shift, win_left, win_right, qk_scale,
            MASK, stride_mm, stride_mn, KPM,
            HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr,
            CAUSAL: tl.constexpr, WINDOW: tl.constexpr, CHECK_BOUNDS: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 scores of a tile: (s * a b + mask) * log2(e), -inf where masked.

    Either orientation: a = q [BLOCK_M, BLOCK_E] and b = k^T [BLOCK_E, BLOCK_N] with the position grids
    m2 = offs_m[:, None], n2 = offs_n[None, :] (a [BLOCK_M, BLOCK_N] tile), or a = k, b = q^T with
    m2 = offs_m[None, :], n2 = offs_n[:, None] (the transposed tile, as the dK/dV kernel wants it).
    MASK points at this (batch, head)'s attention mask, KPM at this batch's key padding row.
    """
    qk = tl.dot(a, b, input_precision=PRECISION) * qk_scale
    if HAS_MASK:
        in_range = (m2 < q_len) & (n2 < k_len)
        mvals = tl.load(MASK + _mask_offsets(m2, n2, stride_mm, stride_mn), mask=in_range, other=0)
        if MASK_BOOL:
            qk = tl.where(mvals != 0, qk, float("-inf"))
        else:
            qk += mvals.to(tl.float32) * 1.4426950408889634
    if HAS_KPM:
        real = tl.load(KPM + n2, mask=n2 < k_len, other=0)
        qk = tl.where(real != 0, qk, float("-inf"))
    if CHECK_BOUNDS:
        keep = n2 < k_len
        if CAUSAL:
            keep = keep & (n2 <= m2 + shift)
        if WINDOW:  # local attention: i + shift - left <= j <= i + shift + right
            keep = keep & (n2 >= m2 + shift - win_left) & (n2 <= m2 + shift + win_right)
        qk = tl.where(keep, qk, float("-inf"))
    return qk


@triton.jit
def _mask_offsets(m2, n2, stride_mm, stride_mn):
    """Element offsets of a tile (position grids m2, n2) of a (b, h) slice of attn_mask, in int64: a slice
    of L = S = 46341 (or an (L, S) view of a wider mask) already passes 2^31 elements."""
    return m2.to(tl.int64) * stride_mm + n2.to(tl.int64) * stride_mn


@triton.jit
def _dropout_counter(bh, m2, n2, max_q, max_k):
    """The element's global Philox counter ((b * H + h) * max_L + i) * max_S + j, in int64: in int32 it
    wraps past 2^32 elements (B = 16, H = 32, L = S = 4096) and later heads repeat earlier masks."""
    return (bh.to(tl.int64) * max_q + m2) * max_k + n2


@triton.jit
def _dropout_keep(seed, bh, m2, n2, max_q, max_k, dropout_p):
    """The keep mask of a tile (position grids m2, n2): Philox uniforms at the element's global counter,
    >= p. The 64-bit counter goes in as two 32-bit words (low, high) of 32-bit Philox."""
    counter = _dropout_counter(bh, m2, n2, max_q, max_k)
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    zero = tl.zeros_like(lo)
    r, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _program_block_and_head(n_blocks):
    """(block, batch * head) of this program. The grid is one axis of n_blocks * B * H programs, block
    fastest: CUDA caps grid axes 1 and 2 at 65535, which B * H passes (2048 x 32), axis 0 at 2^31 - 1."""
    pid = tl.program_id(0)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_e, offs_ev, E, EV,
                lo, hi, q_len, k_len, shift, win_left, win_right, qk_scale,
                MASK, stride_mm, stride_mn, KPM, seed, bh, max_q, max_k, dropout_p,
                HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, CHECK_BOUNDS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax over key blocks [lo, hi): returns the updated (acc, l_i, m_i). With USE_TMA, K and V
    are tensor descriptors (tile loads by the tensor memory accelerator), else pointers."""
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_nb
        if USE_TMA:
            k = tl.trans(K.load([start_n, 0]))
        else:
            k = _tile_t(K, offs_n, k_len, stride_kn, offs_e, E)
        qk = _scores(q, k, offs_m[:, None], offs_n[None, :], q_len, k_len, shift, win_left, win_right, qk_scale,
                     MASK, stride_mm, stride_mn, KPM,
                     HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW, CHECK_BOUNDS, PRECISION)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], max_q, max_k, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        if USE_TMA:
            v = V.load([start_n, 0])
        else:
            v = _tile(V, offs_n, k_len, stride_vn, offs_ev, EV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, Lq, Lk, VARLEN: tl.constexpr):
    """(q_start, q_len, k_start, k_len) of sequence b: packed offsets for varlen, else dense lengths."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        q_len = Lq
        k_start = 0
        k_len = Lk
    return q_start, q_len, k_start, k_len


@triton.jit
def _real_keys(KV_RANGE, b, k_len, HAS_KPM: tl.constexpr):
    """[begin, end) of batch b's real keys under a key padding mask (begin > end when it has none)."""
    if HAS_KPM:
        kv_begin = tl.load(KV_RANGE + 2 * b)
        kv_end = tl.minimum(k_len, tl.load(KV_RANGE + 2 * b + 1))
    else:
        kv_begin = 0
        kv_end = k_len
    return kv_begin, kv_end


@triton.jit
def _key_range(start_m, q_len, k_len, kv_end, shift, CAUSAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(n_full, hi): key blocks [0, n_full) are visible to every query of the tile, [n_full, hi) partly."""
    if CAUSAL:
        hi = tl.minimum(kv_end, tl.maximum(tl.minimum(start_m + BLOCK_M, q_len) + shift, 0))
        n_full = tl.minimum(tl.maximum(start_m + shift + 1, 0), kv_end) // BLOCK_N * BLOCK_N
    else:
        hi = kv_end
        n_full = kv_end // BLOCK_N * BLOCK_N
    return n_full, hi


@triton.jit
def _window_key_range(start_m, q_len, kv_begin, kv_end, shift, win_left, win_right,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks of a query tile under a window (causal folded into win_right by the host):
    (lo, full_lo, full_hi, hi) with [lo, full_lo) and [full_hi, hi) partly visible (the two band edges),
    [full_lo, full_hi) visible to every query of the tile; blocks outside [lo, hi) are never visited.
    Row i sees keys [i + shift - left, i + shift + right], so the tile (rows start_m .. last) sees
    [start_m + shift - left, last + shift + right], and every row of it sees
    [start_m + BLOCK_M - 1 + shift - left, start_m + shift + right]."""
    last = tl.minimum(start_m + BLOCK_M, q_len) - 1
    lo = tl.maximum(tl.maximum(kv_begin, start_m + shift - win_left), 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(kv_end, tl.maximum(last + shift + win_right + 1, 0))
    full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + shift - win_left, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(tl.maximum(start_m + shift + win_right + 1, 0), kv_end) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,  # q, k, v (last dim contiguous), out, lse (float32, natural log)
    MASK, KPM, KV_RANGE, CU_Q, CU_K, SEED,  # optional: attn mask, key padding (uint8), per-batch real-key range, cu_seqlens, seed
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_kpb,  # mask strides (0 where broadcast)
    H, GROUP, Lq, Lk, E, EV,  # heads of q, q heads per kv head, dense lengths, head dims
    sm_scale, dropout_p, win_left, win_right,  # float32 scalars; the band (ints, causal folded in, see window_args)
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "tf32x3" for float32 inputs (float32 accuracy)
    USE_TMA: tl.constexpr = False,  # q, k, v tiles through tensor descriptors (TMA on sm_90), FUSEDLM_TMA=1
):
    m_block, bh = _program_block_and_head(tl.cdiv(Lq, BLOCK_M))
    start_m = m_block * BLOCK_M
    b = bh // H
    h = bh % H
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, Lq, Lk, VARLEN)
    if start_m >= q_len:
        return  # past this sequence's end (varlen batches launch for the longest)
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    b64 = b.to(tl.int64)
    kvh = (h // GROUP).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    Q += b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    K += b64 * stride_kb + kvh * stride_kh + k_start.to(tl.int64) * stride_kn
    V += b64 * stride_vb + kvh * stride_vh + k_start.to(tl.int64) * stride_vn
    MASK += b64 * stride_mb + h.to(tl.int64) * stride_mh
    KPM += b64 * stride_kpb
    if USE_TMA:
        # Descriptors bounded by this sequence: rows past q_len / k_len and features past E read as zeros,
        # as the masked pointer loads do.
        q = tl.make_tensor_descriptor(Q, shape=[q_len, E], strides=[stride_qm, 1],
                                      block_shape=[BLOCK_M, BLOCK_E]).load([start_m, 0])
        K = tl.make_tensor_descriptor(K, shape=[k_len, E], strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_E])
        V = tl.make_tensor_descriptor(V, shape=[k_len, EV], strides=[stride_vn, 1],
                                      block_shape=[BLOCK_N, BLOCK_EV])
    else:
        q = _tile(Q, offs_m, q_len, stride_qm, offs_e, E)
    shift = k_len - q_len if BOTTOM_RIGHT else 0
    kv_begin, kv_end = _real_keys(KV_RANGE, b, k_len, HAS_KPM)
    if WINDOW:  # a band of key blocks: partial ones at both edges, full ones between, none outside
        lo, full_lo, n_full, hi = _window_key_range(start_m, q_len, kv_begin, kv_end, shift, win_left, win_right,
                                                    BLOCK_M, BLOCK_N)
    else:
        n_full, hi = _key_range(start_m, q_len, k_len, kv_end, shift, CAUSAL, BLOCK_M, BLOCK_N)
        lo = kv_begin // BLOCK_N * BLOCK_N  # blocks before the first real key are padding only
        full_lo = lo
    seed = tl.load(SEED) if DROPOUT else 0
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
    if WINDOW:  # the blocks on the band's left edge
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_e, offs_ev, E, EV,
                                    lo, full_lo, q_len, k_len, shift, win_left, win_right, qk_scale, MASK,
                                    stride_mm, stride_mn, KPM, seed, bh, Lq, Lk, dropout_p,
                                    HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW, True, DROPOUT, BLOCK_N, PRECISION,
                                    USE_TMA)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_e, offs_ev, E, EV,
                                full_lo, n_full, q_len, k_len, shift, win_left, win_right, qk_scale, MASK, stride_mm,
                                stride_mn, KPM,
                                seed, bh, Lq, Lk, dropout_p,
                                HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW, False, DROPOUT, BLOCK_N, PRECISION,
                                USE_TMA)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_e, offs_ev, E, EV,
                                tl.maximum(n_full, full_lo), hi, q_len, k_len, shift, win_left, win_right, qk_scale,
                                MASK, stride_mm, stride_mn, KPM,
                                seed, bh, Lq, Lk, dropout_p,
                                HAS_MASK, MASK_BOOL, HAS_KPM, CAUSAL, WINDOW, True, DROPOUT, BLOCK_N, PRECISION,
                                USE_TMA)
    empty = l_i == 0.0  # no visible key: zeros out, lse = -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row_ok = offs_m < q_len
    O += b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    tl.store(O + offs_m[:, None].to(tl.int64) * stride_om + offs_ev[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_ev[None, :] < EV))
    LSE += b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_lm
    tl.store(LSE + offs_m.to(tl.int64) * stride_lm, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------
# Host launchers. Dense tensors are (B, H, L, E); packed (varlen) ones (total, H, E) with int32
# cu_seqlens. Every kernel sees the strides of a logical (batch, head, position, feature) view: packed
# tensors have batch stride 0 and start at cu_seqlens[b]. The last dim must have unit stride.


def _grid(length, block, heads):
    """One grid axis of cdiv(length, block) blocks per (batch, head): see _program_block_and_head."""
    return (triton.cdiv(length, block) * heads,)


def _bhm_strides(t, varlen):
    """(batch, head, position) strides of a dense (B, H, L, X) or packed (total, H, X) tensor."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _row_strides(t, varlen):
    """(batch, head, position) strides of a per-row tensor: dense (B, H, L) or packed (total, H)."""
    return (0, t.stride(1), t.stride(0)) if varlen else t.stride()


def precision(q):
    """float32 inputs multiply as 3xTF32 (each operand split into two TF32 parts, three tensor-core products:
    float32's accuracy, ~1e-6 relative, where plain TF32 costs ~1e-3; IEEE FMA dots spill heavily on
    sm_90); half types as they are."""
    return "tf32x3" if q.dtype == torch.float32 else "tf32"


def _mask_args(attn_mask, key_padding_mask, kv_range, B, H, Lq, Lk, dummy):
    """Pointers and strides for the optional masks, with flags. Bool masks are read as uint8 views."""
    if attn_mask is not None:
        m = attn_mask.expand(B, H, Lq, Lk)  # broadcast dims get stride 0: nothing materialised
        is_bool = m.dtype == torch.bool
        if is_bool:
            m = m.view(torch.uint8)
        mask_ptr, mask_strides = m, m.stride()
    else:
        is_bool, mask_ptr, mask_strides = False, dummy, (0, 0, 0, 0)
    if key_padding_mask is not None:
        # The kernels read row b's flags at KPM + b * stride + j: a transposed or sliced mask is copied
        # (B * S bytes) to unit stride along the keys rather than read wrongly.
        kpm = key_padding_mask.contiguous().view(torch.uint8)
        kpm_ptr, kpm_stride, kv_range_ptr = kpm, kpm.stride(0), kv_range
    else:
        kpm_ptr, kpm_stride, kv_range_ptr = dummy, 0, dummy
    return (mask_ptr, kpm_ptr, kv_range_ptr), (*mask_strides, kpm_stride), dict(
        HAS_MASK=attn_mask is not None, MASK_BOOL=is_bool, HAS_KPM=key_padding_mask is not None)


def key_padding_bounds(key_padding_mask):
    """Per batch, int32 (B,) each: the first real key and one past the last (S and 0 when there is none)."""
    B, S = key_padding_mask.shape
    if S == 0:
        zeros = torch.zeros(B, device=key_padding_mask.device, dtype=torch.int32)
        return zeros, zeros.clone()
    pos = torch.arange(S, device=key_padding_mask.device, dtype=torch.int32)
    m = key_padding_mask.to(torch.int32)
    begin = (m * pos + (1 - m) * S).amin(dim=1).to(torch.int32)
    end = (m * (pos + 1)).amax(dim=1).to(torch.int32)
    return begin, end


def key_padding_range(key_padding_mask):
    """(B, 2) int32 [first real key, one past the last]: the kernels' key loops run only over the blocks
    in between, so leading and trailing padding cost nothing."""
    return torch.stack(key_padding_bounds(key_padding_mask), dim=1).contiguous()


def _geometry(q, k, v, cu_seqlens_q, max_q, max_k):
    varlen = cu_seqlens_q is not None
    if varlen:
        B = cu_seqlens_q.shape[0] - 1
        H, E, Hkv, Ev = q.shape[1], q.shape[2], k.shape[1], v.shape[2]
        Lq, Lk = max_q, max_k
    else:
        B, H, Lq, E = q.shape
        Hkv, Lk, Ev = k.shape[1], k.shape[2], v.shape[3]
    return varlen, B, H, Hkv, Lq, Lk, E, Ev


def window_args(window, causal, Lq, Lk):
    """(win_left, win_right, WINDOW) for the kernels from window = (left, right) (-1: unbounded) or None.
    causal is folded in (right <= 0); an unbounded side becomes Lq + Lk, which no |i + shift - j| reaches
    (-Lq <= i + shift < Lq + Lk and 0 <= j < Lk), so the kernels test both sides without special cases."""
    if window is None or tuple(window) == (-1, -1):
        return 0, 0, False
    left, right = window
    unbounded = Lq + Lk
    left = unbounded if left < 0 else left
    right = unbounded if right < 0 else right
    if causal:
        right = min(right, 0)
    return int(left), int(right), True


def tma_enabled(device, *tensors):
    """Forward tile loads through tensor descriptors (TMA on sm_90): opt-in with FUSEDLM_TMA=1 until a GPU
    has timed it. Descriptors need 16-byte aligned bases and row strides (unit stride along features); the
    allocations themselves are aligned (CUDA 256 B, CPU 64 B), so the storage offset and strides decide."""
    if os.environ.get("FUSEDLM_TMA", "0") != "1":
        return False
    for t in tensors:
        if any(st * t.element_size() % 16 for st in (t.storage_offset(), *t.stride()[:-1])) or t.stride(-1) != 1:
            return False
    if device.type == "cuda":  # in-kernel descriptors live in a global scratch buffer Triton asks for
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    return True


# The forward through the autotuner (FUSEDLM_AUTOTUNE=1): see attention_configs.py.
_attn_fwd_tuned = C._tuned(_attn_fwd, C._FWD_CANDIDATES, backward=False)


def attention_fwd(launch, q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_q, max_k,
                  scale, causal, bottom_right, dropout_p, seed, window=None):
    """-> (out, lse). out like q with v's head dim; lse float32 (B, H, L) or (total, H).
    window: (left, right) local attention, -1 = unbounded on that side, or None."""
    varlen, B, H, Hkv, Lq, Lk, E, Ev = _geometry(q, k, v, cu_seqlens_q, max_q, max_k)
    if varlen:
        out = q.new_empty(q.shape[0], H, Ev)
        lse = torch.empty(q.shape[0], H, device=q.device, dtype=torch.float32)
        lse_strides = _row_strides(lse, varlen)
    else:
        # The layout of q ((B, L, H, E) memory, as Hugging Face models produce it, or (B, H, L, E)).
        if q.transpose(1, 2).is_contiguous():
            out = q.new_empty(B, Lq, H, Ev).transpose(1, 2)
        else:
            out = q.new_empty(B, H, Lq, Ev)
        lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
        lse_strides = lse.stride()
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if Lk == 0 or B == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    dummy = lse
    kv_range = key_padding_range(key_padding_mask) if key_padding_mask is not None else None
    mask_ptrs, mask_strides, mask_flags = _mask_args(attn_mask, key_padding_mask, kv_range, B, H, Lq, Lk, dummy)
    cfg = C.block_config(E, Ev, causal, q.dtype, q.device)
    if dropout_p > 0:  # the Philox keep mask's registers: a smaller tile (see dropout_config)
        cfg = C.dropout_config(cfg, "fwd", q.dtype)
    win_left, win_right, has_window = window_args(window, causal, Lq, Lk)
    args = (q, k, v, out, lse, *mask_ptrs,
            cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy, seed if seed is not None else dummy,
            *_bhm_strides(q, varlen), *_bhm_strides(k, varlen), *_bhm_strides(v, varlen), *_bhm_strides(out, varlen),
            *lse_strides, *mask_strides,
            H, H // Hkv, Lq, Lk, E, Ev, float(scale), float(dropout_p), win_left, win_right)
    flags = dict(CAUSAL=causal, WINDOW=has_window, BOTTOM_RIGHT=bottom_right, VARLEN=varlen, DROPOUT=dropout_p > 0,
                 **mask_flags, PRECISION=precision(q), USE_TMA=tma_enabled(q.device, q, k, v))
    C._launch_blocks(launch, _attn_fwd, _attn_fwd_tuned, lambda bm, bn: _grid(Lq, bm, B * H), args, cfg,
                     flags, q.device)
    return out, lse
