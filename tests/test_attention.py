"""scaled_dot_product_attention and varlen_attention, every backend, against float64 oracles written here.

The oracles are the textbook formula in float64 (scores = q k^T * scale, masks, softmax, a row that
sees no key gives zeros), not fusedlm.reference, which is itself the torch backend under test. Masks
are applied by an explicit boolean "allowed" tensor, GQA by an explicit head index, varlen by a loop
over the sequences with the bottom-right causal test written out. torch's own SDPA is a second
witness for the plain cases.

Shapes are small on purpose (the Triton interpreter runs the CPU tests) but odd: head dims 16..256
not powers of two, lengths 1, 67, 129, L != S both ways, GQA, masks with holes, fully masked rows.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.verify import BOUNDS, check_case, rel_err
from helpers import RecordFusedOps, assert_within, detach_clone, triton_or_skip

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------
# Oracles (float64, CPU)


def oracle(query, key, value, attn_mask=None, is_causal=False, scale=None, key_padding_mask=None,
           return_lse=False, keep=None, dropout_p=0.0):
    """Attention by the book. keep: an optional (B, H, L, S) 0/1 dropout mask applied to the probabilities."""
    B, H, L, E = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    kv_head = torch.arange(H) // (H // Hkv)  # query head h reads kv head h // (H / Hkv)
    key, value = key[:, kv_head], value[:, kv_head]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    scores = torch.einsum("bhle,bhse->bhls", query, key) * scale
    allowed = torch.ones(B, H, L, S, dtype=torch.bool)
    if is_causal:  # top-left: query i sees keys j <= i
        allowed &= torch.arange(S)[None, :] <= torch.arange(L)[:, None]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed &= attn_mask.cpu()
        else:
            scores = scores + attn_mask.cpu()
    if key_padding_mask is not None:
        allowed &= key_padding_mask.cpu()[:, None, None, :]
    scores = scores.masked_fill(~allowed, NEG_INF)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if keep is not None:
        probs = probs * keep.cpu().to(probs.dtype) / (1.0 - dropout_p)
    out = torch.einsum("bhls,bhse->bhle", probs, value)
    if return_lse:
        return out, torch.logsumexp(scores, dim=-1)
    return out


def varlen_oracle(q, k, v, cu_q, cu_k, causal=False, scale=None, return_lse=False):
    """Packed attention: one dense oracle call per sequence; causal aligned bottom-right."""
    cu_q, cu_k = [int(x) for x in cu_q], [int(x) for x in cu_k]
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]
        Lq, Lk = qs.shape[0], ks.shape[0]
        mask = None
        if causal:  # query i sees keys j <= i + Lk - Lq
            mask = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
        out, lse = oracle(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                          attn_mask=mask, scale=scale, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------
# Helpers


def randn(*shape, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def qkv(B, H, Hkv, L, S, E, Ev, gen=None):
    return dict(query=randn(B, H, L, E, gen=gen), key=randn(B, Hkv, S, E, gen=gen),
                value=randn(B, Hkv, S, Ev, gen=gen))


def sdpa_fn(backend, **kw):
    """fn(query, key, value[, attn_mask]) for check_case; tensors other than q/k/v/float mask via kw."""
    def fn(query, key, value, attn_mask=None):
        extra = dict(kw)
        for name in ("key_padding_mask", "bool_mask"):
            if extra.get(name) is not None:
                extra[name] = extra[name].to(query.device)
        if "bool_mask" in extra:
            attn_mask = extra.pop("bool_mask")
        return fusedlm.scaled_dot_product_attention(query, key, value, attn_mask, backend=backend, **extra)
    return fn


def oracle_fn(**kw):
    def ref(query, key, value, attn_mask=None):
        extra = dict(kw)
        if "bool_mask" in extra:
            attn_mask = extra.pop("bool_mask")
        extra.pop("enable_gqa", None)
        return oracle(query, key, value, attn_mask, **extra)
    return ref


def run_dense(backend, device, dtype, inputs, **kw):
    """check_case for sdpa with keyword arguments kw (bool_mask= for a bool attn_mask); grads of q, k, v."""
    rows = check_case(sdpa_fn(backend, **kw), oracle_fn(**kw), inputs, dtype=dtype, device=device,
                      grad=("query", "key", "value"))
    assert [q for q, _ in rows] == ["out", "dquery", "dkey", "dvalue"]
    assert_within(rows, dtype)


def random_lengths_mask(lengths, S):
    return torch.stack([torch.arange(S) < n for n in lengths])


def check_lse(got, want, dtype):
    assert got.dtype == torch.float32, got.dtype
    assert got.shape == want.shape
    got = got.detach().cpu().double()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf rows differ"
    assert torch.isfinite(got[~torch.isneginf(want)]).all()
    finite = ~torch.isneginf(want)
    assert rel_err(got[finite], want[finite]) <= BOUNDS[dtype]


# ----------------------------------------------------------------------------------------------------
# Dense attention: shapes, head dims, causal alignment, GQA

# (B, H, Hkv, L, S, E, Ev, causal)
DENSE = [
    (2, 4, 4, 67, 67, 64, 64, False),
    (2, 4, 4, 67, 67, 64, 64, True),
    (1, 2, 2, 17, 129, 40, 40, True),  # L < S, causal top-left: the last 112 keys are seen by nobody
    (1, 2, 2, 129, 17, 80, 80, True),  # L > S: rows 16.. see every key
    (2, 2, 2, 1, 67, 96, 96, False),  # one query
    (2, 2, 2, 1, 67, 96, 96, True),  # one query, causal: it sees key 0 only
    (2, 2, 2, 67, 1, 16, 16, True),  # one key
    (1, 2, 2, 129, 129, 128, 128, True),
    (1, 1, 1, 17, 17, 256, 256, False),  # the widest head
    (1, 2, 2, 33, 45, 64, 40, False),  # Ev < E
    (1, 2, 2, 45, 33, 40, 96, True),  # Ev > E
    (2, 4, 2, 37, 37, 64, 64, True),  # GQA
    (1, 4, 1, 29, 53, 80, 80, False),  # MQA
]


@pytest.mark.parametrize("case", DENSE, ids=lambda c: "B{}H{}Hkv{}L{}S{}E{}Ev{}{}".format(
    *c[:7], "causal" if c[7] else ""))
def test_sdpa_matches_oracle(backend, device, dtype, case):
    B, H, Hkv, L, S, E, Ev, causal = case
    inputs = qkv(B, H, Hkv, L, S, E, Ev, torch.Generator().manual_seed(hash(case) % 2**31))
    run_dense(backend, device, dtype, inputs, is_causal=causal, enable_gqa=H != Hkv)


@pytest.mark.parametrize("scale", [0.37, 2.0])
def test_explicit_scale(backend, device, dtype, scale):
    inputs = qkv(1, 2, 2, 23, 31, 48, 48)
    run_dense(backend, device, dtype, inputs, scale=scale, is_causal=True)


def test_default_scale_is_one_over_sqrt_e(backend, device):
    q, k, v = (torch.randn(1, 2, 9, 40, device=device) for _ in range(3))
    a = fusedlm.scaled_dot_product_attention(q, k, v, backend=backend)
    b = fusedlm.scaled_dot_product_attention(q, k, v, scale=40 ** -0.5, backend=backend)
    c = fusedlm.scaled_dot_product_attention(q, k, v, scale=1.0, backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("config", ["causal_L_lt_S", "gqa_float_mask", "bool_mask"])
def test_matches_torch_sdpa(backend, device, config):
    """torch.nn.functional.scaled_dot_product_attention as a second witness (float32, non-degenerate rows)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 13, 32, generator=gen)
    k = torch.randn(2, 4 if config != "gqa_float_mask" else 2, 21, 32, generator=gen)
    v = torch.randn(k.shape[:-1] + (24,), generator=gen)
    kw = {}
    if config == "causal_L_lt_S":
        kw["is_causal"] = True
    elif config == "gqa_float_mask":
        kw.update(attn_mask=torch.randn(2, 1, 13, 21, generator=gen), enable_gqa=True)
    else:
        mask = torch.rand(13, 21, generator=gen) < 0.7
        mask[:, 0] = True
        kw["attn_mask"] = mask
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    dev = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    got = fusedlm.scaled_dot_product_attention(q.to(device), k.to(device), v.to(device), backend=backend, **dev)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=2e-5)


