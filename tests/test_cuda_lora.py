"""The cuda backend's fused LoRA linear (csrc/lora.cu: a tensor-core GEMM with the low-rank pair and the bias in
its epilogue, one rounding) against float64, through the CPU harness (FUSEDLM_CUDA_CPU=1) or, on a GPU machine
with fusedlm._C built, on CUDA tensors. test_lora's oracle and cases in float16 and bfloat16, the feature
counts multiples of 8 (the kernel's 16-byte copies; others are declined), ranks 1 to 256 (padded to 8 with
zeros inside), dropout on the LoRA branch, frozen and trainable bases, and the registered ops.
"""
import pytest
import torch

import fusedlm
import test_lora as TL
from fusedlm.verify import BOUNDS, rel_err
from helpers import RecordFusedOps, cuda_harness, detach_clone, dev, nan_filled_outputs  # noqa: F401  (fixtures)

HALF = [torch.float16, torch.bfloat16]
SHAPES = [((1,), 40, 96, 1, False), ((67,), 136, 40, 8, True), ((67,), 96, 136, 16, False),
          ((2, 9), 136, 96, 64, True), ((5,), 40, 136, 100, False), ((3,), 96, 40, 256, False)]


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("lead,k,n,r,train_base", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear(dev, dtype, lead, k, n, r, train_base, bias):
    TL.test_lora_linear("cuda", dev, dtype, lead, k, n, r, train_base, bias)


def test_half_precision_error_earned_against_torch(dev):
    """float16: within twice the error of PyTorch's own float16 computation in PEFT's order of ops."""
    names = ["x", "weight", "bias", "lora_a", "lora_b"]
    inputs = {n: v.half().double() for n, v in TL.make((67,), 136, 96, 16).items()}  # exact in float16
    dy = torch.randn(67, 96, dtype=torch.float16).double()

    def run(f, dt):
        ts = [inputs[n].to(dev if dt != torch.float64 else "cpu", dt).requires_grad_(True) for n in names]
        y = f(*ts)
        return [y] + list(torch.autograd.grad(y, ts, dy.to(ts[0].device, dt)))

    want = run(lambda *t: TL.oracle(*t, 0.75), torch.float64)
    got = run(lambda *t: fusedlm.lora_linear(*t, 0.75, backend="cuda"), torch.float16)
    torch_half = run(lambda x, w, b, a, bb: torch.nn.functional.linear(x, w, b) + (x @ a.T @ bb.T) * 0.75,
                     torch.float16)
    for name, g, t, w in zip(["out"] + ["d" + n for n in names], got, torch_half, want):
        e, et = rel_err(g, w), rel_err(t, w)
        assert e <= 2 * et + 1e-6, f"{name}: {e:.2e} > 2 x torch's float16 error {et:.2e}"


def _identity_adapter(dev, k=64, tokens=200, p=0.3):
    """W = 0, A = B = I, s = 1: y = dropout(x) (x exact in float16 and its / 0.7 rounded once)."""
    x = (torch.randn(tokens, k) + 3.0).half().to(dev)  # never zero
    w = torch.zeros(k, k, dtype=torch.float16, device=dev)
    eye = torch.eye(k, dtype=torch.float16, device=dev)
    return x, w, eye.clone(), eye.clone(), p


def test_dropout_mask_scaling_and_backward(dev):
    x, w, a, b, p = _identity_adapter(dev)
    x.requires_grad_(True)
    torch.manual_seed(11)
    y = fusedlm.lora_linear(x, w, None, a, b, 1.0, dropout_p=p, backend="cuda")
    torch.manual_seed(11)
    keep = torch.rand(x.shape, device=dev) >= p  # the documented mask
    assert torch.equal(y != 0, keep)
    torch.testing.assert_close(y[keep].float(), x[keep].float() / (1 - p), rtol=2e-3, atol=0)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx.float(), torch.where(keep, dy.float() / (1 - p), 0.0), rtol=2e-3, atol=1e-3)


