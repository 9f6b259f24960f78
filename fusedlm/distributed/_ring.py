"""Ring attention: each rank keeps its queries, the K/V shards travel around the ring of W ranks.

Step s = 0 .. W-1 on rank r attends r's queries to the K/V of rank src = (r - s) mod W, while that shard is
already being passed on (the next step's send/receive is posted before the current block computes: double
buffered, so on GPUs the transfer hides behind the block's attention when the block takes longer).

Merging partial results. For a set of keys J, a query's lse_J = log sum_{j in J} exp(s_j) and
out_J = sum_{j in J} exp(s_j - lse_J) v_j. For disjoint J1, J2:
    lse = log(exp(lse_1) + exp(lse_2)),   out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2,
so each block's (out, lse) from fusedlm's attention (return_lse=True) folds into a running (out, lse) in
float32 (float64 for float64 inputs), in place: out_acc *= exp(lse_acc - lse), out_acc += exp(lse_blk - lse) out_blk
(addcmul_: no float32 copy of the block's output), so the merge allocates only row-sized temporaries.

Backward. With out = sum_i w_i out_i, w_i = exp(lse_i - lse), lse = logsumexp_i lse_i:
    d out / d out_i = w_i,     d out / d lse_i = w_i (out_i - out),
so block i receives dout_i = w_i dout and dlse_i = w_i rowsum(dout * (out_i - out)), and fusedlm's own
attention backward (any backend: the block recomputed under autograd, one extra block forward per step)
turns those into the block's dq, dk, dv. The K/V go around the ring again; beside them travel the dK/dV
accumulators (float32): the accumulator for rank src's K/V picks up each rank's contribution on its way
and arrives home after W transfers.

Failure. The block attention runs after the next transfer is posted; if it raises (out of memory, a kernel
error), the loops wait for the transfers already posted before re-raising, so the group is left with nothing
pending and the next call works (a raise on one rank only still leaves its peers waiting at their next step:
that needs the group's timeout). Backend and dtype are resolved before anything is posted (``resolve_backend``),
so a backend that cannot serve the call raises on every rank before any communication.
"""
import torch
from torch.autograd.function import once_differentiable

import fusedlm

from .. import _backend
from ._comm import DKV_TAG, KV_TAG, drain, kernel_call, note_block, wait


def compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def step_plan(rank, src, causal, layout):
    """What rank ``rank`` computes at the ring step holding rank ``src``'s K/V: (q_part, k_part, causal), the
    parts None (the whole shard), "first" or "second" (half), or None when the causal mask hides every key.

    Contiguous (rank r holds block r): src < r all visible, src == r causal, src > r all hidden (skipped).
    Zigzag (rank r holds chunks r and 2W-1-r of 2W, c tokens each, r < W <= 2W-1-r):
      src == r: both shards in increasing position order, so the global causal mask is the local one;
      src < r:  K chunk src precedes both query chunks, K chunk 2W-1-src follows both: all queries x the
                first half of the keys, no mask;
      src > r:  query chunk r precedes both key chunks (src > r, 2W-1-src >= W > r), query chunk 2W-1-r
                follows both (2W-1-r > 2W-1-src, and >= W > src): the second half of the queries x all keys.
    Each zigzag step off the diagonal is c x 2c scores, the diagonal 2c x 2c causal (the same count): equal work
    on every rank at every step. Packed sequences follow the zigzag rule sequence by sequence.
    """
    if not causal:
        return None, None, False
    if src == rank:
        return None, None, True
    if layout == "contiguous":
        return (None, None, False) if src < rank else None
    return (None, "first", False) if src < rank else ("second", None, False)


def resolve_backend(op, q, k, v, backend):
    """The backend every block of this call runs on, chosen (or refused, ValueError) with the same rule and
    reasons as fusedlm's attention op (dtype, head dims), before the first transfer is posted."""
    from ..ops.attention import _cuda_reason, _triton_reason

    E, Ev = q.shape[-1], v.shape[-1]
    return _backend.select(op, backend, q.device, {"triton": _triton_reason((q, k, v), E, Ev, None),
                                                   "cuda": _cuda_reason((q, k, v), E, Ev, None)})


