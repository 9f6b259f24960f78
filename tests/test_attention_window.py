"""window_size (local / sliding-window attention) and varlen dropout, every backend, against float64 oracles.

The band is written out here as an explicit boolean mask (query i sees key j when
i + shift - left <= j <= i + shift + right, -1 = unbounded; shift 0 for sdpa, Lk - Lq per sequence for
varlen) and handed to the float64 oracle of test_attention, which knows nothing of windows. Lengths span
several 32-key blocks (the interpreter's block size) so that the kernels skip whole blocks outside the
band and apply the per-element test to partial blocks at both of its edges.
"""
import pytest
import torch

import fusedlm
from fusedlm.verify import BOUNDS, check_case, rel_err
from helpers import RecordFusedOps, assert_within, detach_clone, triton_or_skip
from test_attention import cu, oracle, qkv, randn, varlen_inputs


def band(L, S, shift, window):
    """(L, S) bool: key j visible to query i under window = (left, right)."""
    left, right = window
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    allowed = torch.ones(L, S, dtype=torch.bool)
    if left != -1:
        allowed &= j >= i + shift - left
    if right != -1:
        allowed &= j <= i + shift + right
    return allowed


def window_varlen_oracle(q, k, v, lq, lk, window=None, causal=False, keeps=None, dropout_p=0.0):
    """Packed attention, one dense oracle call per sequence with the band and bottom-right causal mask
    written out; keeps: per sequence an optional (1, H, Lq, Lk) 0/1 dropout mask."""
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    outs = []
    for b in range(len(lq)):
        qs, ks, vs = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        Lq, Lk = lq[b], lk[b]
        allowed = torch.ones(Lq, Lk, dtype=torch.bool)
        if causal:
            allowed &= band(Lq, Lk, Lk - Lq, (-1, 0))
        if window is not None:
            allowed &= band(Lq, Lk, Lk - Lq, window)
        out = oracle(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                     attn_mask=allowed, keep=None if keeps is None else keeps[b], dropout_p=dropout_p)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------------
# Dense (sdpa): windows alone and with causal, key padding, GQA, L != S

# (H, Hkv, L, S, window, causal, padded)
DENSE = [
    (2, 2, 97, 97, (20, -1), False, False),  # left side only
    (2, 2, 97, 97, (-1, 15), False, False),  # right side only
    (2, 2, 70, 110, (10, 25), False, False),  # both sides, L < S
    (2, 2, 110, 70, (31, 0), True, False),  # Mistral sliding_window=32, L > S: rows 70.. see keys 39..69
    (2, 2, 80, 80, (40, 50), True, False),  # causal caps the right side
    (4, 2, 80, 90, (16, 16), False, True),  # GQA, key padding and a bool attn_mask with holes
    (2, 2, 45, 45, (1, 1), False, False),  # three diagonals (a (0, 0) band makes P = 1: dq, dk vanish)
]
HALF = (2, 3, 5)  # the cases also run in float16 (CPU time: the interpreter); all of them in float32


def dtype_cases(cases, half):
    """(case, dtype) pairs: every case in float32, those at indices ``half`` in float16 too (and in bfloat16
    on a GPU, where the interpreter's bf16 dot is not in the way)."""
    halves = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
    return [(c, torch.float32) for c in cases] + [(cases[i], d) for i in half for d in halves]


@pytest.mark.parametrize("case,dtype", dtype_cases(DENSE, HALF), ids=lambda c: "H{}Hkv{}L{}S{}w{}_{}{}{}".format(
    *c[:4], *c[4], "causal" if c[5] else "", "kpm" if c[6] else "") if isinstance(c, tuple) else str(c)[6:])
def test_window_matches_oracle(backend, device, dtype, case):
    H, Hkv, L, S, window, causal, padded = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    inputs = qkv(2, H, Hkv, L, S, 40, 40, gen)
    kpm = holes = None
    allowed = band(L, S, 0, window)
    if padded:
        kpm = torch.rand(2, S, generator=gen) < 0.8
        kpm[0, :7] = False  # left padding
        kpm[1, 50:] = False  # right padding
        holes = torch.rand(L, S, generator=gen) < 0.9
        allowed = allowed & holes

    def fn(query, key, value):
        return fusedlm.scaled_dot_product_attention(
            query, key, value, None if holes is None else holes.to(device), is_causal=causal,
            enable_gqa=H != Hkv, window_size=window,
            key_padding_mask=None if kpm is None else kpm.to(device), backend=backend)

    def ref(query, key, value):
        return oracle(query, key, value, attn_mask=allowed, is_causal=causal, key_padding_mask=kpm)

    rows = check_case(fn, ref, inputs, dtype=dtype, device=device, grad=("query", "key", "value"))
    assert [q for q, _ in rows] == ["out", "dquery", "dkey", "dvalue"]
    assert_within(rows, dtype)


