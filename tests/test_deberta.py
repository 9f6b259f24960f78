"""deberta_attention, every backend, against a float64 oracle written here and against transformers'
DisentangledSelfAttention.

The oracle computes the buckets per distance in Python float64 (math.log, math.ceil), builds the (S, S)
index and the three score terms by explicit gathers; it is not fusedlm's reference (the torch backend
under test). transformers' module is the second witness: random weights, share_att_key both ways,
256 buckets and 512 relative positions, padding, compared on the rows that are not padding.

Shapes are small (the Triton interpreter runs the CPU tests) but cover: S = 300 > 256 buckets (log
buckets and clamping), S = 67 > max_relative_positions, unbucketed distances, c2p-only, p2c-only, no
position term, length 1, fully padded batch rows, head dims 16..64 not all powers of two.
"""
import math

import pytest
import torch

from fusedlm.ops import deberta as ops
from fusedlm.ops.deberta import deberta_attention
from fusedlm.verify import BOUNDS, check_case, rel_err
from helpers import RecordFusedOps, assert_within, detach_clone, triton_or_skip

# ----------------------------------------------------------------------------------------------------
# Oracle (float64, CPU)


def oracle_bucket(d, position_buckets, max_relative_positions):
    """Hugging Face's make_log_bucket_position for one distance, in float64 Python math."""
    if position_buckets <= 0:
        return d
    mid = position_buckets // 2
    if abs(d) <= mid:
        return d
    log_pos = math.ceil(math.log(abs(d) / mid) / math.log((max_relative_positions - 1) / mid) * (mid - 1)) + mid
    return int(math.copysign(log_pos, d))


def oracle_index(S, position_buckets, max_relative_positions):
    span = position_buckets if position_buckets > 0 else max_relative_positions
    idx = torch.empty(S, S, dtype=torch.long)
    for i in range(S):
        for j in range(S):
            idx[i, j] = min(max(oracle_bucket(i - j, position_buckets, max_relative_positions) + span, 0), 2 * span - 1)
    return idx


_INDEX = {}


