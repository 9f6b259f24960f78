"""rms_norm and layer_norm, every backend, forward and every gradient, against float64 oracles.

The oracles are written here from the textbook formulas (torch.nn.functional in float64), not taken
from fusedlm.reference, which is itself the torch backend under test.
"""
import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.verify import check_case
from helpers import assert_within, triton_or_skip


def rms_oracle(x, weight=None, eps=1e-6, offset=0.0, residual=None):
    s = x if residual is None else x + residual
    w = None if weight is None else weight + offset
    y = F.rms_norm(s, (s.shape[-1],), w, eps)
    return y if residual is None else (y, s)


def ln_oracle(x, weight=None, bias=None, eps=1e-5, residual=None):
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, s)


HIDDEN = [1, 123, 771, 4100]


@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("affine", ["weight", "none", "gemma"])
def test_rms_norm(backend, device, dtype, n, affine):
    x = torch.randn(3, n, dtype=torch.float64) * 2 + 0.5
    inputs = dict(x=x)
    grad = ["x"]
    offset = 0.0
    # One feature: y = x / sqrt(x^2 + eps) ~ sign(x) and dx ~ eps * rstd^3 is pure cancellation
    # (ill-conditioned in any float32 code) unless eps is comparable to x^2.
    eps = 1.0 if n == 1 else 1e-6
    if affine != "none":
        inputs["weight"] = torch.randn(n, dtype=torch.float64)
        grad.append("weight")
    if affine == "gemma":
        offset = 1.0

    def fn(x, weight=None):
        return fusedlm.rms_norm(x, weight, eps, offset=offset, backend=backend)

    def ref(x, weight=None):
        return rms_oracle(x, weight, eps, offset)

    assert_within(check_case(fn, ref, inputs, dtype=dtype, device=device, grad=grad), dtype)


@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
def test_layer_norm(backend, device, dtype, n, affine):
    inputs = dict(x=torch.randn(3, n, dtype=torch.float64) * 2 - 1)
    if affine != "none":
        inputs["weight"] = torch.randn(n, dtype=torch.float64)
    if affine == "weight_bias":
        inputs["bias"] = torch.randn(n, dtype=torch.float64)
    # One feature: xhat = 0, so y = bias and dx = dweight = 0 exactly (checked at the end).
    grad = list(inputs) if n > 1 else [k for k in inputs if k == "bias"]

    def fn(x, weight=None, bias=None):
        return fusedlm.layer_norm(x, weight, bias, 1e-5, backend=backend)

    def ref(x, weight=None, bias=None):
        return ln_oracle(x, weight, bias, 1e-5)

    assert_within(check_case(fn, ref, inputs, dtype=dtype, device=device, grad=grad), dtype)
    if n == 1:
        x = inputs["x"].to(device=device, dtype=dtype).requires_grad_(True)
        w = inputs.get("weight")
        (dx,) = torch.autograd.grad(fn(x, None if w is None else w.to(device, dtype)).sum(), [x])
        assert torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("n", [123, 4100])
def test_residual_returns_normed_and_sum(backend, device, dtype, norm, n):
    inputs = dict(x=torch.randn(2, 3, n, dtype=torch.float64), residual=torch.randn(2, 3, n, dtype=torch.float64),
                  weight=torch.randn(n, dtype=torch.float64))
    if norm == "rms":
        def fn(x, residual, weight):
            return fusedlm.rms_norm(x, weight, 1e-6, residual=residual, backend=backend)

        def ref(x, residual, weight):
            return rms_oracle(x, weight, 1e-6, residual=residual)
    else:
        inputs["bias"] = torch.randn(n, dtype=torch.float64)

        def fn(x, residual, weight, bias):
            return fusedlm.layer_norm(x, weight, bias, 1e-5, residual=residual, backend=backend)

        def ref(x, residual, weight, bias):
            return ln_oracle(x, weight, bias, 1e-5, residual=residual)

    rows = check_case(fn, ref, inputs, dtype=dtype, device=device, grad=list(inputs))
    assert [q for q, _ in rows][:2] == ["out0", "out1"]  # (normed, sum) both compared
    assert_within(rows, dtype)


