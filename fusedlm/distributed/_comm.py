"""The communication of context parallelism, in one place: torch.distributed point-to-point around a ring
and all-to-all, and a dry-run stand-in that moves nothing and only counts.

Every byte the ring and Ulysses put on the wire passes through a ``Transport``; a ``Traffic`` record (see
``recording``) collects them. The memory a rank needs is measured, not declared: ``live_bytes`` watches every
tensor the context-parallel layer allocates (a TorchDispatchMode: buffers, accumulators, merge and backward
temporaries, each block's output and gradients) while the attention kernels' own internals are excluded
(``kernel_call``). That is how fusedlm.distributed.plan counts bytes sent and memory per rank from the
implementation itself instead of from a formula.
"""
import contextlib
import threading
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KV_TAG, DKV_TAG = 0, 1  # distinct tags: gloo matches by (peer, tag), so K/V and dK/dV can never be swapped

_local = threading.local()


class Traffic:
    """What one rank sent while recording.

    sends: (what, nbytes) for every tensor sent to another rank ("kv", "dkv", "all_to_all").
    blocks: (phase, matmul_flops) for every block attention run ("fwd" / "bwd"), counted from the shapes it ran
    on: 2 flops per multiply-add of QK^T and PV, halved for a causal diagonal block; a backward block counts
    its forward recompute (2 products) and the fused kernels' backward (5: S, dP, dV, dQ, dK).
    """

    def __init__(self):
        self.sends, self.blocks = [], []

    def sent(self, what=None):
        return sum(n for w, n in self.sends if what is None or w == what)


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


class LiveBytes(TorchDispatchMode):
    """Peak and current bytes of the tensors allocated while active (this thread), outside ``kernel_call``.

    A tensor's storage counts from the op that made it (any op that returns new storage: factories, copies,
    arithmetic; not views, not in-place or out= ops) until that storage dies (its last tensor, view or alias
    saved by autograd, is gone: torch keeps one Python object per storage while it lives). Inside ``kernel_call`` nothing is counted but the call's tensor
    results: the attention's own workspace and the graph it saves are the backend's, the same as for one
    attention without context parallelism. On meta tensors it measures any size without memory.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.paused = 0
        self._storages = {}  # id of a live storage counted -> its bytes

    def _free(self, key):
        self.live -= self._storages.pop(key)

    def count(self, t):
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._storages:
            return
        self._storages[key] = storage.nbytes()
        self.live += self._storages[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if self.paused or schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return out
        inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in inputs:
                self.count(t)
        return out


@contextlib.contextmanager
def live_bytes():
    """Measure (LiveBytes) the context-parallel calls made inside the block, this thread."""
    tracker = LiveBytes()
    previous = getattr(_local, "tracker", None)
    _local.tracker = tracker
    try:
        with tracker:
            yield tracker
    finally:
        _local.tracker = previous


def kernel_call(fn, *args, **kwargs):
    """fn(*args, **kwargs) for an attention call (a block's forward, its autograd.grad): under ``live_bytes``
    only its tensor results are counted, not what it allocates inside."""
    tracker = getattr(_local, "tracker", None)
    if tracker is None:
        return fn(*args, **kwargs)
    tracker.paused += 1
    try:
        result = fn(*args, **kwargs)
    finally:
        tracker.paused -= 1
    for t in tree_flatten(result)[0]:
        if isinstance(t, torch.Tensor):
            tracker.count(t)
    return result


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
        if self.rank < 0:
            raise ValueError(f"group: expected a process group this rank (global rank {dist.get_rank()}) belongs "
                             f"to, got one of {self.world} ranks without it")
        pg = group if group is not None else dist.group.WORLD
        self.backend = str(dist.get_backend(pg)).lower()
        # P2POp takes global ranks: the group's neighbours translated.
        self.next = dist.get_global_rank(pg, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(pg, (self.rank - 1) % self.world)

    def check_device(self, name, t):
        """NCCL moves only CUDA tensors of the device this process uses: say so by name instead of failing (or
        hanging) inside a collective."""
        if "nccl" not in self.backend:
            return
        if t.device.type != "cuda" and self.backend == "nccl":
            raise ValueError(f"{name}: expected a CUDA tensor (the group's backend is NCCL), got one on {t.device}")
        if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
            raise ValueError(f"{name}: expected a tensor on the current CUDA device cuda:"
                             f"{torch.cuda.current_device()} (NCCL; torch.cuda.set_device), got one on {t.device}")

    def buffer(self, what, like, dtype=None):
        """An uninitialised buffer shaped like ``like`` (``what`` names it for the reader)."""
        return torch.empty_like(like, dtype=dtype or like.dtype)

    def zeros(self, what, shape, dtype, device):
        return torch.zeros(shape, dtype=dtype, device=device)

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
        self.group, self.world, self.rank, self.backend = None, world, rank, "dry"
        self.next, self.prev = (rank + 1) % world, (rank - 1) % world

    def shift(self, what, send, recv, tag):
        _record("sends", what, send.nbytes)
        return [_Done()]

    def all_to_all(self, out, inp):
        _record("sends", "all_to_all", inp.nbytes * (self.world - 1) // self.world)


def wait(works):
    for w in works:
        w.wait()


def drain(works):
    """After an exception: wait for the transfers already posted (their peers posted the matching ones), so
    that nothing is left pending on the group for the next call; errors of the wait itself are dropped (the
    first exception is the one to report)."""
    for w in works:
        try:
            w.wait()
        except Exception:  # noqa: BLE001 - the caller re-raises the original
            pass


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