def oracle(query, key, value, pos_key=None, pos_query=None, key_padding_mask=None, position_buckets=256,
           max_relative_positions=512, keep=None, dropout_p=0.0, return_lse=False):
    """Disentangled attention by the book, float64. keep: an optional (B, H, S, S) 0/1 dropout mask applied
    to the probabilities (kept ones scaled by 1 / (1 - dropout_p)). return_lse: also the log-sum-exp of
    the scaled scores, -inf on rows with no real key."""
    B, H, S, D = query.shape
    ikey = (S, position_buckets, max_relative_positions)
    if ikey not in _INDEX:
        _INDEX[ikey] = oracle_index(*ikey)
    idx = _INDEX[ikey]
    scores = torch.einsum("bhid,bhjd->bhij", query, key)
    terms = 1
    if pos_key is not None:  # q_i . pos_key[idx(i, j)]
        scores = scores + torch.einsum("bhid,hijd->bhij", query, pos_key[:, idx])
        terms += 1
    if pos_query is not None:  # k_j . pos_query[idx(i, j)]
        scores = scores + torch.einsum("bhjd,hijd->bhij", key, pos_query[:, idx])
        terms += 1
    scores = scores / math.sqrt(D * terms)
    allowed = torch.ones(B, 1, 1, S, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed = key_padding_mask.cpu()[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    safe = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(safe, dim=-1).masked_fill(empty, 0.0)
    if keep is not None:
        probs = probs * keep.cpu().to(probs.dtype) / (1.0 - dropout_p)
    out = torch.einsum("bhij,bhjd->bhid", probs, value)
    if not return_lse:
        return out
    return out, torch.logsumexp(safe, dim=-1).masked_fill(empty[..., 0], float("-inf"))


# ----------------------------------------------------------------------------------------------------
# Helpers


def randn(*shape, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def make_inputs(B, H, S, D, pb, mr, terms="c2p,p2c", lengths=None, gen=None):
    span = pb if pb > 0 else mr
    d = dict(query=randn(B, H, S, D, gen=gen), key=randn(B, H, S, D, gen=gen), value=randn(B, H, S, D, gen=gen))
    if "c2p" in terms:
        d["pos_key"] = randn(H, 2 * span, D, gen=gen)
    if "p2c" in terms:
        d["pos_query"] = randn(H, 2 * span, D, gen=gen)
    if lengths is not None:
        d["key_padding_mask"] = torch.stack([torch.arange(S) < n for n in lengths])
    return d


def fn_for(backend, pb, mr):
    def fn(query, key, value, pos_key=None, pos_query=None, key_padding_mask=None):
        return deberta_attention(query, key, value, pos_key, pos_query, key_padding_mask=key_padding_mask,
                                 position_buckets=pb, max_relative_positions=mr, backend=backend)
    return fn


def ref_for(pb, mr):
    def ref(query, key, value, pos_key=None, pos_query=None, key_padding_mask=None):
        return oracle(query, key, value, pos_key, pos_query, key_padding_mask, pb, mr)
    return ref


# ----------------------------------------------------------------------------------------------------
# Buckets


@pytest.mark.parametrize("pb,mr", [(256, 512), (16, 40), (8, 12), (64, 128), (256, 300), (32, 10000)])
def test_buckets_equal_transformers(pb, mr):
    hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
    d = torch.arange(-20000, 20001)
    want = hf.make_log_bucket_position(d, pb, mr)
    got = ops.make_log_bucket_position(d, pb, mr)
    assert got.dtype == want.dtype and torch.equal(got, want)
    # The oracle's float64 buckets agree too (on a subsample: Python loops are slow).
    for x in list(range(-600, 601)) + [-19999, -8191, 8191, 19999]:
        assert oracle_bucket(x, pb, mr) == int(want[x + 20000]), x


@pytest.mark.parametrize("S,pb,mr", [(300, 256, 512), (67, 16, 40), (67, -1, 20), (1, 256, 512), (9000, 256, 512)])
def test_relative_index_table(S, pb, mr):
    hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
    table = ops.relative_index_table(S, pb, mr, torch.device("cpu"))
    assert table.dtype == torch.int32 and table.shape == (2 * S - 1,)
    span = pb if pb > 0 else mr
    d = torch.arange(-(S - 1), S)
    bucket = hf.make_log_bucket_position(d, pb, mr).long() if pb > 0 else d
    assert torch.equal(table.long(), torch.clamp(bucket + span, 0, 2 * span - 1))
    if S <= 300:  # Hugging Face's own (S, S) index: build_relative_position, then clamp(r + span)
        x = torch.empty(1, S, 1)
        rel = hf.build_relative_position(x, x, bucket_size=pb, max_position=mr)[0]
        assert torch.equal(ops.relative_index(S, pb, mr, torch.device("cpu")), torch.clamp(rel + span, 0, 2 * span - 1))


# ----------------------------------------------------------------------------------------------------
# Against the float64 oracle: outputs and the gradients of all five inputs

# (B, H, S, D, position_buckets, max_relative_positions, terms, real lengths or None)
CASES = [
    (2, 2, 67, 40, 16, 40, "c2p,p2c", None),  # log buckets, S > max_relative_positions: clamped
    (2, 2, 67, 64, 256, 512, "c2p,p2c", (67, 30)),  # deberta-v3 setting, padding
    (1, 1, 300, 16, 256, 512, "c2p,p2c", (260,)),  # S = 300 > 256 buckets: log region, padding
    (2, 2, 67, 24, 16, 40, "c2p", (67, 50)),  # content-to-position only
    (2, 2, 67, 24, 16, 40, "p2c", (40, 67)),  # position-to-content only
    (2, 2, 67, 32, -1, 20, "c2p,p2c", None),  # no buckets: plain distance clamped to +-20
    (2, 2, 1, 16, 256, 512, "c2p,p2c", None),  # one token
    (3, 2, 37, 16, 16, 40, "c2p,p2c", (37, 0, 1)),  # a batch row with no real key, one with one
    (1, 2, 33, 16, 16, 40, "", None),  # no position term: plain attention, scale 1/sqrt(D)
]


def _case_id(c):
    B, H, S, D, pb, mr, terms, lengths = c
    return f"B{B}H{H}S{S}D{D}-pb{pb}-mr{mr}-{terms or 'none'}" + ("-pad" if lengths else "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_oracle(backend, device, dtype, case):
    B, H, S, D, pb, mr, terms, lengths = case
    if S == 300 and dtype != torch.float32 and device == "cpu":
        pytest.skip("S = 300 runs in float32 on the interpreter (time)")
    inputs = make_inputs(B, H, S, D, pb, mr, terms, lengths, gen=torch.Generator().manual_seed(S + D))
    grad = tuple(n for n in ("query", "key", "value", "pos_key", "pos_query") if n in inputs)
    rows = check_case(fn_for(backend, pb, mr), ref_for(pb, mr), inputs, dtype=dtype, device=device, grad=grad)
    assert [q for q, _ in rows] == ["out"] + [f"d{n}" for n in grad]
    assert_within(rows, dtype)


def test_padded_rows_and_empty_rows(backend, device, dtype):
    """A batch row with no real key: zeros out, zero gradients, never NaN."""
    gen = torch.Generator().manual_seed(3)
    inputs = make_inputs(2, 2, 35, 16, 16, 40, lengths=(0, 35), gen=gen)
    ts = {n: t.to(device=device, dtype=dtype).requires_grad_(n != "key_padding_mask")
          if n != "key_padding_mask" else t.to(device) for n, t in inputs.items()}
    out = fn_for(backend, 16, 40)(**ts)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    grads = torch.autograd.grad(out, [ts[n] for n in ("query", "key", "value")], torch.randn_like(out))
    for g in grads:
        assert torch.isfinite(g).all() and torch.equal(g[0], torch.zeros_like(g[0]))


def test_hf_layout_inputs(backend, device):
    """q, k, v as Hugging Face produces them ((B, S, H, D) memory) and a non-contiguous pos_key."""
    gen = torch.Generator().manual_seed(5)
    inputs = make_inputs(2, 2, 45, 32, 16, 40, lengths=(45, 20), gen=gen)
    q, k, v = (inputs[n].transpose(1, 2).contiguous().transpose(1, 2).float().to(device)
               for n in ("query", "key", "value"))
    pk = inputs["pos_key"].transpose(0, 1).contiguous().transpose(0, 1).float().to(device)
    pq = inputs["pos_query"].float().to(device)
    kpm = inputs["key_padding_mask"].to(device)
    out = deberta_attention(q, k, v, pk, pq, key_padding_mask=kpm, position_buckets=16, max_relative_positions=40,
                            backend=backend)
    want = oracle(*(t.double().cpu() for t in (q, k, v, pk, pq)), kpm, 16, 40)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, want) <= BOUNDS[torch.float32]


def test_empty_batch(backend, device):
    q = torch.randn(0, 2, 5, 16, device=device, requires_grad=True)
    pk = torch.randn(2, 32, 16, device=device, requires_grad=True)
    out = deberta_attention(q, q, q, pk, pk, position_buckets=16, max_relative_positions=40, backend=backend)
    assert out.shape == (0, 2, 5, 16)
    gq, gp = torch.autograd.grad(out.sum(), (q, pk), allow_unused=True)
    assert gp is None or torch.equal(gp, torch.zeros_like(gp))


# ----------------------------------------------------------------------------------------------------
# Against transformers' DisentangledSelfAttention


def _hf_module(H, D, share_att_key, dtype):
    hf = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
    from transformers import DebertaV2Config

    config = DebertaV2Config(hidden_size=H * D, num_attention_heads=H, intermediate_size=4 * H * D,
                             relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=256,
                             max_relative_positions=512, share_att_key=share_att_key,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(11)
    module = hf.DisentangledSelfAttention(config).eval().to(dtype)
    for p in module.parameters():  # random weights, biases included (the default init zeroes nothing here)
        torch.nn.init.normal_(p, std=0.2)
    return module


def _split_heads(x, H):
    B, S, HD = x.shape
    return x.view(B, S, H, HD // H).transpose(1, 2)


@pytest.mark.parametrize("share_att_key", [True, False])
@pytest.mark.parametrize("S,lengths", [(1, (1,)), (67, (67, 41)), (300, (300, 277))])
def test_matches_transformers(backend, device, share_att_key, S, lengths):
    H, D, span = 2, 32, 256
    if S == 300 and backend == "triton" and not share_att_key and device == "cpu":
        pytest.skip("S = 300 on the interpreter: share_att_key=True covers it (time)")
    module = _hf_module(H, D, share_att_key, torch.float64)
    gen = torch.Generator().manual_seed(S)
    B = len(lengths)
    hidden = randn(B, S, H * D, gen=gen)
    rel_embeddings = randn(2 * span, H * D, gen=gen)
    mask = torch.stack([torch.arange(S) < n for n in lengths])
    # Hugging Face's encoder mask: (B, 1, S, S), query row and key column both real.
    att_mask = (mask[:, None, :, None] & mask[:, None, None, :]).to(torch.uint8)
    with torch.no_grad():
        want = module(hidden, att_mask, rel_embeddings=rel_embeddings)[0]  # (B, S, H * D), float64
        q = _split_heads(module.query_proj(hidden), H)
        k = _split_heads(module.key_proj(hidden), H)
        v = _split_heads(module.value_proj(hidden), H)
        pk_proj = module.key_proj if share_att_key else module.pos_key_proj
        pq_proj = module.query_proj if share_att_key else module.pos_query_proj
        pos_key = pk_proj(rel_embeddings).view(2 * span, H, D).transpose(0, 1)
        pos_query = pq_proj(rel_embeddings).view(2 * span, H, D).transpose(0, 1)
    args = [t.float().to(device) for t in (q, k, v, pos_key, pos_query)]
    out = deberta_attention(*args, key_padding_mask=mask.to(device), position_buckets=256,
                            max_relative_positions=512, backend=backend)
    got = out.transpose(1, 2).reshape(B, S, H * D)
    real = mask  # compare on the rows that are not padding
    assert rel_err(got.cpu()[real], want[real]) <= BOUNDS[torch.float32]
    if backend == "torch":  # float64 end to end: the same numbers as Hugging Face to float64 rounding
        out64 = deberta_attention(q, k, v, pos_key, pos_query, key_padding_mask=mask, backend="torch")
        assert rel_err(out64.transpose(1, 2).reshape(B, S, H * D)[real], want[real]) <= 1e-6


# ----------------------------------------------------------------------------------------------------
# Determinism, registered ops, torch.compile


def test_backward_deterministic_and_inputs_untouched(backend, device):
    """The backward has no atomics: two runs give bit-identical gradients of all five inputs."""
    gen = torch.Generator().manual_seed(47)
    inputs = make_inputs(2, 2, 45, 32, 16, 40, lengths=(45, 30), gen=gen)
    ts = [inputs[n].float().to(device).requires_grad_(True) for n in ("query", "key", "value", "pos_key", "pos_query")]
    kpm = inputs["key_padding_mask"].to(device)
    before = [t.detach().clone() for t in ts]

    def run():
        out = deberta_attention(*ts, key_padding_mask=kpm, position_buckets=16, max_relative_positions=40,
                                backend=backend)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        return out, torch.autograd.grad(out, ts, g)

    out1, first = run()
    out2, second = run()
    assert torch.equal(out1, out2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for t, c in zip(ts, before):
        assert torch.equal(t.detach(), c)


@pytest.mark.parametrize("terms", ["c2p,p2c", "p2c"])
def test_opcheck(device, terms):
    triton_or_skip()
    gen = torch.Generator().manual_seed(53)
    inputs = make_inputs(2, 2, 9, 16, 4, 6, terms, lengths=(9, 4), gen=gen)
    ts = {n: (t.float().to(device).requires_grad_(True) if t.is_floating_point() else t.to(device))
          for n, t in inputs.items()}
    recorder = RecordFusedOps("deberta")
    with recorder:
        out = deberta_attention(**ts, position_buckets=4, max_relative_positions=6, backend="triton")
        out.backward(torch.randn(out.shape, generator=gen).to(device))
    names = [f.name() for f, _, _ in recorder.calls]
    assert any("deberta_fwd" in n for n in names) and any("deberta_bwd" in n for n in names), names
    assert any("deberta_relative_index" in n for n in names), names
    for func, args, kwargs in recorder.calls:
        forward = "deberta_fwd" in func.name()
        args = detach_clone(args, requires_grad=forward)
        if forward:  # q, k, v, pos_key, pos_query are differentiable; the mask and index table are not
            args = tuple(a.detach() if isinstance(a, torch.Tensor) and i >= 5 else a for i, a in enumerate(args))
        torch.library.opcheck(func, args, detach_clone(kwargs))


def test_torch_compile_fullgraph_equals_eager(backend, device):
    if backend == "triton":
        ops._triton_ops()  # registered before tracing (fusedlm's import does it once exported)

    def block(q, k, v, pk, pq, kpm):
        out = deberta_attention(q, k, v, pk, pq, key_padding_mask=kpm, position_buckets=16,
                                max_relative_positions=40, backend=backend)
        return (out * 2).sum() + out.square().sum()

    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    # dynamic shapes: one graph serves both sequence lengths (nothing in the op specialises on S)
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend=compile_backend)
    for S, seed in ((23, 59), (41, 60)):
        inputs = make_inputs(2, 2, S, 16, 16, 40, lengths=(S, 11), gen=torch.Generator().manual_seed(seed))
        names = ("query", "key", "value", "pos_key", "pos_query")
        args = [inputs[n].float().to(device).requires_grad_(True) for n in names]
        args.append(inputs["key_padding_mask"].to(device))
        eager_out = block(*args)
        eager_grads = torch.autograd.grad(eager_out, args[:5])
        out = compiled(*args)
        grads = torch.autograd.grad(out, args[:5])
        torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Bad input: errors name the argument, with expected vs actual


def _args(B=1, H=2, S=5, D=16, span=256, dtype=torch.float32):
    q = torch.randn(B, H, S, D, dtype=dtype)
    return q, q.clone(), q.clone(), torch.randn(H, 2 * span, D, dtype=dtype), torch.randn(H, 2 * span, D, dtype=dtype)


class TestBadInput:
    def test_pos_key_width(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match=r"pos_key: expected shape \(2, 512, 16\).*2\*span.*got \(2, 510, 16\)"):
            deberta_attention(q, k, v, pk[:, :510], pq, backend="torch")

    def test_pos_query_width_unbucketed(self):
        q, k, v, pk, pq = _args(span=20)
        with pytest.raises(ValueError, match=r"pos_query: expected shape \(2, 40, 16\).*max_relative_positions = 20"):
            deberta_attention(q, k, v, pk, pq[:, :30], position_buckets=0, max_relative_positions=20)

    def test_pos_width_for_default_buckets(self):
        q, k, v, pk, pq = _args(span=20)
        with pytest.raises(ValueError, match=r"pos_key: expected shape \(2, 512, 16\)"):
            deberta_attention(q, k, v, pk, pq)

    def test_pos_key_head_dim(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match=r"pos_key: expected shape \(2, 512, 16\).*got \(2, 512, 8\)"):
            deberta_attention(q, k, v, pk[..., :8], pq)

    def test_pos_query_heads(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match=r"pos_query: expected shape \(2, 512, 16\).*got \(1, 512, 16\)"):
            deberta_attention(q, k, v, pk, pq[:1])

    def test_pos_key_rank(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match="pos_key: expected a 3-D tensor"):
            deberta_attention(q, k, v, pk[0], pq)

    def test_pos_dtype(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(TypeError, match="pos_query: expected dtype torch.float32"):
            deberta_attention(q, k, v, pk, pq.half())

    def test_query_rank(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match="query: expected a 4-D tensor"):
            deberta_attention(q[0], k, v, pk, pq)

    def test_key_shape(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match=r"key: expected shape \(1, 2, 5, 16\)"):
            deberta_attention(q, k[..., :3, :], v, pk, pq)

    def test_value_head_dim(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match=r"value: expected shape \(1, 2, 5, 16\)"):
            deberta_attention(q, k, v[..., :8], pk, pq)

    def test_integer_dtype(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(TypeError, match="query: expected a floating dtype"):
            deberta_attention(q.long(), k, v, pk, pq)

    def test_mixed_dtypes(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(TypeError, match="value: expected dtype torch.float32"):
            deberta_attention(q, k, v.half(), pk, pq)

    def test_mixed_devices(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match="pos_query: expected a tensor on cpu"):
            deberta_attention(q, k, v, pk, pq.to("meta"))

    def test_key_padding_mask_not_bool(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(TypeError, match="key_padding_mask: expected a bool tensor"):
            deberta_attention(q, k, v, pk, pq, key_padding_mask=torch.ones(1, 5))

    def test_key_padding_mask_shape(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(1, 5\)"):
            deberta_attention(q, k, v, pk, pq, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))

    def test_position_buckets_not_int(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(TypeError, match="position_buckets: expected a Python int"):
            deberta_attention(q, k, v, pk, pq, position_buckets=256.0)

    def test_position_buckets_one(self):
        q, k, v, pk, pq = _args(span=1)
        with pytest.raises(ValueError, match="position_buckets: expected <= 0"):
            deberta_attention(q, k, v, pk, pq, position_buckets=1)

    def test_max_relative_positions_too_small(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match="max_relative_positions: expected > position_buckets // 2"):
            deberta_attention(q, k, v, pk, pq, max_relative_positions=129)
        with pytest.raises(ValueError, match="max_relative_positions: expected >= 1"):
            deberta_attention(q, k, v, pk, pq, position_buckets=0, max_relative_positions=0)

    @pytest.mark.parametrize("p", [-0.1, 1.0])
    def test_dropout_out_of_range(self, p):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match="dropout_p: expected a probability"):
            deberta_attention(q, k, v, pk, pq, dropout_p=p)

    def test_triton_cannot_take_float64(self):
        triton_or_skip()
        q, k, v, pk, pq = _args(dtype=torch.float64)
        with pytest.raises(ValueError, match="backend 'triton' cannot serve this call.*float64"):
            deberta_attention(q, k, v, pk, pq, backend="triton")

    def test_triton_head_dim_range(self):
        triton_or_skip()
        q, k, v, pk, pq = _args(D=8)
        with pytest.raises(ValueError, match="head dims 16..256, got D=8"):
            deberta_attention(q, k, v, pk, pq, backend="triton")

    def test_cuda_backend_without_extension(self):
        q, k, v, pk, pq = _args()
        with pytest.raises(ValueError, match="backend 'cuda' cannot serve this call"):
            deberta_attention(q, k, v, pk, pq, backend="cuda")