def test_window_rows_outside_every_key_are_zero(backend, device):
    """L > S with a window (10, 10): rows i >= 50 have no key in their band (i - 10 > 39): zeros, lse -inf,
    zero dq."""
    gen = torch.Generator().manual_seed(3)
    t = {n: x.float().to(device).requires_grad_(True) for n, x in qkv(1, 2, 2, 100, 40, 32, 32, gen).items()}
    out, lse = fusedlm.scaled_dot_product_attention(**t, window_size=(10, 10), return_lse=True, backend=backend)
    want_out, want_lse = oracle(*(x.detach().double().cpu() for x in t.values()), attn_mask=band(100, 40, 0, (10, 10)),
                                return_lse=True)
    assert torch.isneginf(want_lse[..., 50:]).all() and torch.isfinite(want_lse[..., :50]).all()
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(want_lse))
    assert rel_err(lse[..., :50], want_lse[..., :50]) <= BOUNDS[torch.float32]
    assert rel_err(out, want_out) <= BOUNDS[torch.float32]
    assert torch.equal(out[..., 50:, :], torch.zeros_like(out[..., 50:, :]))
    dq, dk = torch.autograd.grad(out, (t["query"], t["key"]), torch.randn_like(out))
    assert torch.equal(dq[..., 50:, :], torch.zeros_like(dq[..., 50:, :])) and torch.isfinite(dk).all()


def test_window_blocks_outside_the_band_are_never_read(device):
    """Keys 128.. lie outside the band of every query (32 queries, window (0, 16)): poisoned with NaN, they
    must not reach out, dq, or the other keys' dk, dv (a visited block leaks: 0 * NaN = NaN in P V and in
    dP = dO V^T), and their own dk, dv are exactly zero. The torch backend reads every key: triton only."""
    triton_or_skip()
    gen = torch.Generator().manual_seed(5)
    L, S, window = 32, 256, (0, 16)
    inputs = qkv(1, 2, 2, L, S, 32, 32, gen)
    q, k, v = (inputs[n].float().to(device) for n in ("query", "key", "value"))
    k[:, :, 128:] = float("nan")
    v[:, :, 128:] = float("nan")
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = fusedlm.scaled_dot_product_attention(q, k, v, window_size=window, backend="triton")
    g = torch.randn(out.shape, generator=gen).to(device)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    for name, x in (("out", out), ("dq", dq), ("dk", dk[:, :, :128]), ("dv", dv[:, :, :128])):
        assert torch.isfinite(x).all(), name
    assert torch.equal(dk[:, :, 128:], torch.zeros_like(dk[:, :, 128:]))
    assert torch.equal(dv[:, :, 128:], torch.zeros_like(dv[:, :, 128:]))
    clean = [x.detach()[:, :, :128].double().cpu().requires_grad_(True) for x in (k, v)]
    q64 = q.detach().double().cpu().requires_grad_(True)
    want = oracle(q64, *clean, attn_mask=band(L, 128, 0, window))
    want_grads = torch.autograd.grad(want, (q64, *clean), g.double().cpu())
    assert rel_err(out, want) <= BOUNDS[torch.float32]
    for got, w in zip((dq, dk[:, :, :128], dv[:, :, :128]), want_grads):
        assert rel_err(got, w) <= BOUNDS[torch.float32]


def test_window_with_tma_forward(monkeypatch):
    """The opt-in tensor-descriptor forward (FUSEDLM_TMA=1) loads key tiles at the band's block offsets."""
    triton_or_skip()
    from fusedlm.kernels import attention_configs as C

    monkeypatch.setenv("FUSEDLM_TMA", "1")
    if not torch.cuda.is_available():
        import triton
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    inputs = qkv(1, 2, 2, 97, 97, 64, 64, torch.Generator().manual_seed(7))
    q, k, v = (inputs[n].float() for n in ("query", "key", "value"))
    used = []

    def record(launch, kernel, tuned, grid_of, args, cfg, flags, device):
        used.append((flags["USE_TMA"], flags["WINDOW"]))
        return launch_blocks(launch, kernel, tuned, grid_of, args, cfg, flags, device)

    launch_blocks = C._launch_blocks
    monkeypatch.setattr(C, "_launch_blocks", record)
    got = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=(20, 0), backend="triton")
    assert used == [(True, True)]
    want = oracle(inputs["query"], inputs["key"], inputs["value"], attn_mask=band(97, 97, 0, (20, 0)), is_causal=True)
    assert rel_err(got, want) <= BOUNDS[torch.float32]


