"""The position terms formed inside the DeBERTa kernels (kernels/deberta.py): the bucket runs that bound the
tile kinds (relative_band, against the table itself), and the tile kinds against the float64 oracle where the
other DeBERTa tests reach them rarely: tiles wholly inside the first / last run, an empty band, a band kernel
run with one slice, dropout and packed sequences across runs, one position gradient of two, and the GPU's
(non-square, 64-row) tile shapes run on the interpreter.
"""
import pytest
import torch

import fusedlm
from fusedlm import _deberta_positions
from fusedlm.ops import deberta as ops
from fusedlm.verify import check_case
from helpers import assert_within, triton_or_skip
from test_deberta import make_inputs, oracle, randn
from test_deberta_training import NAMES, _cu, _seeded, varlen_oracle


@pytest.mark.parametrize("pb,mr", [(256, 512), (16, 40), (8, 12), (64, 128), (256, 300), (32, 10000), (2, 3),
                                   (3, 4), (4, 6), (-1, 20), (0, 1), (-1, 1), (256, 1024), (128, 512), (6, 9)])
def test_relative_band_bounds_hold_on_the_table(pb, mr):
    """Every distance from D_HI on has idx 2 span - 1 and every one up to D_LO idx 0, as the table says; the
    bounds are within a few distances of the first / last such distance (the band stays small)."""
    d_lo, d_hi, idx_lo, idx_hi = ops.relative_band(pb, mr)
    span = ops.attention_span(pb, mr)
    assert (idx_lo, idx_hi) == (0, 2 * span - 1)
    half = 1 << 15
    table = _deberta_positions._index_table(half, pb, mr, torch.device("cpu")).long()
    d = torch.arange(-(half - 1), half)
    if d_hi < ops.NEVER:
        assert d_hi < half - 1 and bool((table[d >= d_hi] == idx_hi).all())
        first = int(d[table == idx_hi].min())
        assert bool((table[d >= first] == idx_hi).all()) and d_hi - first <= 8, (first, d_hi)
    else:
        assert not bool((table == idx_hi).any())
    if d_lo > -ops.NEVER:
        assert bool((table[d <= d_lo] == idx_lo).all())
        last = int(d[table == idx_lo].max())
        assert last - d_lo <= 8, (last, d_lo)
    else:
        assert not bool((table == idx_lo).any())


def _gpu_tiles(monkeypatch):
    """Run the kernels with the GPU's tile shapes (64-row blocks, 128-wide windows) on the interpreter."""
    from fusedlm.kernels import deberta as K

    configs = K.block_config
    monkeypatch.setattr(K, "block_config", lambda d, dtype, device, *a, **kw: configs(
        d, dtype, torch.device("cuda"), *a, **kw))


@pytest.fixture(params=["cpu tiles", "gpu tiles"])
def tiles(request, monkeypatch):
    """The interpreter's tile shapes, or the GPU's (_gpu_tiles)."""
    if request.param == "gpu tiles":
        _gpu_tiles(monkeypatch)
    return request.param


def _dense(B, H, S, D, pb, mr, terms, lengths, seed):
    return make_inputs(B, H, S, D, pb, mr, terms, lengths, gen=torch.Generator().manual_seed(seed))


def _fn(pb, mr, **kw):
    def fn(query, key, value, pos_key=None, pos_query=None, key_padding_mask=None):
        return fusedlm.deberta_attention(query, key, value, pos_key, pos_query, key_padding_mask=key_padding_mask,
                                         position_buckets=pb, max_relative_positions=mr, backend="triton", **kw)
    return fn


def _ref(pb, mr, **kw):
    def ref(**inputs):
        return oracle(**inputs, position_buckets=pb, max_relative_positions=mr, **kw)
    return ref


