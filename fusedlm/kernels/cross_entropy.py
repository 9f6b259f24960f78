"""The language-model loss without its logits: fused linear + cross-entropy, forward and the backward's tiles.

For a token with hidden state h (D features), target t, the LM head W (V x D) and bias b:

    z_j  = h . w_j + b_j                 (float32 accumulate), then with softcap c: z_j <- c tanh(z_j / c)
    lse  = log sum_j exp(z_j)
    loss = (1 - e) (lse - z_t) + e (lse - mean_j z_j) + z_loss lse^2        (label smoothing e)

and with p_j = exp(z_j - lse) and g the gradient reaching the token's loss,

    dz_j = g (p_j (1 + 2 z_loss lse) - (1 - e) [j = t] - e / V)  (times 1 - (z_j / c)^2 under a softcap)
    dh   = sum_j dz_j w_j,    dW_j += dz_j h,    db_j += dz_j.

Forward (_lce_fwd, one program per BLOCK_M tokens): vocabulary tiles of BLOCK_V stream through the product
(the D reduction in BLOCK_K steps), and only running values are kept per token: the max and the sum of
exponentials (online softmax), the target's logit and, with smoothing, the sum of the logits. Nothing of
size tokens x V is written.

Ignored tokens cost nothing: the op layer orders the tokens that count first (PERM, a stable sort of the
ignore flags, made on the device) and NVALID holds their number on the device; programs past it return at
once, in the forward and in the backward's tiles.

Backward tile (_lce_dz): the logits of a tile of tokens x vocabulary are computed again, turned into dz in
registers and written as a bounded slice (the op layer's chunk: a few MiB); the chunk's products dh += dz W
and dW += dz^T h run as matmuls in a fixed order, summed in float32 (deterministic, no atomics). See
fusedlm/ops/cross_entropy.py.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from exp2, safe at both ends (exp2 overflows to inf: 1 - 0; underflows to 0: 1 - 2)."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2.885... = 2 log2(e)


@triton.jit
def _logits(H, W, BIAS, rows, ok, offs_v, stride_h, stride_w, V, D, softcap,
            HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_V] float32 logits of tokens ``rows`` (where ``ok``) and vocabulary entries offs_v
    (softcapped when SOFTCAP); columns past V hold 0."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    w_ok = offs_v < V
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        h = tl.load(H + rows[:, None] * stride_h + k[None, :], mask=ok[:, None] & (k[None, :] < D), other=0.0)
        w = tl.load(W + offs_v[:, None].to(tl.int64) * stride_w + k[None, :], mask=w_ok[:, None] & (k[None, :] < D),
                    other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=w_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _lce_fwd(
    H, W, BIAS, T, PERM, NVALID, LOSS, LSE,  # LOSS / LSE: float32 (N,), zeros where ignored
    stride_h, stride_w, V, D, smoothing, z_loss, softcap,
    HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Loss and lse of the tokens PERM[pid BLOCK_M + i] (those that count come first: see the docstring)."""
    start = tl.program_id(0) * BLOCK_M
    n_valid = tl.load(NVALID)
    if start >= n_valid:
        return
    r = start + tl.arange(0, BLOCK_M)
    ok = r < n_valid
    rows = tl.load(PERM + r, mask=ok, other=0)
    tgt = tl.load(T + rows, mask=ok, other=0)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    z_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs
        z = _logits(H, W, BIAS, rows, ok, v, stride_h, stride_w, V, D, softcap, HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_V,
                    BLOCK_K, PRECISION)
        zm = tl.where((v < V)[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), 1)
        m = m_new
        z_t += tl.sum(tl.where(v[None, :] == tgt[:, None], z, 0.0), 1)
        if SMOOTH:
            z_sum += tl.sum(z, 1)  # (columns past V hold 0)
    lse = m + tl.log(s)
    loss = (1.0 - smoothing) * (lse - z_t)
    if SMOOTH:
        loss += smoothing * (lse - z_sum / V)
    if ZLOSS:
        loss += z_loss * lse * lse
    tl.store(LOSS + rows, loss, mask=ok)
    tl.store(LSE + rows, lse, mask=ok)


