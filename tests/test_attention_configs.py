"""The attention launchers' block shapes (fusedlm/kernels/attention_configs.py) as the kernels receive them,
and the code paths they choose: the rules that keep sm_90's registers free of spills (tests/sm90_compile.py
holds the compiled figures).

Block shapes: the launchers run on meta tensors with a ``launch`` that records each kernel's blocks and grid
and runs nothing, with the configs a CUDA device gets (they are keyed on device.type). The dK/dV kernel's
split (two programs a key block, dV and dK apart) is forced at small odd head dims under the interpreter and
held to the unsplit kernel bit for bit (the same operations in the same order) and to the float64 oracle.
"""
import pytest
import torch

pytest.importorskip("triton")

import fusedlm  # noqa: E402
from fusedlm.kernels import attention, attention_backward, attention_configs  # noqa: E402
from helpers import triton_or_skip  # noqa: E402
from fusedlm.verify import check_case  # noqa: E402
from helpers import assert_within  # noqa: E402
from test_attention import _seeded, cu, oracle, qkv, randn, run_dense  # noqa: E402


class BlockRecorder:
    """A ``launch`` that records (kernel name, BLOCK_* meta) and runs nothing."""

    def __init__(self):
        self.blocks, self.grids, self.split = {}, {}, {}

    def __call__(self, kernel, grid, *args, **meta):
        name = kernel.fn.__name__
        self.blocks[name] = {k: v for k, v in meta.items() if k.startswith("BLOCK") or k == "num_warps"}
        self.grids[name], self.split[name] = grid, meta.get("SPLIT", False)


@pytest.fixture
def cuda_configs(monkeypatch):
    cfg = attention_configs.block_config
    monkeypatch.setattr(attention_configs, "block_config", lambda e, ev, causal, dtype, device, backward=False: cfg(
        e, ev, causal, dtype, torch.device("cuda"), backward))
    monkeypatch.setattr(attention_configs, "autotune_enabled", lambda device: False)


def backward_launch(E, Ev, dropout_p, dtype=torch.bfloat16, Hkv=4):
    B, H, L = 2, 4, 128
    q = torch.empty(B, H, L, E, dtype=dtype, device="meta")
    k = torch.empty(B, Hkv, L, E, dtype=dtype, device="meta")
    v = torch.empty(B, Hkv, L, Ev, dtype=dtype, device="meta")
    out = torch.empty(B, H, L, Ev, dtype=dtype, device="meta")
    lse = torch.empty(B, H, L, device="meta")
    seed = torch.empty(1, dtype=torch.int64, device="meta") if dropout_p > 0 else None
    rec = BlockRecorder()
    attention_backward.attention_bwd(rec, out, None, q, k, v, out, lse, None, None, None, None, L, L, 0.1, True, False,
                                     dropout_p, seed)
    return rec


def backward_blocks(E, Ev, dropout_p, dtype=torch.bfloat16):
    rec = backward_launch(E, Ev, dropout_p, dtype)
    return rec.blocks["_attn_bwd_dq"], rec.blocks["_attn_bwd_dkdv"]


