"""Fused LoRA linear: one GEMM for the base projection with the low-rank update added in its epilogue.

PEFT's shapes: x (M, K) tokens by in-features, weight W (N, K), bias b (N,), lora_a A (r, K),
lora_b B (N, r), scaling s. Dropout on the LoRA branch is a keep mask m (M, K) (1 = kept) with the
1 / (1 - p) factor folded into s by the op layer, so below x_m = x * m and s already includes it.

Forward:
    xa = x_m A^T                              (M, r): a skinny product, done once by the op layer
    y  = x W^T + s * xa B^T + b               ONE kernel: the K-loop computes x W^T in float32, the
                                              epilogue of each (BLOCK_M, BLOCK_N) output tile adds
                                              s * tl.dot(xa tile (BLOCK_M, r), B^T tile (r, BLOCK_N))
                                              and b, then rounds once to the output dtype.
Backward, with dy (M, N):
    dyb = dy B                                (M, r), by the op layer
    dx  = dy W + s * (dyb A) * m              the SAME kernel: base operand W read as (N, K), low-rank
                                              pair (dyb, A), the keep mask applied in the epilogue to
                                              the low-rank term only (the base branch saw x, not x_m)
    dA  = s * dyb^T x_m,   dB = s * dy^T xa,  dW = dy^T x,   db = sum_rows dy     (op layer, when needed)

The kernel is a plain tiled GEMM (grouped tile order for L2 reuse, float32 accumulator, masks on
every edge so any M, N, K work) with a generic "low-rank pair" epilogue: C = X Wop + s * P Q (* keep)
+ bias, where every operand carries its own two strides (so W, W^T, B^T are read in place, no copy).
The rank is walked in chunks of BLOCK_R <= 64 (r padded to a power of two >= 16 with masks), so
ranks 1 to 256 and beyond work with bounded registers.

float32 inputs: tl.dot would use TF32 on NVIDIA by default; the op layer asks for IEEE float32 unless
torch.backends.cuda.matmul.allow_tf32 is set, matching what torch.matmul does with the same flag.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _lora_gemm_kernel(
    X, W, P, Q, BIAS, KEEP, Y,  # X (M, K); base operand read as (K, N); P (M, R); Q read as (R, N);
                                # bias (N,); keep mask (M, N) uint8; output Y (M, N). Unused ones: any pointer
    M, N, K, R,  # problem sizes: output rows, output columns, reduction length, rank
    stride_xm, stride_xk,  # X element (m, k) at X + m * stride_xm + k * stride_xk
    stride_wk, stride_wn,  # base operand element (k, n)
    stride_pm, stride_pr,  # P element (m, r)
    stride_qr, stride_qn,  # Q element (r, n)
    stride_km, stride_kn,  # KEEP element (m, n)
    stride_ym, stride_yn,  # Y element (m, n)
    stride_bias,  # bias element n at BIAS + n * stride_bias
    scaling,  # float32 scalar s multiplying P Q
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr,
    IEEE: tl.constexpr,  # float32 operands: IEEE products instead of TF32
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K in the main loop
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rank chunk, a power of two >= 16
    GROUP_M: tl.constexpr,  # tiles along M that share one band of columns (L2 reuse of the base operand)
):
    # Grouped ordering of the output tiles: GROUP_M row-tiles sweep a column band together.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_width = GROUP_M * num_pid_n
    first_m = (pid // group_width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_rows
    pid_n = (pid % group_width) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)  # row offsets in int64: M * K may pass 2^31 elements
    rn64 = rn.to(tl.int64)
    scaling = tl.cast(scaling, tl.float32)

    # Main loop: acc = X[rm, :] @ Wop[:, rn] in float32.
    x_ptrs = X + rm64[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = W + rk[:, None] * stride_wk + rn64[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
            b = tl.load(w_ptrs, mask=(rk[:, None] < k_left) & mask_n[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: the low-rank term s * P[rm, :] @ Q[:, rn], rank walked in BLOCK_R chunks.
    rr = tl.arange(0, BLOCK_R)
    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        mask_r = (r0 + rr) < R
        p = tl.load(P + rm64[:, None] * stride_pm + (r0 + rr)[None, :] * stride_pr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        q = tl.load(Q + (r0 + rr)[:, None] * stride_qr + rn64[None, :] * stride_qn,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            low = tl.dot(p, q, low, input_precision="ieee")
        else:
            low = tl.dot(p, q, low)
    low = low * scaling
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_KEEP:  # dropout's backward on the low-rank term: zero where the forward dropped x
        keep = tl.load(KEEP + rm64[:, None] * stride_km + rn64[None, :] * stride_kn, mask=mask_mn, other=0)
        low = tl.where(keep != 0, low, 0.0)
    acc += low
    if HAS_BIAS:
        acc += tl.load(BIAS + rn64 * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn, acc.to(Y.dtype.element_ty), mask=mask_mn)


# ---------------------------------------------------------------------------------------------------
# Host launchers. ``launch`` is fusedlm._triton.launch (wrap_triton on a GPU). Every operand keeps its
# strides; outputs are new contiguous tensors.


def _config(M, N, K, R, dtype, device, masked_low_rank=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M, num_warps, num_stages) for one problem.

    Half types on sm_90: BLOCK_M is at least 64, the M that Hopper's wgmma takes per warpgroup (a 16-row
    tile would run on Ampere's mma.sync; the padding rows cost tensor-core time only, which a skinny,
    weight-bound GEMM has to spare). With a dropout keep mask the epilogue holds a second [BLOCK_M,
    BLOCK_N] float32 tile (the low-rank term) beside the accumulator: BLOCK_N 64 there keeps both in
    registers (128 x 128 spilled 176 B)."""
    block_r = min(64, max(16, triton.next_power_of_2(R)))
    if device.type != "cuda":  # the interpreter: one small config (fewer, larger tiles run faster there)
        return 32, 32, 32, block_r, 4, 4, 1
    block_n = 128 if N > 64 else max(16, triton.next_power_of_2(N))
    if dtype == torch.float32:
        block_m = 128 if M > 64 else max(16, triton.next_power_of_2(M))
        return block_m, block_n, 32, block_r, 8, 8, 3
    block_m = 128 if M > 64 else 64
    if masked_low_rank:
        block_n = min(block_n, 64)
    return block_m, block_n, 64, block_r, 8, 8 if block_m == 128 else 4, 3


