"""apply_rotary_pos_emb, every backend, forward and every gradient, against a float64 oracle.

The oracle is written here from the textbook formula (Hugging Face's ``q * cos + rotate_half(q) * sin``,
its interleaved variant, partial rotary by slicing), not taken from fusedlm.reference, which is itself
the torch backend under test. cos and sin are random rather than true cosines and sines, so a kernel
that assumes the two halves of a row (or the two members of a pair) share one value is caught.
"""
import pytest
import torch

import fusedlm
from fusedlm.verify import check_case
from helpers import assert_within, triton_or_skip


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope_oracle(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = rotate_interleaved if interleaved else rotate_half
    r = cos.shape[-1]

    def embed(x):
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat((x_rot * cos + rot(x_rot) * sin, x_pass), dim=-1)

    return embed(q), embed(k)


def make_inputs(B, H, Hkv, S, D, R, cos_batch, unsqueeze_dim):
    """float64 q, k in the layout unsqueeze_dim asks for; cos, sin (S, R) when cos_batch is None."""
    qs, ks = ((B, H, S, D), (B, Hkv, S, D)) if unsqueeze_dim == 1 else ((B, S, H, D), (B, S, Hkv, D))
    cs = (S, R) if cos_batch is None else (cos_batch, S, R)
    return dict(q=torch.randn(qs, dtype=torch.float64), k=torch.randn(ks, dtype=torch.float64),
                cos=torch.randn(cs, dtype=torch.float64), sin=torch.randn(cs, dtype=torch.float64))


def rope_fn(backend, **kw):
    def fn(q, k, cos, sin):
        return fusedlm.apply_rotary_pos_emb(q, k, cos, sin, backend=backend, **kw)
    return fn


def oracle_fn(**kw):
    def ref(q, k, cos, sin):
        return rope_oracle(q, k, cos, sin, **kw)
    return ref


# (B, H, Hkv, S, D, R, cos batch (None: (S, R)), unsqueeze_dim)
CASES = [
    (2, 4, 2, 67, 80, 32, 2, 1),  # GQA, partial rotary, (B, S, R)
    (1, 3, 3, 1, 40, 40, None, 2),  # one token, full rotary, (S, R), (B, S, H, D)
    (2, 2, 1, 7, 96, 96, 1, 2),  # MQA, cos batch of 1 broadcast
    (3, 5, 1, 5, 80, 64, None, 1),  # odd head count, partial rotary, (S, R)
    (2, 2, 4, 3, 40, 2, 2, 1),  # more k heads than q heads, a single rotary pair
]


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}S{}D{}R{}c{}u{}".format(*c))
def test_rope_matches_oracle(backend, device, dtype, case, interleaved):
    B, H, Hkv, S, D, R, cb, ud = case
    inputs = make_inputs(B, H, Hkv, S, D, R, cb, ud)
    kw = dict(unsqueeze_dim=ud, interleaved=interleaved)
    rows = check_case(rope_fn(backend, **kw), oracle_fn(**kw), inputs, dtype=dtype, device=device,
                      grad=["q", "k"])
    assert [q for q, _ in rows] == ["out0", "out1", "dq", "dk"]
    assert_within(rows, dtype)