@pytest.mark.parametrize("E, Ev", [(64, 64), (40, 96), (128, 128), (128, 64), (256, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dropout_halves_the_backward_loop_blocks(cuda_configs, E, Ev, dtype):
    """Under dropout each backward kernel's loop block halves, to 16 at least (dropout_config); the program
    blocks (wgmma's M) and everything else stay."""
    dq, dkdv = backward_blocks(E, Ev, 0.0, dtype)
    dq_p, dkdv_p = backward_blocks(E, Ev, 0.1, dtype)
    assert dq_p == dict(dq, BLOCK_N=max(dq["BLOCK_N"] // 2, 16))
    assert dkdv_p == dict(dkdv, BLOCK_M=max(dkdv["BLOCK_M"] // 2, 16))
    if dtype == torch.bfloat16:
        assert dq_p["BLOCK_M"] == dkdv_p["BLOCK_N"] == 64  # every product on wgmma (M = 64 a warpgroup)
    assert min(dq_p["BLOCK_N"], dkdv_p["BLOCK_M"]) >= 16


def test_dropout_config_floor():
    cfg = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_E=64, BLOCK_EV=64, num_warps=8, num_stages=2)
    assert attention_configs.dropout_config(cfg, "dq", torch.bfloat16) == cfg
    assert attention_configs.dropout_config(dict(cfg, BLOCK_N=64), "dq", torch.bfloat16) == dict(cfg, BLOCK_N=32)
    assert attention_configs.dropout_config(cfg, "dkdv", torch.float32) == dict(cfg, BLOCK_M=32)
    assert attention_configs.dropout_config(dict(cfg, BLOCK_M=16), "dkdv", torch.float32) == dict(cfg, BLOCK_M=16)


def forward_blocks(E, Ev, dropout_p, dtype=torch.bfloat16, causal=True):
    q = torch.empty(2, 4, 128, E, dtype=dtype, device="meta")
    v = torch.empty(2, 4, 128, Ev, dtype=dtype, device="meta")
    seed = torch.empty(1, dtype=torch.int64, device="meta") if dropout_p > 0 else None
    rec = BlockRecorder()
    attention.attention_fwd(rec, q, q, v, None, None, None, None, 128, 128, 0.1, causal, False, dropout_p, seed)
    return rec.blocks["_attn_fwd"]


@pytest.mark.parametrize("E, Ev", [(64, 64), (40, 96), (128, 128), (128, 64), (256, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_blocks(cuda_configs, E, Ev, causal):
    """The forward's tile under dropout: as without up to head dim 64; past it BLOCK_N halves and 8 warps
    share the tile (half types); float32 keeps its tile."""
    plain, dropped = forward_blocks(E, Ev, 0.0, causal=causal), forward_blocks(E, Ev, 0.1, causal=causal)
    if max(E, Ev) <= 64:
        assert dropped == plain
    else:
        assert dropped == dict(plain, BLOCK_N=plain["BLOCK_N"] // 2, num_warps=8)
        assert dropped["BLOCK_M"] in (64, 128) and dropped["BLOCK_N"] >= 16
    assert forward_blocks(E, Ev, 0.1, torch.float32, causal) == forward_blocks(E, Ev, 0.0, torch.float32, causal)


# ----------------------------------------------------------------------------------------------------
# The dK/dV split (attention_configs.dkdv_split): two programs a key block at head dim 256


@pytest.mark.parametrize("E, Ev, split", [(64, 64, False), (128, 128, False), (128, 256, True), (256, 256, True),
                                          (192, 64, True)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_dkdv_split_at_head_dim_256(cuda_configs, E, Ev, split, dropout_p):
    """Split when a head-dim block is 256: twice the programs (B x Hkv x key blocks x 2), the same blocks."""
    rec = backward_launch(E, Ev, dropout_p, Hkv=2)
    assert rec.split["_attn_bwd_dkdv"] is split and not rec.split["_attn_bwd_dq"]
    blocks = rec.blocks["_attn_bwd_dkdv"]
    assert blocks["BLOCK_N"] == 64 and blocks["BLOCK_M"] >= 16
    assert rec.grids["_attn_bwd_dkdv"] == (-(-128 // blocks["BLOCK_N"]) * 2 * 2 * (2 if split else 1),)


@pytest.fixture
def dkdv_split(monkeypatch):
    """Run the dK/dV kernel split (True) or not (False) whatever the head dim."""
    def force(on):
        monkeypatch.setattr(attention_configs, "dkdv_split", lambda cfg: on)
    return force


def _grads(fn, inputs, g):
    leaves = {n: t.clone().requires_grad_(True) for n, t in inputs.items()}
    out = fn(**leaves)
    return [out.detach()] + list(torch.autograd.grad(out, list(leaves.values()), g))


SPLIT_CASES = {  # name -> (B, H, Hkv, L, S, E, Ev, sdpa keywords); odd sizes, GQA, Lq != Lk, E != Ev
    "gqa_causal_kpm": (2, 4, 2, 67, 129, 40, 80, dict(is_causal=True, kpm=True)),
    "bool_mask_dropout": (1, 2, 1, 45, 37, 24, 16, dict(bool_mask=True, dropout_p=0.3)),
    "float_mask_window": (1, 3, 3, 70, 70, 16, 48, dict(float_mask=True, window_size=(9, 4))),
    "varlen_causal_dropout": None,
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_dkdv_split_equals_unsplit(dkdv_split, name):
    """dV from the even program and dK from the odd one are the unsplit kernel's, bit for bit: each program
    does the same operations on its accumulator in the same order."""
    triton_or_skip()
    gen = torch.Generator().manual_seed(61)
    if name == "varlen_causal_dropout":
        lq, lk, H, Hkv = [5, 33, 1], [9, 20, 40], 4, 2
        inputs = dict(q=randn(sum(lq), H, 40, gen=gen), k=randn(sum(lk), Hkv, 40, gen=gen),
                      v=randn(sum(lk), Hkv, 24, gen=gen))

        def fn(q, k, v):
            torch.manual_seed(5)
            return fusedlm.varlen_attention(q, k, v, cu(lq), cu(lk), max(lq), max(lk), causal=True, dropout_p=0.25,
                                            backend="triton")
    else:
        B, H, Hkv, L, S, E, Ev, kw = SPLIT_CASES[name]
        inputs = qkv(B, H, Hkv, L, S, E, Ev, gen)
        kw = dict(kw)
        mask = None
        if kw.pop("bool_mask", False):
            mask = torch.rand(L, S, generator=gen) < 0.7
        if kw.pop("float_mask", False):
            mask = randn(B, 1, L, S, gen=gen).float()
        if kw.pop("kpm", False):
            kw["key_padding_mask"] = torch.arange(S)[None, :] < torch.tensor([[S - 11], [S]])

        def fn(query, key, value):
            torch.manual_seed(5)
            return fusedlm.scaled_dot_product_attention(query, key, value, mask, enable_gqa=H != Hkv,
                                                        backend="triton", **kw)
    inputs = {n: t.float() for n, t in inputs.items()}
    out_shape = fn(**inputs).shape
    g = torch.randn(out_shape, generator=gen)
    dkdv_split(False)
    plain = _grads(fn, inputs, g)
    dkdv_split(True)
    split = _grads(fn, inputs, g)
    for a, b in zip(plain, split):
        assert torch.equal(a, b)
    assert any(t.abs().sum() > 0 for t in split[2:])


@pytest.mark.parametrize("case", [(2, 4, 2, 67, 129, 40, 80, True), (1, 2, 2, 33, 17, 16, 24, False)],
                         ids=["gqa_causal_E40_Ev80", "L_gt_S_E16_Ev24"])
def test_dkdv_split_matches_oracle(dkdv_split, dtype, case):
    """The split path against the float64 oracle, every gradient, within the dtype's earned bound."""
    triton_or_skip()
    dkdv_split(True)
    B, H, Hkv, L, S, E, Ev, causal = case
    inputs = qkv(B, H, Hkv, L, S, E, Ev, torch.Generator().manual_seed(67))
    run_dense("triton", "cuda" if torch.cuda.is_available() else "cpu", dtype, inputs, is_causal=causal,
              enable_gqa=H != Hkv)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_gqa_dropout_backward_uses_each_heads_mask(dkdv_split, dtype, split):
    """GQA and dropout: dK/dV sum the group's query heads (one flat loop over head and query block), each
    with its own keep mask (Philox counter of head h). The masks are read through value = identity; out and
    every gradient must meet the float64 oracle given them."""
    triton_or_skip()
    dkdv_split(split)
    B, H, Hkv, L, S, E, Ev, p, seed = 1, 4, 2, 40, 56, 24, 40, 0.2, 91
    gen = torch.Generator().manual_seed(71)
    inputs = dict(query=randn(B, H, L, E, gen=gen), key=randn(B, Hkv, S, E, gen=gen),
                  value=randn(B, Hkv, S, Ev, gen=gen))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = (inputs[n].to(device=device, dtype=dtype) for n in ("query", "key"))
    eye = torch.eye(S, device=device, dtype=dtype).expand(B, Hkv, S, S)
    sdpa = fusedlm.scaled_dot_product_attention
    keep = _seeded(seed, sdpa, q, k, eye, dropout_p=p, is_causal=True, enable_gqa=True, backend="triton") != 0
    assert not torch.equal(keep[:, 0], keep[:, 1])  # heads of one group drop differently

    def fn(query, key, value):
        return _seeded(seed, sdpa, query, key, value, dropout_p=p, is_causal=True, enable_gqa=True, backend="triton")

    def ref(query, key, value):
        return oracle(query, key, value, is_causal=True, keep=keep, dropout_p=p)

    rows = check_case(fn, ref, inputs, dtype=dtype, device=device, grad=("query", "key", "value"))
    assert_within(rows, dtype)