def test_frozen_base_and_non_contiguous_operands(dev):
    """x a transposed view, W a transposed view of its storage, A strided: copied for the 16-byte reads;
    no dW / db for a frozen base."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(136, 9, generator=g).t().half().to(dev).requires_grad_(True)
    w = torch.randn(136, 40, generator=g).t().half().to(dev)
    a = torch.randn(8, 2 * 136, generator=g)[:, ::2].half().to(dev).requires_grad_(True)
    b = torch.randn(40, 8, generator=g).half().to(dev).requires_grad_(True)
    bias = torch.randn(80, generator=g)[::2].half().to(dev)
    y = fusedlm.lora_linear(x, w, bias, a, b, 0.5, backend="cuda")
    hi = [t.detach().double().cpu().requires_grad_(True) for t in (x, a, b)]
    want = TL.oracle(hi[0], w.double().cpu(), bias.double().cpu(), hi[1], hi[2], 0.5)
    assert rel_err(y, want) <= BOUNDS[torch.float16]
    got = torch.autograd.grad(y.float().sum(), [x, a, b])
    exp = torch.autograd.grad(want.sum(), hi)
    for gg, e in zip(got, exp):
        assert rel_err(gg, e) <= BOUNDS[torch.float16]
    assert w.grad is None and bias.grad is None


@pytest.mark.parametrize("lead,k,n,r,train_base", [s for s in TL.SHAPES if s[1] % 8 or s[2] % 8])
def test_feature_counts_not_multiples_of_8(dev, lead, k, n, r, train_base):
    """test_lora's own odd shapes (130 features): padded with zeros for the 16-byte copies, sliced back."""
    TL.test_lora_linear("cuda", dev, torch.float16, lead, k, n, r, train_base, True)


def test_float32_is_declined():
    d = {k: v.float() for k, v in TL.make((3,), 40, 24, 4).items()}
    with pytest.raises(ValueError, match="lora_linear: backend 'cuda' cannot serve.*float16 or bfloat16"):
        fusedlm.lora_linear(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], 1.0, backend="cuda")


@pytest.mark.parametrize("with_bias,with_keep", [(True, False), (False, True)])
def test_opcheck(dev, with_bias, with_keep):
    d = {k: v.half().to(dev) for k, v in TL.make((5,), 40, 24, 4).items()}
    x, w, a, b = (d[k].requires_grad_(True) for k in ("x", "weight", "lora_a", "lora_b"))
    bias = d["bias"].requires_grad_(True) if with_bias else None
    recorder = RecordFusedOps("lora", ("fusedlm", "fusedlm_C"))
    with recorder:
        if with_keep:
            torch.manual_seed(0)
        y = fusedlm.lora_linear(x, w, bias, a, b, 1.5, dropout_p=0.5 if with_keep else 0.0, backend="cuda")
        y.backward(torch.randn_like(y))
    names = [f.name() for f, _, _ in recorder.calls]
    assert {"fusedlm::lora_fwd_cuda", "fusedlm::lora_bwd_cuda"} <= set(names), names
    for func, args, kwargs in recorder.calls:
        forward = func.name() == "fusedlm::lora_fwd_cuda"
        args = detach_clone(args, requires_grad=forward)
        if forward:  # keep (the last argument) is not differentiable
            args = args[:-1] + (None if args[-1] is None else args[-1].detach(),)
        torch.library.opcheck(func, args, detach_clone(kwargs))
    # the kernel op itself, both uses (the forward's and dx's operand layouts), rank 4 padded to 8 inside
    keep = torch.rand(5, 40, device=dev) >= 0.5 if with_keep else None
    xa, dyb = torch.randn(5, 4).half().to(dev), torch.randn(5, 4).half().to(dev)
    torch.library.opcheck(torch.ops.fusedlm_C.lora_gemm.default,
                          (x.detach(), w.detach(), xa, b.detach(), None if bias is None else bias.detach(), None, 1.5,
                           False))
    torch.library.opcheck(torch.ops.fusedlm_C.lora_gemm.default,
                          (torch.randn(5, 24).half().to(dev), w.detach(), dyb, a.detach(), None, keep, 1.5, True))


def test_torch_compile_fullgraph_equals_eager(dev):
    def block(x, w, bias, a, b):
        return (fusedlm.lora_linear(x, w, bias, a, b, 2.0, backend="cuda").float() * 2).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="inductor" if dev == "cuda" else "aot_eager")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 40, generator=g).half().to(dev).requires_grad_(True)
    w, bias = torch.randn(24, 40, generator=g).half().to(dev), torch.randn(24, generator=g).half().to(dev)
    a = torch.randn(8, 40, generator=g).half().to(dev).requires_grad_(True)
    b = torch.randn(24, 8, generator=g).half().to(dev).requires_grad_(True)
    eager = block(x, w, bias, a, b)
    eager_grads = torch.autograd.grad(eager, [x, a, b])
    out = compiled(x, w, bias, a, b)
    grads = torch.autograd.grad(out, [x, a, b])
    assert torch.equal(out, eager)
    assert all(torch.equal(u, v) for u, v in zip(grads, eager_grads))
