"""The communication of context parallelism, in one place: torch.distributed point-to-point around a ring
and all-to-all, and a dry-run stand-in that moves nothing and only counts.

Every byte the ring and Ulysses put on the wire, and every buffer they allocate, passes through a
``Transport``; a ``Traffic`` record (see ``recording``) collects them, which is how fusedlm.distributed.plan
counts the bytes sent and the memory per rank from the implementation itself instead of from a formula.
"""
import contextlib
import threading

import torch
import torch.distributed as dist

KV_TAG, DKV_TAG = 0, 1  # distinct tags: gloo matches by (peer, tag), so K/V and dK/dV can never be swapped

_local = threading.local()


class Traffic:
    """What one rank sent and allocated while recording.

    sends: (what, nbytes) for every tensor sent to another rank ("kv", "dkv", "all_to_all").
    buffers: (what, nbytes) for every buffer the context-parallel layer allocated (communication buffers and
    accumulators; not the attention kernels' own workspace).
    blocks: (phase, matmul_flops) for every block attention run ("fwd" / "bwd"), counted from the shapes it ran
    on: 2 flops per multiply-add of QK^T and PV, halved for a causal diagonal block; a backward block counts
    its forward recompute (2 products) and the fused kernels' backward (5: S, dP, dV, dQ, dK).
    """

    def __init__(self):
        self.sends, self.buffers, self.blocks = [], [], []

    def sent(self, what=None):
        return sum(n for w, n in self.sends if what is None or w == what)

    def allocated(self, what=None):
        return sum(n for w, n in self.buffers if what is None or w == what)


@contextlib.contextmanager
def recording():
    """Collect a Traffic of the context-parallel calls made inside the block (this thread)."""
    previous = getattr(_local, "traffic", None)
    _local.traffic = Traffic()
    try:
        yield _local.traffic
    finally:
        _local.traffic = previous


def _record(kind, what, value):
    traffic = getattr(_local, "traffic", None)
    if traffic is not None:
        getattr(traffic, kind).append((what, value) if kind != "blocks" else value)


def note_block(phase, batch_heads, q_rows, k_rows, e, ev, causal, recompute=True):
    """Record one block attention's matmul flops (dense shapes only)."""
    one = 2.0 * batch_heads * q_rows * k_rows * (e + ev) / 2 * (0.5 if causal else 1.0)  # one product's flops
    _record("blocks", None, (phase, one * (2 if phase == "fwd" else (7 if recompute else 5))))


class _Done:
    def wait(self):
        return True


class Transport:
    """Point-to-point around a ring and all-to-all over a torch.distributed process group.

    group: a ProcessGroup or None (the default group). rank / world: this process's place in the group.
    """

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        pg = group if group is not None else dist.group.WORLD
        # P2POp takes global ranks: the group's neighbours translated.
        self.next = dist.get_global_rank(pg, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(pg, (self.rank - 1) % self.world)

    def buffer(self, what, like, dtype=None):
        """An uninitialised buffer shaped like ``like`` (recorded)."""
        t = torch.empty_like(like, dtype=dtype or like.dtype)
        _record("buffers", what, t.nbytes)
        return t

    def zeros(self, what, shape, dtype, device):
        t = torch.zeros(shape, dtype=dtype, device=device)
        _record("buffers", what, t.nbytes)
        return t

    def shift(self, what, send, recv, tag):
        """Post: ``send`` to the next rank, ``recv`` filled from the previous one. Returns the works to wait on
        (both tensors must stay untouched until then)."""
        _record("sends", what, send.nbytes)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        return dist.batch_isend_irecv(ops)

    def all_to_all(self, out, inp):
        """out[i] <- rank i's inp[rank] (equal splits along dim 0)."""
        _record("sends", "all_to_all", inp.nbytes * (self.world - 1) // self.world)  # its own chunk stays
        dist.all_to_all_single(out, inp, group=self.group)


class DryTransport(Transport):
    """Rank ``rank`` of ``world`` without a process group: records what would be sent and moves nothing
    (receive buffers keep whatever they hold). With meta tensors it counts bytes and buffers at any size."""

    def __init__(self, world, rank=0):
        self.group, self.world, self.rank = None, world, rank
        self.next, self.prev = (rank + 1) % world, (rank - 1) % world

    def shift(self, what, send, recv, tag):
        _record("sends", what, send.nbytes)
        return [_Done()]

    def all_to_all(self, out, inp):
        _record("sends", "all_to_all", inp.nbytes * (self.world - 1) // self.world)


def wait(works):
    for w in works:
        w.wait()


class AllToAll(torch.autograd.Function):
    """All-to-all with equal splits along dim 0, x (W, ...) -> y (W, ...) with y[i] = rank i's x[rank].
    Its own transpose: the gradient takes the same all-to-all back (grad_x[i] = rank i's grad_y[rank])."""

    @staticmethod
    def forward(ctx, x, transport):
        ctx.transport = transport
        x = x.contiguous()
        out = transport.buffer("all_to_all_buffer", x)
        transport.all_to_all(out, x)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = ctx.transport.buffer("all_to_all_buffer", grad)
        ctx.transport.all_to_all(out, grad)
        return out, None
