"""The cuda backend's DeBERTa attention (csrc/deberta.cu) against float64, through the CPU harness
(FUSEDLM_CUDA_CPU=1) or, on a GPU machine with fusedlm._C built, on CUDA tensors.

test_deberta's and test_deberta_training's cases and oracles (Hugging Face's log buckets and plain distances,
both position terms and each alone, S past max_relative_positions and past the buckets, padding, empty and
one-token rows, packed sequences with empty ones, dropout, lse and its gradient) in float16 and bfloat16, the
kernels' dtypes, with the gradients of all five inputs: the position embeddings' too, whose band and runs
are summed by separate kernels (DebBand, DebFold) and matmuls. Plus determinism, the dropout mask equal to
the triton backend's, the declined cases and the registered ops.
"""
import pytest
import torch

import fusedlm
import test_deberta as TD
import test_deberta_training as TT
from fusedlm.verify import BOUNDS, check_case, rel_err
from helpers import (RecordFusedOps, assert_within, cuda_harness, detach_clone, dev,  # noqa: F401  (fixtures)
                     nan_filled_outputs, triton_or_skip)

HALF = [torch.float16, torch.bfloat16]
ids = lambda d: str(d)[6:]  # noqa: E731


@pytest.mark.parametrize("dtype", HALF, ids=ids)
@pytest.mark.parametrize("case", TD.CASES, ids=TD._case_id)
def test_matches_oracle(dev, dtype, case):
    B, H, S, D, pb, mr, terms, lengths = case
    inputs = TD.make_inputs(B, H, S, D, pb, mr, terms, lengths, gen=torch.Generator().manual_seed(S + D))
    grad = tuple(n for n in ("query", "key", "value", "pos_key", "pos_query") if n in inputs)
    rows = check_case(TD.fn_for("cuda", pb, mr), TD.ref_for(pb, mr), inputs, dtype=dtype, device=dev, grad=grad)
    assert [q for q, _ in rows] == ["out"] + [f"d{n}" for n in grad]
    assert_within(rows, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=ids)
def test_padded_rows_and_empty_rows(dev, dtype):
    TD.test_padded_rows_and_empty_rows("cuda", dev, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=ids)
def test_dense_lse_and_its_gradient(dev, dtype):
    TT.test_dense_lse_and_its_gradient("cuda", dev, dtype)


def test_dropout_backward_uses_the_forward_mask(dev):
    TT.test_dropout_backward_uses_the_forward_mask("cuda", dev, torch.float16)


@pytest.mark.parametrize("terms", ["c2p,p2c", "p2c"])
def test_varlen_matches_oracle(dev, terms):
    """test_deberta_training's packed case (odd lengths, a length-1 and an empty sequence) in bfloat16: out,
    lse and the gradients of every input through both."""
    pb, mr, H, D = 16, 40, 2, 24
    lengths = [45, 1, 0, 9]
    gen = torch.Generator().manual_seed(81)
    total = sum(lengths)
    inputs = dict(q=TD.randn(total, H, D, gen=gen), k=TD.randn(total, H, D, gen=gen), v=TD.randn(total, H, D, gen=gen),
                  pos_key=TD.randn(H, 2 * pb, D, gen=gen) if "c2p" in terms else None,
                  pos_query=TD.randn(H, 2 * pb, D, gen=gen), cu_seqlens=TT._cu(lengths))

    def fn(q, k, v, pos_key, pos_query, cu_seqlens):
        out, lse = fusedlm.deberta_varlen_attention(q, k, v, pos_key, pos_query, cu_seqlens, max(lengths),
                                                    position_buckets=pb, max_relative_positions=mr, return_lse=True,
                                                    backend="cuda")
        return out, lse.masked_fill(torch.isneginf(lse), 0.0)

    def ref(q, k, v, pos_key, pos_query, cu_seqlens):
        out, lse = TT.varlen_oracle(q, k, v, pos_key, pos_query, cu_seqlens, pb, mr)
        return out, lse.masked_fill(torch.isneginf(lse), 0.0)

    grad = ("q", "k", "v", "pos_query") + (("pos_key",) if "c2p" in terms else ())
    assert_within(check_case(fn, ref, inputs, dtype=torch.bfloat16, device=dev, grad=grad), torch.bfloat16)


