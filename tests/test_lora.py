"""lora_linear, every backend, forward and every gradient, against a float64 oracle written here.

The oracle is the textbook formula in plain float64 matmuls. Errors are norm-wise relative errors held
to fusedlm.verify.BOUNDS (a GEMM that accumulates over K in float32 and rounds once has the error
profile of the normalisation ops those bounds were set for: ~u/sqrt(3) per output), and, in the
half-precision test below, also to twice PyTorch's own error in the same dtype.
"""
import pytest
import torch

import fusedlm
from fusedlm.verify import check_case, rel_err
from helpers import assert_within, triton_or_skip


def oracle(x, weight, bias, lora_a, lora_b, scaling, keep=None, p=0.0):
    xd = x if keep is None else x * keep / (1.0 - p)
    y = x @ weight.T + scaling * (xd @ lora_a.T) @ lora_b.T
    return y if bias is None else y + bias


def make(lead, k, n, r, bias=True, gen=None):
    gen = gen or torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    return dict(x=rnd(*lead, k), weight=rnd(n, k) / k**0.5, bias=rnd(n) if bias else None,
                lora_a=rnd(r, k) / k**0.5, lora_b=rnd(n, r))


def _triton_or_skip():
    triton_or_skip()
    from fusedlm.ops import lora

    lora._triton_ops()  # registered at import by fusedlm; made sure of here for tests run alone


# (leading dims of x, in, out, r, base trainable): odd sizes, one token, a 3-D x, ranks 1 to 256
# (100 leaves a partial rank chunk, 256 walks four chunks of 64).
SHAPES = [((1,), 40, 96, 1, False), ((67,), 130, 40, 8, True), ((67,), 96, 130, 16, False),
          ((2, 9), 130, 96, 64, True), ((5,), 40, 130, 100, False), ((3,), 96, 40, 256, False)]


@pytest.mark.parametrize("lead,k,n,r,train_base", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear(backend, device, dtype, lead, k, n, r, train_base, bias):
    inputs = make(lead, k, n, r, bias)
    if not bias:
        del inputs["bias"]
    grad = ["x", "lora_a", "lora_b"] + (["weight"] + (["bias"] if bias else []) if train_base else [])

    def fn(x, weight, lora_a, lora_b, bias=None):
        return fusedlm.lora_linear(x, weight, bias, lora_a, lora_b, 0.75, backend=backend)

    def ref(x, weight, lora_a, lora_b, bias=None):
        return oracle(x, weight, bias, lora_a, lora_b, 0.75)

    rows = check_case(fn, ref, inputs, dtype=dtype, device=device, grad=grad)
    assert [q for q, _ in rows] == ["out"] + [f"d{g}" for g in grad]
    assert_within(rows, dtype)


def test_half_precision_error_earned_against_torch(backend, device):
    """float16: within twice the error of PyTorch's own float16 computation in PEFT's order of ops."""
    names = ["x", "weight", "bias", "lora_a", "lora_b"]
    inputs = {n: v.half().double() for n, v in make((67,), 130, 96, 16).items()}  # exact in float16
    dy = torch.randn(67, 96, dtype=torch.float16).double()

    def run(f, dt, dev):
        ts = [inputs[n].to(dev, dt).requires_grad_(True) for n in names]
        y = f(*ts)
        return [y] + list(torch.autograd.grad(y, ts, dy.to(dev, dt)))

    def peft_like(x, w, b, a, bb):
        return torch.nn.functional.linear(x, w, b) + (x @ a.T @ bb.T) * 0.75

    def ours(x, w, b, a, bb):
        return fusedlm.lora_linear(x, w, b, a, bb, 0.75, backend=backend)

    want = run(lambda *t: oracle(*t, 0.75), torch.float64, "cpu")
    got = run(ours, torch.float16, device)
    torch_half = run(peft_like, torch.float16, device)
    for name, g, t, w in zip(["out"] + ["d" + n for n in names], got, torch_half, want):
        e, et = rel_err(g, w), rel_err(t, w)
        assert e <= 2 * et + 1e-6, f"{name}: {e:.2e} > 2 x torch's float16 error {et:.2e}"


def test_matches_peft_lora_layer(backend, device):
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(96, 40)).to(device)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], lora_dropout=0.0))
    layer = pm.base_model.model[0]
    assert isinstance(layer, peft.tuners.lora.Linear)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # PEFT initialises B to zeros
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    x = torch.randn(2, 13, 96, device=device, requires_grad=True)
    dy = torch.randn(2, 13, 40, device=device)
    want = layer(x)
    want_grads = torch.autograd.grad(want, [x, a, b], dy)
    got = fusedlm.lora_linear(x, w, bias, a, b, layer.scaling["default"], backend=backend)
    got_grads = torch.autograd.grad(got, [x, a, b], dy)
    assert rel_err(got, want) < 1e-6
    for g, e in zip(got_grads, want_grads):
        assert rel_err(g, e) < 1e-6


