"""swiglu, every backend, forward and both gradients, against a float64 oracle written here."""
import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.verify import BOUNDS, check_case


def oracle(gate, up):
    return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("shape", [(1,), (3, 1), (4, 123), (2, 5, 771), (1, 4100)])
def test_swiglu(backend, device, dtype, shape):
    inputs = dict(gate=torch.randn(shape, dtype=torch.float64) * 3, up=torch.randn(shape, dtype=torch.float64))
    rows = check_case(lambda gate, up: fusedlm.swiglu(gate, up, backend=backend), oracle, inputs,
                      dtype=dtype, device=device, grad=("gate", "up"))
    bad = [(q, e) for q, e in rows if not e <= BOUNDS[dtype]]
    assert not bad, bad


def test_halves_of_a_fused_projection(backend, device):
    """gate and up as the two halves of one gate_up output: strided rows, no copy needed."""
    gate_up = torch.randn(6, 2 * 130, device=device, requires_grad=True)
    gate, up = gate_up.chunk(2, dim=-1)
    y = fusedlm.swiglu(gate, up, backend=backend)
    g64, u64 = gate.detach().double(), up.detach().double()
    torch.testing.assert_close(y.double(), oracle(g64, u64), rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, gate_up, dy)
    gu64 = gate_up.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(oracle(*gu64.chunk(2, -1)), gu64, dy.double())
    torch.testing.assert_close(grad.double(), want, rtol=1e-6, atol=1e-6)


def test_transposed_inputs(backend, device):
    gate = torch.randn(50, 7, device=device).t()
    up = torch.randn(50, 7, device=device).t()
    torch.testing.assert_close(fusedlm.swiglu(gate, up, backend=backend), F.silu(gate) * up)


def test_empty(backend, device):
    gate = torch.randn(0, 16, device=device, requires_grad=True)
    y = fusedlm.swiglu(gate, torch.randn(0, 16, device=device), backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert gate.grad.shape == (0, 16)


def test_large_gate_saturates_without_nan(backend, device):
    gate = torch.tensor([[-1e4, -80.0, 0.0, 80.0, 1e4]], device=device, dtype=torch.float16)
    up = torch.ones_like(gate)
    y = fusedlm.swiglu(gate, up, backend=backend)
    torch.testing.assert_close(y.float(), F.silu(gate.float()).half().float())


def test_opcheck(device):
    if fusedlm._backend.why_unavailable("triton") is not None:
        pytest.skip("triton unavailable")
    g = torch.randn(3, 40, device=device, requires_grad=True)
    u = torch.randn(3, 40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedlm.swiglu_fwd.default, (g, u))
    torch.library.opcheck(torch.ops.fusedlm.swiglu_bwd.default, (torch.randn(3, 40, device=device), g.detach(),
                                                                 u.detach()))


def test_torch_compile_fullgraph_equals_eager(backend, device):
    def mlp(g, u):
        return fusedlm.swiglu(g, u, backend=backend).square().sum()

    compiled = torch.compile(mlp, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    g = torch.randn(8, 64, device=device, requires_grad=True)
    u = torch.randn(8, 64, device=device, requires_grad=True)
    out, eager = compiled(g, u), mlp(g, u)
    torch.testing.assert_close(out, eager)
    for a, b in zip(torch.autograd.grad(out, [g, u]), torch.autograd.grad(eager, [g, u])):
        torch.testing.assert_close(a, b)


class TestBadInput:
    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"up: expected shape \(2, 8\).*got \(2, 9\)"):
            fusedlm.swiglu(torch.randn(2, 8), torch.randn(2, 9))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="up: expected dtype torch.float32"):
            fusedlm.swiglu(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float16))

    def test_integer(self):
        with pytest.raises(TypeError, match="gate: expected a floating dtype"):
            fusedlm.swiglu(torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64))

    def test_scalar(self):
        with pytest.raises(ValueError, match="gate: expected at least 1 dimension"):
            fusedlm.swiglu(torch.tensor(1.0), torch.tensor(1.0))

    def test_devices(self):
        with pytest.raises(ValueError, match="up: expected a tensor on cpu"):
            fusedlm.swiglu(torch.randn(2), torch.randn(2, device="meta"))