def test_long_sequence_band_and_runs(dev):
    """S = 700 with max_relative_positions 128: most pairs in the two runs of constant bucket (their dpos
    shares from the per-row and per-key sums), a band of 254 distances over several 64-distance blocks."""
    inputs = TD.make_inputs(1, 1, 700, 16, 64, 128, "c2p,p2c", (700,), gen=torch.Generator().manual_seed(7))
    grad = ("query", "key", "value", "pos_key", "pos_query")
    rows = check_case(TD.fn_for("cuda", 64, 128), TD.ref_for(64, 128), inputs, dtype=torch.float16, device=dev,
                      grad=grad)
    assert_within(rows, torch.float16)


def test_hf_layout_and_strided_positions(dev):
    """q, k, v in (B, S, H, D) memory and a non-contiguous pos_key, float16."""
    inputs = TD.make_inputs(2, 2, 45, 32, 16, 40, lengths=(45, 20), gen=torch.Generator().manual_seed(5))
    q, k, v = (inputs[n].transpose(1, 2).contiguous().transpose(1, 2).half().to(dev) for n in ("query", "key", "value"))
    pk = inputs["pos_key"].transpose(0, 1).contiguous().transpose(0, 1).half().to(dev)
    pq = inputs["pos_query"].half().to(dev)
    kpm = inputs["key_padding_mask"].to(dev)
    out = fusedlm.deberta_attention(q, k, v, pk, pq, key_padding_mask=kpm, position_buckets=16,
                                    max_relative_positions=40, backend="cuda")
    want = TD.oracle(*(t.double().cpu() for t in (q, k, v, pk, pq)), kpm.cpu(), 16, 40)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, want) <= BOUNDS[torch.float16]


