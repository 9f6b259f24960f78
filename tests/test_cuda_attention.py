"""The cuda backend's attention (csrc/attention.cu: mma.sync / ldmatrix / cp.async) against float64.

Without a GPU the kernels' own source runs on CPU through the SIMT harness (FUSEDLM_CUDA_CPU=1, the
cuda_harness fixture; the tensor-core instructions are emulated lane by lane from the PTX ISA's fragment
maps, tests/test_cuda_tensor_cores.py); on a GPU machine with fusedlm._C built the same cases run on CUDA
tensors. The cases are test_attention's and test_attention_window's (their float64 oracles, their shapes:
every head-dim bucket and its padding, L != S both ways, GQA / MQA, empty rows, packed sequences with
empty ones), run in float16 and bfloat16, the kernels' dtypes; plus what is the cuda backend's own: the
dropout mask equal to the triton backend's, bitwise determinism, the declined cases, layouts the 16-byte
copies cannot take, the registered ops (opcheck, torch.compile). Outputs start as NaN (deterministic
mode), so an element a kernel never writes shows as an infinite error.
"""
import pytest
import torch

import fusedlm
import test_attention as TA
import test_attention_window as TW
from fusedlm.verify import BOUNDS, check_case, rel_err
from helpers import (RecordFusedOps, assert_within, cuda_harness, detach_clone, dev,  # noqa: F401  (fixtures)
                     nan_filled_outputs, triton_or_skip)

HALF = [torch.float16, torch.bfloat16]
ids = {"dtype": lambda d: str(d)[6:]}


# ---- The shared cases -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=ids["dtype"])
@pytest.mark.parametrize("case", TA.DENSE, ids=lambda c: "B{}H{}Hkv{}L{}S{}E{}Ev{}{}".format(
    *c[:7], "causal" if c[7] else ""))
def test_sdpa_matches_oracle(dev, dtype, case):
    TA.test_sdpa_matches_oracle("cuda", dev, dtype, case)


@pytest.mark.parametrize("dtype", HALF, ids=ids["dtype"])
@pytest.mark.parametrize("case", TA.KPM_CASES, ids=lambda c: c[0])
def test_key_padding_mask(dev, dtype, case):
    TA.test_key_padding_mask("cuda", dev, dtype, case)


@pytest.mark.parametrize("causal", [False, True])
def test_long_leading_and_trailing_padding(dev, causal):
    TA.test_long_leading_and_trailing_padding("cuda", dev, torch.float16, causal)


@pytest.mark.parametrize("dtype", HALF, ids=ids["dtype"])
def test_fully_padded_batch_rows_are_zero(dev, dtype):
    TA.test_fully_masked_rows("cuda", dev, dtype, "kpm_all_padded")


@pytest.mark.parametrize("dtype", HALF, ids=ids["dtype"])
@pytest.mark.parametrize("case", TA.VARLEN, ids=lambda c: "q{}k{}H{}Hkv{}E{}Ev{}{}".format(
    "-".join(map(str, c[0])), "-".join(map(str, c[1])), *c[2:6], "causal" if c[6] else ""))
def test_varlen_matches_oracle(dev, dtype, case):
    TA.test_varlen_matches_oracle("cuda", dev, dtype, case)


@pytest.mark.parametrize("case", TW.DENSE, ids=lambda c: "H{}Hkv{}L{}S{}w{}_{}{}{}".format(
    *c[:4], *c[4], "causal" if c[5] else "", "kpm" if c[6] else ""))
