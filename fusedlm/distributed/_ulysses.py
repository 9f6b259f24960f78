"""Ulysses (DeepSpeed-Ulysses) attention: an all-to-all turns sequence shards into head shards, each rank
attends its H/W heads over the whole sequence with one local attention, and a second all-to-all turns the
output back into sequence shards. Four all-to-alls forward (q, k, v, out) and four backward, each moving
(W-1)/W of the tensor; nothing else. Needs H divisible by W; K/V heads are repeated (GQA groups split) up to
lcm(Hkv, W), which divides H, when Hkv is not divisible by W.
"""
import math

import torch

import fusedlm

from torch.autograd.function import once_differentiable

from ._comm import AllToAll, kernel_call, note_block
from .layout import shard_positions


def _seq_to_heads(x, transport):
    """(B, h, n, E), this rank's n tokens of every head -> (B, h/W, W n, E), every rank's tokens (rank after
    rank) of this rank's h/W heads."""
    B, h, n, E = x.shape
    W = transport.world
    y = AllToAll.apply(x.reshape(B, W, h // W, n, E).transpose(0, 1), transport)  # y[i]: rank i's tokens
    return y.permute(1, 2, 0, 3, 4).reshape(B, h // W, W * n, E)


def _heads_to_seq(y, transport):
    """The inverse: (B, h/W, W n, E) -> (B, h, n, E)."""
    B, hw, L, E = y.shape
    W = transport.world
    z = AllToAll.apply(y.reshape(B, hw, W, L // W, E).permute(2, 0, 1, 3, 4), transport)  # z[i]: rank i's heads
    return z.transpose(0, 1).reshape(B, W * hw, L // W, E)


def _attend(q, k, v, causal, scale, backend):
    return fusedlm.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                enable_gqa=q.shape[1] != k.shape[1], backend=backend)


class _LocalAttention(torch.autograd.Function):
    """The one local attention, its autograd graph held in ctx, so that forward and backward both run through
    kernel_call (plan.py's measurement counts its results, never its workspace: that is the backend's)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, backend):
        with torch.enable_grad():
            ctx.inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            ctx.out = kernel_call(_attend, *ctx.inputs, causal, scale, backend)
        return ctx.out.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        grads = kernel_call(torch.autograd.grad, ctx.out, ctx.inputs, dout)
        del ctx.out, ctx.inputs
        return (*grads, None, None, None)


def ulysses_attention(q, k, v, transport, causal, layout, scale, backend):
    """q (B, H, n, E), k / v (B, Hkv, n, E / Ev) shards of a sequence of L = W n tokens -> out (B, H, n, Ev)."""
    W, Hkv = transport.world, k.shape[1]
    repeat = math.lcm(Hkv, W) // Hkv
    if repeat > 1:  # kv head j serves query heads [j G, (j+1) G); its copies serve G / repeat of them each
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    qh, kh, vh = (_seq_to_heads(t, transport) for t in (q, k, v))
    # The gathered sequence is the ranks' shards one after another. Without a mask the order of the keys does
    # not matter and each query's output follows it wherever it sits; with the causal mask the tokens are put in
    # position order first (zigzag) and taken back after.
    pos = None
    if causal and layout == "zigzag":
        L = qh.shape[2]
        pos = torch.cat([shard_positions(L, W, i, layout, q.device) for i in range(W)])  # gathered -> position
        order = torch.argsort(pos)                                                           # position -> gathered
        qh, kh, vh = (t.index_select(2, order) for t in (qh, kh, vh))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (qh, kh, vh)):
        out = _LocalAttention.apply(qh, kh, vh, causal, scale, backend)
    else:
        out = kernel_call(_attend, qh, kh, vh, causal, scale, backend)
    for phase in ("fwd", "bwd"):
        note_block(phase, qh.shape[0] * qh.shape[1], qh.shape[2], kh.shape[2], qh.shape[-1], vh.shape[-1], causal,
                   recompute=False)
    if pos is not None:
        out = out.index_select(2, pos)
    return _heads_to_seq(out, transport)
