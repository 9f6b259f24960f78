"""kv_cache_attention, both backends, against a float64 oracle written here.

The oracle walks the cache token by token: it writes the new keys (turned by the textbook rotary formula at
their positions) into a float64 copy of the cache, contiguous or through the block table, collects each
sequence's T_b keys one by one, and takes the softmax of each query row over the keys its position allows.
It shares no code with fusedlm.reference (the torch backend under test).
"""
import math

import pytest
import torch

import fusedlm
from fusedlm.kernels import kv_cache as K
from fusedlm.verify import BOUNDS, rel_err
from helpers import RecordFusedOps, triton_or_skip

NEG_INF = float("-inf")


def turn(x, cos, sin, interleaved):
    """Rotary of one row x (E,) with the table rows cos, sin (R,): pairs (d, d + R/2) or (2i, 2i + 1)."""
    R = cos.shape[0]
    out = x.clone()
    for a in range(R // 2):
        i, j = (2 * a, 2 * a + 1) if interleaved else (a, a + R // 2)
        out[i] = x[i] * cos[i] - x[j] * sin[i]
        out[j] = x[j] * cos[j] + x[i] * sin[j]
    return out


def oracle(q, k_cache, v_cache, seqlens, k, v, cos, sin, interleaved, block_table, causal, scale, window):
    """-> (out (B, Lq, H, Ev), lse (B, H, Lq), k_cache, v_cache after the append), all float64."""
    q, kc, vc = q.double(), k_cache.double().clone(), v_cache.double().clone()
    B, Lq, H, E = q.shape
    Hkv = kc.shape[2]
    Lnew = 0 if k is None else k.shape[1]
    bs = kc.shape[1]

    def slot(b, t):
        return (int(block_table[b, t // bs]), t % bs) if block_table is not None else (b, t)

    out = torch.zeros(B, Lq, H, vc.shape[-1], dtype=torch.float64)
    lse = torch.full((B, H, Lq), NEG_INF, dtype=torch.float64)
    left, right = window or (-1, -1)
    for b in range(B):
        T0 = int(seqlens[b])
        for j in range(Lnew):
            for hk in range(Hkv):
                row = k[b, j, hk].double()
                if cos is not None:
                    row = turn(row, cos[T0 + j].double(), sin[T0 + j].double(), interleaved)
                kc[slot(b, T0 + j) + (hk,)] = row
                vc[slot(b, T0 + j) + (hk,)] = v[b, j, hk].double()
        T = T0 + Lnew
        keys = [[kc[slot(b, t) + (hk,)] for t in range(T)] for hk in range(Hkv)]
        vals = [[vc[slot(b, t) + (hk,)] for t in range(T)] for hk in range(Hkv)]
        for i in range(Lq):
            p = T - Lq + i
            for h in range(H):
                hk = h // (H // Hkv)
                qi = q[b, i, h]
                if cos is not None:
                    qi = turn(qi, cos[max(p, 0)].double(), sin[max(p, 0)].double(), interleaved)
                seen = [t for t in range(T) if (not causal or t <= p) and (left < 0 or t >= p - left)
                        and (right < 0 or t <= p + right)]
                if not seen:
                    continue
                z = torch.stack([qi @ keys[hk][t] for t in seen]) * scale
                w = torch.softmax(z, 0)
                out[b, i, h] = sum(w[n] * vals[hk][t] for n, t in enumerate(seen))
                lse[b, h, i] = torch.logsumexp(z, 0)
    return out, lse, kc, vc


def make(B=3, Lq=1, Lnew=1, H=4, Hkv=2, E=32, Ev=None, S=40, lens=(5, 0, 20), paged=None, rotary=None,
         dtype=torch.float32, hf_layout=False, seed=0):
    """Inputs: a contiguous cache (B, S, Hkv, E) (or transformers' (B, Hkv, S, E) seen through a transpose), or
    with ``paged = block_size`` a shuffled pool of blocks; rotary = R gives cos / sin tables (128, R)."""
    g = torch.Generator().manual_seed(seed)
    Ev = Ev or E

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)
    t = {"q": rnd(B, Lq, H, E), "cache_seqlens": torch.tensor(lens[:B], dtype=torch.int32)}
    if paged:
        per_seq = math.ceil(S / paged)
        nb = B * per_seq + 3
        t["k_cache"], t["v_cache"] = rnd(nb, paged, Hkv, E), rnd(nb, paged, Hkv, Ev)
        t["block_table"] = torch.randperm(nb, generator=g)[:B * per_seq].view(B, per_seq).int()
    elif hf_layout:
        t["k_cache"], t["v_cache"] = rnd(B, Hkv, S, E).transpose(1, 2), rnd(B, Hkv, S, Ev).transpose(1, 2)
    else:
        t["k_cache"], t["v_cache"] = rnd(B, S, Hkv, E), rnd(B, S, Hkv, Ev)
    if Lnew:
        t["k"], t["v"] = rnd(B, Lnew, Hkv, E), rnd(B, Lnew, Hkv, Ev)
    if rotary:
        t["cos"], t["sin"] = torch.randn(128, rotary, generator=g), torch.randn(128, rotary, generator=g)
    return t


def run_and_check(backend, t, dtype, causal=True, window=None, interleaved=False, scale=None):
    """kv_cache_attention on t (its caches written in place) against the oracle: output, lse and caches."""
    E = t["q"].shape[-1]
    scale_used = scale if scale is not None else E ** -0.5
    want = oracle(t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"], t.get("k"), t.get("v"), t.get("cos"),
                  t.get("sin"), interleaved, t.get("block_table"), causal, scale_used, window)
    before_k = t["k_cache"].clone()
    out, lse = fusedlm.kv_cache_attention(
        t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"], k=t.get("k"), v=t.get("v"), cos=t.get("cos"),
        sin=t.get("sin"), interleaved=interleaved, block_table=t.get("block_table"), causal=causal, scale=scale,
        window_size=window, return_lse=True, backend=backend)
    assert out.dtype == dtype and out.shape == want[0].shape and lse.dtype == torch.float32
    bound = BOUNDS[dtype]
    assert rel_err(out, want[0]) <= bound, rel_err(out, want[0])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want[1])), "empty rows: lse -inf exactly there"
    seen = ~torch.isneginf(want[1])
    assert rel_err(lse[seen], want[1][seen]) <= bound
    assert rel_err(t["k_cache"], want[2]) <= bound and rel_err(t["v_cache"], want[3]) <= bound
    untouched = (want[2] == before_k.double()).all(-1)  # rows the append did not write stay bit for bit
    assert torch.equal(t["k_cache"][untouched], before_k[untouched])
    return out, lse


@pytest.mark.parametrize("layout", ["contiguous", "hf", "paged16", "paged32"])
def test_decode_step_appends_with_rotary_and_attends(backend, layout, dtype):
    """One new token per sequence (decode) with GQA and rotary, an empty sequence among them, every layout."""
    paged = {"paged16": 16, "paged32": 32}.get(layout)
    t = make(dtype=dtype, paged=paged, hf_layout=layout == "hf", rotary=32, S=64)
    base = t["k_cache"]._base if layout == "hf" else None
    run_and_check(backend, t, dtype)
    if base is not None:  # transformers' own cache tensor got the new keys (written through the view)
        assert torch.equal(base.transpose(1, 2), t["k_cache"])


@pytest.mark.parametrize("case", ["speculative", "partial-interleaved", "window", "noncausal-window", "no-append",
                                  "longer-queries-than-keys", "wide-ev"])
def test_query_rows_windows_and_rotary_forms(backend, case, dtype):
    kw, t_kw = {}, {}
    if case == "speculative":  # 3 queries verifying 3 new tokens, paged
        t_kw = dict(Lq=3, Lnew=3, paged=16, rotary=32)
    elif case == "partial-interleaved":  # R < E, pairs (2i, 2i + 1)
        t_kw, kw = dict(Lq=2, Lnew=2, rotary=12, E=40), dict(interleaved=True)
    elif case == "window":
        t_kw, kw = dict(Lq=4, Lnew=4, lens=(9, 1, 20)), dict(window=(5, 0))
    elif case == "noncausal-window":
        t_kw, kw = dict(Lq=3, Lnew=1, paged=16, H=8), dict(causal=False, window=(3, 2), scale=0.3)
    elif case == "no-append":  # attend only: nothing written
        t_kw = dict(Lq=2, Lnew=0)
    elif case == "longer-queries-than-keys":  # query i before the first key: zeros, lse -inf
        t_kw = dict(Lq=6, Lnew=2, lens=(1, 0, 3))
    elif case == "wide-ev":
        t_kw = dict(E=24, Ev=48, H=6, Hkv=3, Lq=2, Lnew=1)
    t = make(dtype=dtype, **t_kw)
    out, lse = run_and_check(backend, t, dtype, **kw)
    if case == "longer-queries-than-keys":
        assert (out[1, :4] == 0).all() and torch.isneginf(lse[1, :, :4]).all()  # T = 2: queries 0..3 see nothing
        assert torch.isfinite(lse[1, :, 4:]).all()


def test_empty_sequences_and_empty_batch(backend):
    """No key at all (every length 0, nothing appended): zeros and lse -inf; an empty batch and Lq = 0 give
    empty outputs."""
    t = make(lens=(0, 0, 0), Lnew=0, Lq=2)
    out, lse = run_and_check(backend, t, torch.float32)
    assert (out == 0).all() and torch.isneginf(lse).all()
    for q, cache, lens in [(torch.randn(0, 1, 4, 16), torch.randn(0, 8, 2, 16), torch.zeros(0, dtype=torch.int32)),
                           (torch.randn(2, 0, 4, 16), torch.randn(2, 8, 2, 16), torch.ones(2, dtype=torch.int32))]:
        out, lse = fusedlm.kv_cache_attention(q, cache, cache, lens, return_lse=True, backend=backend)
        assert out.shape == q.shape and lse.shape == (q.shape[0], 4, q.shape[1])


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_split_kv_partials_merge_to_the_same_result(monkeypatch, splits):
    """The Triton split-KV kernel with the keys cut into 1, 3 and 7 chunks a sequence (ragged lengths, a chunk
    past a short sequence's end, an empty sequence): the lse merge gives the one-program result."""
    triton_or_skip()
    monkeypatch.setattr(K, "num_splits", lambda *a: splits)
    t = make(B=4, lens=(70, 0, 5, 33), S=96, Lq=2, Lnew=2, rotary=16, paged=16)
    run_and_check("triton", t, torch.float32)


@pytest.mark.parametrize("splits", [1, 5])
def test_windowed_decode_splits_the_window_only(monkeypatch, splits):
    """With a window the splits cut [first key the window reaches, T_b): every split gets window keys."""
    triton_or_skip()
    monkeypatch.setattr(K, "num_splits", lambda *a: splits)
    t = make(B=2, lens=(90, 40), S=96, Lq=1, Lnew=1, rotary=16)
    run_and_check("triton", t, torch.float32, window=(20, 0))


def test_strided_lengths_block_table_and_nan_in_unused_slots(backend):
    """cache_seqlens and block_table as strided views, unused cache slots holding NaN (a cache made with
    torch.empty): the same result as contiguous, finite."""
    t = make(paged=16, Lq=2, Lnew=2, rotary=32, S=64)
    lens = t["cache_seqlens"]
    t["cache_seqlens"] = torch.stack([lens, torch.full_like(lens, 999)], 1)[:, 0]  # stride 2
    table = t["block_table"]
    t["block_table"] = table.t().contiguous().t()  # strides (1, B)
    want = oracle(t["q"], t["k_cache"], t["v_cache"], lens, t["k"], t["v"], t["cos"], t["sin"], False, table, True,
                  32 ** -0.5, None)[0]
    used = set()
    for b in range(table.shape[0]):  # the blocks sequence b reaches after the append
        used |= {int(x) for x in table[b, :(int(lens[b]) + 2 + 15) // 16]}
    for blk in set(range(t["k_cache"].shape[0])) - used:
        t["k_cache"][blk], t["v_cache"][blk] = float("nan"), float("nan")
    out = fusedlm.kv_cache_attention(t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"], k=t["k"], v=t["v"],
                                     cos=t["cos"], sin=t["sin"], block_table=t["block_table"], backend=backend)
    assert torch.isfinite(out).all() and rel_err(out, want) <= BOUNDS[torch.float32]


def test_chunked_prefill_rows_span_several_tiles(backend):
    """Lq x G = 80 query rows a K/V head: more than one row tile."""
    t = make(B=2, Lq=20, Lnew=20, H=8, Hkv=2, lens=(10, 0), S=48, rotary=32)
    run_and_check(backend, t, torch.float32)


def test_decode_step_compiles_fullgraph_without_host_sync(backend):
    """A decode step under torch.compile(fullgraph=True): no .item(), no branch on the lengths' values."""
    t = make(Lnew=1, rotary=32)
    t2 = {n: x.clone() for n, x in t.items()}

    def step(q, k_cache, v_cache, seqlens, k, v, cos, sin):
        return fusedlm.kv_cache_attention(q, k_cache, v_cache, seqlens, k=k, v=v, cos=cos, sin=sin,
                                          backend=backend)
    args = [t[n] for n in ("q", "k_cache", "v_cache", "cache_seqlens", "k", "v", "cos", "sin")]
    args2 = [t2[n] for n in ("q", "k_cache", "v_cache", "cache_seqlens", "k", "v", "cos", "sin")]
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args2)
    want = step(*args)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(t2["k_cache"], t["k_cache"], atol=1e-6)


def test_registered_triton_ops_pass_opcheck():
    triton_or_skip()
    t = make(B=2, lens=(3, 7), rotary=16, S=16)
    append, attend = fusedlm.ops.kv_cache._triton_ops()
    torch.library.opcheck(append, (t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"], t["k"], t["v"], t["cos"],
                                   t["sin"], None, False))
    torch.library.opcheck(attend, (t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"], None, None, 1, True, 0.2,
                                   -1, -1))


@pytest.mark.parametrize("L, padding", [(1, True), (3, False), (2, True)])
def test_sdpa_runs_short_queries_over_long_keys_on_the_split_kv_kernel(L, padding, dtype):
    """scaled_dot_product_attention with a decode shape (transformers hands over the whole cache) takes the
    split-KV kernel on the Triton backend, key padding with holes included; equal to float64 attention."""
    triton_or_skip()
    g = torch.Generator().manual_seed(L)
    B, H, Hkv, S, E = 2, 8, 2, 50, 32
    q, k, v = (torch.randn(B, h, n, E, generator=g).to(dtype) for h, n in ((H, L), (Hkv, S), (Hkv, S)))
    kpm = torch.rand(B, S, generator=g) > 0.3 if padding else None
    with RecordFusedOps("kv_cache_attention_fwd") as rec:
        out, lse = fusedlm.scaled_dot_product_attention(q, k, v, enable_gqa=True, key_padding_mask=kpm,
                                                        return_lse=True, backend="triton")
    assert len(rec.calls) == 1, "the split-KV kernel served the call"
    if L == 3:  # key / value views whose feature dim is not contiguous: read right (copied for the kernel)
        k2, v2 = k.transpose(-1, -2).contiguous().transpose(-1, -2), torch.stack([v, v], -1)[..., 0]
        out2 = fusedlm.scaled_dot_product_attention(q, k2, v2, enable_gqa=True, key_padding_mask=kpm,
                                                    backend="triton")
        assert torch.allclose(out2, out, atol=1e-6)
    kk, vv = (x.double().repeat_interleave(H // Hkv, 1) for x in (k, v))
    z = q.double() @ kk.transpose(-1, -2) * E ** -0.5
    if kpm is not None:
        z = z.masked_fill(~kpm[:, None, None, :], NEG_INF)
    assert rel_err(out, torch.softmax(z, -1) @ vv) <= BOUNDS[dtype]
    assert rel_err(lse, torch.logsumexp(z, -1)) <= BOUNDS[dtype]


def test_sdpa_keeps_the_training_kernel_where_the_split_kv_one_does_not_serve():
    """A gradient wanted, a causal (top-left) query, or a square shape: the training kernel, as before."""
    triton_or_skip()
    q, k = torch.randn(1, 4, 1, 16, requires_grad=True), torch.randn(1, 4, 40, 16)
    for kw, (qq, kk) in [({}, (q, k)), ({"is_causal": True}, (q.detach(), k)),
                         ({}, (torch.randn(1, 4, 40, 16), k))]:
        with RecordFusedOps("kv_cache_attention_fwd") as rec:
            fusedlm.scaled_dot_product_attention(qq, kk, kk, backend="triton", **kw)
        assert not rec.calls, kw


def test_bad_input_names_the_argument():
    t = make()
    q, kc, vc, lens = t["q"], t["k_cache"], t["v_cache"], t["cache_seqlens"]
    call = fusedlm.kv_cache_attention
    with pytest.raises(TypeError, match="cache_seqlens: expected dtype torch.int32"):
        call(q, kc, vc, lens.long())
    with pytest.raises(ValueError, match="cache_seqlens: a sequence of 39 tokens plus 2 new ones passes the "
                                         "cache's capacity of 40"):
        call(q, kc, vc, torch.tensor([39, 0, 0], dtype=torch.int32), k=t["k"].repeat(1, 2, 1, 1),
             v=t["v"].repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match="cache_seqlens: expected lengths >= 0"):
        call(q, kc, vc, torch.tensor([-1, 0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="k, v: expected both or neither"):
        call(q, kc, vc, lens, k=t["k"])
    with pytest.raises(ValueError, match="k_cache: expected a number of heads dividing q's 4"):
        call(q, kc.repeat(1, 1, 3, 1)[:, :, :3], vc.repeat(1, 1, 3, 1)[:, :, :3], lens)
    with pytest.raises(ValueError, match="k_cache: expected a unit stride on the last dim"):
        call(q, kc.transpose(-1, -2).contiguous().transpose(-1, -2), vc, lens)
    with pytest.raises(ValueError, match="cos: expected rows for positions up to 20"):
        call(q, kc, vc, lens, k=t["k"], v=t["v"], cos=torch.ones(20, 8), sin=torch.ones(20, 8))
    with pytest.raises(ValueError, match="cos: expected \\(P, R\\) with R even"):
        call(q, kc, vc, lens, cos=torch.ones(64, 7), sin=torch.ones(64, 7))
    with pytest.raises(TypeError, match="v_cache: expected dtype torch.float32"):
        call(q, kc, vc.half(), lens)
    p = make(paged=16)
    bad = p["block_table"].clone()
    bad[2, 0] = 99
    with pytest.raises(ValueError, match="block_table: expected block indices in \\[0, 12\\)"):
        call(p["q"], p["k_cache"], p["v_cache"], p["cache_seqlens"], block_table=bad)
    with pytest.raises(ValueError, match="block_table: expected 3 rows"):
        call(p["q"], p["k_cache"], p["v_cache"], p["cache_seqlens"], block_table=p["block_table"][:2])
