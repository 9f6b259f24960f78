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
q and of k, in tiles of [BLOCK_H heads, BLOCK_HALF pairs], looping over blocks of heads. q and k are
addressed through the full strides of their logical (B, H, S, D) view, so transposed (B, S, H, D)
layouts, slices and a non-unit feature stride need no copy.
"""
import torch
import triton
import triton.language as tl

MAX_TILE = 4096  # elements of one [BLOCK_H, BLOCK_HALF] (or tail) tile


@triton.jit
def _rope_heads(
    X, OUT,  # this token's first head of the input and of the output
    H,  # heads
    stride_xh, stride_xd, stride_oh, stride_od,  # head and feature strides in elements
    c1, c2, s1, s2,  # [BLOCK_HALF] float32 cos/sin at the x1 and the x2 feature of each pair
    idx1, idx2, mask_half,  # [BLOCK_HALF] feature index of x1 and x2, valid pairs
    tail_cols, mask_tail,  # [BLOCK_TAIL] pass-through feature indices R..D-1, valid ones
    BLOCK_H: tl.constexpr, HAS_TAIL: tl.constexpr, BACKWARD: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + heads
        mh = h < H
        x_rows = X + (h.to(tl.int64) * stride_xh)[:, None]
        o_rows = OUT + (h.to(tl.int64) * stride_oh)[:, None]
        m = mh[:, None] & mask_half[None, :]
        x1 = tl.load(x_rows + (idx1 * stride_xd)[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + (idx2 * stride_xd)[None, :], mask=m, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1[None, :] + x2 * s2[None, :]
            o2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(o_rows + (idx1 * stride_od)[None, :], o1.to(OUT.dtype.element_ty), mask=m)
        tl.store(o_rows + (idx2 * stride_od)[None, :], o2.to(OUT.dtype.element_ty), mask=m)
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
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # one program per token
    b = pid // S
    s = pid % S
    i = tl.arange(0, BLOCK_HALF)
    mask_half = i < HALF
    if INTERLEAVED:
        idx1 = 2 * i
        idx2 = 2 * i + 1
    else:
        idx1 = i
        idx2 = i + HALF
    cos_row = COS + b * scb + s * scs
    sin_row = SIN + b * ssb + s * sss
    c1 = tl.load(cos_row + idx1 * scr, mask=mask_half, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + idx2 * scr, mask=mask_half, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + idx1 * ssr, mask=mask_half, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + idx2 * ssr, mask=mask_half, other=0.0).to(tl.float32)
    tail_cols = 2 * HALF + tl.arange(0, BLOCK_TAIL)
    mask_tail = tail_cols < D
    _rope_heads(Q + b * sqb + s * sqs, QO + b * sqob + s * sqos, HQ, sqh, sqd, sqoh, sqod,
                c1, c2, s1, s2, idx1, idx2, mask_half, tail_cols, mask_tail,
                BLOCK_HQ, HAS_TAIL, BACKWARD)
    _rope_heads(K + b * skb + s * sks, KO + b * skob + s * skos, HK, skh, skd, skoh, skod,
                c1, c2, s1, s2, idx1, idx2, mask_half, tail_cols, mask_tail,
                BLOCK_HK, HAS_TAIL, BACKWARD)


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
    block_hq, block_hk = _block_h(HQ, width), _block_h(HK, width)
    warps = min(max(block_hq * width // 512, 1), 8)
    launch(
        _rope_kernel, (B * S,),
        q, k, cos, sin, q_out, k_out,
        S, HQ, HK,
        *_logical_strides(q, transposed), *_logical_strides(k, transposed),
        *_logical_strides(q_out, transposed), *_logical_strides(k_out, transposed),
        *_cos_strides(cos), *_cos_strides(sin),
        half, D,
        INTERLEAVED=interleaved, BACKWARD=backward, HAS_TAIL=tail > 0,
        BLOCK_HALF=block_half, BLOCK_TAIL=block_tail, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        num_warps=warps,
    )
    return q_out, k_out