# ----------------------------------------------------------------------------------------------------
# Packed (varlen): bottom-right band when Lq != Lk

# (lq, lk, H, Hkv, window, causal)
VARLEN = [
    ([40, 3, 70], [70, 9, 40], 2, 2, (12, 5), False),
    ([40, 3, 70], [70, 9, 40], 4, 2, (20, 0), True),  # sliding window, causal bottom-right, GQA
    ([65, 1], [65, 33], 2, 1, (-1, 8), False),
]


@pytest.mark.parametrize("case,dtype", dtype_cases(VARLEN, (1,)), ids=lambda c: "q{}k{}H{}Hkv{}w{}_{}{}".format(
    "-".join(map(str, c[0])), "-".join(map(str, c[1])), *c[2:4], *c[4], "causal" if c[5] else "")
    if isinstance(c, tuple) else str(c)[6:])
def test_varlen_window_matches_oracle(backend, device, dtype, case):
    lq, lk, H, Hkv, window, causal = case
    inputs = varlen_inputs(lq, lk, H, Hkv, 32, 32, torch.Generator().manual_seed(11))

    def fn(q, k, v):
        return fusedlm.varlen_attention(q, k, v, cu(lq).to(device), cu(lk).to(device), max(lq), max(lk),
                                        causal=causal, window_size=window, backend=backend)

    rows = check_case(fn, lambda q, k, v: window_varlen_oracle(q, k, v, lq, lk, window, causal),
                      inputs, dtype=dtype, device=device, grad=("q", "k", "v"))
    assert [q for q, _ in rows] == ["out", "dq", "dk", "dv"]
    assert_within(rows, dtype)


# ----------------------------------------------------------------------------------------------------
# varlen dropout


def _varlen(backend, device, lq, lk, seed, q, k, v, **kw):
    torch.manual_seed(seed)
    return fusedlm.varlen_attention(q, k, v, cu(lq).to(device), cu(lk).to(device), max(lq), max(lk),
                                    backend=backend, **kw)


