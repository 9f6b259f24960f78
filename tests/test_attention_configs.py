"""The attention launchers' block shapes (fusedlm/kernels/attention_configs.py) as the kernels receive them:
the rules that keep sm_90's registers free of spills (tests/sm90_compile.py holds the compiled figures).

The launchers run on meta tensors with a ``launch`` that records each kernel's block shapes and runs nothing,
with the configs a CUDA device gets (they are keyed on device.type).
"""
import pytest
import torch

pytest.importorskip("triton")

from fusedlm.kernels import attention, attention_backward, attention_configs  # noqa: E402


class BlockRecorder:
    """A ``launch`` that records (kernel name, BLOCK_* meta) and runs nothing."""

    def __init__(self):
        self.blocks = {}

    def __call__(self, kernel, grid, *args, **meta):
        self.blocks[kernel.fn.__name__] = {k: v for k, v in meta.items() if k.startswith("BLOCK") or k == "num_warps"}


@pytest.fixture
def cuda_configs(monkeypatch):
    cfg = attention_configs.block_config
    monkeypatch.setattr(attention_configs, "block_config", lambda e, ev, causal, dtype, device, backward=False: cfg(
        e, ev, causal, dtype, torch.device("cuda"), backward))
    monkeypatch.setattr(attention_configs, "autotune_enabled", lambda device: False)


def backward_blocks(E, Ev, dropout_p, dtype=torch.bfloat16, Hkv=4):
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