def test_backward_deterministic(dev):
    """No atomics: the dQ, dK/dV, band and fold passes give bitwise the same gradients run after run."""
    inputs = TD.make_inputs(2, 2, 67, 40, 16, 40, lengths=(67, 30), gen=torch.Generator().manual_seed(9))
    ts = {n: t.to(dev, torch.bfloat16).requires_grad_(n != "key_padding_mask") if n != "key_padding_mask"
          else t.to(dev) for n, t in inputs.items()}
    leaves = [ts[n] for n in ("query", "key", "value", "pos_key", "pos_query")]
    g = torch.randn(ts["query"].shape, generator=torch.Generator().manual_seed(1)).to(dev, torch.bfloat16)
    runs = [torch.autograd.grad(TD.fn_for("cuda", 16, 40)(**ts), leaves, g) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_dropout_mask_is_the_triton_backends(dev):
    triton_or_skip()
    B, H, S, p = 1, 2, 40, 0.3
    gen = torch.Generator().manual_seed(86)
    q, k = (torch.randn(B, H, S, S, generator=gen).to(dev, torch.float16) for _ in range(2))
    pk, pq = (torch.randn(H, 32, S, generator=gen).to(dev, torch.float16) for _ in range(2))
    masks = [TT._probs(b, dev, q, k, pk, pq, 5, p) != 0 for b in ("cuda", "triton")]
    assert 0.2 < 1 - masks[0].double().mean().item() < 0.4
    assert torch.equal(masks[0], masks[1])


class TestDeclined:
    def _args(self, dtype=torch.float16, d=32):
        q = torch.randn(1, 2, 5, d).to(dtype)
        return q, q, q, torch.randn(2, 32, d).to(dtype), None

    def test_float32(self):
        with pytest.raises(ValueError, match="backend 'cuda' cannot serve.*float16 or bfloat16"):
            fusedlm.deberta_attention(*self._args(torch.float32), position_buckets=16, max_relative_positions=40,
                                      backend="cuda")

    def test_head_dim_above_64(self):
        with pytest.raises(ValueError, match="head dims 16..64.*got D=96"):
            fusedlm.deberta_attention(*self._args(d=96), position_buckets=16, max_relative_positions=40,
                                      backend="cuda")


@pytest.mark.parametrize("terms", ["both", "c2p", "none"])
def test_opcheck(dev, terms):
    gen = torch.Generator().manual_seed(13)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(dev, torch.float16).requires_grad_(True)

    q, k, v = t(2, 2, 9, 24), t(2, 2, 9, 24), t(2, 2, 9, 24)
    pk = t(2, 32, 24) if terms != "none" else None
    pq = t(2, 32, 24) if terms == "both" else None
    kpm = torch.tensor([[True] * 9, [True] * 4 + [False] * 5], device=dev)
    recorder = RecordFusedOps("deberta")
    with recorder:
        out = fusedlm.deberta_attention(q, k, v, pk, pq, key_padding_mask=kpm, position_buckets=16,
                                        max_relative_positions=40, backend="cuda")
        out.backward(torch.randn(out.shape, generator=gen).to(dev, out.dtype))
    names = [f.name() for f, _, _ in recorder.calls]
    assert "fusedlm::deberta_fwd_cuda" in names and "fusedlm::deberta_bwd_cuda" in names, names
    for func, args, kwargs in recorder.calls:
        if not func.name().endswith("_cuda"):
            continue
        forward = "fwd" in func.name()
        args = detach_clone(args, requires_grad=forward)
        if forward:  # q, k, v, pos_key, pos_query are differentiable
            args = tuple(a.detach() if isinstance(a, torch.Tensor) and i >= 5 else a for i, a in enumerate(args))
        torch.library.opcheck(func, args, detach_clone(kwargs))


def test_torch_compile_fullgraph_equals_eager(dev):
    def block(q, k, v, pk, pq):
        return fusedlm.deberta_attention(q, k, v, pk, pq, position_buckets=16, max_relative_positions=40,
                                         backend="cuda").float().square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="inductor" if dev == "cuda" else "aot_eager")
    gen = torch.Generator().manual_seed(17)
    args = [torch.randn(*s, generator=gen).to(dev, torch.float16).requires_grad_(True)
            for s in ((2, 2, 19, 32),) * 3 + ((2, 32, 32),) * 2]
    eager = block(*args)
    eager_grads = torch.autograd.grad(eager, args)
    out = compiled(*args)
    grads = torch.autograd.grad(out, args)
    assert torch.equal(out, eager)
    assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads))


def _packed(lengths, H=2, D=32, pb=16, gen=None):
    gen = gen or torch.Generator().manual_seed(21)
    total = sum(lengths)
    q, k, v = (torch.randn(total, H, D, generator=gen).half() for _ in range(3))
    pk, pq = (torch.randn(H, 2 * pb, D, generator=gen).half() for _ in range(2))
    return q, k, v, pk, pq, TT._cu(lengths)


def _grads(dev, q, k, v, pk, pq, cu, max_seqlen, seed=None, p=0.0, need=(0, 1, 2, 3, 4)):
    leaves = [t.to(dev).requires_grad_(i in need) for i, t in enumerate((q, k, v, pk, pq))]
    if seed is not None:
        torch.manual_seed(seed)
    out = fusedlm.deberta_varlen_attention(*leaves, cu.to(dev), max_seqlen, position_buckets=16,
                                           max_relative_positions=40, dropout_p=p, backend="cuda")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dev, out.dtype)
    return [out] + list(torch.autograd.grad(out, [leaves[i] for i in need], g))


def test_packed_max_seqlen_past_the_longest(dev):
    """max_seqlen may exceed the longest sequence: the band then reaches distances no pair has (their blocks
    skip every tile) and the result must not change, bit for bit (without dropout: its counters use max_seqlen)."""
    q, k, v, pk, pq, cu = _packed([20, 7, 33])
    tight = _grads(dev, q, k, v, pk, pq, cu, 33)
    loose = _grads(dev, q, k, v, pk, pq, cu, 4 * 33)
    assert all(torch.equal(a, b) for a, b in zip(tight, loose))


