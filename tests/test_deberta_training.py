"""deberta_varlen_attention, return_lse and dropout of the DeBERTa ops, against the float64 oracle of
tests/test_deberta.py (its buckets from Python float64 math, its scores by explicit gathers).

Packed batches: odd lengths, a sequence of length 1, an empty one, packed == padded (outputs and every
gradient, and with dropout the same mask: the Philox counter uses positions within the sequence). lse:
values and the gradient reaching it. Dropout: the keep rate, the rescaling, reproducibility, and the
gradients of all five inputs against the oracle given the kernel's own mask (read through value =
identity, as tests/test_attention.py does). Strided masks and the CUDA grid limits of every launcher.
"""
import pytest
import torch

import fusedlm
from fusedlm.verify import BOUNDS, check_case, rel_err
from helpers import assert_within, triton_or_skip
from test_deberta import _hf_module, _split_heads, make_inputs, oracle, randn

NAMES = ("query", "key", "value", "pos_key", "pos_query")


def _seeded(seed, fn, *args, **kw):
    torch.manual_seed(seed)
    return fn(*args, **kw)


def _pack(x, mask):
    """(B, H, S, D) -> (total, H, D): the real rows of each batch row, in order."""
    return x.transpose(1, 2)[mask]


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def varlen_oracle(q, k, v, pos_key, pos_query, cu, pb, mr):
    """The dense oracle per sequence: (total, H, D) out and (total, H) lse."""
    outs, lses = [], []
    bounds = cu.tolist()
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        o, l = oracle(*(t[s0:s1].transpose(0, 1)[None] for t in (q, k, v)), pos_key, pos_query,
                      position_buckets=pb, max_relative_positions=mr, return_lse=True)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0].transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


# ----------------------------------------------------------------------------------------------------
# Packed sequences


@pytest.mark.parametrize("terms", ["c2p,p2c", "p2c"])
def test_varlen_matches_oracle(backend, device, terms):
    """Odd lengths, a length-1 and an empty sequence; out, lse and the gradients of all inputs (through
    both outputs) against float64."""
    pb, mr, H, D = 16, 40, 2, 24
    lengths = [45, 1, 0, 9]  # 45 > max_relative_positions: clamped indices
    gen = torch.Generator().manual_seed(81)
    total = sum(lengths)
    inputs = dict(q=randn(total, H, D, gen=gen), k=randn(total, H, D, gen=gen), v=randn(total, H, D, gen=gen),
                  pos_key=randn(H, 2 * pb, D, gen=gen) if "c2p" in terms else None,
                  pos_query=randn(H, 2 * pb, D, gen=gen), cu_seqlens=_cu(lengths))

    def fn(q, k, v, pos_key, pos_query, cu_seqlens):
        return fusedlm.deberta_varlen_attention(q, k, v, pos_key, pos_query, cu_seqlens, max(lengths),
                                                position_buckets=pb, max_relative_positions=mr, return_lse=True,
                                                backend=backend)

    def ref(q, k, v, pos_key, pos_query, cu_seqlens):
        return varlen_oracle(q, k, v, pos_key, pos_query, cu_seqlens, pb, mr)

    grad = ("q", "k", "v", "pos_query") + (("pos_key",) if "c2p" in terms else ())
    rows = check_case(fn, ref, inputs, dtype=torch.float32, device=device, grad=grad)
    assert [q for q, _ in rows] == ["out0", "out1"] + [f"d{n}" for n in grad]
    assert_within(rows, torch.float32)