def test_frozen_base_computes_no_weight_gradient(backend, device):
    d = {k: v.float().to(device) for k, v in make((7,), 40, 24, 4).items()}
    x = d["x"].requires_grad_(True)
    a, b = d["lora_a"].requires_grad_(True), d["lora_b"].requires_grad_(True)
    y = fusedlm.lora_linear(x, d["weight"], d["bias"], a, b, 2.0, backend=backend)
    y.sum().backward()
    assert d["weight"].grad is None and d["bias"].grad is None
    assert x.grad is not None and a.grad is not None and b.grad is not None


def test_bwd_op_skips_what_is_not_asked(device):
    _triton_or_skip()
    d = {k: v.float().to(device) for k, v in make((7,), 40, 24, 4).items()}
    x, w, a, b = d["x"], d["weight"], d["lora_a"], d["lora_b"]
    _, xa = torch.ops.fusedlm.lora_fwd(x, w, None, a, b, 2.0, None)
    dy = torch.randn(7, 24, device=device)
    outs = torch.ops.fusedlm.lora_bwd(dy, x, w, a, b, xa, None, 2.0, True, False, False, True, True)
    assert [t.numel() for t in outs] == [7 * 40, 0, 0, 4 * 40, 24 * 4]
    outs = torch.ops.fusedlm.lora_bwd(dy, x, w, a, b, xa, None, 2.0, False, True, True, False, False)
    assert [t.numel() for t in outs] == [0, 24 * 40, 24, 0, 0]


# --- dropout ---------------------------------------------------------------------------------------


def _identity_adapter(device, k=64, tokens=200, p=0.3):
    """W = 0, A = B = I, s = 1: y is exactly dropout(x), so the mask and its scaling can be read off."""
    x = torch.randn(tokens, k, device=device) + 3.0  # never zero
    w = torch.zeros(k, k, device=device)
    eye = torch.eye(k, device=device)
    return x, w, eye.clone(), eye.clone(), p


def test_dropout_statistics_and_scaling(backend, device):
    x, w, a, b, p = _identity_adapter(device)
    y = fusedlm.lora_linear(x, w, None, a, b, 1.0, dropout_p=p, backend=backend)
    kept = y != 0
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02, frac  # 12800 draws: 5 standard deviations
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=1e-6)


def test_dropout_backward_uses_the_forward_mask(backend, device):
    x, w, a, b, p = _identity_adapter(device)
    x.requires_grad_(True)
    y = fusedlm.lora_linear(x, w, None, a, b, 1.0, dropout_p=p, backend=backend)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    kept = y.detach() != 0
    torch.testing.assert_close(dx, torch.where(kept, dy / (1 - p), 0.0), rtol=1e-6, atol=1e-6)


def test_dropout_is_reproducible_and_documented(backend, device):
    """Same seed -> same result; the mask is torch.rand(x.shape) >= p from torch's generator."""
    inputs = {k: v.float().to(device) for k, v in make((2, 11), 40, 24, 8).items()}
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    p = 0.4

    def run(seed):
        torch.manual_seed(seed)
        y = fusedlm.lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"],
                                1.5, dropout_p=p, backend=backend)
        return [y] + list(torch.autograd.grad(y.square().sum(), [leaves[k] for k in ("x", "lora_a", "lora_b")]))

    first, again, other = run(7), run(7), run(8)
    for u, v in zip(first, again):
        assert torch.equal(u, v)
    assert not torch.equal(first[0], other[0])
    # The float64 oracle with the documented mask: forward and the gradients through the same mask.
    torch.manual_seed(7)
    keep = (torch.rand(inputs["x"].shape, device=device) >= p).cpu()
    hi = {k: v.detach().double().cpu().requires_grad_(True) for k, v in inputs.items()}
    want = oracle(hi["x"], hi["weight"], hi["bias"], hi["lora_a"], hi["lora_b"], 1.5, keep, p)
    wants = [want] + list(torch.autograd.grad(want.square().sum(), [hi[k] for k in ("x", "lora_a", "lora_b")]))
    for name, g, w in zip(["out", "dx", "dlora_a", "dlora_b"], first, wants):
        assert rel_err(g, w) < 1e-5, name