@pytest.mark.parametrize("cos_batch", [None, 1, 2], ids=["SR", "1SR", "BSR"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_cos_sin_gradients(backend, device, dtype, cos_batch, interleaved, unsqueeze_dim):
    inputs = make_inputs(2, 4, 2, 5, 40, 16, cos_batch, unsqueeze_dim)
    kw = dict(unsqueeze_dim=unsqueeze_dim, interleaved=interleaved)
    rows = check_case(rope_fn(backend, **kw), oracle_fn(**kw), inputs, dtype=dtype, device=device,
                      grad=["q", "k", "cos", "sin"])
    assert [q for q, _ in rows][-2:] == ["dcos", "dsin"]
    assert_within(rows, dtype)


def test_cos_sin_gradients_only(backend, device):
    """cos and sin require grad, q and k do not: the sums over heads and batch still come back."""
    inputs = make_inputs(3, 2, 1, 4, 24, 24, None, 1)
    rows = check_case(rope_fn(backend), oracle_fn(), inputs, dtype=torch.float32, device=device,
                      grad=["cos", "sin"])
    assert_within(rows, torch.float32)


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_tail_passes_through_bit_exactly(backend, device, dtype, interleaved):
    B, H, Hkv, S, D, R = 2, 3, 1, 6, 80, 32
    q = torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=True)
    cos, sin = torch.randn(2, S, R, device=device, dtype=dtype).unbind(0)
    qo, ko = fusedlm.apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved, backend=backend)
    assert qo.dtype == dtype and ko.dtype == dtype
    assert torch.equal(qo[..., R:], q[..., R:]) and torch.equal(ko[..., R:], k[..., R:])
    assert not torch.equal(qo[..., :R], q[..., :R])
    dqo, dko = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (dqo, dko))
    assert torch.equal(dq[..., R:], dqo[..., R:]) and torch.equal(dk[..., R:], dko[..., R:])


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_non_contiguous_inputs(backend, device, interleaved):
    """q a transposed view, k a slice with a non-unit feature stride, cos/sin strided slices."""
    B, H, Hkv, S, D, R = 2, 4, 2, 9, 40, 24
    inputs = make_inputs(B, H, Hkv, S, D, R, B, 1)

    def fn(q, k, cos, sin):
        q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D) memory
        k_nc = torch.stack((k, torch.randn_like(k)), dim=-1)[..., 0]  # feature stride 2
        cos_nc = torch.cat((cos, torch.randn_like(cos)), dim=-1)[..., :R]  # seq stride 2R
        sin_nc = torch.stack((torch.randn_like(sin), sin), dim=-1)[..., 1]  # feature stride 2
        assert not any(t.is_contiguous() for t in (q_nc, k_nc, cos_nc, sin_nc))
        copies = [t.detach().clone() for t in (q_nc, k_nc, cos_nc, sin_nc)]
        out = fusedlm.apply_rotary_pos_emb(q_nc, k_nc, cos_nc, sin_nc, interleaved=interleaved, backend=backend)
        for t, c in zip((q_nc, k_nc, cos_nc, sin_nc), copies):  # the caller's tensors are never written
            assert torch.equal(t, c)
        return out

    rows = check_case(fn, oracle_fn(interleaved=interleaved), inputs, dtype=torch.float32, device=device,
                      grad=["q", "k", "cos", "sin"])
    assert_within(rows, torch.float32)