def test_packed_dropout_equals_padded(dev):
    """Packed and padded batches draw the same dropout mask (counters from positions inside a sequence)."""
    lengths, S = [20, 33], 33
    q, k, v, pk, pq, cu = _packed(lengths)
    packed = _grads(dev, q, k, v, pk, pq, cu, S, seed=5, p=0.3, need=(0, 1, 2))
    mask = torch.stack([torch.arange(S) < n for n in lengths]).to(dev)
    dense = [torch.zeros(len(lengths), S, 2, 32, dtype=torch.float16) for _ in range(3)]
    for t, src in zip(dense, (q, k, v)):
        t[mask.cpu()] = src
    leaves = [t.transpose(1, 2).to(dev).requires_grad_(True) for t in dense]
    torch.manual_seed(5)
    out = fusedlm.deberta_attention(*leaves, pk.to(dev), pq.to(dev), key_padding_mask=mask, position_buckets=16,
                                    max_relative_positions=40, dropout_p=0.3, backend="cuda")
    g = torch.zeros_like(out)
    g.transpose(1, 2)[mask] = torch.randn(packed[0].shape, generator=torch.Generator().manual_seed(2)).to(dev, out.dtype)
    grads = torch.autograd.grad(out, leaves, g)
    assert torch.equal(out.transpose(1, 2)[mask], packed[0])
    for gd, gp in zip(grads, packed[1:]):
        assert torch.equal(gd.transpose(1, 2)[mask], gp)


def test_frozen_position_embeddings(dev):
    """pos_key / pos_query frozen: their gradients are not computed (no band kernel), q, k, v's still right."""
    inputs = TD.make_inputs(2, 2, 67, 40, 16, 40, lengths=(67, 30), gen=torch.Generator().manual_seed(31))
    rows = check_case(TD.fn_for("cuda", 16, 40), TD.ref_for(16, 40), inputs, dtype=torch.float16, device=dev,
                      grad=("query", "key", "value"))
    assert_within(rows, torch.float16)


def test_misaligned_position_embeddings(dev):
    """A pos_key view 2 bytes off 16-byte alignment (its rows are gathered 16 bytes at a time): copied first."""
    inputs = TD.make_inputs(1, 2, 40, 32, 16, 40, gen=torch.Generator().manual_seed(8))
    flat = torch.zeros(2 * 32 * 32 + 1, dtype=torch.float16)
    pk = flat[1:].view(2, 32, 32)
    pk.copy_(inputs["pos_key"])
    args = [inputs[n].half().to(dev) for n in ("query", "key", "value")]
    out = fusedlm.deberta_attention(*args, pk.to(dev), inputs["pos_query"].half().to(dev), position_buckets=16,
                                    max_relative_positions=40, backend="cuda")
    want = TD.oracle(*(t.double().cpu() for t in args), pk.double(), inputs["pos_query"].half().double(), None, 16, 40)
    assert rel_err(out, want) <= BOUNDS[torch.float16]


@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, False)])
def test_opcheck_kernel_ops(dev, grads):
    """fusedlm_C::deberta_fwd / deberta_bwd themselves (fakes against the kernels), position gradients on or off."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 9, 24, generator=gen).to(dev, torch.float16) for _ in range(3))
    pk, pq = (torch.randn(2, 32, 24, generator=gen).to(dev, torch.float16) for _ in range(2))
    rel = fusedlm.ops.deberta.relative_index_table(9, 16, 40, torch.device(dev))
    args = (q, k, v, pk, pq, None, None, rel, 9, 0.1, 0.0, None)
    torch.library.opcheck(torch.ops.fusedlm_C.deberta_fwd.default, args)
    out, lse = torch.ops.fusedlm_C.deberta_fwd(*args)
    band = list(fusedlm.ops.deberta.relative_band(16, 40))
    torch.library.opcheck(torch.ops.fusedlm_C.deberta_bwd.default,
                          (torch.randn_like(out), None, q, k, v, pk, pq, out, lse, None, None, rel, 9, 0.1, 0.0, None,
                           band[0], band[1], -8, 17, *grads))