def merge_(out_acc, lse_acc, out_blk, lse_blk):
    """In place: (out_acc, lse_acc) becomes (out, lse) over the union of two disjoint key sets (see the module
    docstring); out_blk may be in a lower precision than out_acc (it is read, not copied, on GPUs).
    A row that sees no key in either has lse_acc = lse_blk = -inf: its lse stays -inf and its weights are taken
    against 0 instead of -inf (exp(-inf - 0) = 0, never exp(-inf + inf) = nan), so it keeps out = 0."""
    lse = torch.logaddexp(lse_acc, lse_blk)
    ref = lse.masked_fill(torch.isneginf(lse), 0.0)
    out_acc.mul_(torch.sub(lse_acc, ref).exp_().unsqueeze(-1))
    out_acc.addcmul_(out_blk, torch.sub(lse_blk, ref).exp_().unsqueeze(-1))
    lse_acc.copy_(lse)


def merge(out_acc, lse_acc, out_blk, lse_blk):
    """merge_ on copies: returns (out, lse)."""
    out_acc, lse_acc = out_acc.clone(), lse_acc.clone()
    merge_(out_acc, lse_acc, out_blk, lse_blk)
    return out_acc, lse_acc


class DenseBlocks:
    """A dense shard: q (B, H, n, E), k / v (B, Hkv, n, E / Ev); tokens along dim 2 of q, k, v, out and lse."""

    def __init__(self, n, scale, backend):
        self.n, self.half, self.scale, self.backend = n, n // 2, scale, backend

    def take(self, x, part):
        return x if part is None else x.narrow(2, 0 if part == "first" else self.half, self.half)

    def merge(self, out_acc, lse_acc, part, out_blk, lse_blk):
        merge_(self.take(out_acc, part), self.take(lse_acc, part), out_blk, lse_blk)  # views: in place

    def add(self, acc, part, value):
        self.take(acc, part).add_(value)  # (value in a lower precision: read, not copied, on GPUs)

    def note(self, phase, q, k, v, causal):
        """The flops of one block, from the shapes it attends (q, k, v: the parts taken)."""
        note_block(phase, q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[-1], v.shape[-1], causal)

    def attend(self, q, k, v, q_part, k_part, causal):
        return fusedlm.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self.scale,
                                                    enable_gqa=q.shape[1] != k.shape[1], return_lse=True,
                                                    backend=self.backend)