def _ieee(dtype):
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def lora_gemm(launch, x, w_kn, p, q_rn, bias, keep, scaling):
    """C = x @ w_kn + scaling * (p @ q_rn) [* keep] + bias, accumulated in float32, in x's dtype.

    x (M, K); w_kn (K, N) and q_rn (R, N) may be transposed views (strides are passed, no copy);
    p (M, R); bias (N,) or None; keep (M, N) bool/uint8 or None (zeroes the low-rank term where 0).
    """
    M, K = x.shape
    N = w_kn.shape[1]
    R = p.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    bm, bn, bk, br, group, warps, stages = _config(M, N, K, R, x.dtype, x.device, keep is not None)
    if keep is not None and keep.dtype == torch.bool:
        keep = keep.view(torch.uint8)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    launch(
        _lora_gemm_kernel, grid,
        x, w_kn, p, q_rn, bias if bias is not None else x, keep if keep is not None else x, y,
        M, N, K, R,
        x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1), p.stride(0), p.stride(1),
        q_rn.stride(0), q_rn.stride(1), keep.stride(0) if keep is not None else 0,
        keep.stride(1) if keep is not None else 0, y.stride(0), y.stride(1),
        bias.stride(0) if bias is not None else 0, float(scaling),
        HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, IEEE=_ieee(x.dtype), EVEN_K=K % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, GROUP_M=group, num_warps=warps, num_stages=stages,
    )
    return y


def lora_fwd(launch, x, weight, bias, xa, lora_b, scaling):
    """y = x W^T + scaling * xa B^T + bias: x (M, K), weight (N, K), xa (M, r), lora_b (N, r) -> (M, N)."""
    return lora_gemm(launch, x, weight.t(), xa, lora_b.t(), bias, None, scaling)


def lora_dx(launch, dy, weight, dyb, lora_a, keep, scaling):
    """dx = dy W + scaling * (dyb A) [* keep]: dy (M, N), weight (N, K), dyb (M, r), lora_a (r, K) -> (M, K)."""
    return lora_gemm(launch, dy, weight, dyb, lora_a, None, keep, scaling)