@triton.jit
def _lce_dz(
    H, W, BIAS, T, PERM, NVALID, LSE, G, DZ,  # G: float32, the gradient reaching each token's loss (stride_g 0: one)
    stride_h, stride_w, stride_g, stride_dz, r0, v0, NC, VC, V, D, smoothing, z_loss, softcap,
    HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """DZ[i, j] (NC x VC, the chunk of tokens PERM[r0 + i] and vocabulary entries v0 + j): dz of the docstring,
    0 for the chunk's rows past the tokens that count."""
    offs_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    store_ok = (offs_i[:, None] < NC) & (offs_j[None, :] < VC)
    dz_ptr = DZ + offs_i[:, None].to(tl.int64) * stride_dz + offs_j[None, :]
    n_valid = tl.load(NVALID)
    if r0 + tl.program_id(0) * BLOCK_M >= n_valid:
        tl.store(dz_ptr, tl.zeros([BLOCK_M, BLOCK_V], dtype=DZ.dtype.element_ty), mask=store_ok)
        return
    ok = (r0 + offs_i < n_valid) & (offs_i < NC)
    rows = tl.load(PERM + r0 + offs_i, mask=ok, other=0)
    tgt = tl.load(T + rows, mask=ok, other=0)
    lse = tl.load(LSE + rows, mask=ok, other=0.0)
    g = tl.load(G + rows * stride_g, mask=ok, other=0.0)
    v = v0 + offs_j
    z = _logits(H, W, BIAS, rows, ok, v, stride_h, stride_w, V, D, softcap, HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_V,
                BLOCK_K, PRECISION)
    p = tl.exp(z - lse[:, None])
    if ZLOSS:
        p = p * (1.0 + 2.0 * z_loss * lse)[:, None]
    dz = p - tl.where(v[None, :] == tgt[:, None], 1.0 - smoothing, 0.0)
    if SMOOTH:
        dz -= smoothing / V
    if SOFTCAP:
        zc = z / softcap
        dz = dz * (1.0 - zc * zc)
    dz = tl.where(ok[:, None] & (v < V)[None, :], dz * g[:, None], 0.0)
    tl.store(dz_ptr, dz.to(DZ.dtype.element_ty), mask=store_ok)


def block_config(d, dtype, device):
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages): GPU tiles of 64 tokens (wgmma's M per warpgroup) x
    128 vocabulary entries, the D reduction in 64-wide steps (float32: 64 x 64 tiles, 32-wide steps, two
    stages: 3xTF32's products spilled at 128); small ones on the interpreter."""
    if device.type != "cuda":
        return 16, 32, 32, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2
    return 64, 128, 64, 4, 3


def lce_fwd(launch, hidden, weight, bias, target, perm, n_valid, softcap, smoothing, z_loss, precision):
    """-> (loss float32 (N,), lse float32 (N,)), zeros at ignored tokens. hidden (N, D), weight (V, D)."""
    N, D = hidden.shape
    V = weight.shape[0]
    loss = torch.zeros(N, device=hidden.device, dtype=torch.float32)
    lse = torch.zeros(N, device=hidden.device, dtype=torch.float32)
    if N == 0:
        return loss, lse
    bm, bv, bk, warps, stages = block_config(D, hidden.dtype, hidden.device)
    launch(_lce_fwd, (triton.cdiv(N, bm),), hidden, weight, bias if bias is not None else weight, target, perm,
           n_valid, loss, lse, hidden.stride(0), weight.stride(0), V, D, float(smoothing), float(z_loss),
           float(softcap or 1.0), HAS_BIAS=bias is not None, SMOOTH=smoothing > 0, ZLOSS=z_loss > 0,
           SOFTCAP=softcap is not None, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, PRECISION=precision, num_warps=warps,
           num_stages=stages)
    return loss, lse


def lce_dz(launch, dz, hidden, weight, bias, target, perm, n_valid, lse, g, r0, v0, softcap, smoothing, z_loss,
           precision):
    """Fills dz (NC, VC) for the tokens perm[r0:r0 + NC] and the vocabulary entries [v0, v0 + VC)."""
    NC, VC = dz.shape
    D = hidden.shape[1]
    bm, bv, bk, warps, stages = block_config(D, hidden.dtype, hidden.device)
    launch(_lce_dz, (triton.cdiv(NC, bm), triton.cdiv(VC, bv)), hidden, weight, bias if bias is not None else weight,
           target, perm, n_valid, lse, g, dz, hidden.stride(0), weight.stride(0), g.stride(0) if g.dim() else 0,
           dz.stride(0), r0, v0, NC, VC, weight.shape[0], D, float(smoothing), float(z_loss), float(softcap or 1.0),
           HAS_BIAS=bias is not None, SMOOTH=smoothing > 0, ZLOSS=z_loss > 0, SOFTCAP=softcap is not None,
           BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, PRECISION=precision, num_warps=warps, num_stages=stages)
