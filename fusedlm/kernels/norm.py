"""RMSNorm and LayerNorm over the last dimension, forward and backward, with the fused residual add.

One kernel pair serves both norms (IS_RMS switches the centring off). Per row of N features, in float32:

    s     = x + residual           rounded to x's dtype: the sum the op returns, and what is normalised
    LN:   mu = mean(s),  rstd = 1 / sqrt(mean((s - mu)^2) + eps),  xhat = (s - mu) * rstd
    RMS:  mu = 0,        rstd = 1 / sqrt(mean(s^2) + eps),         xhat = s * rstd
    y     = xhat * w + b           (RMS: w = offset + weight; offset = 1 gives Gemma's (1 + weight))

Backward, with g = dy * w (g = dy without a weight); the mean over the row is written <.>:

    RMS:  ds = rstd * (g - xhat * <g xhat>)
    LN:   ds = rstd * (g - <g> - xhat * <g xhat>)
    ds   += d(s)                    the gradient reaching the returned sum, when there is one
    dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy

ds is the gradient of both x and residual. Only rstd (and mu for LN) is saved by the forward, one
float per row; xhat is recomputed from s in the backward rather than stored.

Rows are held in registers whole (one read of the row) up to MAX_ONE_PASS features in the forward
(16384: 16 warps, 32 floats a thread) and MAX_ONE_PASS_BWD in the backward (whose row needs s, dy, the
weight and the dweight/dbias accumulators at once). Not 65536 as some peers: a float32 row of 65536 is
256 KB, the whole register file of an SM (sm_90 compiles of a one-pass 65536 row spill 140-916 B a thread). Wider rows take the looped variant: the
forward reads the row once per statistic (RMS 2, LN 3 passes), the backward computes the two row means
in a first pass and ds in a second.
"""
import torch
import triton
import triton.language as tl

MAX_ONE_PASS = 16384  # widest row the forward keeps in registers whole; wider rows loop over LOOP_BLOCK chunks
MAX_ONE_PASS_BWD = 8192  # the same for the backward
LOOP_BLOCK = 4096


@triton.jit
def _load_s(X, RES, S, cols, mask, HAS_RES: tl.constexpr):
    """s = x (+ residual) for the columns ``cols`` of one row, in float32; stores s when fused."""
    s = tl.load(X + cols, mask=mask, other=0.0)
    if HAS_RES:
        s = s + tl.load(RES + cols, mask=mask, other=0.0)  # added in x's dtype, as the reference does
        tl.store(S + cols, s, mask=mask)
    return s.to(tl.float32)


