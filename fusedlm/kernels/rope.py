"""Rotary position embedding (Hugging Face Llama's apply_rotary_pos_emb), forward and backward.

Each rotary pair (x1, x2) of the first R features of a head turns by the angle whose cosine and sine are
given per token and per feature, in float32:

    rotate_half (default):  x1 = x[i],  x2 = x[i + R/2]        for i < R/2
    interleaved:            x1 = x[2i], x2 = x[2i + 1]

    forward:   o1 = x1 * cos1 - x2 * sin1        o2 = x2 * cos2 + x1 * sin2
    backward:  d1 = g1 * cos1 + g2 * sin2        d2 = g2 * cos2 - g1 * sin1

where cos1/sin1 are taken at x1's feature index and cos2/sin2 at x2's (equal in practice, but never
assumed). The backward is the transposed rotation, so one kernel serves both (BACKWARD). Features
R..D-1 (partial rotary) pass through unchanged, copied bit for bit.

One program per token (b, s): it loads that token's cos/sin row once and applies it to every head of
q and of k, in tiles of [BLOCK_H heads, BLOCK_HALF pairs], looping over blocks of heads. q and k use the
same BLOCK_H, so their tiles share one register layout and the cos/sin vectors serve both without a
reload. The interleaved layout loads each head's rotary features as one contiguous [BLOCK_H, R] tile
(16-byte vectors) and splits it into the even and odd features in registers, instead of two stride-2
gathers of 2-byte scalars. q and k are addressed through the full strides of their logical (B, H, S, D)
view, so transposed (B, S, H, D) layouts, slices and a non-unit feature stride need no copy.
"""
import torch
import triton
import triton.language as tl

MAX_TILE = 4096  # elements of one [BLOCK_H, BLOCK_HALF] (or tail) tile


@triton.jit
def _pairs(ROW, stride, HALF, BLOCK_HALF: tl.constexpr):
    """(x1, x2) float32 [BLOCK_HALF] of an interleaved row: one contiguous load, split into even and odd."""
    f = tl.arange(0, 2 * BLOCK_HALF)
    row = tl.load(ROW + f * stride, mask=f < 2 * HALF, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(row, [BLOCK_HALF, 2]))


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2, BACKWARD: tl.constexpr):
    """The rotation of the pairs (x1, x2) by [BLOCK_HALF] cos/sin vectors (its transpose when BACKWARD)."""
    if BACKWARD:
        o1 = x1 * c1[None, :] + x2 * s2[None, :]
        o2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
    return o1, o2


@triton.jit
def _rope_heads(
    X, OUT,  # this token's first head of the input and of the output
    H, HALF,  # heads, rotary pairs
    stride_xh, stride_xd, stride_oh, stride_od,  # head and feature strides in elements
    c1, c2, s1, s2,  # [BLOCK_HALF] float32 cos/sin at the x1 and the x2 feature of each pair
    tail_cols, mask_tail,  # [BLOCK_TAIL] pass-through feature indices R..D-1, valid ones
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_TAIL: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    f = tl.arange(0, 2 * BLOCK_HALF)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + heads
        mh = h < H
        x_rows = X + (h.to(tl.int64) * stride_xh)[:, None]
        o_rows = OUT + (h.to(tl.int64) * stride_oh)[:, None]
        if INTERLEAVED:  # features 2i, 2i + 1: one contiguous [BLOCK_H, 2 * BLOCK_HALF] tile
            m = mh[:, None] & (f < 2 * HALF)[None, :]
            x = tl.load(x_rows + (f * stride_xd)[None, :], mask=m, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_HALF, 2]))
            o1, o2 = _rotate(x1, x2, c1, c2, s1, s2, BACKWARD)
            o = tl.reshape(tl.join(o1, o2), [BLOCK_H, 2 * BLOCK_HALF])
            tl.store(o_rows + (f * stride_od)[None, :], o.to(OUT.dtype.element_ty), mask=m)
        else:  # features i, i + R/2: two contiguous half rows
            m = mh[:, None] & (i < HALF)[None, :]
            x1 = tl.load(x_rows + (i * stride_xd)[None, :], mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(x_rows + ((i + HALF) * stride_xd)[None, :], mask=m, other=0.0).to(tl.float32)
            o1, o2 = _rotate(x1, x2, c1, c2, s1, s2, BACKWARD)
            tl.store(o_rows + (i * stride_od)[None, :], o1.to(OUT.dtype.element_ty), mask=m)
            tl.store(o_rows + ((i + HALF) * stride_od)[None, :], o2.to(OUT.dtype.element_ty), mask=m)
        if HAS_TAIL:
            mt = mh[:, None] & mask_tail[None, :]
            t = tl.load(x_rows + (tail_cols * stride_xd)[None, :], mask=mt)
            tl.store(o_rows + (tail_cols * stride_od)[None, :], t, mask=mt)


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN,  # inputs (the incoming gradients when BACKWARD); cos/sin (B or 1, S, R)
    QO, KO,  # outputs, same logical shapes as Q and K
    S, HQ, HK,  # sequence length, heads of q and of k
    sqb, sqh, sqs, sqd,  # strides of q's logical (B, H, S, D) view
    skb, skh, sks, skd,  # strides of k's logical (B, Hkv, S, D) view
    sqob, sqoh, sqos, sqod,  # strides of the q output's logical view
    skob, skoh, skos, skod,  # strides of the k output's logical view
    scb, scs, scr,  # cos strides (batch, seq, feature); batch stride 0 when shared by the batch
    ssb, sss, ssr,  # sin strides
    HALF,  # R / 2 rotary pairs
    D,  # head dim; features 2 * HALF .. D - 1 pass through
    INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr,  # heads per tile, q and k alike (one register layout for both)
):
    pid = tl.program_id(0).to(tl.int64)  # one program per token
    b = pid // S
    s = pid % S
    cos_row = COS + b * scb + s * scs
    sin_row = SIN + b * ssb + s * sss
    if INTERLEAVED:
        c1, c2 = _pairs(cos_row, scr, HALF, BLOCK_HALF)
        s1, s2 = _pairs(sin_row, ssr, HALF, BLOCK_HALF)
    else:
        i = tl.arange(0, BLOCK_HALF)
        c1 = tl.load(cos_row + i * scr, mask=i < HALF, other=0.0).to(tl.float32)
        c2 = tl.load(cos_row + (i + HALF) * scr, mask=i < HALF, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + i * ssr, mask=i < HALF, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + (i + HALF) * ssr, mask=i < HALF, other=0.0).to(tl.float32)
    tail_cols = 2 * HALF + tl.arange(0, BLOCK_TAIL)
    mask_tail = tail_cols < D
    _rope_heads(Q + b * sqb + s * sqs, QO + b * sqob + s * sqos, HQ, HALF, sqh, sqd, sqoh, sqod,
                c1, c2, s1, s2, tail_cols, mask_tail, BLOCK_H, BLOCK_HALF, INTERLEAVED, HAS_TAIL, BACKWARD)
    _rope_heads(K + b * skb + s * sks, KO + b * skob + s * skos, HK, HALF, skh, skd, skoh, skod,
                c1, c2, s1, s2, tail_cols, mask_tail, BLOCK_H, BLOCK_HALF, INTERLEAVED, HAS_TAIL, BACKWARD)