def test_output_dtype_shape_and_layout(backend, device, dtype):
    q = torch.randn(2, 3, 5, 32, device=device, dtype=dtype)
    k = torch.randn(2, 3, 7, 32, device=device, dtype=dtype)
    v = torch.randn(2, 3, 7, 48, device=device, dtype=dtype)
    out = fusedlm.scaled_dot_product_attention(q, k, v, backend=backend)
    assert out.dtype == dtype and out.shape == (2, 3, 5, 48) and out.device == q.device
    assert torch.isfinite(out).all()


def test_non_contiguous_inputs(backend, device):
    """Hugging Face layout (B, L, H, E) transposed to (B, H, L, E), and a key with a non-unit last stride."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 19, 4, 40, generator=gen).transpose(1, 2)
    k = torch.randn(2, 2, 40, 23, generator=gen).transpose(-1, -2)  # stride(-1) != 1
    v = torch.randn(2, 23, 2, 56, generator=gen).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    inputs = dict(query=q.double(), key=k.double(), value=v.double())
    # check_case casts with .to(), which keeps the strides: the op sees the non-contiguous tensors.
    run_dense(backend, device, torch.float32, inputs, is_causal=True, enable_gqa=True)


def test_empty_batch(backend, device):
    q = torch.randn(0, 2, 5, 32, device=device, requires_grad=True)
    k = torch.randn(0, 2, 6, 32, device=device, requires_grad=True)
    v = torch.randn(0, 2, 6, 32, device=device, requires_grad=True)
    out = fusedlm.scaled_dot_product_attention(q, k, v, backend=backend)
    assert out.shape == (0, 2, 5, 32)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


# ----------------------------------------------------------------------------------------------------
# Masks: key padding, bool and float attn_mask (broadcast), combinations


# (name, B, H, Hkv, L, S, causal): key padding masks built in the test
KPM_CASES = [
    ("right_and_empty", 2, 2, 2, 67, 67, False),  # random length, and a sequence with every key padded
    ("holes_causal", 2, 4, 2, 67, 67, True),
    ("holes_cross", 2, 2, 2, 19, 67, False),  # L != S
    ("left_causal", 2, 2, 2, 37, 37, True),  # left padding + causal: early rows see no real key -> zeros
]


def make_kpm(name, B, S, gen):
    if name.startswith("right"):
        n = int(torch.randint(1, S, (1,), generator=gen))
        return random_lengths_mask([n, 0], S)
    if name.startswith("holes"):
        mask = torch.rand(B, S, generator=gen) < 0.6
        mask[1, :S // 3] = False  # a long run of padding too
        return mask
    pads = [5, 20]
    return torch.stack([torch.arange(S) >= p for p in pads])


@pytest.mark.parametrize("case", KPM_CASES, ids=lambda c: c[0])
def test_key_padding_mask(backend, device, dtype, case):
    name, B, H, Hkv, L, S, causal = case
    gen = torch.Generator().manual_seed(7)
    inputs = qkv(B, H, Hkv, L, S, 48, 48, gen)
    kpm = make_kpm(name, B, S, gen)
    run_dense(backend, device, dtype, inputs, key_padding_mask=kpm, is_causal=causal, enable_gqa=H != Hkv)


MASK_SHAPES = ["LS", "11LS", "B1LS", "BHLS"]


def make_mask(kind, shape_name, B, H, L, S, gen):
    shape = {"LS": (L, S), "11LS": (1, 1, L, S), "B1LS": (B, 1, L, S), "BHLS": (B, H, L, S)}[shape_name]
    if kind == "bool":
        return torch.rand(shape, generator=gen) < 0.7
    mask = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    return mask.masked_fill(torch.rand(shape, generator=gen) < 0.1, NEG_INF)  # some keys masked by -inf


def mask_kwargs(kind, mask):
    """bool masks travel by closure (check_case would cast a tensor input); float ones as an input."""
    return (dict(bool_mask=mask), {}) if kind == "bool" else ({}, dict(attn_mask=mask))


@pytest.mark.parametrize("shape_name", MASK_SHAPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_broadcast(backend, device, dtype, kind, shape_name):
    B, H, Hkv, L, S = 2, 4, 2, 37, 45
    gen = torch.Generator().manual_seed(13)
    inputs = qkv(B, H, Hkv, L, S, 32, 32, gen)
    kw, extra_inputs = mask_kwargs(kind, make_mask(kind, shape_name, B, H, L, S, gen))
    run_dense(backend, device, dtype, {**inputs, **extra_inputs}, enable_gqa=True, **kw)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_with_causal_and_key_padding(backend, device, dtype, kind):
    B, H, Hkv, L, S = 2, 2, 1, 45, 37  # L > S, causal top-left
    gen = torch.Generator().manual_seed(17)
    inputs = qkv(B, H, Hkv, L, S, 40, 40, gen)
    kw, extra_inputs = mask_kwargs(kind, make_mask(kind, "B1LS", B, H, L, S, gen))
    kpm = torch.rand(B, S, generator=gen) < 0.8
    run_dense(backend, device, dtype, {**inputs, **extra_inputs}, is_causal=True, key_padding_mask=kpm,
              enable_gqa=True, **kw)


# ----------------------------------------------------------------------------------------------------
# Rows with no key to attend to: zeros out, zero gradient, no NaN anywhere


def empty_row_setup(how, gen):
    """(inputs, kwargs for sdpa/oracle) for a case with fully masked query rows."""
    B, H, L, S = 2, 2, 67, 41
    inputs = qkv(B, H, H, L, S, 32, 32, gen)
    if how == "bool_rows":  # scattered empty rows, rows 0 and L - 1 among them
        mask = torch.rand(B, 1, L, S, generator=gen) < 0.5
        mask[:, :, [0, 5, 6, 33, L - 1]] = False
        return inputs, dict(bool_mask=mask)
    if how == "bool_block":  # a whole query block of empty rows beside a partial one
        mask = torch.ones(L, S, dtype=torch.bool)
        mask[:40] = False
        return inputs, dict(bool_mask=mask)
    if how == "float_neg_inf_rows":
        mask = torch.randn(1, H, L, S, generator=gen, dtype=torch.float64)
        mask[:, :, [2, 3, 50]] = NEG_INF
        return {**inputs, "attn_mask": mask}, {}
    if how == "kpm_all_padded":  # batch 1 has no real key
        return inputs, dict(key_padding_mask=random_lengths_mask([17, 0], S))
    if how == "causal_and_mask":  # row 0 sees only key 0, which the mask removes
        mask = torch.rand(L, S, generator=gen) < 0.8
        mask[:, 0] = False
        mask[1, 1] = False  # row 1: keys 0 and 1 removed -> empty too
        return inputs, dict(bool_mask=mask, is_causal=True)
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["bool_rows", "bool_block", "float_neg_inf_rows", "kpm_all_padded",
                                 "causal_and_mask"])
def test_fully_masked_rows(backend, device, dtype, how):
    inputs, kw = empty_row_setup(how, torch.Generator().manual_seed(19))
    run_dense(backend, device, dtype, inputs, **kw)

    # Exactly zero output and query gradient on the empty rows; no NaN in any gradient.
    t = {n: v.to(device=device, dtype=dtype).requires_grad_(n != "attn_mask") for n, v in inputs.items()}
    out = sdpa_fn(backend, **kw)(**t)
    _, want_lse = oracle_fn(**kw, return_lse=True)(**{n: v.detach().double().cpu() for n, v in t.items()})
    empty = torch.isneginf(want_lse).to(device)  # (B, H, L)
    assert empty.any() and not empty.all()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    dq, dk, dv = torch.autograd.grad(out, [t["query"], t["key"], t["value"]], torch.randn_like(out))
    for g in (dq, dk, dv):
        assert not torch.isnan(g).any() and torch.isfinite(g).all()
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty]))


# ----------------------------------------------------------------------------------------------------
# Packed sequences


# (lengths q, lengths k, H, Hkv, E, Ev, causal)
VARLEN = [
    ([5, 17, 33], [5, 17, 33], 4, 2, 64, 64, True),  # equal lengths: bottom-right == top-left
    ([5, 17, 33], [9, 3, 40], 4, 2, 40, 40, True),  # Lq > Lk in sequence 1: its first 14 rows see nothing
    ([5, 17, 33], [9, 3, 40], 2, 1, 80, 48, False),
    ([0, 7, 12], [4, 0, 12], 2, 2, 32, 32, True),  # a sequence with no query, one with no key
    ([1, 67, 2], [67, 1, 129], 2, 2, 16, 16, True),
]


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def varlen_inputs(lq, lk, H, Hkv, E, Ev, gen):
    return dict(q=randn(sum(lq), H, E, gen=gen), k=randn(sum(lk), Hkv, E, gen=gen), v=randn(sum(lk), Hkv, Ev, gen=gen))


def varlen_fn(backend, lq, lk, **kw):
    def fn(q, k, v):
        return fusedlm.varlen_attention(q, k, v, cu(lq).to(q.device), cu(lk).to(q.device), max(lq), max(lk),
                                        backend=backend, **kw)
    return fn


@pytest.mark.parametrize("case", VARLEN, ids=lambda c: "q{}k{}H{}Hkv{}E{}Ev{}{}".format(
    "-".join(map(str, c[0])), "-".join(map(str, c[1])), *c[2:6], "causal" if c[6] else ""))
def test_varlen_matches_oracle(backend, device, dtype, case):
    lq, lk, H, Hkv, E, Ev, causal = case
    inputs = varlen_inputs(lq, lk, H, Hkv, E, Ev, torch.Generator().manual_seed(23))
    rows = check_case(varlen_fn(backend, lq, lk, causal=causal),
                      lambda q, k, v: varlen_oracle(q, k, v, cu(lq), cu(lk), causal=causal),
                      inputs, dtype=dtype, device=device, grad=("q", "k", "v"))
    assert [q for q, _ in rows] == ["out", "dq", "dk", "dv"]
    assert_within(rows, dtype)


def test_varlen_scale_and_empty_rows_are_zero(backend, device):
    lq, lk = [17, 4], [3, 9]
    inputs = varlen_inputs(lq, lk, 2, 2, 32, 32, torch.Generator().manual_seed(29))
    rows = check_case(varlen_fn(backend, lq, lk, causal=True, scale=0.5),
                      lambda q, k, v: varlen_oracle(q, k, v, cu(lq), cu(lk), causal=True, scale=0.5),
                      inputs, dtype=torch.float32, device=device, grad=("q", "k", "v"))
    assert_within(rows, torch.float32)
    q, k, v = (inputs[n].float().to(device).requires_grad_(True) for n in "qkv")
    out = varlen_fn(backend, lq, lk, causal=True, scale=0.5)(q, k, v)
    # sequence 0: Lq = 17, Lk = 3, query i sees keys j <= i - 14: rows 0..13 see none
    assert torch.equal(out[:14], torch.zeros_like(out[:14])) and (out[14:17] != 0).any()
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
    assert torch.equal(dq[:14], torch.zeros_like(dq[:14])) and torch.isfinite(dq).all()


@pytest.mark.parametrize("causal", [False, True])
def test_padded_batch_equals_packed(backend, device, causal):
    """sdpa with key_padding_mask == unpad_input + varlen_attention + pad_input on the real rows, grads too."""
    B, S, H, Hkv, E = 3, 37, 4, 2, 32
    gen = torch.Generator().manual_seed(31)
    mask = torch.rand(B, S, generator=gen) < 0.7  # holes
    mask[0, :3] = False  # left padding
    mask[2] = False  # a sequence with no real token
    mask = mask.to(device)
    # (B, S, heads, E), the layout unpad_input takes
    x = [torch.randn(B, S, h, E, generator=gen).to(device).requires_grad_(True) for h in (H, Hkv, Hkv)]

    dense = fusedlm.scaled_dot_product_attention(*(t.transpose(1, 2) for t in x), is_causal=causal,
                                                 key_padding_mask=mask, enable_gqa=True, backend=backend)
    dense = dense.transpose(1, 2)  # (B, S, H, E)

    packed = [fusedlm.unpad_input(t, mask) for t in x]
    _, indices, cu_seqlens, max_seqlen = packed[0]
    assert cu_seqlens.tolist()[-1] == int(mask.sum()) and cu_seqlens.tolist()[-2] == cu_seqlens.tolist()[-1]
    out = fusedlm.varlen_attention(packed[0][0], packed[1][0], packed[2][0], cu_seqlens, cu_seqlens, max_seqlen,
                                   max_seqlen, causal=causal, backend=backend)
    padded = fusedlm.pad_input(out, indices, B, S)

    real = mask[..., None, None].to(dense.dtype)
    assert rel_err(padded * real, dense * real) <= 2 * BOUNDS[torch.float32]
    assert torch.equal(padded[~mask], torch.zeros_like(padded[~mask]))
    g = torch.randn(dense.shape, generator=gen).to(device) * real  # loss on the real rows only
    want = torch.autograd.grad(dense, x, g)
    got = torch.autograd.grad(padded, x, g)
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) <= 2 * BOUNDS[torch.float32], name


# ----------------------------------------------------------------------------------------------------
# log-sum-exp


def test_sdpa_return_lse(backend, device, dtype):
    gen = torch.Generator().manual_seed(37)
    B, H, Hkv, L, S = 2, 4, 2, 41, 53
    inputs = qkv(B, H, Hkv, L, S, 40, 40, gen)
    mask = torch.rand(L, S, generator=gen) < 0.8
    mask[[0, 7]] = False  # empty rows
    kpm = random_lengths_mask([S, 0], S)  # batch 1 all padded
    t = {n: v.to(device=device, dtype=dtype) for n, v in inputs.items()}
    kw = dict(attn_mask=mask.to(device), is_causal=True, key_padding_mask=kpm.to(device), scale=0.3, enable_gqa=True)
    out, lse = fusedlm.scaled_dot_product_attention(**t, **kw, return_lse=True, backend=backend)
    plain = fusedlm.scaled_dot_product_attention(**t, **kw, backend=backend)
    assert torch.equal(out, plain)
    assert lse.shape == (B, H, L)
    want_out, want_lse = oracle(*(v.double().cpu() for v in t.values()), attn_mask=mask, is_causal=True,
                                key_padding_mask=kpm, scale=0.3, return_lse=True)
    assert torch.isneginf(want_lse[:, :, 0]).all() and torch.isneginf(want_lse[1]).all()
    check_lse(lse, want_lse, dtype)
    assert rel_err(out, want_out) <= BOUNDS[dtype]


def test_varlen_return_lse(backend, device, dtype):
    lq, lk = [17, 5, 9], [3, 12, 0]
    inputs = varlen_inputs(lq, lk, 4, 1, 48, 48, torch.Generator().manual_seed(41))
    t = {n: v.to(device=device, dtype=dtype) for n, v in inputs.items()}
    out, lse = varlen_fn(backend, lq, lk, causal=True, return_lse=True)(**t)
    assert lse.shape == (sum(lq), 4)
    want_out, want_lse = varlen_oracle(*(v.double().cpu() for v in t.values()), cu(lq), cu(lk), causal=True,
                                       return_lse=True)
    assert torch.isneginf(want_lse[:14]).all() and torch.isneginf(want_lse[22:]).all()
    check_lse(lse, want_lse, dtype)
    assert rel_err(out, want_out) <= BOUNDS[dtype]


# ----------------------------------------------------------------------------------------------------
# Dropout


def _seeded(seed, fn, *args, **kw):
    torch.manual_seed(seed)
    return fn(*args, **kw)


def test_dropout_zero_is_no_dropout(backend, device):
    q, k, v = (torch.randn(2, 2, 33, 32, device=device) for _ in range(3))
    a = fusedlm.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True, backend=backend)
    b = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    assert torch.equal(a, b)


def test_dropout_seed_reproduces_and_differs(backend, device):
    q, k, v = (torch.randn(2, 2, 33, 32, device=device, requires_grad=True) for _ in range(3))
    sdpa = fusedlm.scaled_dot_product_attention
    runs = []
    for seed in (1, 1, 2):
        out = _seeded(seed, sdpa, q, k, v, dropout_p=0.25, backend=backend)
        g = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        runs.append((out, g))
    (o1, g1), (o2, g2), (o3, g3) = runs
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3) and not torch.equal(g1[2], g3[2])
    no_dropout = sdpa(q, k, v, backend=backend)
    assert not torch.allclose(o1, no_dropout, atol=1e-3)


def probabilities(backend, device, q, k, seed, p, **kw):
    """The (dropped and rescaled) probability matrix, read through value = identity (Ev = S)."""
    B, Hkv, S = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(S, device=device, dtype=q.dtype).expand(B, Hkv, S, S)
    return _seeded(seed, fusedlm.scaled_dot_product_attention, q, k, eye, dropout_p=p, backend=backend, **kw)


def test_dropout_mask_statistics(backend, device):
    B, H, L, S, E, p = 2, 2, 64, 64, 32, 0.3
    q = torch.randn(B, H, L, E, device=device)
    k = torch.randn(B, H, S, E, device=device)
    probs = probabilities(backend, device, q, k, 0, 0.0)
    assert (probs > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, L, device=device), rtol=1e-5, atol=1e-5)
    dropped = probabilities(backend, device, q, k, 123, p)
    kept = dropped != 0
    frac = 1 - kept.double().mean().item()  # n = 16384: sigma = 0.0036
    assert abs(frac - p) < 0.02, frac
    per_head = 1 - kept.double().mean(dim=(-1, -2))  # n = 4096 each: sigma = 0.007
    assert ((per_head - p).abs() < 0.05).all(), per_head
    # the kept entries are P / (1 - p), exactly the rescaling
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-7)
    # masks differ across batch, heads and rows, and are not the same for every column of a row
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])
    assert not torch.equal(kept[0, 0, 0], kept[0, 0, 1])
    # the mean over seeds approaches the undropped matrix (E[keep / (1 - p)] = 1)
    mean = sum(probabilities(backend, device, q[:1, :1], k[:1, :1], s, p) for s in range(200, 216)) / 16
    assert rel_err(mean, probs[:1, :1]) < 0.25


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_backward_uses_the_forward_mask(backend, device, dtype, causal):
    """Read the dropout mask of a seed through value = identity; then out and every gradient of a run with
    that seed must equal the float64 oracle given that mask. A backward drawing another mask (or none)
    fails on dq/dk/dv; a forward ignoring dropout fails on the dropped fraction."""
    B, H, L, S, E, p, seed = 1, 2, 48, 64, 32, 0.2, 77
    gen = torch.Generator().manual_seed(43)
    inputs = dict(query=randn(B, H, L, E, gen=gen), key=randn(B, H, S, E, gen=gen), value=randn(B, H, S, S, gen=gen))
    q, k = (inputs[n].to(device=device, dtype=dtype) for n in ("query", "key"))
    keep = probabilities(backend, device, q, k, seed, p, is_causal=causal) != 0
    allowed = torch.ones(L, S, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    assert not (keep & ~allowed).any()
    frac = 1 - keep[allowed.expand_as(keep)].double().mean().item()
    assert abs(frac - p) < 0.05, frac

    def fn(query, key, value):
        return _seeded(seed, fusedlm.scaled_dot_product_attention, query, key, value, dropout_p=p,
                       is_causal=causal, backend=backend)

    def ref(query, key, value):
        return oracle(query, key, value, is_causal=causal, keep=keep, dropout_p=p)

    rows = check_case(fn, ref, inputs, dtype=dtype, device=device, grad=("query", "key", "value"))
    assert_within(rows, dtype)


# ----------------------------------------------------------------------------------------------------
# Determinism, registered ops, torch.compile


def test_backward_deterministic_and_inputs_untouched(backend, device):
    gen = torch.Generator().manual_seed(47)
    q = torch.randn(2, 4, 67, 40, generator=gen).to(device).requires_grad_(True)
    k = torch.randn(2, 1, 67, 40, generator=gen).to(device).requires_grad_(True)  # GQA: dk, dv sum 4 heads
    v = torch.randn(2, 1, 67, 40, generator=gen).to(device).requires_grad_(True)
    kpm = (torch.rand(2, 67, generator=gen) < 0.8).to(device)
    before = [t.detach().clone() for t in (q, k, v)]

    def run():
        out = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=True, key_padding_mask=kpm, enable_gqa=True,
                                                   backend=backend)
        return out, torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)

    out, g = run()
    g_copy = g.clone()
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), g)
    out2, g2 = run()
    third = torch.autograd.grad(out2, (q, k, v), g2)
    assert torch.equal(out, out2)
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)
    for t, c in zip((q, k, v), before):
        assert torch.equal(t.detach(), c)
    assert torch.equal(g, g_copy)


@pytest.mark.parametrize("config", ["dense_masks", "dropout", "varlen"])
def test_opcheck(device, config):
    """torch.library.opcheck on the registered ops, with the arguments the public functions pass them."""
    triton_or_skip()
    if not hasattr(torch.ops.fusedlm, "attention_fwd"):
        fusedlm.scaled_dot_product_attention(*(torch.randn(1, 1, 2, 16, device=device) for _ in range(3)),
                                             backend="triton")  # registers on first use
    if not hasattr(torch.ops.fusedlm, "attention_fwd"):
        pytest.skip("no fusedlm::attention_fwd op registered")
    gen = torch.Generator().manual_seed(53)

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(True)

    recorder = RecordFusedOps("attention")
    with recorder:
        if config == "varlen":
            lq, lk = [3, 9], [5, 9]
            out = fusedlm.varlen_attention(t(12, 2, 24), t(14, 1, 24), t(14, 1, 40), cu(lq).to(device),
                                           cu(lk).to(device), 9, 9, causal=True, backend="triton")
        elif config == "dropout":
            torch.manual_seed(0)
            out = fusedlm.scaled_dot_product_attention(t(1, 2, 7, 24), t(1, 2, 9, 24), t(1, 2, 9, 24),
                                                       dropout_p=0.3, backend="triton")
        else:
            out = fusedlm.scaled_dot_product_attention(
                t(2, 2, 7, 24), t(2, 1, 9, 24), t(2, 1, 9, 32), torch.randn(2, 1, 7, 9, generator=gen).to(device),
                is_causal=True, enable_gqa=True, key_padding_mask=torch.tensor([[True] * 9, [True] * 4 + [False] * 5],
                                                                               device=device), backend="triton")
        out.backward(torch.randn(out.shape, generator=gen).to(device))
    names = [f.name() for f, _, _ in recorder.calls]
    assert any("attention_fwd" in n for n in names) and any("attention_bwd" in n for n in names), names
    for func, args, kwargs in recorder.calls:
        forward = "attention_fwd" in func.name()
        args = detach_clone(args, requires_grad=forward)
        if forward:  # only q, k, v are differentiable; masks, offsets and the seed are not
            args = tuple(a.detach() if isinstance(a, torch.Tensor) and i >= 3 else a for i, a in enumerate(args))
        torch.library.opcheck(func, args, detach_clone(kwargs))


def test_torch_compile_fullgraph_equals_eager(backend, device):
    def block(q, k, v, kpm, mask):
        out = fusedlm.scaled_dot_product_attention(q, k, v, mask, is_causal=True, enable_gqa=True,
                                                   key_padding_mask=kpm, backend=backend)
        return (out * 2).sum() + out.square().sum()

    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    gen = torch.Generator().manual_seed(59)
    args = [torch.randn(2, 4, 19, 40, generator=gen).to(device).requires_grad_(True),
            torch.randn(2, 2, 23, 40, generator=gen).to(device).requires_grad_(True),
            torch.randn(2, 2, 23, 40, generator=gen).to(device).requires_grad_(True),
            (torch.rand(2, 23, generator=gen) < 0.8).to(device), torch.randn(19, 23, generator=gen).to(device)]
    eager_out = block(*args)
    eager_grads = torch.autograd.grad(eager_out, args[:3])
    out = compiled(*args)
    grads = torch.autograd.grad(out, args[:3])
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_torch_compile_varlen_equals_eager(backend, device):
    """fullgraph where nothing reads the offsets on the host: the torch backend loops over them in Python
    and on CPU the op layer checks their values, so there the graph may break (the values must still agree)."""
    fullgraph = backend != "torch" and device == "cuda"
    lq, lk = [5, 11], [7, 11]
    cu_q, cu_k = cu(lq).to(device), cu(lk).to(device)

    def block(q, k, v):
        out = fusedlm.varlen_attention(q, k, v, cu_q, cu_k, 11, 11, causal=True, backend=backend)
        return out.square().sum()

    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=fullgraph, backend=compile_backend)
    gen = torch.Generator().manual_seed(61)
    args = [torch.randn(16, 4, 32, generator=gen).to(device).requires_grad_(True),
            torch.randn(18, 2, 32, generator=gen).to(device).requires_grad_(True),
            torch.randn(18, 2, 32, generator=gen).to(device).requires_grad_(True)]
    eager_out = block(*args)
    eager_grads = torch.autograd.grad(eager_out, args)
    out = compiled(*args)
    grads = torch.autograd.grad(out, args)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Bad input


def _qkv(q=(2, 4, 5, 32), k=(2, 4, 7, 32), v=(2, 4, 7, 32), dtype=torch.float32):
    return torch.randn(q).to(dtype), torch.randn(k).to(dtype), torch.randn(v).to(dtype)


def _packed(q=(12, 4, 32), k=(14, 2, 32), v=(14, 2, 32)):
    return torch.randn(q), torch.randn(k), torch.randn(v), cu([5, 7]), cu([6, 8])


class TestBadInput:
    def test_query_rank(self):
        with pytest.raises(ValueError, match="query: expected a 4-D tensor"):
            fusedlm.scaled_dot_product_attention(*_qkv(q=(4, 5, 32)))

    def test_key_head_dim(self):
        with pytest.raises(ValueError, match=r"key: expected .*\(2, 4, 7, 32\).*got \(2, 4, 7, 40\)"):
            fusedlm.scaled_dot_product_attention(*_qkv(k=(2, 4, 7, 40)))

    def test_value_length(self):
        with pytest.raises(ValueError, match=r"value: expected .*\(2, 4, 7, 32\).*got \(2, 4, 6, 32\)"):
            fusedlm.scaled_dot_product_attention(*_qkv(v=(2, 4, 6, 32)))

    def test_kv_heads_not_dividing(self):
        with pytest.raises(ValueError, match="key: .*heads.*4.*got 3"):
            fusedlm.scaled_dot_product_attention(*_qkv(k=(2, 3, 7, 32), v=(2, 3, 7, 32)), enable_gqa=True)

    def test_gqa_not_enabled(self):
        with pytest.raises(ValueError, match="key: .*enable_gqa"):
            fusedlm.scaled_dot_product_attention(*_qkv(k=(2, 2, 7, 32), v=(2, 2, 7, 32)))

    def test_integer_dtype(self):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match="query: expected a floating dtype"):
            fusedlm.scaled_dot_product_attention(q.to(torch.int32), k, v)

    def test_mixed_dtypes(self):
        q, k, v = _qkv()
        with pytest.raises(TypeError, match="value: expected dtype torch.float32"):
            fusedlm.scaled_dot_product_attention(q, k, v.half())

    def test_not_a_tensor(self):
        _, k, v = _qkv()
        with pytest.raises(TypeError, match="query: expected a torch.Tensor, got list"):
            fusedlm.scaled_dot_product_attention([1.0], k, v)

    def test_key_padding_mask_shape(self):
        with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(2, 7\).*got \(2, 5\)"):
            fusedlm.scaled_dot_product_attention(*_qkv(), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))

    def test_key_padding_mask_not_bool(self):
        with pytest.raises(TypeError, match="key_padding_mask: expected a bool tensor.*got torch.int64"):
            fusedlm.scaled_dot_product_attention(*_qkv(), key_padding_mask=torch.ones(2, 7, dtype=torch.int64))

    @pytest.mark.parametrize("shape", [(5, 6), (3, 1, 5, 7), (2, 4, 5, 7, 1)])
    def test_attn_mask_not_broadcastable(self, shape):
        with pytest.raises(ValueError, match=r"attn_mask: expected a shape broadcastable to .*\(2, 4, 5, 7\)"):
            fusedlm.scaled_dot_product_attention(*_qkv(), attn_mask=torch.ones(shape, dtype=torch.bool))

    def test_attn_mask_integer(self):
        with pytest.raises(TypeError, match="attn_mask: expected a bool or floating dtype"):
            fusedlm.scaled_dot_product_attention(*_qkv(), attn_mask=torch.ones(5, 7, dtype=torch.int64))

    @pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
    def test_dropout_out_of_range(self, p):
        with pytest.raises(ValueError, match="dropout_p: expected a probability"):
            fusedlm.scaled_dot_product_attention(*_qkv(), dropout_p=p)

    def test_mixed_devices(self):
        q, k, v = _qkv()
        with pytest.raises(ValueError, match="value: expected a tensor on cpu"):
            fusedlm.scaled_dot_product_attention(q, k, v.to("meta"))

    @pytest.mark.parametrize("e", [8, 264])
    def test_head_dim_outside_kernel_range_on_triton(self, e):
        triton_or_skip()
        with pytest.raises(ValueError, match=f"backend 'triton' cannot serve.*head dims 16..256.*E={e}"):
            fusedlm.scaled_dot_product_attention(*_qkv((1, 1, 3, e), (1, 1, 3, e), (1, 1, 3, e)), backend="triton")

    def test_value_head_dim_outside_kernel_range_on_triton(self):
        triton_or_skip()
        with pytest.raises(ValueError, match="backend 'triton' cannot serve.*Ev=8"):
            fusedlm.scaled_dot_product_attention(*_qkv(v=(2, 4, 7, 8)), backend="triton")

    def test_triton_cannot_take_float64(self):
        triton_or_skip()
        with pytest.raises(ValueError, match="float64"):
            fusedlm.scaled_dot_product_attention(*_qkv(dtype=torch.float64), backend="triton")

    def test_cuda_backend_without_extension(self):
        with pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
            fusedlm.scaled_dot_product_attention(*_qkv(), backend="cuda")

    # varlen

    def test_varlen_q_rank(self):
        q, k, v, cq, ck = _packed()
        with pytest.raises(ValueError, match="q: expected a 3-D tensor"):
            fusedlm.varlen_attention(q[None], k, v, cq, ck, 7, 8)

    def test_varlen_head_dim(self):
        q, k, v, cq, ck = _packed(k=(14, 2, 40))
        with pytest.raises(ValueError, match="k: expected"):
            fusedlm.varlen_attention(q, k, v, cq, ck, 7, 8)

    def test_varlen_kv_heads_not_dividing(self):
        q, k, v, cq, ck = _packed(k=(14, 3, 32), v=(14, 3, 32))
        with pytest.raises(ValueError, match="k: .*heads.*4.*got 3"):
            fusedlm.varlen_attention(q, k, v, cq, ck, 7, 8)

    def test_cu_seqlens_not_int32(self):
        q, k, v, cq, ck = _packed()
        with pytest.raises(TypeError, match="cu_seqlens_q: expected dtype torch.int32, got torch.int64"):
            fusedlm.varlen_attention(q, k, v, cq.long(), ck, 7, 8)

    def test_cu_seqlens_not_starting_at_zero(self):
        q, k, v, cq, _ = _packed()
        with pytest.raises(ValueError, match="cu_seqlens_k: expected .*from 0"):
            fusedlm.varlen_attention(q, k, v, cq, torch.tensor([1, 7, 14], dtype=torch.int32), 7, 8)

    def test_cu_seqlens_past_the_end(self):
        q, k, v, _, ck = _packed()
        with pytest.raises(ValueError, match="cu_seqlens_q: expected"):
            fusedlm.varlen_attention(q, k, v, torch.tensor([0, 5, 20], dtype=torch.int32), ck, 15, 8)

    def test_cu_seqlens_batch_mismatch(self):
        q, k, v, cq, _ = _packed()
        with pytest.raises(ValueError, match="cu_seqlens_k: expected shape"):
            fusedlm.varlen_attention(q, k, v, cq, torch.tensor([0, 14], dtype=torch.int32), 7, 14)

    def test_max_seqlen_too_small(self):
        q, k, v, cq, ck = _packed()
        with pytest.raises(ValueError, match="max_seqlen_q: expected at least the longest sequence, 7"):
            fusedlm.varlen_attention(q, k, v, cq, ck, 6, 8)

    def test_max_seqlen_not_int(self):
        q, k, v, cq, ck = _packed()
        with pytest.raises(TypeError, match="max_seqlen_k: expected a Python int"):
            fusedlm.varlen_attention(q, k, v, cq, ck, 7, 8.0)

    def test_varlen_head_dim_outside_kernel_range_on_triton(self):
        triton_or_skip()
        q, k, v, cq, ck = _packed(q=(12, 4, 8), k=(14, 2, 8), v=(14, 2, 8))
        with pytest.raises(ValueError, match="backend 'triton' cannot serve.*head dims"):
            fusedlm.varlen_attention(q, k, v, cq, ck, 7, 8, backend="triton")


def test_gradient_through_lse(backend, device, dtype):
    """lse is differentiable (d lse_i / d z_ij = P_ij), alone or together with the output."""
    gen = torch.Generator().manual_seed(43)
    inputs = qkv(2, 2, 1, 23, 37, 32, 24, gen)
    kpm = random_lengths_mask([37, 0], 37)  # batch 1: empty rows, lse = -inf, no gradient

    def finite(lse):
        return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)

    def fn(query, key, value):
        out, lse = fusedlm.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True,
                                                        key_padding_mask=kpm.to(query.device), backend=backend,
                                                        return_lse=True)
        return out, finite(lse)

    def ref(query, key, value):
        out, lse = oracle(query, key, value, is_causal=True, key_padding_mask=kpm, return_lse=True)
        return out, finite(lse)

    rows = check_case(fn, ref, inputs, dtype=dtype, device=device, grad=("query", "key", "value"))
    assert_within(rows, dtype)

    def lse_only(query, key, value):
        return fn(query, key, value)[1]

    def lse_only_ref(query, key, value):
        return ref(query, key, value)[1]

    assert_within(check_case(lse_only, lse_only_ref, inputs, dtype=dtype, device=device, grad=("query", "key")), dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_long_leading_and_trailing_padding(backend, device, dtype, causal):
    """Whole key blocks of padding before the first and after the last real key are skipped by the
    kernels' loops (forward, dQ and dK/dV): the result must not change."""
    gen = torch.Generator().manual_seed(11)
    B, H, L, S = 3, 2, 40, 150
    inputs = qkv(B, H, H, L, S, 32, 32, gen)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, 70:] = True  # left padding over two key blocks and more
    kpm[1, 65:80] = True  # a window in the middle: padding on both sides
    kpm[1, 100] = True
    kpm[2, :3] = True  # right padding
    run_dense(backend, device, dtype, inputs, key_padding_mask=kpm, is_causal=causal)