# (B, H, S, D, position_buckets, max_relative_positions, terms, real lengths)
CASES = [
    (2, 2, 140, 24, -1, 4, "c2p,p2c", (140, 95)),  # mostly tiles of the first / last run, padding
    (1, 2, 70, 16, 16, 12, "c2p", (70,)),  # log buckets with runs, c2p only
    (2, 1, 40, 16, 0, 1, "c2p,p2c", (40, 31)),  # span 1: runs meet, the band is empty
    (1, 1, 16, 16, 256, 512, "c2p,p2c", None),  # one query block: the band kernel runs one slice
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c[2]}-pb{c[4]}-mr{c[5]}-{c[6]}")
def test_tile_kinds_match_oracle(case, tiles):
    triton_or_skip()
    B, H, S, D, pb, mr, terms, lengths = case
    if tiles == "gpu tiles" and S < 64:
        pytest.skip("one 64-row block: the CPU tiles cover it")
    inputs = _dense(B, H, S, D, pb, mr, terms, lengths, seed=S + D)
    grad = tuple(n for n in NAMES if n in inputs)
    rows = check_case(_fn(pb, mr), _ref(pb, mr), inputs, dtype=torch.float32, device="cpu", grad=grad)
    assert len(rows) == 1 + len(grad)
    assert_within(rows, torch.float32)


def test_one_position_gradient_of_two(tiles):
    """pos_query frozen: dpos_key and the rest still equal the oracle (the band kernel computes one term)."""
    triton_or_skip()
    pb, mr = -1, 6
    inputs = _dense(2, 2, 72, 16, pb, mr, "c2p,p2c", (72, 50), seed=5)
    grad = ("query", "key", "value", "pos_key")
    assert_within(check_case(_fn(pb, mr), _ref(pb, mr), inputs, dtype=torch.float32, device="cpu", grad=grad),
                  torch.float32)


def test_packed_sequences_across_runs(tiles):
    """Packed batch whose sequences reach both runs (plain distances clamped at 5), with a length-1 and an
    empty sequence: out, lse and every gradient."""
    triton_or_skip()
    pb, mr, H, D = -1, 5, 2, 16
    lengths = [70, 1, 0, 9, 33]
    gen = torch.Generator().manual_seed(93)
    total = sum(lengths)
    inputs = dict(q=randn(total, H, D, gen=gen), k=randn(total, H, D, gen=gen), v=randn(total, H, D, gen=gen),
                  pos_key=randn(H, 2 * mr, D, gen=gen), pos_query=randn(H, 2 * mr, D, gen=gen),
                  cu_seqlens=_cu(lengths))

    def fn(q, k, v, pos_key, pos_query, cu_seqlens):
        return fusedlm.deberta_varlen_attention(q, k, v, pos_key, pos_query, cu_seqlens, max(lengths),
                                                position_buckets=pb, max_relative_positions=mr, return_lse=True,
                                                backend="triton")

    def ref(q, k, v, pos_key, pos_query, cu_seqlens):
        return varlen_oracle(q, k, v, pos_key, pos_query, cu_seqlens, pb, mr)

    rows = check_case(fn, ref, inputs, dtype=torch.float32, device="cpu", grad=("q", "k", "v", "pos_key", "pos_query"))
    assert_within(rows, torch.float32)


def test_dropout_across_runs():
    """Dropout where most tiles lie in a run: the gradients of all five inputs equal the oracle given the
    kernel's own mask (read through value = identity), so every kernel regenerates the same mask."""
    triton_or_skip()
    B, H, S, D, p, seed, pb, mr = 1, 2, 48, 48, 0.2, 78, -1, 4
    inputs = make_inputs(B, H, S, D, pb, mr, gen=torch.Generator().manual_seed(88))
    q, k, pk, pq = (inputs[n].float() for n in ("query", "key", "pos_key", "pos_query"))
    eye = torch.eye(S).expand(B, H, S, S)
    keep = _seeded(seed, fusedlm.deberta_attention, q, k, eye, pk, pq, position_buckets=pb,
                   max_relative_positions=mr, dropout_p=p, backend="triton") != 0
    assert abs((1 - keep.double().mean().item()) - p) < 0.05
    fn = _fn(pb, mr, dropout_p=p)
    rows = check_case(lambda **kw: _seeded(seed, fn, **kw), _ref(pb, mr, keep=keep, dropout_p=p), inputs,
                      dtype=torch.float32, device="cpu", grad=NAMES)
    assert_within(rows, torch.float32)