def test_varlen_float16_without_pos_grads(device):
    """float16 on the kernels, position embeddings frozen (their gradients skipped): q, k, v still right."""
    triton_or_skip()
    pb, mr, H, D, lengths = 16, 40, 2, 32, [45, 3, 20]
    gen = torch.Generator().manual_seed(82)
    total = sum(lengths)
    inputs = dict(q=randn(total, H, D, gen=gen), k=randn(total, H, D, gen=gen), v=randn(total, H, D, gen=gen),
                  pos_key=randn(H, 2 * pb, D, gen=gen), pos_query=randn(H, 2 * pb, D, gen=gen),
                  cu_seqlens=_cu(lengths))

    def fn(q, k, v, pos_key, pos_query, cu_seqlens):
        return fusedlm.deberta_varlen_attention(q, k, v, pos_key, pos_query, cu_seqlens, 45, position_buckets=pb,
                                                max_relative_positions=mr, backend="triton")

    def ref(q, k, v, pos_key, pos_query, cu_seqlens):
        return varlen_oracle(q, k, v, pos_key, pos_query, cu_seqlens, pb, mr)[0]

    assert_within(check_case(fn, ref, inputs, dtype=torch.float16, device=device, grad=("q", "k", "v")),
                  torch.float16)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_packed_equals_padded(backend, device, dropout_p):
    """The packed batch gives the padded batch's real rows and gradients. With dropout (Triton) the masks
    are the same too: both count positions from the sequence start and max_seqlen equals S here."""
    if dropout_p and backend == "torch":
        pytest.skip("the torch backend draws its dropout mask with torch's generator: no packed == padded mask")
    pb, mr, H, D, lengths = 16, 40, 2, 16, [30, 1, 17]
    B, S = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(83)
    ins = make_inputs(B, H, S, D, pb, mr, lengths=lengths, gen=gen)
    mask = ins.pop("key_padding_mask").to(device)
    dense = [ins[n].float().to(device).requires_grad_(True) for n in NAMES]
    packed = [_pack(t.detach(), mask).requires_grad_(True) for t in dense[:3]] + \
        [t.detach().clone().requires_grad_(True) for t in dense[3:]]
    kw = dict(position_buckets=pb, max_relative_positions=mr, dropout_p=dropout_p, return_lse=True, backend=backend)
    out, lse = _seeded(5, fusedlm.deberta_attention, *dense, key_padding_mask=mask, **kw)
    out_p, lse_p = _seeded(5, fusedlm.deberta_varlen_attention, *packed, _cu(lengths).to(device), S, **kw)
    torch.testing.assert_close(out_p, _pack(out, mask), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(lse_p, lse.transpose(1, 2)[mask], rtol=2e-6, atol=2e-6)
    g_out = torch.randn(out_p.shape, generator=gen).to(device)
    g_lse = torch.randn(lse_p.shape, generator=gen).to(device)
    grads_p = torch.autograd.grad((out_p, lse_p), packed, (g_out, g_lse))
    dense_g_out = torch.zeros_like(out).transpose(1, 2)
    dense_g_out[mask] = g_out
    dense_g_lse = torch.zeros_like(lse).transpose(1, 2)
    dense_g_lse[mask] = g_lse
    grads = torch.autograd.grad((out, lse), dense, (dense_g_out.transpose(1, 2), dense_g_lse.transpose(1, 2)))
    for name, gp, gd in zip(NAMES, grads_p, grads):
        want = _pack(gd, mask) if gd.dim() == 4 else gd
        assert rel_err(gp, want) <= 1e-5, name


@pytest.mark.parametrize("share_att_key", [True, False])
def test_varlen_matches_transformers(backend, device, share_att_key):
    """A packed batch against Hugging Face's DisentangledSelfAttention on the padded one (256 buckets)."""
    H, D, span, lengths = 2, 16, 256, (40, 1, 23)
    module = _hf_module(H, D, share_att_key, torch.float64)
    gen = torch.Generator().manual_seed(84)
    B, S = len(lengths), max(lengths)
    hidden = randn(B, S, H * D, gen=gen)
    rel = randn(2 * span, H * D, gen=gen)
    mask = torch.stack([torch.arange(S) < n for n in lengths])
    with torch.no_grad():
        want = module(hidden, (mask[:, None, :, None] & mask[:, None, None, :]).to(torch.uint8),
                      rel_embeddings=rel)[0][mask]  # (total, H * D)
        q, k, v = (_split_heads(proj(hidden), H) for proj in (module.query_proj, module.key_proj, module.value_proj))
        pk = (module.key_proj if share_att_key else module.pos_key_proj)(rel).view(2 * span, H, D).transpose(0, 1)
        pq = (module.query_proj if share_att_key else module.pos_query_proj)(rel).view(2 * span, H, D).transpose(0, 1)
    args = [_pack(t, mask).float().to(device) for t in (q, k, v)] + [t.float().to(device) for t in (pk, pq)]
    out = fusedlm.deberta_varlen_attention(*args, _cu(lengths).to(device), S, backend=backend)
    assert rel_err(out.reshape(-1, H * D), want) <= BOUNDS[torch.float32]


class TestVarlenBadInput:
    """The offsets get varlen_attention's checks, worded the same."""

    def _args(self):
        q = torch.randn(10, 2, 16)
        pos = torch.randn(2, 512, 16)
        return q, q.clone(), q.clone(), pos, pos.clone()

    def test_cu_seqlens_dtype(self):
        with pytest.raises(TypeError, match="cu_seqlens: expected dtype torch.int32"):
            fusedlm.deberta_varlen_attention(*self._args(), torch.tensor([0, 10]), 10)

    def test_cu_seqlens_not_ending_at_total(self):
        with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets from 0 to 10"):
            fusedlm.deberta_varlen_attention(*self._args(), torch.tensor([0, 4, 9], dtype=torch.int32), 10)

    def test_cu_seqlens_decreasing(self):
        with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing"):
            fusedlm.deberta_varlen_attention(*self._args(), torch.tensor([0, 6, 4, 10], dtype=torch.int32), 10)

    def test_max_seqlen_too_small(self):
        with pytest.raises(ValueError, match="max_seqlen: expected at least the longest sequence, 6, got 5"):
            fusedlm.deberta_varlen_attention(*self._args(), torch.tensor([0, 6, 10], dtype=torch.int32), 5)

    def test_max_seqlen_not_int(self):
        with pytest.raises(TypeError, match="max_seqlen: expected a Python int"):
            fusedlm.deberta_varlen_attention(*self._args(), torch.tensor([0, 10], dtype=torch.int32), 10.0)

    def test_rank_and_heads(self):
        q, k, v, pk, pq = self._args()
        with pytest.raises(ValueError, match="q: expected a 3-D tensor"):
            fusedlm.deberta_varlen_attention(q[None], k, v, pk, pq, torch.tensor([0, 10], dtype=torch.int32), 10)
        with pytest.raises(ValueError, match=r"pos_key: expected shape \(2, 512, 16\)"):
            fusedlm.deberta_varlen_attention(q, k, v, pk[:1], pq, torch.tensor([0, 10], dtype=torch.int32), 10)


# ----------------------------------------------------------------------------------------------------
# lse


def test_dense_lse_and_its_gradient(backend, device, dtype):
    """lse (B, H, S) float32 against the oracle, -inf on a batch row with no real key, and the gradients
    of all five inputs through out and lse together."""
    pb, mr = 16, 40
    inputs = make_inputs(3, 2, 37, 24, pb, mr, lengths=(37, 0, 12), gen=torch.Generator().manual_seed(85))

    def fn(query, key, value, pos_key, pos_query, key_padding_mask):
        out, lse = fusedlm.deberta_attention(query, key, value, pos_key, pos_query, key_padding_mask=key_padding_mask,
                                             position_buckets=pb, max_relative_positions=mr, return_lse=True,
                                             backend=backend)
        assert lse.dtype == (torch.float32 if dtype != torch.float64 else torch.float64) and lse.shape == out.shape[:-1]
        assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all() and torch.isfinite(lse[2]).all()
        return out, lse.masked_fill(torch.isneginf(lse), 0.0)  # -inf rows checked above; rel_err needs finite

    def ref(**kw):
        out, lse = oracle(**kw, position_buckets=pb, max_relative_positions=mr, return_lse=True)
        return out, lse.masked_fill(torch.isneginf(lse), 0.0)

    rows = check_case(fn, ref, inputs, dtype=dtype, device=device, grad=NAMES)
    assert_within(rows, dtype)


# ----------------------------------------------------------------------------------------------------
# Dropout


def _probs(backend, device, q, k, pk, pq, seed, p, **kw):
    """The (dropped and rescaled) probability matrix, read through value = identity (D = S)."""
    B, H, S, _ = q.shape
    eye = torch.eye(S, device=device, dtype=q.dtype).expand(B, H, S, S)
    return _seeded(seed, fusedlm.deberta_attention, q, k, eye, pk, pq, position_buckets=16, max_relative_positions=40,
                   dropout_p=p, backend=backend, **kw)


def test_dropout_keep_rate_and_reproducibility(backend, device):
    B, H, S, p = 2, 2, 64, 0.3
    gen = torch.Generator().manual_seed(86)
    q, k = (torch.randn(B, H, S, S, generator=gen).to(device) for _ in range(2))
    pk, pq = (torch.randn(H, 32, S, generator=gen).to(device) for _ in range(2))
    probs = _probs(backend, device, q, k, pk, pq, 0, 0.0)
    assert (probs > 0).all()
    dropped = _probs(backend, device, q, k, pk, pq, 123, p)
    kept = dropped != 0
    frac = 1 - kept.double().mean().item()  # n = 16384: sigma = 0.0036
    assert abs(frac - p) < 0.02, frac
    per_head = 1 - kept.double().mean(dim=(-1, -2))  # n = 4096 each: sigma = 0.007
    assert ((per_head - p).abs() < 0.05).all(), per_head
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-7)
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])
    # the same seed gives the same mask, another seed another one
    assert torch.equal(_probs(backend, device, q, k, pk, pq, 123, p), dropped)
    assert not torch.equal(_probs(backend, device, q, k, pk, pq, 124, p) != 0, kept)