# ---------------------------------------------------------------------------------------------------
# Host launcher. q, k are 4-D, (B, H, S, D) or, with ``transposed``, (B, S, H, D); any strides.
# cos, sin are (S, R) or (B or 1, S, R). Outputs are new tensors shaped (and, where the input is dense,
# strided) like the inputs. ``launch`` is fusedlm._triton.launch (wrap_triton on a GPU).


def _cos_strides(t):
    """(batch, seq, feature) strides of cos/sin, batch stride 0 where the batch is shared."""
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


def _block_h(heads, width):
    """Heads per tile: all of them when the [heads, width] tile fits in MAX_TILE elements."""
    return max(1, min(triton.next_power_of_2(max(heads, 1)), MAX_TILE // width))


def _logical_strides(t, transposed):
    """Strides of t's logical (B, H, S, D) view: t is (B, S, H, D) when ``transposed``."""
    sb, s1, s2, sd = t.stride()
    return (sb, s2, s1, sd) if transposed else (sb, s1, s2, sd)


def rope(launch, q, k, cos, sin, interleaved, transposed, backward):
    """Returns (q_out, k_out): the rotation (its transpose when ``backward``) applied to q and k.

    The kernel gets the tensors themselves (never views) and the strides of their logical views.
    """
    q_out = torch.empty_like(q)
    k_out = torch.empty_like(k)
    if transposed:
        (B, S, HQ, D), HK = q.shape, k.shape[2]
    else:
        (B, HQ, S, D), HK = q.shape, k.shape[1]
    if B * S == 0 or HQ + HK == 0:
        return q_out, k_out
    half = cos.shape[-1] // 2
    tail = D - 2 * half
    block_half = triton.next_power_of_2(half)
    block_tail = triton.next_power_of_2(max(tail, 1))
    width = max(block_half, block_tail)
    block_h = _block_h(max(HQ, HK), width)
    warps = min(max(block_h * width // 512, 1), 8)
    launch(
        _rope_kernel, (B * S,),
        q, k, cos, sin, q_out, k_out,
        S, HQ, HK,
        *_logical_strides(q, transposed), *_logical_strides(k, transposed),
        *_logical_strides(q_out, transposed), *_logical_strides(k_out, transposed),
        *_cos_strides(cos), *_cos_strides(sin),
        half, D,
        INTERLEAVED=interleaved, BACKWARD=backward, HAS_TAIL=tail > 0,
        BLOCK_HALF=block_half, BLOCK_TAIL=block_tail, BLOCK_H=block_h,
        num_warps=warps,
    )
    return q_out, k_out