def test_programs_with_several_items(monkeypatch):
    """Every persistent program takes several (sequence, block) items: the band kernel sliced in two, and the
    dK/dV kernel with its interpreter count (a few programs a head): the runs' sums added across items."""
    triton_or_skip()
    from fusedlm.kernels import deberta_band

    monkeypatch.setattr(deberta_band, "_BAND_PROGRAMS", 2)
    pb, mr = 8, 12
    inputs = _dense(3, 2, 70, 24, pb, mr, "c2p,p2c", (70, 23, 41), seed=11)
    rows = check_case(_fn(pb, mr), _ref(pb, mr), inputs, dtype=torch.float32, device="cpu", grad=NAMES)
    assert_within(rows, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_loop_over_runs_and_window_gpu_tiles(dtype, monkeypatch):
    """The backward's tile loop on the GPU's shapes, run on the interpreter: 64-row query blocks whose loop
    meets the last run, the window and the first run (plain distances clamped at 20, S = 203), with the
    window's spare rows carrying the tile's own keys / queries (W = 128); odd head dim 40, key padding, lse and
    its gradient (the delta pass), both position gradients (the runs' sums in the dK/dV kernel); fresh
    inputs. float16: dQ's run tiles take K + pos_key[run] rounded to half."""
    triton_or_skip()
    _gpu_tiles(monkeypatch)
    pb, mr = -1, 20
    inputs = _dense(2, 1, 203, 40, pb, mr, "c2p,p2c", (203, 150), seed=203)

    def fn(query, key, value, pos_key, pos_query, key_padding_mask):
        out, lse = fusedlm.deberta_attention(query, key, value, pos_key, pos_query, key_padding_mask=key_padding_mask,
                                             position_buckets=pb, max_relative_positions=mr, return_lse=True,
                                             backend="triton")
        return out, lse

    def ref(**kw):
        return oracle(**kw, position_buckets=pb, max_relative_positions=mr, return_lse=True)

    rows = check_case(fn, ref, inputs, dtype=dtype, device="cpu", grad=NAMES)
    assert len(rows) == 2 + len(NAMES)
    assert_within(rows, dtype)


def test_dq_run_tiles_half_padding_dropout_gpu_tiles(monkeypatch):
    """float16 with key padding and dropout on the GPU's tile shapes, where dQ's key tiles lie wholly in the last
    run (keys 64 and more before the query block) and in the first (64 and more after): there every key has the
    same pos_key row and dQ takes dS (K + pos_key[run]). Every gradient against the oracle given the kernel's own
    dropout mask, read through value = identity (so S = D = 128; padding cuts batch row 1 inside a first-run
    tile)."""
    triton_or_skip()
    _gpu_tiles(monkeypatch)
    B, H, S, D, p, seed, pb, mr = 2, 1, 128, 128, 0.2, 29, -1, 4
    inputs = make_inputs(B, H, S, D, pb, mr, lengths=(128, 100), gen=torch.Generator().manual_seed(128))
    q, k, pk, pq = (inputs[n].float() for n in ("query", "key", "pos_key", "pos_query"))
    eye = torch.eye(S).expand(B, H, S, S)
    keep = _seeded(seed, fusedlm.deberta_attention, q, k, eye, pk, pq, key_padding_mask=inputs["key_padding_mask"],
                   position_buckets=pb, max_relative_positions=mr, dropout_p=p, backend="triton") != 0
    real = inputs["key_padding_mask"][:, None, None, :].expand(B, H, S, S)
    assert abs((1 - keep[real].double().mean().item()) - p) < 0.05
    fn = _fn(pb, mr, dropout_p=p)
    rows = check_case(lambda **kw: _seeded(seed, fn, **kw), _ref(pb, mr, keep=keep, dropout_p=p), inputs,
                      dtype=torch.float16, device="cpu", grad=NAMES)
    assert len(rows) == 1 + len(NAMES)
    assert_within(rows, torch.float16)