def test_dropout_same_mask_on_both_backends(device):
    _triton_or_skip()
    d = {k: v.float().to(device) for k, v in make((9,), 40, 24, 8).items()}
    outs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(3)
        outs.append(fusedlm.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.0,
                                        dropout_p=0.5, backend=backend))
    assert rel_err(outs[1], outs[0]) < 1e-5


def test_no_dropout_draws_no_random_numbers(backend, device):
    d = {k: v.float().to(device) for k, v in make((5,), 40, 24, 8).items()}
    def rng_state():
        return torch.cuda.get_rng_state() if device == "cuda" else torch.random.get_rng_state()

    state = rng_state()
    fusedlm.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.0, backend=backend)
    assert torch.equal(state, rng_state())
    fusedlm.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.0, dropout_p=0.1,
                        backend=backend)
    assert not torch.equal(state, rng_state())  # the check above can see a draw


# --- layouts, edge cases, autograd hygiene --------------------------------------------------------


def test_non_contiguous_operands(backend, device):
    x = torch.randn(130, 9, device=device).t()  # (9, 130) transposed
    w = torch.randn(130, 40, device=device).t()  # (40, 130) transposed view of the storage
    a = torch.randn(8, 2 * 130, device=device)[:, ::2]
    b = torch.randn(40, 8, device=device)
    bias = torch.randn(80, device=device)[::2]
    leaves = [t.requires_grad_(True) for t in (x, a, b)]
    y = fusedlm.lora_linear(x, w, bias, a, b, 0.5, backend=backend)
    want = oracle(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.5)
    assert rel_err(y, want) < 1e-5
    got = torch.autograd.grad(y.sum(), leaves)
    hi = [t.detach().double().requires_grad_(True) for t in leaves]
    exp = torch.autograd.grad(oracle(hi[0], w.double(), bias.double(), hi[1], hi[2], 0.5).sum(), hi)
    for g, e in zip(got, exp):
        assert rel_err(g, e) < 1e-5


def test_empty_batch(backend, device):
    x = torch.randn(0, 3, 40, device=device, requires_grad=True)
    a = torch.randn(4, 40, device=device, requires_grad=True)
    b = torch.randn(24, 4, device=device, requires_grad=True)
    y = fusedlm.lora_linear(x, torch.randn(24, 40, device=device), None, a, b, 1.0, backend=backend)
    assert y.shape == (0, 3, 24)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


def test_backward_twice_and_inputs_untouched(backend, device):
    d = {k: v.float().to(device).requires_grad_(True) for k, v in make((6,), 40, 24, 8).items()}
    y = fusedlm.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.0, backend=backend)
    dy = torch.randn_like(y)
    copies = {k: v.detach().clone() for k, v in d.items()}
    dy_copy = dy.clone()
    first = torch.autograd.grad(y, list(d.values()), dy, retain_graph=True)
    second = torch.autograd.grad(y, list(d.values()), dy)
    for u, v in zip(first, second):
        assert torch.equal(u, v)
    assert torch.equal(dy, dy_copy)
    for k, v in d.items():
        assert torch.equal(v.detach(), copies[k])


def test_1d_input(backend, device):
    d = {k: v.float().to(device) for k, v in make((), 40, 24, 4).items()}
    y = fusedlm.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.0, backend=backend)
    assert y.shape == (24,)
    assert rel_err(y, oracle(*(d[k].double() for k in ("x", "weight", "bias", "lora_a", "lora_b")), 1.0)) < 1e-5


@pytest.mark.parametrize("with_bias,with_keep", [(True, False), (False, True)])
def test_opcheck(device, with_bias, with_keep):
    _triton_or_skip()
    d = {k: v.float().to(device) for k, v in make((5,), 40, 24, 4).items()}
    x, w, a, b = (d[k].requires_grad_(True) for k in ("x", "weight", "lora_a", "lora_b"))
    bias = d["bias"].requires_grad_(True) if with_bias else None
    keep = torch.rand(5, 40, device=device) >= 0.5 if with_keep else None
    torch.library.opcheck(torch.ops.fusedlm.lora_fwd.default, (x, w, bias, a, b, 1.5, keep))
    _, xa = torch.ops.fusedlm.lora_fwd(x, w, bias, a, b, 1.5, keep)
    dy = torch.randn(5, 24, device=device)
    torch.library.opcheck(torch.ops.fusedlm.lora_bwd.default,
                          (dy, x.detach(), w.detach(), a.detach(), b.detach(), xa.detach(), keep, 1.5,
                           True, True, with_bias, True, True))