def test_dropout_backward_uses_the_forward_mask(backend, device, dtype):
    """Out and the gradients of all five inputs of a seeded run equal the float64 oracle given the mask
    read from the same seed; a backward drawing another mask (or none) fails on every gradient."""
    B, H, S, D, p, seed, pb, mr = 1, 2, 48, 48, 0.2, 77, 16, 40
    inputs = make_inputs(B, H, S, D, pb, mr, gen=torch.Generator().manual_seed(87))
    q, k, pk, pq = (inputs[n].to(device=device, dtype=dtype) for n in ("query", "key", "pos_key", "pos_query"))
    keep = _probs(backend, device, q, k, pk, pq, seed, p) != 0
    assert abs((1 - keep.double().mean().item()) - p) < 0.05

    def fn(**kw):
        return _seeded(seed, fusedlm.deberta_attention, **kw, position_buckets=pb, max_relative_positions=mr,
                       dropout_p=p, backend=backend)

    def ref(**kw):
        return oracle(**kw, position_buckets=pb, max_relative_positions=mr, keep=keep, dropout_p=p)

    assert_within(check_case(fn, ref, inputs, dtype=dtype, device=device, grad=NAMES), dtype)


# ----------------------------------------------------------------------------------------------------
# Strided inputs, CUDA grid limits