@pytest.mark.parametrize("varlen", [False, True])
def test_gradient_through_summed_lse(backend, device, varlen):
    """lse.sum() hands the backward a broadcast (stride-0) lse gradient; it must be read as such."""
    gen = torch.Generator().manual_seed(47)
    if varlen:
        lq = [7, 13]
        t = {n: v.to(device) for n, v in varlen_inputs(lq, lq, 2, 2, 32, 32, gen).items()}

        def run(q, k, v):
            return varlen_fn(backend, lq, lq, causal=True, return_lse=True)(q, k, v)

        def ref(q, k, v):
            return varlen_oracle(q, k, v, cu(lq), cu(lq), causal=True, return_lse=True)
    else:
        t = {n: v.to(device) for n, v in qkv(2, 2, 2, 20, 20, 32, 32, gen).items()}

        def run(query, key, value):
            return fusedlm.scaled_dot_product_attention(query, key, value, is_causal=True, backend=backend,
                                                        return_lse=True)

        def ref(query, key, value):
            return oracle(query, key, value, is_causal=True, return_lse=True)

    low = {n: v.float().requires_grad_(True) for n, v in t.items()}
    high = {n: v.double().cpu().requires_grad_(True) for n, v in t.items()}
    out, lse = run(**low)
    want_out, want_lse = ref(**high)
    got = torch.autograd.grad(out.sum() + lse.sum(), list(low.values()))
    want = torch.autograd.grad(want_out.sum() + want_lse.sum(), list(high.values()))
    for g, w in zip(got, want):
        assert rel_err(g, w) <= BOUNDS[torch.float32]


