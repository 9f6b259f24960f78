"""The "cuda" backend (csrc/ kernels through fusedlm_C ops) against float64, forward and backward.

Without a GPU the kernels' own source runs on CPU through the SIMT harness (FUSEDLM_CUDA_CPU=1, set
here for this module; the harness is compiled on first use and cached): every case below runs, none
skips. On a GPU machine with fusedlm._C built the same cases run the device kernels on CUDA tensors.
Outputs start as NaN (deterministic mode fills uninitialised memory), so an element a kernel fails to
write shows as an infinite error. Sizes are odd on purpose: they pick the scalar (VEC = 1) and the
16-byte vector paths, every register-held variant and the looped one for wide rows.
"""
import pytest
import torch

import fusedlm
from fusedlm import _backend, reference as R
from fusedlm.verify import check_case
from helpers import assert_within, cuda_harness, detach_clone, dev, nan_filled_outputs  # noqa: F401  (fixtures)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bfloat16 too: the harness computes it right


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def check(fn, ref, inputs, dtype, dev, grad):
    rows = check_case(fn, ref, inputs, dtype=dtype, device=dev, grad=grad)
    assert_within(rows, dtype)
    return rows


def test_outputs_start_as_nan(dev):
    """The poisoning the module relies on: aten::empty, which the binding layer's at::empty calls, gives NaN."""
    assert torch.ops.aten.empty.memory_format([4], device=dev).isnan().all()


# ---- RMSNorm / LayerNorm ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,n", [(op, n) for op in ("rms_norm", "layer_norm") for n in (1, 123, 771, 4096, 4100)
                                  if (op, n) != ("layer_norm", 1)])  # LayerNorm of one feature is its bias