def test_residual_sum_is_exactly_x_plus_residual(backend, device):
    x = torch.randn(4, 100, device=device, dtype=torch.float16)
    r = torch.randn(4, 100, device=device, dtype=torch.float16)
    _, s = fusedlm.rms_norm(x, torch.ones(100, device=device), residual=r, backend=backend)
    assert s.dtype == torch.float16
    assert torch.equal(s, x + r)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_one_row_of_65536(backend, device, norm):
    n = 65536
    inputs = dict(x=torch.randn(1, n, dtype=torch.float64), weight=torch.randn(n, dtype=torch.float64))
    if norm == "rms":
        def fn(x, weight):
            return fusedlm.rms_norm(x, weight, backend=backend)
        ref = rms_oracle
    else:
        def fn(x, weight):
            return fusedlm.layer_norm(x, weight, backend=backend)
        ref = ln_oracle
    rows = check_case(fn, ref, inputs, dtype=torch.float32, device=device, grad=["x", "weight"])
    assert_within(rows, torch.float32)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_looped_variant_over_many_rows(device, norm, monkeypatch):
    """Rows wider than the one-pass limit loop over chunks; force that path on small rows, many per program."""
    if fusedlm._backend.why_unavailable("triton") is not None:
        pytest.skip("triton unavailable")
    from fusedlm.kernels import norm as K

    monkeypatch.setattr(K, "MAX_ONE_PASS", 64)
    monkeypatch.setattr(K, "MAX_ONE_PASS_BWD", 64)
    monkeypatch.setattr(K, "LOOP_BLOCK", 64)
    n = 300  # 5 chunks, the last one partial
    inputs = dict(x=torch.randn(11, n, dtype=torch.float64), residual=torch.randn(11, n, dtype=torch.float64),
                  weight=torch.randn(n, dtype=torch.float64), bias=torch.randn(n, dtype=torch.float64))
    if norm == "rms":
        def fn(x, residual, weight, bias):
            return fusedlm.rms_norm(x, weight, residual=residual, backend="triton")

        def ref(x, residual, weight, bias):
            return rms_oracle(x, weight, residual=residual)
        grad = ["x", "residual", "weight"]
    else:
        def fn(x, residual, weight, bias):
            return fusedlm.layer_norm(x, weight, bias, residual=residual, backend="triton")

        def ref(x, residual, weight, bias):
            return ln_oracle(x, weight, bias, residual=residual)
        grad = ["x", "residual", "weight", "bias"]
    assert_within(check_case(fn, ref, inputs, dtype=torch.float32, device=device, grad=grad), torch.float32)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_non_contiguous_inputs(backend, device, norm):
    base = torch.randn(6, 2 * 129, device=device)
    x = base[:, ::2]  # unit stride broken along the hidden dim
    xt = torch.randn(129, 6, device=device).t()  # transposed
    res = torch.randn(12, 129, device=device)[::2]  # row stride 2 * 129
    w = torch.randn(2 * 129, device=device)[::2]
    fn = fusedlm.rms_norm if norm == "rms" else fusedlm.layer_norm
    oracle = rms_oracle if norm == "rms" else ln_oracle
    for inp in (x, xt):
        inp = inp.detach().requires_grad_(True)
        y, s = fn(inp, w, residual=res, backend=backend)
        y64, s64 = oracle(inp.double(), w.double(), residual=res.double())
        assert (y.double() - y64).norm() / y64.norm() < 1e-5
        assert torch.equal(s, inp + res)
        (g,) = torch.autograd.grad(y.sum(), inp)
        (g64,) = torch.autograd.grad(y64.sum(), inp)
        assert (g.double() - g64).norm() / g64.norm() < 1e-5


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_empty_batch(backend, device, norm):
    x = torch.randn(0, 5, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    fn = fusedlm.rms_norm if norm == "rms" else fusedlm.layer_norm
    y = fn(x, w, backend=backend)
    assert y.shape == (0, 5, 64)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_nan_stays_in_its_row(backend, device, norm):
    x = torch.randn(4, 37, device=device)
    x[2, 5] = float("nan")
    fn = fusedlm.rms_norm if norm == "rms" else fusedlm.layer_norm
    y = fn(x, torch.randn(37, device=device), backend=backend)
    assert torch.isnan(y[2]).all()
    others = torch.cat([y[:2], y[3:]])
    assert torch.isfinite(others).all()
    x_clean = torch.cat([x[:2], x[3:]])
    y_clean = fn(x_clean, torch.ones(37, device=device), backend=backend)
    assert torch.isfinite(y_clean).all()


def test_backward_twice_and_inputs_untouched(backend, device):
    x = torch.randn(5, 80, device=device, requires_grad=True)
    r = torch.randn(5, 80, device=device, requires_grad=True)
    w = torch.randn(80, device=device, requires_grad=True)
    y, s = fusedlm.rms_norm(x, w, residual=r, backend=backend)
    dy = torch.randn_like(y)
    dy_copy, x_copy = dy.clone(), x.detach().clone()
    first = torch.autograd.grad((y * dy).sum() + s.sum(), [x, r, w], retain_graph=True)
    second = torch.autograd.grad((y * dy).sum() + s.sum(), [x, r, w])
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.equal(first[0], first[1])  # x and residual get the same gradient
    assert torch.equal(dy, dy_copy) and torch.equal(x.detach(), x_copy)


def test_matches_transformers_llama_rmsnorm(backend, device):
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    hf = modeling.LlamaRMSNorm(96, eps=1e-6).to(device)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(2, 7, 96, device=device)
    ours = fusedlm.rms_norm(x, hf.weight, 1e-6, backend=backend)
    torch.testing.assert_close(ours, hf(x), rtol=1e-5, atol=1e-5)


def test_weight_gradient_in_weight_dtype(backend, device):
    x = torch.randn(4, 64, device=device, dtype=torch.float16)
    w = torch.randn(64, device=device, dtype=torch.float32, requires_grad=True)
    y = fusedlm.rms_norm(x, w, backend=backend)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("is_rms", [True, False])
def test_opcheck(device, residual, is_rms):
    triton_or_skip()
    x = torch.randn(3, 40, device=device, requires_grad=True)
    r = torch.randn(3, 40, device=device, requires_grad=True) if residual else None
    w = torch.randn(40, device=device, requires_grad=True)
    b = None if is_rms else torch.randn(40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedlm.norm_fwd.default, (x, r, w, b, 1e-5, 0.5 if is_rms else 0.0, is_rms))
    _, s, mean, rstd = (t.detach() for t in torch.ops.fusedlm.norm_fwd(x, r, w, b, 1e-5, 0.0, is_rms))
    src = s if residual else x
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fusedlm.norm_bwd.default,
                          (dy, src.detach(), w.detach(), dy if residual else None, mean, rstd, 0.0, is_rms,
                           True, not is_rms))


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_torch_compile_fullgraph_equals_eager(backend, device, norm):
    def block(x, r, w, b):
        if norm == "rms":
            y, s = fusedlm.rms_norm(x, w, residual=r, backend=backend)
        else:
            y, s = fusedlm.layer_norm(x, w, b, residual=r, backend=backend)
        return (y * 2).sum() + s.square().sum()

    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    args = [torch.randn(4, 96, device=device, requires_grad=True), torch.randn(4, 96, device=device),
            torch.randn(96, device=device, requires_grad=True), torch.randn(96, device=device)]
    eager_out = block(*args)
    eager_grads = torch.autograd.grad(eager_out, [args[0], args[2]])
    out = compiled(*args)
    grads = torch.autograd.grad(out, [args[0], args[2]])
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