def test_window_matches_oracle(dev, case):
    """The band (and causal, key padding) of test_attention_window, without its bool attn_mask holes."""
    H, Hkv, L, S, window, causal, padded = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    inputs = TA.qkv(2, H, Hkv, L, S, 40, 40, gen)
    allowed = TW.band(L, S, 0, window)
    kpm = TA.random_lengths_mask([S, S // 2], S) if padded else None
    kw = dict(is_causal=causal, enable_gqa=H != Hkv, key_padding_mask=kpm)
    rows = check_case(lambda query, key, value: fusedlm.scaled_dot_product_attention(
        query, key, value, window_size=window, backend="cuda",
        **{**kw, "key_padding_mask": None if kpm is None else kpm.to(query.device)}),
        lambda query, key, value: TA.oracle(query, key, value, attn_mask=allowed, is_causal=causal,
                                            key_padding_mask=kpm),
        inputs, dtype=torch.bfloat16, device=dev, grad=("query", "key", "value"))
    assert_within(rows, torch.bfloat16)


@pytest.mark.parametrize("case", TW.VARLEN, ids=str)
def test_varlen_window_matches_oracle(dev, case):
    TW.test_varlen_window_matches_oracle("cuda", dev, torch.float16, case)


@pytest.mark.parametrize("dtype", HALF, ids=ids["dtype"])
def test_gradient_through_lse(dev, dtype):
    TA.test_gradient_through_lse("cuda", dev, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=ids["dtype"])
def test_varlen_return_lse(dev, dtype):
    TA.test_varlen_return_lse("cuda", dev, dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_backward_uses_the_forward_mask(dev, causal):
    TA.test_dropout_backward_uses_the_forward_mask("cuda", dev, torch.bfloat16, causal)


def test_dropout_seed_reproduces_and_differs(dev):
    q, k, v = (torch.randn(2, 2, 33, 32, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3))
    runs = []
    for seed in (1, 1, 2):
        out = TA._seeded(seed, fusedlm.scaled_dot_product_attention, q, k, v, dropout_p=0.25, backend="cuda")
        runs.append((out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    (o1, g1), (o2, g2), (o3, g3) = runs
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3) and not torch.equal(g1[2], g3[2])


@pytest.mark.parametrize("packed", [False, True, "gqa_window"])
def test_dropout_mask_is_the_triton_backends(dev, packed):
    """The same seed drops the same elements on the cuda and triton backends (one Philox scheme, counters
    from the (batch, head, query, key) position): switching backends does not change a training run. Read
    through value = identity, float16 (the interpreter's float16 dot is exact enough for a 0/1 test)."""
    triton_or_skip()
    B, H, L, S, p = 2, 2, 40, 48, 0.3
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, L, 32, generator=gen).to(dev, torch.float16)
    k = torch.randn(B, H, S, 32, generator=gen).to(dev, torch.float16)
    masks = {}
    for backend in ("cuda", "triton"):
        if packed:  # two sequences of L queries / S keys, identity values: (B S, H, S)
            eye = torch.eye(S, device=dev, dtype=torch.float16)[:, None, :].expand(S, H, S).repeat(B, 1, 1)
            cu_q, cu_k = TA.cu([L] * B).to(dev), TA.cu([S] * B).to(dev)
            out = TA._seeded(9, fusedlm.varlen_attention, q.transpose(1, 2).reshape(B * L, H, 32),
                             k.transpose(1, 2).reshape(B * S, H, 32), eye, cu_q, cu_k, L, S, causal=True,
                             dropout_p=p, backend=backend)
        elif packed == "gqa_window":  # four query heads a K/V head, a band of 24 to the left
            q4 = torch.cat([q, q.flip(2)], 1)
            out = TA.probabilities(backend, dev, q4, k, 9, p, is_causal=True, enable_gqa=True, window_size=(24, 0))
        else:
            out = TA.probabilities(backend, dev, q, k, 9, p, is_causal=True)
        masks[backend] = out != 0
    frac = 1 - masks["cuda"].double().mean().item()
    assert 0.3 < frac < 0.9, frac  # dropout (0.3) and the causal mask's (and band's) zeros both show
    assert torch.equal(masks["cuda"], masks["triton"])


# ---- The cuda backend's own --------------------------------------------------------------------------

def test_backward_deterministic(dev):
    """No atomics: the dK/dV and dQ passes give bitwise the same gradients run after run (GQA: dK, dV sum
    four query heads inside one block, in a fixed order)."""
    gen = torch.Generator().manual_seed(47)
    q = torch.randn(2, 4, 67, 40, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
    k = torch.randn(2, 1, 67, 40, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
    v = torch.randn(2, 1, 67, 40, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
    kpm = (torch.rand(2, 67, generator=gen) < 0.8).to(dev)
    g = torch.randn(2, 4, 67, 40, generator=gen).to(dev, torch.bfloat16)
    grads = []
    for _ in range(2):
        out = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, key_padding_mask=kpm, enable_gqa=True,
                                                   backend="cuda")
        grads.append(torch.autograd.grad(out, (q, k, v), g))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("layout", ["BLHE", "offset", "strided"])
def test_layouts_the_copies_cannot_take_directly(dev, layout):
    """(B, L, H, E) memory (Hugging Face's transposed views) is read in place and the output laid out the
    same way; a view 2 bytes off 16-byte alignment, or with a head dim stride of 2, is copied first."""
    gen = torch.Generator().manual_seed(3)
    B, H, L, E = 2, 2, 37, 32
    if layout == "BLHE":
        q, k, v = (torch.randn(B, L, H, E, generator=gen).transpose(1, 2) for _ in range(3))
    elif layout == "offset":
        q, k, v = (torch.randn(B * H * L * E + 1, generator=gen)[1:].view(B, H, L, E) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, L, 2 * E, generator=gen)[..., ::2] for _ in range(3))
    q, k, v = (t.to(dev, torch.float16) for t in (q, k, v))
    out = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
    want = TA.oracle(q.double().cpu(), k.double().cpu(), v.double().cpu(), is_causal=True)
    assert rel_err(out, want) <= BOUNDS[torch.float16]
    if layout == "BLHE":
        assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("e,ev", [(16, 16), (24, 24), (72, 72), (136, 136), (256, 256), (20, 36), (250, 17)])
def test_every_head_dim_bucket(dev, e, ev):
    """Head dims padded up to the buckets 32, 64, 128, 256 (zero-filled columns), the buckets' edges, and head
    dims that are not multiples of 8 (padded with zero features by the op layer for the 16-byte copies)."""
    inputs = TA.qkv(1, 2, 2, 70, 70, e, ev, torch.Generator().manual_seed(e))
    TA.run_dense("cuda", dev, torch.float16, inputs, is_causal=True)


@pytest.mark.parametrize("window", [(2**31 - 1, 0), (0, 2**31 - 1), (2**31 - 1, 2**31 - 1), (2**32 + 3, 0),
                                    (70, 69)])
def test_window_sides_wider_than_the_sequence(dev, window):
    """A side at least as wide as the sequence bounds nothing (and must not wrap around in 32 bits)."""
    inputs = TA.qkv(1, 2, 2, 70, 70, 32, 32, torch.Generator().manual_seed(1))
    eff = tuple(-1 if w >= 70 else w for w in window)
    rows = check_case(lambda query, key, value: fusedlm.scaled_dot_product_attention(
        query, key, value, window_size=window, backend="cuda"),
        lambda query, key, value: TA.oracle(query, key, value, attn_mask=TW.band(70, 70, 0, eff)),
        inputs, dtype=torch.float16, device=dev, grad=("query", "key", "value"))
    assert_within(rows, torch.float16)


def test_first_call_inside_torch_compile(tmp_path):
    """A fresh process whose first cuda call is a compiled one (the backend resolved at import: the harness
    load, an import of fusedlm._C, cannot be traced)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, fusedlm\n"
        "q = torch.randn(1, 2, 20, 20, dtype=torch.float16, requires_grad=True)\n"
        "f = lambda q: fusedlm.scaled_dot_product_attention(q, q, q, is_causal=True, backend='cuda').float().sum()\n"
        "out = torch.compile(f, fullgraph=True, backend='aot_eager')(q)\n"
        "assert torch.equal(out, f(q)), (out, f(q))\n"
        "g = lambda x, w, a, b: fusedlm.lora_linear(x, w, None, a, b, 0.5, backend='cuda').float().sum()\n"
        "x, w, a, b = (torch.randn(*s, dtype=torch.float16) for s in ((3, 20), (12, 20), (4, 20), (12, 4)))\n"
        "assert torch.equal(torch.compile(g, fullgraph=True, backend='aot_eager')(x, w, a, b), g(x, w, a, b))\n"
        "print('ok')\n")
    env = dict(os.environ, FUSEDLM_CUDA_CPU="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


class TestDeclined:
    """What the kernels do not serve raises ValueError naming why (and "auto" then takes another backend)."""

    def _qkv(self, dtype=torch.float16, e=32):
        return [torch.randn(1, 2, 5, e).to(dtype) for _ in range(3)]

    def test_float32(self):
        with pytest.raises(ValueError, match="backend 'cuda' cannot serve.*float16 or bfloat16"):
            fusedlm.scaled_dot_product_attention(*self._qkv(torch.float32), backend="cuda")

    def test_attn_mask(self):
        with pytest.raises(ValueError, match="cuda attention kernels take no attn_mask"):
            fusedlm.scaled_dot_product_attention(*self._qkv(), torch.ones(5, 5, dtype=torch.bool), backend="cuda")

    def test_head_dim_outside_16_to_256(self):
        with pytest.raises(ValueError, match="head dims 16..256, got E=8"):
            fusedlm.scaled_dot_product_attention(*self._qkv(e=8), backend="cuda")

    def test_varlen_float32(self):
        q = torch.randn(6, 2, 32)
        with pytest.raises(ValueError, match="float16 or bfloat16"):
            fusedlm.varlen_attention(q, q, q, TA.cu([6]), TA.cu([6]), 6, 6, backend="cuda")

    def test_auto_does_not_pick_it_before_a_gpu_verified_it(self, monkeypatch):
        monkeypatch.setattr(fusedlm._backend, "_CUDA_VERIFIED", {})
        explicit, auto = RecordFusedOps("attention", ("fusedlm_C",)), RecordFusedOps("attention", ("fusedlm_C",))
        with explicit:
            fusedlm.scaled_dot_product_attention(*self._qkv(), backend="cuda")
        with auto, fusedlm.use_backend("auto"):
            fusedlm.scaled_dot_product_attention(*self._qkv())
        assert explicit.calls and not auto.calls


@pytest.mark.parametrize("config", ["dense", "dropout", "varlen", "blhe"])
def test_opcheck(dev, config):
    """torch.library.opcheck on fusedlm_C::attention_fwd / attention_bwd with the public functions' arguments."""
    gen = torch.Generator().manual_seed(53)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(dev, torch.float16).requires_grad_(True)

    recorder = RecordFusedOps("attention", ("fusedlm_C",))
    with recorder:
        if config == "varlen":
            out = fusedlm.varlen_attention(t(12, 2, 24), t(14, 1, 24), t(14, 1, 40), TA.cu([3, 9]).to(dev),
                                           TA.cu([5, 9]).to(dev), 9, 9, causal=True, backend="cuda")
        elif config == "dropout":
            torch.manual_seed(0)
            out = fusedlm.scaled_dot_product_attention(t(1, 2, 7, 24), t(1, 2, 9, 24), t(1, 2, 9, 24),
                                                       dropout_p=0.3, backend="cuda")
        elif config == "blhe":  # Hugging Face's (B, L, H, E) memory: out laid out alike, gradients contiguous
            q, k, v = (t(2, 9, 2, 32).transpose(1, 2) for _ in range(3))
            out = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
        else:
            out = fusedlm.scaled_dot_product_attention(
                t(2, 2, 7, 24), t(2, 1, 9, 24), t(2, 1, 9, 32), is_causal=True, enable_gqa=True, window_size=(3, 1),
                key_padding_mask=torch.tensor([[True] * 9, [True] * 4 + [False] * 5], device=dev), backend="cuda")
        out.backward(torch.randn(out.shape, generator=gen).to(dev, out.dtype))
    names = [f.name() for f, _, _ in recorder.calls]
    assert "fusedlm_C::attention_fwd" in names and "fusedlm_C::attention_bwd" in names, names
    for func, args, kwargs in recorder.calls:
        if not func.name().startswith("fusedlm_C::attention"):
            continue
        forward = func.name().endswith("fwd")
        args = detach_clone(args, requires_grad=forward)
        if forward:  # only q, k, v are differentiable
            args = tuple(a.detach() if isinstance(a, torch.Tensor) and i >= 3 else a for i, a in enumerate(args))
        torch.library.opcheck(func, args, detach_clone(kwargs))


def test_torch_compile_fullgraph_equals_eager(dev):
    def block(q, k, v, kpm):
        out, lse = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                        key_padding_mask=kpm, return_lse=True, backend="cuda")
        return out.float().square().sum() + lse.clamp_min(-1e4).sum()

    compiled = torch.compile(block, fullgraph=True, backend="inductor" if dev == "cuda" else "aot_eager")
    gen = torch.Generator().manual_seed(59)
    args = [torch.randn(2, 4, 19, 40, generator=gen).to(dev, torch.float16).requires_grad_(True),
            torch.randn(2, 2, 23, 40, generator=gen).to(dev, torch.float16).requires_grad_(True),
            torch.randn(2, 2, 23, 40, generator=gen).to(dev, torch.float16).requires_grad_(True),
            (torch.rand(2, 23, generator=gen) < 0.8).to(dev)]
    eager = block(*args)
    eager_grads = torch.autograd.grad(eager, args[:3])
    out = compiled(*args)
    grads = torch.autograd.grad(out, args[:3])
    assert torch.equal(out, eager)
    assert all(torch.equal(g, e) for g, e in zip(grads, eager_grads))