def test_norm_with_residual(op, n, dtype, dev):
    rows = 3
    inputs = dict(x=randn(rows, n), residual=randn(rows, n), weight=randn(n))
    if op == "rms_norm":
        eps = 1.0 if n == 1 else 1e-6  # one feature: rstd = 1/|x| is ill-conditioned (see test_norm.py)
        fn = lambda x, residual, weight: fusedlm.rms_norm(x, weight, eps, offset=1.0, residual=residual,
                                                         backend="cuda")
        ref = lambda x, residual, weight: R.rms_norm_ref(x, weight, eps, 1.0, residual)
    else:
        inputs["bias"] = randn(n)
        fn = lambda x, residual, weight, bias: fusedlm.layer_norm(x, weight, bias, residual=residual, backend="cuda")
        ref = lambda x, residual, weight, bias: R.layer_norm_ref(x, weight, bias, 1e-5, residual)
    check(fn, ref, inputs, dtype, dev, tuple(inputs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_norm_wide_rows(op, dtype, dev):
    """65536 features: held in registers in a 16-bit dtype's forward, the looped kernels otherwise."""
    n = 65536
    inputs = dict(x=randn(2, n), weight=randn(n))
    if op == "rms_norm":
        fn = lambda x, weight: fusedlm.rms_norm(x, weight, backend="cuda")
        ref = lambda x, weight: R.rms_norm_ref(x, weight)
    else:
        inputs["x"] = inputs["x"] + 3.0  # an offset mean: the two-pass variance must remove it
        fn = lambda x, weight: fusedlm.layer_norm(x, weight, backend="cuda")
        ref = lambda x, weight: R.layer_norm_ref(x, weight)
    check(fn, ref, inputs, dtype, dev, ("x", "weight"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_many_rows_and_chunks(dtype, dev):
    """More rows than one dweight chunk (128 rows): the chunk partials must add up."""
    inputs = dict(x=randn(300, 40), weight=randn(40), bias=randn(40))
    check(lambda x, weight, bias: fusedlm.layer_norm(x, weight, bias, backend="cuda"),
          lambda x, weight, bias: R.layer_norm_ref(x, weight, bias), inputs, dtype, dev, ("x", "weight", "bias"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_norm_strided_and_misaligned_inputs(dtype, dev):
    """Row-strided views (aligned: the vector path) and views one element off (the scalar path)."""
    n = 256
    base_x, base_r = torch.randn(5, n + 24, dtype=dtype, device=dev), torch.randn(5, n + 24, dtype=dtype, device=dev)
    w = torch.randn(n, dtype=dtype, device=dev)
    for start in (0, 8, 1):  # 8: still 16-byte aligned for 16-bit dtypes; 1: misaligned
        x, r = base_x[:, start:start + n], base_r[:, start:start + n]
        y, s = fusedlm.rms_norm(x, w, residual=r, backend="cuda")
        y_ref, s_ref = R.rms_norm_ref(x.double(), w.double(), 1e-6, 0.0, r.to(dtype).double())
        assert torch.equal(s, x + r)
        assert_within([("y", (y.double() - y_ref).norm().item() / y_ref.norm().item())], dtype)


def test_norm_without_weight_and_bias(dev):
    x = randn(4, 130)
    check(lambda x: fusedlm.rms_norm(x, backend="cuda"), lambda x: R.rms_norm_ref(x), dict(x=x), torch.float32, dev,
          ("x",))
    check(lambda x: fusedlm.layer_norm(x, backend="cuda"), lambda x: R.layer_norm_ref(x), dict(x=x), torch.float32,
          dev, ("x",))


def test_norm_weight_in_float32_with_half_input(dev):
    """A float32 weight with a float16 input (mixed precision): the weight's gradient comes back float32."""
    x = torch.randn(3, 64, dtype=torch.float16, device=dev, requires_grad=True)
    w = torch.randn(64, device=dev, requires_grad=True)
    y = fusedlm.rms_norm(x, w, backend="cuda")
    y.float().square().sum().backward()
    assert y.dtype == torch.float16 and w.grad.dtype == torch.float32 and x.grad.dtype == torch.float16
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    R.rms_norm_ref(xr, wr).to(torch.float16).double().square().sum().backward()
    assert (w.grad.double() - wr.grad).norm() / wr.grad.norm() < 4 * 2.0**-11


def test_norm_empty_batch(dev):
    x = torch.randn(0, 96, device=dev, requires_grad=True)
    w = torch.randn(96, device=dev, requires_grad=True)
    y = fusedlm.layer_norm(x, w, backend="cuda")
    y.sum().backward()
    assert y.shape == (0, 96) and torch.equal(w.grad, torch.zeros_like(w))


# ---- SwiGLU -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 1), (4, 123), (2, 5, 771), (2, 4096)])
def test_swiglu(shape, dtype, dev):
    check(lambda gate, up: fusedlm.swiglu(gate, up, backend="cuda"), R.swiglu_ref,
          dict(gate=randn(*shape) * 2, up=randn(*shape)), dtype, dev, ("gate", "up"))


@pytest.mark.parametrize("n", [771, 1024])
def test_swiglu_strided_halves(n, dev):
    """The halves of a fused gate_up projection: row stride 2n, no copy (n = 1024 keeps 16-byte alignment)."""
    gate_up = torch.randn(4, 2 * n, dtype=torch.bfloat16, device=dev)
    gate, up = gate_up.chunk(2, dim=-1)
    out = fusedlm.swiglu(gate, up, backend="cuda")
    ref = R.swiglu_ref(gate.double(), up.double())
    assert_within([("out", ((out.double() - ref).norm() / ref.norm()).item())], torch.bfloat16)


# ---- Rotary embedding -----------------------------------------------------------------------------------

# (B, H, Hkv, S, D, R, interleaved, unsqueeze_dim, cos batch: 0 = (S, R), 1 = (1, S, R), B = (B, S, R))
ROPE = [(1, 4, 4, 67, 80, 32, False, 1, 0), (2, 4, 2, 5, 64, 64, True, 1, 2), (2, 3, 1, 9, 40, 40, False, 2, 2),
        (1, 2, 1, 7, 96, 64, True, 2, 1), (2, 2, 2, 3, 128, 128, False, 1, 1), (1, 2, 2, 3, 6, 2, True, 1, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROPE, ids=lambda c: "x".join(map(str, c)))
def test_rope(case, dtype, dev):
    B, H, Hkv, S, D, Rot, inter, udim, cb = case
    qs, ks = ((B, H, S, D), (B, Hkv, S, D)) if udim == 1 else ((B, S, H, D), (B, S, Hkv, D))
    angle = randn(*((S, Rot) if cb == 0 else (cb, S, Rot)))
    check(lambda q, k, cos, sin: fusedlm.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=udim, interleaved=inter,
                                                              backend="cuda"),
          lambda q, k, cos, sin: R.rope_ref(q, k, cos, sin, udim, inter),
          dict(q=randn(*qs), k=randn(*ks), cos=angle.cos(), sin=angle.sin()), dtype, dev, ("q", "k", "cos", "sin"))


def test_rope_strided_views(dev):
    """(B, S, H, D) storage viewed as (B, H, S, D): the kernel follows the strides, no copy."""
    B, H, S, D = 2, 4, 6, 64
    q = torch.randn(B, S, H, D, device=dev).transpose(1, 2)
    k = torch.randn(B, S, 2, D, device=dev).transpose(1, 2)
    angle = torch.randn(S, D, device=dev)
    got = fusedlm.apply_rotary_pos_emb(q, k, angle.cos(), angle.sin(), backend="cuda")
    want = R.rope_ref(q.double(), k.double(), angle.cos().double(), angle.sin().double())
    for g, w in zip(got, want):
        assert_within([("out", ((g.double() - w).norm() / w.norm()).item())], torch.float32)


# ---- The ops themselves, dispatch, errors ------------------------------------------------------------------

def _opcheck_cases(dev):
    t = lambda *s, dt=torch.float32: torch.randn(*s, device=dev, dtype=dt)
    ops = torch.ops.fusedlm_C
    rstd, mean = t(6).abs() + 0.5, t(6)
    return [
        (ops.norm_fwd, (t(2, 3, 40), t(2, 3, 40), t(40), None, 1e-6, 1.0, True)),
        (ops.norm_fwd, (t(6, 40, dt=torch.float16), None, t(40), t(40), 1e-5, 0.0, False)),
        (ops.norm_bwd, (t(6, 40), t(6, 40), t(40), t(6, 40), mean, rstd, 0.0, False, True, True)),
        (ops.norm_bwd, (t(6, 40), t(6, 40), None, None, torch.empty(0, device=dev), rstd, 0.0, True, False, False)),
        (ops.swiglu_fwd, (t(3, 5, 24), t(3, 5, 24))),
        (ops.swiglu_bwd, (t(3, 24), t(3, 24), t(3, 24))),
        (ops.rope, (t(2, 4, 5, 16), t(2, 2, 5, 16), t(5, 8), t(5, 8), False, False, False)),
        (ops.rope, (t(2, 5, 4, 16), t(2, 5, 2, 16), t(2, 5, 16), t(2, 5, 16), True, True, True)),
    ]


@pytest.mark.parametrize("index", range(8))
def test_opcheck(index, dev):
    op, args = _opcheck_cases(dev)[index]
    differentiable = op in (torch.ops.fusedlm_C.norm_fwd, torch.ops.fusedlm_C.swiglu_fwd, torch.ops.fusedlm_C.rope)
    torch.library.opcheck(op, detach_clone(args, requires_grad=differentiable))


def test_auto_prefers_cuda_only_for_verified_ops(monkeypatch, dev):
    picked = []
    real = _backend.select
    monkeypatch.setattr(_backend, "select", lambda *a, **k: picked.append(real(*a, **k)) or picked[-1])
    g = torch.randn(2, 8, device=dev)
    fusedlm.swiglu(g, g)
    assert picked[-1] != "cuda"  # nothing verified on a GPU yet
    monkeypatch.setattr(_backend, "cuda_verified_ops", lambda device=None: frozenset({"swiglu"}))
    fusedlm.swiglu(g, g)
    assert picked[-1] == "cuda"
    fusedlm.rms_norm(g)
    assert picked[-1] != "cuda"


def test_cuda_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="swiglu: backend 'cuda' cannot serve this call: .*float64"):
        fusedlm.swiglu(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), backend="cuda")
    with pytest.raises(ValueError, match="linear_cross_entropy: backend 'cuda' .*no kernel"):
        h = torch.randn(4, 16, dtype=torch.float16)
        fusedlm.linear_cross_entropy(h, torch.randn(32, 16, dtype=torch.float16), torch.zeros(4, dtype=torch.long),
                                     backend="cuda")
    # a 1-D input is one row: wider than the kernel's grid allows, a clear error (auto takes triton/torch)
    wide = torch.empty(65535 * 256 + 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="swiglu: backend 'cuda' cannot serve this call: rows wider than 16776960"):
        fusedlm.swiglu(wide, wide, backend="cuda")
    monkeypatch.setenv("FUSEDLM_CUDA_CPU", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="rms_norm: backend 'cuda' cannot serve this call: .*FUSEDLM_CUDA_CPU=1"):
            fusedlm.rms_norm(torch.randn(2, 8), backend="cuda")


def test_verify_cli_runs_cuda_rows(capsys):
    from fusedlm import cli

    assert cli.main(["verify", "--backend", "cuda", "--ops", "swiglu", "apply_rotary_pos_emb"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if " cuda " in line and line.rstrip().endswith("ok")]
    assert len(rows) == 18, out  # (3 swiglu + 3 rope cases) x (float32, float16, bfloat16)


def _butterfly(lanes):
    """The device's warp reduction (shfl_xor 16, 8, 4, 2, 1) on rows of 32 float32 lanes; lane 0's total."""
    idx = torch.arange(32)
    for offset in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[..., idx ^ offset]
    return lanes[..., 0]


def test_block_reduction_follows_the_device_order():
    """LayerNorm's row statistics equal, bit for bit, sums taken in the device's order, written out here:
    4096 float32 features = 1024 16-byte vectors over 128 threads holding 8 each (thread t: vectors
    t, t + 128, ...), per-thread sums in that order, a butterfly per warp, then one over the 4 warp sums."""
    if torch.cuda.is_available():
        pytest.skip("the harness's order on CPU; a GPU's FMA contraction changes the last bits")
    n, threads, held, vec = 4096, 128, 8, 4
    x = torch.randn(1, n) * torch.logspace(-2, 2, n)[torch.randperm(n)]  # magnitudes apart: the order shows
    _, _, mean, rstd = torch.ops.fusedlm_C.norm_fwd(x, None, None, None, 1e-5, 0.0, False)

    def device_sum(values):  # values: (n,) float32 terms, one per feature
        per_thread = values.view(held, threads, vec)  # [slot i][thread t][element e] = vector t + i * threads
        acc = torch.zeros(threads)
        for i in range(held):
            for e in range(vec):
                acc = acc + per_thread[i, :, e]  # float32, rounded at each step as on the host
        warp_sums = _butterfly(acc.view(threads // 32, 32))
        return _butterfly(torch.cat([warp_sums, torch.zeros(32 - len(warp_sums))]))

    inv_n = torch.tensor(1.0 / n)
    want_mean = device_sum(x[0]) * inv_n
    want_rstd = 1.0 / torch.sqrt(device_sum((x[0] - want_mean) * (x[0] - want_mean)) * inv_n + torch.tensor(1e-5))
    assert mean.item() == want_mean.item() and rstd.item() == want_rstd.item()
    # The check tells orders apart: a left-to-right float32 sum of the same terms rounds differently.
    assert x[0].cumsum(0)[-1].item() * (1.0 / n) != want_mean.item()


def test_torch_compile_fullgraph(dev):
    x = torch.randn(3, 130, device=dev, requires_grad=True)
    w = torch.randn(130, device=dev, requires_grad=True)

    def f(x, w):
        y, s = fusedlm.rms_norm(x, w, residual=x, backend="cuda")
        return fusedlm.swiglu(y, s, backend="cuda")

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if dev == "cuda" else "aot_eager")
    got, want = compiled(x, w), f(x, w)
    assert torch.equal(got, want)
    (gx, gw), (wx, ww) = (torch.autograd.grad(o.sum(), (x, w)) for o in (got, want))
    assert torch.equal(gx, wx) and torch.equal(gw, ww)