def test_varlen_dropout_seed_reproduces_and_differs(backend, device):
    lq, lk = [30, 17], [25, 40]
    gen = torch.Generator().manual_seed(13)
    q, k, v = (x.float().to(device).requires_grad_(True) for x in varlen_inputs(lq, lk, 2, 2, 32, 32, gen).values())
    runs = []
    for seed in (1, 1, 2):
        out = _varlen(backend, device, lq, lk, seed, q, k, v, dropout_p=0.25, causal=True)
        runs.append((out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    (o1, g1), (o2, g2), (o3, g3) = runs
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3) and not torch.equal(g1[2], g3[2])
    plain = _varlen(backend, device, lq, lk, 1, q, k, v, causal=True)
    assert torch.equal(_varlen(backend, device, lq, lk, 1, q, k, v, dropout_p=0.0, causal=True), plain)
    assert not torch.allclose(o1, plain, atol=1e-3)


@pytest.mark.parametrize("window", [None, (9, 4)])
def test_varlen_dropout_backward_uses_the_forward_mask(backend, device, dtype, window):
    """Read each sequence's dropout mask through value = identity, then out and every gradient of a run with
    that seed must equal the float64 oracle given that mask (a backward drawing another mask fails)."""
    lq, lk, H, p, seed = [30, 40], [48, 20], 2, 0.2, 77
    gen = torch.Generator().manual_seed(17)
    inputs = varlen_inputs(lq, lk, H, H, 32, max(lk), gen)
    q, k = (inputs[n].to(device=device, dtype=dtype) for n in ("q", "k"))
    eye = torch.cat([torch.eye(n, max(lk)) for n in lk])[:, None, :].expand(-1, H, -1)
    probs = _varlen(backend, device, lq, lk, seed, q, k, eye.to(device=device, dtype=dtype), dropout_p=p,
                    window_size=window).cpu()
    cq = cu(lq).tolist()
    keeps = [(probs[cq[b]:cq[b + 1], :, :lk[b]] != 0).transpose(0, 1)[None] for b in range(len(lq))]
    allowed = torch.cat([(band(lq[b], lk[b], lk[b] - lq[b], window) if window else torch.ones(lq[b], lk[b],
                          dtype=torch.bool)).expand(H, -1, -1).flatten() for b in range(len(lq))])
    kept = torch.cat([kp.flatten() for kp in keeps])
    assert not (kept & ~allowed).any()
    frac = 1 - kept[allowed].double().mean().item()
    assert abs(frac - p) < 0.06, frac

    def fn(q, k, v):
        return _varlen(backend, device, lq, lk, seed, q, k, v, dropout_p=p, window_size=window)

    def ref(q, k, v):
        return window_varlen_oracle(q, k, v, lq, lk, window, keeps=keeps, dropout_p=p)

    rows = check_case(fn, ref, inputs, dtype=dtype, device=device, grad=("q", "k", "v"))
    assert_within(rows, dtype)


# ----------------------------------------------------------------------------------------------------
# Registered ops and torch.compile


def test_opcheck_window_and_varlen_dropout(device):
    """torch.library.opcheck on fusedlm::attention_fwd / attention_bwd with the window arguments and the
    varlen dropout seed the public function passes them."""
    triton_or_skip()
    gen = torch.Generator().manual_seed(19)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(True)

    recorder = RecordFusedOps("attention")
    lq, lk = [3, 9], [5, 9]
    with recorder:
        torch.manual_seed(0)
        out = fusedlm.varlen_attention(t(12, 2, 24), t(14, 1, 24), t(14, 1, 40), cu(lq).to(device),
                                       cu(lk).to(device), 9, 9, causal=True, window_size=(2, 0), dropout_p=0.3,
                                       backend="triton")
        out.backward(torch.randn(out.shape, generator=gen).to(device))
    names = [f.name() for f, _, _ in recorder.calls]
    assert any("attention_fwd" in n for n in names) and any("attention_bwd" in n for n in names), names
    for func, args, kwargs in recorder.calls:
        assert tuple(args[-2:]) == (2, 0), "window (left, right) not passed to the op"
        forward = "attention_fwd" in func.name()
        args = detach_clone(args, requires_grad=forward)
        if forward:
            args = tuple(a.detach() if isinstance(a, torch.Tensor) and i >= 3 else a for i, a in enumerate(args))
        torch.library.opcheck(func, args, detach_clone(kwargs))


def test_torch_compile_window_equals_eager(backend, device):
    def block(q, k, v, kpm):
        out = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, key_padding_mask=kpm,
                                                   window_size=(7, 0), backend=backend)
        return out.square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    gen = torch.Generator().manual_seed(23)
    args = [torch.randn(1, 4, 37, 32, generator=gen).to(device).requires_grad_(True),
            torch.randn(1, 2, 37, 32, generator=gen).to(device).requires_grad_(True),
            torch.randn(1, 2, 37, 32, generator=gen).to(device).requires_grad_(True),
            (torch.rand(1, 37, generator=gen) < 0.8).to(device)]
    eager = block(*args)
    eager_grads = torch.autograd.grad(eager, args[:3])
    out = compiled(*args)
    grads = torch.autograd.grad(out, args[:3])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("bad", [(-2, 0), (3,), (1, 2, 3), (1.0, 2), (True, 0), "ab", 5])
def test_window_size_validation(bad):
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="window_size"):
        fusedlm.scaled_dot_product_attention(q, q, q, window_size=bad)
    p = torch.randn(5, 2, 16)
    offsets = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="window_size"):
        fusedlm.varlen_attention(p, p, p, offsets, offsets, 5, 5, window_size=bad)


def test_varlen_dropout_validation():
    p = torch.randn(5, 2, 16)
    offsets = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="dropout_p: expected a probability"):
        fusedlm.varlen_attention(p, p, p, offsets, offsets, 5, 5, dropout_p=1.0)


def test_unbounded_window_is_no_window(backend, device):
    q, k, v = (torch.randn(1, 2, 40, 32, device=device) for _ in range(3))
    plain = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    assert torch.equal(fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=(-1, -1),
                                                            backend=backend), plain)
    # a window wider than the sequence changes nothing either (up to the order of the block loop)
    wide = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=(100, 100), backend=backend)
    assert rel_err(wide, plain) <= BOUNDS[torch.float32]