class VarlenBlocks:
    """A packed shard: q (total/W, H, E), k / v (total/W, Hkv, E / Ev); tokens along dim 0. Local offsets
    cu_local = cu_seqlens / W; the halves (chunk r, chunk 2W-1-r of each sequence) are gathered by index,
    their offsets cu_local / 2. The indices are built on the device, with no read back."""

    def __init__(self, cu_local, max_local, total_local, scale, backend):
        self.scale, self.backend = scale, backend
        cu = cu_local.long()
        cu_half = cu // 2
        u = torch.arange(total_local // 2, device=cu.device)
        seq = torch.searchsorted(cu_half[1:], u, right=True)  # the sequence of each half-token
        first = cu[seq] + (u - cu_half[seq])                  # its place in the first half of that sequence
        second = first + (cu_half[seq + 1] - cu_half[seq])    # and in the second
        self.idx = {"first": first, "second": second}
        self.cu = {None: cu_local, "first": cu_half.to(torch.int32), "second": cu_half.to(torch.int32)}
        self.max = {None: max_local, "first": max_local // 2, "second": max_local // 2}

    def take(self, x, part):
        return x if part is None else x.index_select(0, self.idx[part])

    def merge(self, out_acc, lse_acc, part, out_blk, lse_blk):
        if part is None:
            merge_(out_acc, lse_acc, out_blk, lse_blk)
            return
        o, lse = self.take(out_acc, part), self.take(lse_acc, part)  # (gathered copies: merged, put back)
        merge_(o, lse, out_blk, lse_blk)
        out_acc.index_copy_(0, self.idx[part], o)
        lse_acc.index_copy_(0, self.idx[part], lse)

    def add(self, acc, part, value):
        if part is None:
            acc.add_(value)
        else:
            acc.index_add_(0, self.idx[part], value.to(acc.dtype))

    def note(self, *args):
        pass  # (the flops of packed blocks depend on the lengths: not counted)

    def attend(self, q, k, v, q_part, k_part, causal):
        return fusedlm.varlen_attention(q, k, v, self.cu[q_part], self.cu[k_part], self.max[q_part],
                                        self.max[k_part], causal=causal, scale=self.scale, return_lse=True,
                                        backend=self.backend)


def _pack(transport, k, v):
    """K and V in one flat buffer (one message a step instead of two)."""
    buf = transport.zeros("kv_buffer", (k.numel() + v.numel(),), k.dtype, k.device)
    buf[:k.numel()].copy_(k.reshape(-1))
    buf[k.numel():].copy_(v.reshape(-1))
    return buf


def _unpack(buf, k, v):
    return buf[:k.numel()].view(k.shape), buf[k.numel():].view(v.shape)


class RingAttention(torch.autograd.Function):
    """out = attention of this rank's queries over every rank's keys; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, transport, causal, layout):
        ct, W, r, dev = compute_dtype(q), transport.world, transport.rank, q.device
        out_acc = transport.zeros("out_acc", (*q.shape[:-1], v.shape[-1]), ct, dev)
        lse_acc = transport.zeros("lse_acc", q.shape[:-1], ct, dev).fill_(float("-inf"))
        kv = [_pack(transport, k, v), None]
        kv[1] = transport.buffer("kv_buffer", kv[0])
        works = []
        try:
            for s in range(W):
                works = transport.shift("kv", kv[0], kv[1], KV_TAG) if s < W - 1 else []
                plan = step_plan(r, (r - s) % W, causal, layout)
                if plan is not None:
                    _block_forward(blocks, plan, q, k, v, kv[0], out_acc, lse_acc)
                wait(works)
                works = []
                kv.reverse()
        except BaseException:
            drain(works)  # the peers posted the matching transfers: finish them, leave nothing pending
            raise
        del kv
        out = out_acc.to(q.dtype)
        del out_acc
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.blocks, ctx.transport, ctx.causal, ctx.layout = blocks, transport, causal, layout
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        blocks, transport = ctx.blocks, ctx.transport
        ct, W, r, dev = lse.dtype, transport.world, transport.rank, q.device
        lse_ref = lse.masked_fill(torch.isneginf(lse), 0.0)  # rows with no key (none here in practice): w = 0
        dq = transport.zeros("dq", q.shape, ct, dev)
        kv = [_pack(transport, k, v), None]
        kv[1] = transport.buffer("kv_buffer", kv[0])
        # dK/dV accumulators: the one being summed, the one arriving, the one leaving (3 buffers rotate).
        acc, recv, spare = (transport.zeros("dkv_buffer", (k.numel() + v.numel(),), ct, dev) for _ in range(3))
        works, dworks = [], []
        try:
            for s in range(W):
                works = transport.shift("kv", kv[0], kv[1], KV_TAG) if s < W - 1 else []
                plan = step_plan(r, (r - s) % W, ctx.causal, ctx.layout)
                acc.zero_()
                if plan is not None:
                    _block_backward(blocks, plan, q, k, v, kv[0], out, lse_ref, dout, dq, acc)
                if s > 0:  # add what the ranks before contributed to this K/V (it left them at their step s - 1)
                    wait(dworks)
                    dworks = []
                    acc.add_(recv)
                dworks = transport.shift("dkv", acc, spare, DKV_TAG)
                acc, recv, spare = recv, spare, acc  # (recv was consumed; spare now receives; acc is in flight)
                wait(works)
                works = []
                kv.reverse()
            wait(dworks)  # recv: this rank's own K/V's accumulator, home from its last stop (rank r - 1)
        except BaseException:
            drain(works + dworks)
            raise
        del kv, acc, spare
        dk, dv = _unpack(recv, k, v)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _block_forward(blocks, plan, q, k, v, kv, out_acc, lse_acc):
    """One ring step's forward: this rank's queries (part) against the K/V in ``kv`` (part), merged into the
    accumulators. (benchmarks/bench_cp_step.py times this on a GPU.)"""
    qp, kp, c = plan
    k_s, v_s = _unpack(kv, k, v)
    ql, kl, vl = blocks.take(q, qp), blocks.take(k_s, kp), blocks.take(v_s, kp)
    o, lse = kernel_call(blocks.attend, ql, kl, vl, qp, kp, c)
    blocks.note("fwd", ql, kl, vl, c)
    blocks.merge(out_acc, lse_acc, qp, o, lse)


def _weighted_rowdot(o, out, do, w, ct, pieces=8):
    """w * rowsum(do * (o - out)) in ``ct``, (...,) rows of (..., Ev) tensors. Computed slice by slice along the
    longest leading dim, so that the float32 temporary is 1/pieces of the block, not a whole block."""
    rows = torch.empty(o.shape[:-1], dtype=ct, device=o.device)
    dim = max(range(o.dim() - 1), key=lambda d: o.shape[d])
    size = -(-o.shape[dim] // pieces) if o.shape[dim] else 1
    for part in zip(*(t.split(size, dim) for t in (o, out, do, rows))):
        po, pout, pdo, prow = part
        torch.sum(po.to(ct, copy=True).sub_(pout).mul_(pdo), -1, out=prow)
    return rows.mul_(w)


def _block_backward(blocks, plan, q, k, v, kv, out, lse_ref, dout, dq, acc):
    """One ring step's backward (benchmarks/bench_cp_step.py times it): the block recomputed under autograd and
    given dout_i = w_i dout and
    dlse_i = w_i rowsum(dout * (out_i - out)); its dq added to ``dq``, its dk / dv to the accumulator ``acc``.
    The temporaries are one float32 block of the output's shape (out_i - out) and row-sized ones; dout and
    the block's results are read in their own dtype (no float32 copies)."""
    qp, kp, c = plan
    ct = dq.dtype
    k_s, v_s = _unpack(kv, k, v)
    with torch.enable_grad():
        ql = blocks.take(q, qp).detach().requires_grad_()
        kl = blocks.take(k_s, kp).detach().requires_grad_()
        vl = blocks.take(v_s, kp).detach().requires_grad_()
        o, l_blk = kernel_call(blocks.attend, ql, kl, vl, qp, kp, c)
    blocks.note("bwd", ql, kl, vl, c)
    w = torch.sub(l_blk.detach(), blocks.take(lse_ref, qp)).exp_()  # this block's weight in out (rows)
    do = blocks.take(dout, qp)
    do_blk = torch.mul(do, w.unsqueeze(-1), out=torch.empty_like(do, dtype=o.dtype))  # in float32, stored in o's
    dlse_blk = _weighted_rowdot(o.detach(), blocks.take(out, qp), do, w, ct)
    gq, gk, gv = kernel_call(torch.autograd.grad, (o, l_blk), (ql, kl, vl), (do_blk, dlse_blk.to(l_blk.dtype)))
    del o, l_blk, do_blk, dlse_blk, ql, kl, vl  # the block's graph goes here
    blocks.add(dq, qp, gq)
    dk_s, dv_s = _unpack(acc, k, v)
    blocks.add(dk_s, kp, gk)
    blocks.add(dv_s, kp, gv)