@triton.jit
def _norm_fwd_kernel(
    X, RES, W, B,  # inputs: x and residual rows, weight and bias (N,); unused pointers when absent
    Y, S, MEAN, RSTD,  # outputs: y rows, s = x + residual rows, per-row mean (LN) and rstd, float32
    stride_x, stride_res, stride_y, stride_s,  # row strides in elements; features are contiguous
    N,  # features per row
    eps, offset,  # float32 scalars
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns handled at once (the whole row when ONE_PASS)
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one program per row
    eps = tl.cast(eps, tl.float32)
    offset = tl.cast(offset, tl.float32)
    X += row * stride_x
    Y += row * stride_y
    RES += row * stride_res
    S += row * stride_s
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = cols < N
        s = _load_s(X, RES, S, cols, mask, HAS_RES)
        if IS_RMS:
            mean = 0.0
            var = tl.sum(s * s, axis=0) / N
        else:
            mean = tl.sum(s, axis=0) / N
            d = tl.where(mask, s - mean, 0.0)
            var = tl.sum(d * d, axis=0) / N
        rstd = tl.rsqrt(var + eps)
        y = (s - mean) * rstd
        if HAS_W:
            y = y * (tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: sum (LN) or sum of squares (RMS); s is formed and stored here when fused.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            s = _load_s(X, RES, S, c, c < N, HAS_RES)
            if IS_RMS:
                acc += s * s
            else:
                acc += s
        if HAS_RES:
            SRC = S
            tl.debug_barrier()  # later passes read back s written by other threads of this program
        else:
            SRC = X
        if IS_RMS:
            mean = 0.0
            var = tl.sum(acc, axis=0) / N
        else:
            mean = tl.sum(acc, axis=0) / N
            # Pass 2 (LN): variance about the mean, two-pass for accuracy.
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                s = tl.load(SRC + c, mask=c < N, other=0.0).to(tl.float32)
                d = tl.where(c < N, s - mean, 0.0)
                acc += d * d
            var = tl.sum(acc, axis=0) / N
        rstd = tl.rsqrt(var + eps)
        # Last pass: normalise, scale, shift.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            y = (tl.load(SRC + c, mask=m, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                y = y * (tl.load(W + c, mask=m, other=0.0).to(tl.float32) + offset)
            if HAS_B:
                y = y + tl.load(B + c, mask=m, other=0.0).to(tl.float32)
            tl.store(Y + c, y.to(Y.dtype.element_ty), mask=m)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_weight(W, c, N, offset, HAS_W: tl.constexpr):
    """w + offset for columns ``c`` in float32 (0 past N); a scalar 0 without a weight. Row-invariant: the
    callers load it once per program (one pass) or once per column chunk, never once per row."""
    w = 0.0
    if HAS_W:
        w = tl.load(W + c, mask=c < N, other=0.0).to(tl.float32) + offset
    return w


@triton.jit
def _norm_bwd_row_terms(S, DY, w, mean, rstd, c, N, IS_RMS: tl.constexpr, HAS_W: tl.constexpr):
    """For columns ``c`` of one row: xhat and g = dy * w (both zero past N), and dy, in float32."""
    m = c < N
    s = tl.load(S + c, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + c, mask=m, other=0.0).to(tl.float32)
    xhat = tl.where(m, (s - mean) * rstd, 0.0)
    if HAS_W:
        g = dy * w
    else:
        g = dy
    return xhat, g, dy


@triton.jit
def _norm_bwd_store_ds(DS, DSUM, c, N, xhat, g, mean_gx, mean_g, rstd, IS_RMS: tl.constexpr, HAS_DSUM: tl.constexpr):
    """ds = rstd * (g - xhat * <g xhat> (- <g> for LN)) (+ d(sum)) for columns ``c`` of one row, stored."""
    ds = g - xhat * mean_gx
    if not IS_RMS:
        ds = ds - mean_g
    ds = ds * rstd
    if HAS_DSUM:
        ds += tl.load(DSUM + c, mask=c < N, other=0.0).to(tl.float32)
    tl.store(DS + c, ds.to(DS.dtype.element_ty), mask=c < N)


@triton.jit
def _norm_bwd_kernel(
    DY, S, W, DSUM, MEAN, RSTD,  # inputs: dy rows, normalised input s rows, weight, d(s) rows, saved stats
    DS, DW, DB,  # outputs: ds rows; per-program partial dweight / dbias rows (G, N) float32, summed on the host
    C1, C2,  # float32 (M,) scratch for the looped variant: the row means <g xhat> and <g>
    stride_dy, stride_s, stride_dsum, stride_ds,  # row strides in elements
    M, N, rows_per_program,
    offset,  # float32 scalar
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DSUM: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr,
):
    # Each program owns a contiguous band of rows and its own row of the dweight/dbias partials:
    # no atomics, so the result is deterministic.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    offset = tl.cast(offset, tl.float32)
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = cols < N
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        w = _norm_weight(W, cols, N, offset, HAS_W)
        for row in range(row_start, row_end):
            r = tl.cast(row, tl.int64)
            rstd = tl.load(RSTD + r)
            mean = 0.0 if IS_RMS else tl.load(MEAN + r)
            xhat, g, dy = _norm_bwd_row_terms(S + r * stride_s, DY + r * stride_dy, w, mean, rstd,
                                              cols, N, IS_RMS, HAS_W)
            _norm_bwd_store_ds(DS + r * stride_ds, DSUM + r * stride_dsum, cols, N, xhat, g,
                               tl.sum(g * xhat, axis=0) / N, 0.0 if IS_RMS else tl.sum(g, axis=0) / N, rstd,
                               IS_RMS, HAS_DSUM)
            if NEED_DW:
                dw += dy * xhat
            if NEED_DB:
                db += dy
        if NEED_DW:
            tl.store(DW + pid * N + cols, dw, mask=mask)
        if NEED_DB:
            tl.store(DB + pid * N + cols, db, mask=mask)
    else:
        # Pass 1, row by row: the two row means that ds needs.
        for row in range(row_start, row_end):
            r = tl.cast(row, tl.int64)
            rstd = tl.load(RSTD + r)
            mean = 0.0 if IS_RMS else tl.load(MEAN + r)
            acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                w = _norm_weight(W, start + cols, N, offset, HAS_W)
                xhat, g, dy = _norm_bwd_row_terms(S + r * stride_s, DY + r * stride_dy, w, mean, rstd,
                                                  start + cols, N, IS_RMS, HAS_W)
                acc_gx += g * xhat
                acc_g += g
            tl.store(C1 + r, tl.sum(acc_gx, axis=0) / N)
            tl.store(C2 + r, tl.sum(acc_g, axis=0) / N)
        tl.debug_barrier()  # the row means are read back below by other threads of this program
        # Pass 2, chunk by chunk with the rows inside, so each dweight/dbias chunk stays in registers.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            dw = tl.zeros([BLOCK_N], dtype=tl.float32)
            db = tl.zeros([BLOCK_N], dtype=tl.float32)
            w = _norm_weight(W, c, N, offset, HAS_W)
            for row in range(row_start, row_end):
                r = tl.cast(row, tl.int64)
                rstd = tl.load(RSTD + r)
                mean = 0.0 if IS_RMS else tl.load(MEAN + r)
                xhat, g, dy = _norm_bwd_row_terms(S + r * stride_s, DY + r * stride_dy, w, mean, rstd,
                                                  c, N, IS_RMS, HAS_W)
                _norm_bwd_store_ds(DS + r * stride_ds, DSUM + r * stride_dsum, c, N, xhat, g,
                                   tl.load(C1 + r), 0.0 if IS_RMS else tl.load(C2 + r), rstd, IS_RMS, HAS_DSUM)
                if NEED_DW:
                    dw += dy * xhat
                if NEED_DB:
                    db += dy
            if NEED_DW:
                tl.store(DW + pid * N + c, dw, mask=m)
            if NEED_DB:
                tl.store(DB + pid * N + c, db, mask=m)


# ---------------------------------------------------------------------------------------------------
# Host launchers. Inputs are 2-D (M, N) with unit stride along N (the op layer reshapes and makes them
# so); outputs are new tensors. ``launch`` is fusedlm._triton.launch (wrap_triton on a GPU).


def _block(n, max_one_pass):
    """(BLOCK_N, ONE_PASS, num_warps) for rows of n features: 512 features a warp, at most 16 warps."""
    if n <= max_one_pass:
        block = triton.next_power_of_2(max(n, 1))
        return block, True, min(max(block // 512, 1), 16)
    return LOOP_BLOCK, False, 8


def norm_fwd(launch, x, residual, weight, bias, eps, offset, is_rms):
    """Returns (y, s, mean, rstd): s is x + residual (an empty tensor without residual), mean is
    empty for RMSNorm; mean and rstd are float32 (M,)."""
    M, N = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = torch.empty(0 if is_rms else M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return y, s, mean, rstd
    block, one_pass, warps = _block(N, MAX_ONE_PASS)
    dummy = x  # any valid pointer for absent arguments (never read: the constexpr flags skip them)
    launch(
        _norm_fwd_kernel, (M,),
        x, residual if residual is not None else dummy, weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        y, s if residual is not None else dummy, mean if not is_rms else rstd, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        s.stride(0) if residual is not None else 0,
        N, float(eps), float(offset),
        IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_N=block, ONE_PASS=one_pass, num_warps=warps,
    )
    return y, s, mean, rstd


def norm_bwd(launch, num_programs, dy, s, weight, dsum, mean, rstd, offset, is_rms, need_dw, need_db):
    """Returns (ds, dweight, dbias) with dweight/dbias float32 (N,) or empty when not needed."""
    M, N = s.shape
    ds = torch.empty_like(s)

    def empty():  # a distinct placeholder per unused output (ops may not return aliased outputs)
        return torch.empty(0, device=s.device, dtype=torch.float32)

    if M == 0:
        def zeros():
            return torch.zeros(N, device=s.device, dtype=torch.float32)
        return ds, zeros() if need_dw else empty(), zeros() if need_db else empty()
    block, one_pass, warps = _block(N, MAX_ONE_PASS_BWD)
    rows_per_program = triton.cdiv(M, num_programs(s.device, M))
    grid = triton.cdiv(M, rows_per_program)
    dw = torch.empty((grid, N), device=s.device, dtype=torch.float32) if need_dw else rstd
    db = torch.empty((grid, N), device=s.device, dtype=torch.float32) if need_db else rstd
    if one_pass:
        c1 = c2 = rstd  # unused
    else:
        c1 = torch.empty(M, device=s.device, dtype=torch.float32)
        c2 = torch.empty(M, device=s.device, dtype=torch.float32)
    launch(
        _norm_bwd_kernel, (grid,),
        dy, s, weight if weight is not None else s, dsum if dsum is not None else s,
        mean if not is_rms else rstd, rstd,
        ds, dw, db,
        c1, c2,
        dy.stride(0), s.stride(0), dsum.stride(0) if dsum is not None else 0, ds.stride(0),
        M, N, rows_per_program, float(offset),
        IS_RMS=is_rms, HAS_W=weight is not None, HAS_DSUM=dsum is not None,
        NEED_DW=need_dw, NEED_DB=need_db, BLOCK_N=block, ONE_PASS=one_pass, num_warps=warps,
    )
    return ds, dw.sum(0) if need_dw else empty(), db.sum(0) if need_db else empty()