def test_transposed_layout_keeps_its_memory_layout(backend, device):
    """(B, S, H, D) inputs (unsqueeze_dim=2) and the common (B, H, S, D) view of them both work unchanged."""
    B, H, S, D = 2, 4, 5, 32
    q = torch.randn(B, S, H, D, device=device)
    k = torch.randn(B, S, 2, D, device=device)
    cos, sin = torch.randn(2, B, S, D, device=device).unbind(0)
    qo2, ko2 = fusedlm.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2, backend=backend)
    qo1, ko1 = fusedlm.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, backend=backend)
    want_q, want_k = rope_oracle(q.double(), k.double(), cos.double(), sin.double(), unsqueeze_dim=2)
    for got, want in ((qo2, want_q), (ko2, want_k), (qo1.transpose(1, 2), want_q), (ko1.transpose(1, 2), want_k)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert qo2.shape == q.shape and qo1.shape == (B, H, S, D)


@pytest.mark.parametrize("empty", ["batch", "seq"])
def test_empty(backend, device, empty):
    B, S = (0, 5) if empty == "batch" else (2, 0)
    q = torch.randn(B, 4, S, 32, device=device, requires_grad=True)
    k = torch.randn(B, 2, S, 32, device=device, requires_grad=True)
    cos = torch.randn(S, 16, device=device, requires_grad=True)
    sin = torch.randn(S, 16, device=device, requires_grad=True)
    qo, ko = fusedlm.apply_rotary_pos_emb(q, k, cos, sin, backend=backend)
    assert qo.shape == q.shape and ko.shape == k.shape
    (qo.sum() + ko.sum()).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    assert torch.equal(cos.grad, torch.zeros_like(cos)) and torch.equal(sin.grad, torch.zeros_like(sin))


def test_backward_twice_and_inputs_untouched(backend, device):
    q = torch.randn(2, 4, 6, 48, device=device, requires_grad=True)
    k = torch.randn(2, 2, 6, 48, device=device, requires_grad=True)
    cos = torch.randn(6, 32, device=device, requires_grad=True)
    sin = torch.randn(6, 32, device=device, requires_grad=True)
    before = [t.detach().clone() for t in (q, k, cos, sin)]
    qo, ko = fusedlm.apply_rotary_pos_emb(q, k, cos, sin, backend=backend)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    g_before = (gq.clone(), gk.clone())
    first = torch.autograd.grad((qo, ko), (q, k, cos, sin), (gq, gk), retain_graph=True)
    second = torch.autograd.grad((qo, ko), (q, k, cos, sin), (gq, gk))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for t, c in zip((q, k, cos, sin), before):
        assert torch.equal(t.detach(), c)
    assert torch.equal(gq, g_before[0]) and torch.equal(gk, g_before[1])


def test_only_q_output_used(backend, device):
    """A gradient reaching only q_out: k gets zero gradient, q the transposed rotation of it."""
    q = torch.randn(1, 2, 3, 16, device=device, requires_grad=True)
    k = torch.randn(1, 2, 3, 16, device=device, requires_grad=True)
    cos, sin = torch.randn(2, 3, 16, device=device).unbind(0)
    qo, _ = fusedlm.apply_rotary_pos_emb(q, k, cos, sin, backend=backend)
    g = torch.randn_like(qo)
    dq, dk = torch.autograd.grad(qo, (q, k), g, allow_unused=True)
    assert dk is None or torch.equal(dk, torch.zeros_like(k))
    q64 = q.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(rope_oracle(q64, q64, cos.double(), sin.double())[0], q64, g.double())
    torch.testing.assert_close(dq.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_matches_transformers_llama(backend, device, unsqueeze_dim):
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = modeling.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128)
    rotary = modeling.LlamaRotaryEmbedding(config).to(device)
    B, S, H, Hkv, D = 2, 11, 4, 2, 64
    x = torch.randn(B, S, 256, device=device)
    position_ids = torch.tensor([list(range(S)), list(range(3, 3 + S))], device=device)
    cos, sin = rotary(x, position_ids)
    q = torch.randn(B, S, H, D, device=device)
    k = torch.randn(B, S, Hkv, D, device=device)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    want_q, want_k = modeling.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    got_q, got_k = fusedlm.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, backend=backend)
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)