def test_strided_key_padding_mask(backend, device):
    """A transposed (non-contiguous) key padding mask gives the contiguous one's result."""
    pb, mr = 16, 40
    inputs = make_inputs(3, 2, 29, 16, pb, mr, lengths=(29, 7, 18), gen=torch.Generator().manual_seed(88))
    ts = {n: t.float().to(device) for n, t in inputs.items() if n != "key_padding_mask"}
    mask = inputs["key_padding_mask"].to(device)
    mask[0, 3] = False  # a hole in the middle too
    strided = mask.t().contiguous().t()
    assert not strided.is_contiguous()
    out = fusedlm.deberta_attention(**ts, key_padding_mask=strided, position_buckets=pb, max_relative_positions=mr,
                                    backend=backend)
    want = oracle(**{n: t.double().cpu() for n, t in ts.items()}, key_padding_mask=mask.cpu(), position_buckets=pb,
                  max_relative_positions=mr)
    assert rel_err(out, want) <= BOUNDS[torch.float32]


def test_strided_cu_seqlens(backend, device):
    """Offsets taken as a strided slice give the contiguous offsets' result."""
    lengths, H, D = [9, 1, 14], 2, 16
    gen = torch.Generator().manual_seed(89)
    q, k, v = (torch.randn(sum(lengths), H, D, generator=gen).to(device) for _ in range(3))
    pk, pq = (torch.randn(H, 32, D, generator=gen).to(device) for _ in range(2))
    cu = _cu(lengths).to(device)
    strided = torch.stack([cu, torch.full_like(cu, 99)], dim=1).flatten()[::2]  # stride 2
    assert not strided.is_contiguous() and torch.equal(strided, cu)
    kw = dict(position_buckets=16, max_relative_positions=40, backend=backend)
    want = fusedlm.deberta_varlen_attention(q, k, v, pk, pq, cu, 14, **kw)
    torch.testing.assert_close(fusedlm.deberta_varlen_attention(q, k, v, pk, pq, strided, 14, **kw), want,
                               rtol=0, atol=0)


@pytest.mark.parametrize("varlen", [False, True])
def test_launch_grids_within_cuda_limits(varlen):
    """Every launcher's grid for B x H = 10^6 (83334 sequences, 12 heads) and for S = 2^20 stays within
    CUDA's limits: axis 0 < 2^31, axes 1 and 2 <= 65535 (computed on meta tensors, nothing launched)."""
    triton_or_skip()
    from fusedlm.kernels import deberta as K
    from fusedlm.kernels import deberta_backward as KB
    from fusedlm.ops.deberta import relative_band

    H, D, span = 12, 64, 256
    grids = []

    def record(kernel, grid, *args, **meta):
        grids.append(tuple(grid))

    for B, S in ((83334, 4), (1, 2**20)):
        pos = torch.empty(H, 2 * span, D, device="meta")
        if varlen:
            q = torch.empty(B * S, H, D, device="meta")
            cu = torch.empty(B + 1, dtype=torch.int32, device="meta")
            lse = torch.empty(B * S, H, device="meta")
            args = (None, cu, torch.empty(2 * S - 1, dtype=torch.int32, device="meta"), S, 0.1, 0.1,
                    torch.empty(1, dtype=torch.int64, device="meta"))
        else:
            q = torch.empty(B, H, S, D, device="meta")
            lse = torch.empty(B, H, S, device="meta")
            args = (torch.empty(B, S, dtype=torch.bool, device="meta"), None,
                    torch.empty(2 * S - 1, dtype=torch.int32, device="meta"), S, 0.1, 0.1,
                    torch.empty(1, dtype=torch.int64, device="meta"))
        band = relative_band(256, 512)
        K.deberta_fwd(record, q, q, q, pos, pos, *args, band)
        KB.deberta_bwd(record, q, lse, q, q, q, pos, pos, q, lse, *args, True, True, band)
    assert grids
    for grid in grids:
        assert grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), grid