class TestBadInput:
    def test_weight_shape(self):
        with pytest.raises(ValueError, match=r"weight: expected shape \(8,\).*got \(9,\)"):
            fusedlm.rms_norm(torch.randn(2, 8), torch.randn(9))

    def test_bias_rank(self):
        with pytest.raises(ValueError, match="bias: expected a 1-D tensor"):
            fusedlm.layer_norm(torch.randn(2, 8), torch.randn(8), torch.randn(1, 8))

    def test_residual_shape(self):
        with pytest.raises(ValueError, match=r"residual: expected shape \(2, 8\)"):
            fusedlm.rms_norm(torch.randn(2, 8), residual=torch.randn(3, 8))

    def test_residual_dtype(self):
        with pytest.raises(TypeError, match="residual: expected dtype torch.float32"):
            fusedlm.layer_norm(torch.randn(2, 8), residual=torch.randn(2, 8, dtype=torch.float16))

    def test_integer_input(self):
        with pytest.raises(TypeError, match="x: expected a floating dtype"):
            fusedlm.rms_norm(torch.ones(2, 8, dtype=torch.int32))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
            fusedlm.layer_norm([[1.0, 2.0]])

    def test_scalar_input(self):
        with pytest.raises(ValueError, match="x: expected at least 1 dimension"):
            fusedlm.rms_norm(torch.tensor(1.0))

    def test_mixed_devices(self):
        with pytest.raises(ValueError, match="weight: expected a tensor on cpu"):
            fusedlm.rms_norm(torch.randn(2, 8), torch.randn(8, device="meta"))

    def test_offset_without_weight(self):
        with pytest.raises(ValueError, match="offset"):
            fusedlm.rms_norm(torch.randn(2, 8), None, offset=1.0)

    def test_negative_eps(self):
        with pytest.raises(ValueError, match="eps: expected a number >= 0"):
            fusedlm.layer_norm(torch.randn(2, 8), eps=-1.0)

    def test_cuda_backend_without_extension(self):
        with pytest.raises(ValueError, match="rms_norm: backend 'cuda' cannot serve"):
            fusedlm.rms_norm(torch.randn(2, 8), backend="cuda")

    def test_triton_cannot_take_float64(self):
        triton_or_skip()
        with pytest.raises(ValueError, match="float64"):
            fusedlm.rms_norm(torch.randn(2, 8, dtype=torch.float64), backend="triton")