# ----------------------------------------------------------------------------------------------------
# Tensor-descriptor (TMA) tile loads in the forward, opt-in with FUSEDLM_TMA=1: Triton's interpreter runs
# tensor descriptors, so the same kernel path is checked here that sm_90 would run with TMA.

TMA_CASES = [  # (B, H, Hkv, L, S, E, Ev, causal, layout)
    (2, 4, 2, 67, 67, 64, 64, True, "BHLE"),
    (1, 2, 2, 37, 129, 40, 80, False, "BLHE"),  # head dims below their blocks, Lq != Lk, (B, L, H, E) memory
]


@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: f"E{c[5]}_{c[8]}")
def test_tma_forward_matches_oracle(monkeypatch, case):
    triton_or_skip()
    from fusedlm.kernels import attention as K
    from fusedlm.kernels import attention_configs as C

    monkeypatch.setenv("FUSEDLM_TMA", "1")
    if not torch.cuda.is_available():
        import triton
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    B, H, Hkv, L, S, E, Ev, causal, layout = case
    gen = torch.Generator().manual_seed(11)
    inputs = qkv(B, H, Hkv, L, S, E, Ev, gen)
    q, k, v = (inputs[n].float() for n in ("query", "key", "value"))
    if layout == "BLHE":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert K.tma_enabled(q.device, q, k, v)
    calls = []

    def record(launch, kernel, tuned, grid_of, args, cfg, flags, device):
        calls.append(flags["USE_TMA"])
        return launch_blocks(launch, kernel, tuned, grid_of, args, cfg, flags, device)

    launch_blocks = C._launch_blocks
    monkeypatch.setattr(C, "_launch_blocks", record)
    got = fusedlm.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != Hkv, backend="triton")
    want = oracle(inputs["query"], inputs["key"], inputs["value"], is_causal=causal)
    assert calls == [True]
    assert rel_err(got.double(), want) <= BOUNDS[torch.float32]


def test_tma_needs_aligned_rows(monkeypatch):
    from fusedlm.kernels import attention as K

    monkeypatch.setenv("FUSEDLM_TMA", "1")
    aligned = torch.randn(1, 2, 8, 64)
    assert K.tma_enabled(aligned.device, aligned)
    odd = torch.randn(1, 2, 8, 20)  # rows of 80 bytes in float32 are aligned; of 20 halves (40 bytes) are not
    assert not K.tma_enabled(odd.device, odd.half())
    assert not K.tma_enabled(aligned.device, aligned[..., 1:])  # offset start
    monkeypatch.setenv("FUSEDLM_TMA", "0")
    assert not K.tma_enabled(aligned.device, aligned)
