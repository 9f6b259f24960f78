"""linear_cross_entropy, both backends, against torch's own F.cross_entropy on float64 logits.

The oracle materialises the logits in float64 and calls torch.nn.functional.cross_entropy (the semantics the
contract names), adding the softcap and the z-loss term by their definitions; it shares no code with
fusedlm.reference. Gradients come from autograd through it. Memory is counted on meta tensors (no kernel runs).
"""
import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.bench.memory import MiB, LiveBytes, _skip
from fusedlm.ops import cross_entropy as X
from fusedlm.verify import BOUNDS, rel_err
from helpers import triton_or_skip


def oracle(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
           softcap=None, z_loss=0.0):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    t = target.reshape(-1)
    rows = F.cross_entropy(logits, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(logits, -1).square() * (t != ignore_index)
    if reduction == "none":
        return rows.reshape(target.shape)
    return rows.sum() if reduction == "sum" else rows.sum() / (t != ignore_index).sum()


def make(N=37, D=40, V=77, bias=True, ignored=3, scale=0.3, batch_shape=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"hidden": torch.randn(N, D, generator=g), "weight": torch.randn(V, D, generator=g) * scale,
         "target": torch.randint(0, V, (N,), generator=g)}
    if bias:
        t["bias"] = torch.randn(V, generator=g)
    if ignored:
        t["target"][::ignored] = -100
    if batch_shape:
        t["hidden"] = t["hidden"].reshape(*batch_shape, D)
        t["target"] = t["target"].reshape(batch_shape)
    return t


def check(backend, t, dtype, grads=("hidden", "weight", "bias"), **kw):
    """The op in ``dtype`` against the oracle in float64 on the same rounded values: loss and gradients."""
    low = {n: (x.to(dtype).requires_grad_(n in grads) if x.is_floating_point() else x) for n, x in t.items()}
    high = {n: (x.to(dtype).double().requires_grad_(n in grads) if x.is_floating_point() else x) for n, x in t.items()}
    out = fusedlm.linear_cross_entropy(**low, backend=backend, **kw)
    want = oracle(**high, **kw)
    assert out.dtype == torch.float32 and out.shape == want.shape
    bound = BOUNDS[dtype]
    assert rel_err(out, want) <= bound, rel_err(out, want)
    names = [n for n in grads if n in t]
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(out, [low[n] for n in names], cot.float())
    exp = torch.autograd.grad(want, [high[n] for n in names], cot)
    for n, a, b in zip(names, got, exp):
        assert a.dtype == dtype and rel_err(a, b) <= bound, (n, rel_err(a, b))
    return out, got


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_ignored_tokens(backend, dtype, reduction):
    check(backend, make(), dtype, reduction=reduction)


@pytest.mark.parametrize("kw", [dict(label_smoothing=0.1), dict(softcap=3.0), dict(z_loss=1e-2),
                                dict(label_smoothing=0.3, softcap=5.0, z_loss=1e-3, ignore_index=5)],
                         ids=["smoothing", "softcap", "z_loss", "all+ignore5"])
def test_smoothing_softcap_and_z_loss(backend, dtype, kw):
    t = make()
    t["target"][t["target"] == -100] = kw.get("ignore_index", -100)  # (5 is also a real class then: ignored)
    check(backend, t, dtype, **kw)


@pytest.mark.parametrize("shape", [dict(N=5, D=16, V=1), dict(N=70, D=33, V=301, bias=False),
                                   dict(N=12, D=24, V=50, batch_shape=(3, 4))], ids=["V1", "odd", "3d"])
def test_odd_vocabularies_widths_and_batch_shapes(backend, shape):
    check(backend, make(**shape), torch.float32)


def test_large_logits_stay_finite(backend):
    """Logits in the thousands: the softmax is taken in a stable form (a naive exp overflows)."""
    t = make(scale=300.0)
    out, grads = check(backend, t, torch.float32, reduction="sum")
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads)


def test_only_some_gradients_and_every_token_ignored(backend):
    check(backend, make(), torch.float32, grads=("weight",))
    t = make(ignored=1)  # every target -100
    h = t["hidden"].requires_grad_()
    mean = fusedlm.linear_cross_entropy(h, t["weight"], t["target"], backend=backend)
    assert torch.isnan(mean)  # 0 / 0, as torch's cross_entropy
    total = fusedlm.linear_cross_entropy(h, t["weight"], t["target"], reduction="sum", backend=backend)
    (g,) = torch.autograd.grad(total, [h])
    assert total == 0 and (g == 0).all()


def test_strided_target_and_bias_views(backend):
    """A target and a bias that are strided or expanded views read as their values (the kernels index them
    with unit strides: the op copies them)."""
    t = make(N=20, V=50)
    t["target"] = torch.stack([t["target"], torch.zeros_like(t["target"])], 1)[:, 0]  # stride 2
    t["bias"] = torch.stack([t["bias"], t["bias"] + 100], 1)[:, 0]
    check(backend, t, torch.float32)
    t["target"] = torch.tensor([3]).expand(20)  # stride 0
    check(backend, t, torch.float32, reduction="sum")


def test_second_derivative_is_refused(backend):
    """The backward is a formula on saved statistics: asking to differentiate it raises, never a wrong value."""
    t = make(N=10, V=20)
    h = t["hidden"].requires_grad_()
    loss = fusedlm.linear_cross_entropy(h, t["weight"], t["target"], backend=backend)
    (g,) = torch.autograd.grad(loss, [h], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), [h])


