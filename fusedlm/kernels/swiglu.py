"""SwiGLU: y = silu(gate) * up, forward and backward, elementwise over (M, N) rows.

With sig = sigmoid(g) and silu(g) = g * sig, all in float32:

    y      = g * sig * u
    d gate = dy * u * sig * (1 + g * (1 - sig))      (d silu / dg = sig + g * sig * (1 - sig))
    d up   = dy * silu(g)

The backward recomputes sig from gate instead of saving silu(gate). Rows carry their own stride so
that gate and up can be the two halves of one fused gate_up projection (``chunk(2, -1)``) without a copy.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_kernel(
    G, U, DY,  # gate, up, and dy rows (DY unused in the forward)
    OUT0, OUT1,  # forward: y in OUT0; backward: d gate in OUT0, d up in OUT1
    stride_g, stride_u, stride_dy, stride_o0, stride_o1,  # row strides in elements
    N,  # elements per row
    BACKWARD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One grid axis of M * cdiv(N, BLOCK_N) programs, column block fastest: a second axis would be capped
    # at 65535 blocks by CUDA (a 1-D input of 128M elements is one row of 131072 blocks).
    pid = tl.program_id(0).to(tl.int64)
    n_blocks = tl.cdiv(N, BLOCK_N)
    row = pid // n_blocks
    cols = (pid % n_blocks).to(tl.int32) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    if BACKWARD:
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        dg = dy * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(OUT0 + row * stride_o0 + cols, dg.to(OUT0.dtype.element_ty), mask=mask)
        tl.store(OUT1 + row * stride_o1 + cols, (dy * silu).to(OUT1.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT0 + row * stride_o0 + cols, (silu * u).to(OUT0.dtype.element_ty), mask=mask)


def _grid(M, N):
    block = min(BLOCK, triton.next_power_of_2(max(N, 1)))
    return (M * triton.cdiv(N, block),), block, min(max(block // 256, 1), 8)


def swiglu_fwd(launch, gate, up):
    """gate, up: (M, N) with unit stride along N -> y (M, N), a new tensor."""
    M, N = gate.shape
    y = torch.empty((M, N), device=gate.device, dtype=gate.dtype)
    if y.numel() == 0:
        return y
    grid, block, warps = _grid(M, N)
    launch(_swiglu_kernel, grid, gate, up, gate, y, y,
           gate.stride(0), up.stride(0), 0, y.stride(0), 0, N,
           BACKWARD=False, BLOCK_N=block, num_warps=warps)
    return y


def swiglu_bwd(launch, dy, gate, up):
    """-> (d gate, d up), new (M, N) tensors in the dtypes of gate and up."""
    M, N = gate.shape
    dgate = torch.empty((M, N), device=gate.device, dtype=gate.dtype)
    dup = torch.empty((M, N), device=up.device, dtype=up.dtype)
    if dgate.numel() == 0:
        return dgate, dup
    grid, block, warps = _grid(M, N)
    launch(_swiglu_kernel, grid, gate, up, dy, dgate, dup,
           gate.stride(0), up.stride(0), dy.stride(0), dgate.stride(0), dup.stride(0), N,
           BACKWARD=True, BLOCK_N=block, num_warps=warps)
    return dgate, dup