def test_torch_compile_fullgraph_equals_eager(backend, device):
    def block(x, w, bias, a, b):
        return (fusedlm.lora_linear(x, w, bias, a, b, 2.0, backend=backend) * 2).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    x = torch.randn(2, 5, 40, device=device, requires_grad=True)
    w, bias = torch.randn(24, 40, device=device), torch.randn(24, device=device)
    a = torch.randn(8, 40, device=device, requires_grad=True)
    b = torch.randn(24, 8, device=device, requires_grad=True)
    eager = block(x, w, bias, a, b)
    eager_grads = torch.autograd.grad(eager, [x, a, b])
    out = compiled(x, w, bias, a, b)
    grads = torch.autograd.grad(out, [x, a, b])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


class TestBadInput:
    def args(self, **over):
        d = dict(x=torch.randn(3, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_a=torch.randn(4, 8),
                 lora_b=torch.randn(6, 4), scaling=2.0)
        d.update(over)
        return d

    def call(self, dropout_p=0.0, backend=None, **over):
        return fusedlm.lora_linear(**self.args(**over), dropout_p=dropout_p, backend=backend)

    def test_rank_mismatch(self):
        msg = r"lora_b: expected shape \(6, 4\).*rank r = lora_a.shape\[0\].*got \(6, 5\)"
        with pytest.raises(ValueError, match=msg):
            self.call(lora_b=torch.randn(6, 5))

    def test_lora_a_in_features(self):
        with pytest.raises(ValueError, match=r"lora_a: expected shape \(4, 8\).*got \(4, 7\)"):
            self.call(lora_a=torch.randn(4, 7))

    def test_lora_b_out_features(self):
        with pytest.raises(ValueError, match=r"lora_b: expected shape \(6, 4\).*got \(5, 4\)"):
            self.call(lora_b=torch.randn(5, 4))

    def test_weight_in_features(self):
        with pytest.raises(ValueError, match=r"weight: expected shape \(6, 8\).*got \(6, 9\)"):
            self.call(weight=torch.randn(6, 9))

    def test_bias_shape(self):
        with pytest.raises(ValueError, match=r"bias: expected shape \(6,\).*got \(7,\)"):
            self.call(bias=torch.randn(7))

    def test_ranks(self):
        with pytest.raises(ValueError, match="lora_a: expected a 2-D tensor"):
            self.call(lora_a=torch.randn(4, 8, 1))
        with pytest.raises(ValueError, match="weight: expected a 2-D tensor"):
            self.call(weight=torch.randn(48))
        with pytest.raises(ValueError, match="x: expected at least 1 dimension"):
            self.call(x=torch.tensor(1.0))

    def test_dtypes(self):
        with pytest.raises(TypeError, match="weight: expected dtype torch.float32"):
            self.call(weight=torch.randn(6, 8, dtype=torch.float16))
        with pytest.raises(TypeError, match="lora_a: expected dtype torch.float32"):
            self.call(lora_a=torch.randn(4, 8, dtype=torch.float16))
        with pytest.raises(TypeError, match="lora_b: expected dtype torch.float32"):
            self.call(lora_b=torch.randn(6, 4, dtype=torch.float64))
        with pytest.raises(TypeError, match="x: expected a floating dtype"):
            self.call(x=torch.ones(3, 8, dtype=torch.int64))

    def test_devices(self):
        with pytest.raises(ValueError, match="lora_b: expected a tensor on cpu"):
            self.call(lora_b=torch.randn(6, 4, device="meta"))

    def test_scaling(self):
        with pytest.raises(TypeError, match="scaling: expected a number, got Tensor"):
            self.call(scaling=torch.tensor(2.0))
        with pytest.raises(TypeError, match="scaling: expected a number, got str"):
            self.call(scaling="2")

    def test_dropout_p(self):
        with pytest.raises(ValueError, match=r"dropout_p: expected a probability in \[0, 1\), got 1.0"):
            self.call(dropout_p=1.0)
        with pytest.raises(ValueError, match="dropout_p: expected a number >= 0"):
            self.call(dropout_p=-0.1)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="lora_a: expected a torch.Tensor, got list"):
            self.call(lora_a=[[1.0] * 8] * 4)

    def test_cuda_backend_without_extension(self):
        with pytest.raises(ValueError, match="lora_linear: backend 'cuda' cannot serve"):
            self.call(backend="cuda")

    def test_triton_cannot_take_float64(self):
        _triton_or_skip()
        d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in self.args().items()}
        with pytest.raises(ValueError, match="float64"):
            fusedlm.lora_linear(**d, backend="triton")