def test_bf16_weight_gradient_within_twice_torchs_error(monkeypatch):
    """The 16-bit dW is summed in float32 over the token chunks (one rounding a vocabulary chunk): with many
    chunks its error against float64 stays within twice that of torch's own bf16 path (bf16 dlogits, one
    matmul). The chunked backward is driven with exact dz rounded to bf16, as the kernels make it."""
    N, V, D = 4096, 256, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).bfloat16()
    w = (torch.randn(V, D, generator=g) * D ** -0.5).bfloat16()
    t = torch.randint(0, V, (N,), generator=g)
    p = torch.softmax(h.double() @ w.double().T, -1)
    p[torch.arange(N), t] -= 1
    dz = (p / N).bfloat16()
    want = (p / N).T @ h.double()
    torch_err = rel_err(dz.T @ h, want)
    monkeypatch.setattr(X, "CHUNK_BYTES", 256 * 1024)  # tens of token chunks
    perm = torch.arange(N)
    _, dw, _ = X._backward(lambda r0, nc, v0, vc: dz[r0:r0 + nc, v0:v0 + vc], h, w, None, perm, torch.tensor(N),
                           (False, True, False), torch.bfloat16, skip_ignored=False)
    assert rel_err(dw, want) <= 2 * torch_err, (rel_err(dw, want), torch_err)


def test_chunked_backward_equals_one_chunk(backend, monkeypatch):
    """With buffers of a few KiB the backward takes many token x vocabulary chunks (dW summed over the token
    chunks, dh over the vocabulary ones): the same gradients as the oracle."""
    monkeypatch.setattr(X, "CHUNK_BYTES", 8 * 1024)
    monkeypatch.setattr(X, "_chunks", lambda D, V, hb, wb, N: (16, 24))
    check(backend, make(N=70, V=101), torch.float32, label_smoothing=0.1)


def test_deterministic(backend):
    t = make(N=50, V=90)
    runs = []
    for _ in range(2):
        h, w = t["hidden"].clone().requires_grad_(), t["weight"].clone().requires_grad_()
        loss = fusedlm.linear_cross_entropy(h, w, t["target"], t["bias"], backend=backend)
        runs.append((loss, *torch.autograd.grad(loss, [h, w])))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_compiles_fullgraph_forward_and_backward(backend):
    """The loss under torch.compile(fullgraph=True) (its backward compiled by AOTAutograd) equals eager."""
    t = make()

    def loss_fn(h, w, target, bias):
        return fusedlm.linear_cross_entropy(h, w, target, bias, label_smoothing=0.1, backend=backend)
    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(loss_fn, fullgraph=True, backend="aot_eager"), loss_fn):
        h, w = t["hidden"].clone().requires_grad_(), t["weight"].clone().requires_grad_()
        loss = fn(h, w, t["target"], t["bias"])
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_registered_triton_op_passes_opcheck():
    triton_or_skip()
    t = make(N=20, V=40)
    op = X._triton_ops()
    args = (t["hidden"].requires_grad_(), t["weight"].requires_grad_(), t["bias"], t["target"], -100, 0.1, 0.0, 0.0)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_loss_memory_has_no_token_by_vocabulary_buffer():
    """Issue 19: N = 16384 tokens, V = 128256, D = 4096, bf16, forward + backward of the Triton path counted on
    meta tensors: beside the inputs and their gradients at most 64 MiB, no allocation of N x V elements
    (the logits alone would be 4 GiB in bf16)."""
    N, V, D = 16384, 128256, 4096

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")
    h, w, t = meta(N, D), meta(V, D), meta(N, dtype=torch.int64)
    sizes = []

    class Sizes(LiveBytes):
        def _track(self, x, inputs):
            sizes.append(x.numel())
            super()._track(x, inputs)
    with Sizes() as mem:
        loss, lse = X.triton_forward(_skip, h, w, None, t, -100, 0.0, 0.0, 0.0)
        grads = X.triton_backward(_skip, meta(N, dtype=torch.float32), h, w, None, t, lse, -100, 0.0, 0.0, 0.0,
                                  (True, True, False))
        grad_bytes = sum(g.numel() * g.element_size() for g in grads if g is not None)
        del loss, lse, grads
    extra = mem.peak - grad_bytes
    assert extra <= 64 * MiB, f"{extra / MiB:.1f} MiB over the inputs and their gradients"
    others = [s for s in sizes if s not in (N * D, V * D)]  # all but the gradients
    assert max(others) * 4 <= 32 * MiB, "every buffer a bounded chunk, even in float32 (the logits: 8 GiB)"


def test_bad_input_names_the_argument():
    t = make()
    h, w, tg = t["hidden"], t["weight"], t["target"]
    call = fusedlm.linear_cross_entropy
    with pytest.raises(TypeError, match="target: expected dtype torch.int64"):
        call(h, w, tg.int())
    bad = tg.clone()
    bad[1] = 77
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 77\) or ignore_index=-100"):
        call(h, w, bad)
    with pytest.raises(ValueError, match=r"weight: expected shape \(V, 40\)"):
        call(h, w[:, :39], tg)
    with pytest.raises(ValueError, match="target: expected shape \\(37,\\)"):
        call(h, w, tg[:5])
    with pytest.raises(ValueError, match="bias: expected shape \\(77,\\)"):
        call(h, w, tg, w[0])
    with pytest.raises(ValueError, match="reduction: expected 'mean', 'sum' or 'none'"):
        call(h, w, tg, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing: expected a number in \\[0, 1\\]"):
        call(h, w, tg, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap: expected a positive number"):
        call(h, w, tg, softcap=0.0)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32"):
        call(h, w.half(), tg)