def test_float64_runs_on_the_torch_backend(device):
    inputs = make_inputs(1, 2, 1, 3, 16, 8, None, 1)
    inputs = {n: t.to(device) for n, t in inputs.items()}
    got = fusedlm.apply_rotary_pos_emb(**inputs)  # auto: the kernels do not take float64
    want = rope_oracle(**inputs)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_negative_unsqueeze_dim(backend, device):
    inputs = {n: t.float().to(device) for n, t in make_inputs(2, 3, 1, 4, 16, 16, 2, 2).items()}
    got = fusedlm.apply_rotary_pos_emb(**inputs, unsqueeze_dim=-2, backend=backend)
    want = rope_oracle(**{n: t.double() for n, t in inputs.items()}, unsqueeze_dim=2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("transposed", [False, True], ids=["BHSD", "BSHD"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_opcheck(device, interleaved, transposed, backward):
    triton_or_skip()
    B, H, Hkv, S, D, R = 2, 2, 1, 3, 24, 16
    qs, ks = ((B, S, H, D), (B, S, Hkv, D)) if transposed else ((B, H, S, D), (B, Hkv, S, D))
    q = torch.randn(qs, device=device, requires_grad=True)
    k = torch.randn(ks, device=device, requires_grad=True)
    cos = torch.randn(B, S, R, device=device, requires_grad=backward)
    sin = torch.randn(S, R, device=device, requires_grad=backward)
    torch.library.opcheck(torch.ops.fusedlm.rope.default, (q, k, cos, sin, interleaved, transposed, backward))


def test_op_backward_flag_is_the_transpose(device):
    """<rope(x), y> == <x, rope_backward(y)>: the backward rotation is the adjoint of the forward one."""
    triton_or_skip()
    from fusedlm.ops.rope import _triton_ops

    op = _triton_ops()
    for interleaved in (False, True):
        x = torch.randn(2, 3, 5, 40, device=device)
        y = torch.randn(2, 3, 5, 40, device=device)
        kx, ky = torch.randn(2, 1, 5, 40, device=device), torch.randn(2, 1, 5, 40, device=device)
        cos, sin = torch.randn(2, 5, 24, device=device).unbind(0)
        fx = op(x, kx, cos, sin, interleaved, False, False)
        by = op(y, ky, cos, sin, interleaved, False, True)
        lhs = (fx[0] * y).sum().double() + (fx[1] * ky).sum().double()
        rhs = (x * by[0]).sum().double() + (kx * by[1]).sum().double()
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-4)


def rope_transposed_oracle(q, k, cos, sin, interleaved):
    """The backward rotation as a function of its input: x * cos - rot(x * sin) on the rotary part."""
    rot = rotate_interleaved if interleaved else rotate_half
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]

    def embed(x):
        x_rot, x_pass = x[..., :r], x[..., r:]
        return torch.cat((x_rot * cos - rot(x_rot * sin), x_pass), dim=-1)

    return embed(q), embed(k)


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
def test_op_backward_mode_and_its_gradients(device, interleaved):
    """The op with backward=True (what autograd runs, and differentiates for a double backward)."""
    triton_or_skip()
    from fusedlm.ops.rope import _triton_ops

    op = _triton_ops()

    def fn(q, k, cos, sin):
        return op(q, k, cos, sin, interleaved, False, True)

    def ref(q, k, cos, sin):
        return rope_transposed_oracle(q, k, cos, sin, interleaved)

    for cos_batch in (None, 2):
        inputs = make_inputs(2, 3, 1, 4, 40, 24, cos_batch, 1)
        rows = check_case(fn, ref, inputs, dtype=torch.float32, device=device, grad=["q", "k", "cos", "sin"])
        assert_within(rows, torch.float32)


def test_many_head_blocks(device, monkeypatch):
    """More heads than one tile holds: the kernel loops over blocks of heads, the last one partial."""
    triton_or_skip()
    from fusedlm.kernels import rope as K

    monkeypatch.setattr(K, "MAX_TILE", 32)  # width 16 (R/2 = 16 pairs) -> 2 heads per tile
    inputs = make_inputs(2, 5, 3, 3, 40, 32, 2, 2)
    for interleaved in (False, True):
        kw = dict(unsqueeze_dim=2, interleaved=interleaved)
        rows = check_case(rope_fn("triton", **kw), oracle_fn(**kw), inputs, dtype=torch.float32, device=device,
                          grad=["q", "k"])
        assert_within(rows, torch.float32)


def test_torch_compile_fullgraph_equals_eager(backend, device):
    def block(q, k, cos, sin):
        qo, ko = fusedlm.apply_rotary_pos_emb(q, k, cos, sin, interleaved=False, backend=backend)
        return (qo * 2).sum() + ko.square().sum()

    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    args = [torch.randn(2, 4, 5, 40, device=device, requires_grad=True),
            torch.randn(2, 2, 5, 40, device=device, requires_grad=True),
            torch.randn(5, 32, device=device, requires_grad=True), torch.randn(5, 32, device=device)]
    eager_out = block(*args)
    eager_grads = torch.autograd.grad(eager_out, args[:3])
    out = compiled(*args)
    grads = torch.autograd.grad(out, args[:3])
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def _args(q=(2, 4, 5, 32), k=(2, 2, 5, 32), cos=(5, 16), sin=None, dtype=torch.float32):
    return (torch.randn(q, dtype=dtype), torch.randn(k, dtype=dtype), torch.randn(cos), torch.randn(sin or cos))


class TestBadInput:
    def test_q_rank(self):
        with pytest.raises(ValueError, match="q: expected a 4-D tensor"):
            fusedlm.apply_rotary_pos_emb(*_args(q=(4, 5, 32)))

    def test_k_not_a_tensor(self):
        q, _, cos, sin = _args()
        with pytest.raises(TypeError, match="k: expected a torch.Tensor, got list"):
            fusedlm.apply_rotary_pos_emb(q, [1.0], cos, sin)

    def test_integer_cos(self):
        q, k, _, sin = _args()
        with pytest.raises(TypeError, match="cos: expected a floating dtype"):
            fusedlm.apply_rotary_pos_emb(q, k, torch.ones(5, 16, dtype=torch.int64), sin)

    def test_k_head_dim(self):
        with pytest.raises(ValueError, match=r"k: expected .*\(2, 5, 32\).*got \(2, 5, 40\)"):
            fusedlm.apply_rotary_pos_emb(*_args(k=(2, 2, 5, 40)))

    def test_k_seq_len_in_transposed_layout(self):
        q, k, cos, sin = _args(q=(2, 5, 4, 32), k=(2, 6, 4, 32))
        with pytest.raises(ValueError, match="k: expected batch, sequence length"):
            fusedlm.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)

    def test_qk_dtype(self):
        q, k, cos, sin = _args()
        with pytest.raises(TypeError, match="k: expected dtype torch.float32"):
            fusedlm.apply_rotary_pos_emb(q, k.half(), cos, sin)

    def test_cos_sin_shapes_differ(self):
        with pytest.raises(ValueError, match=r"sin: expected shape \(5, 16\)"):
            fusedlm.apply_rotary_pos_emb(*_args(sin=(5, 8)))

    def test_cos_rank(self):
        with pytest.raises(ValueError, match="cos: expected a 2-D .* or 3-D"):
            fusedlm.apply_rotary_pos_emb(*_args(cos=(2, 1, 5, 16)))

    def test_odd_rotary_dim(self):
        with pytest.raises(ValueError, match="cos: expected an even rotary dim.*got R = 15"):
            fusedlm.apply_rotary_pos_emb(*_args(cos=(5, 15)))

    def test_rotary_dim_over_head_dim(self):
        with pytest.raises(ValueError, match="cos: expected an even rotary dim.*D = 32.*got R = 34"):
            fusedlm.apply_rotary_pos_emb(*_args(cos=(5, 34)))

    def test_cos_seq_len(self):
        with pytest.raises(ValueError, match="cos: expected sequence length 5.*got 6"):
            fusedlm.apply_rotary_pos_emb(*_args(cos=(6, 16)))

    def test_cos_batch(self):
        with pytest.raises(ValueError, match="cos: expected batch size 2.*or 1, got 3"):
            fusedlm.apply_rotary_pos_emb(*_args(cos=(3, 5, 16)))

    @pytest.mark.parametrize("bad", [0, 3, -1, 1.0, "1"])
    def test_unsqueeze_dim(self, bad):
        with pytest.raises(ValueError, match="unsqueeze_dim: expected 1 .* or 2"):
            fusedlm.apply_rotary_pos_emb(*_args(), unsqueeze_dim=bad)

    def test_interleaved_not_bool(self):
        with pytest.raises(TypeError, match="interleaved: expected a bool"):
            fusedlm.apply_rotary_pos_emb(*_args(), interleaved="yes")

    def test_mixed_devices(self):
        q, k, cos, sin = _args()
        with pytest.raises(ValueError, match="sin: expected a tensor on cpu"):
            fusedlm.apply_rotary_pos_emb(q, k, cos, sin.to("meta"))

    def test_cuda_backend_without_extension(self):
        with pytest.raises(ValueError, match="apply_rotary_pos_emb: backend 'cuda' cannot serve"):
            fusedlm.apply_rotary_pos_emb(*_args(), backend="cuda")

    def test_triton_cannot_take_float64(self):
        triton_or_skip()
        with pytest.raises(ValueError, match="float64"):
            fusedlm.apply_rotary_pos_emb(*_args(dtype=torch.float64), backend="triton")
