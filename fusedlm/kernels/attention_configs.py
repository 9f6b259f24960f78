"""Launch configurations of the attention kernels (attention.py, attention_backward.py): the default block
shapes per head dim and dtype, the autotuning candidates and their shared-memory pruning, and the launch
through either. Imports nothing of the kernels: both kernel modules import this one.
"""
import functools
import os

import torch
import triton


def block_config(e, ev, causal, dtype, device, backward=False):
    """Block shapes and warps, keyed on head dim, causal and dtype: the default when not autotuning.

    On the interpreter one small config (speed of the NumPy emulation matters, not occupancy).
    """
    be, bev = max(16, triton.next_power_of_2(e)), max(16, triton.next_power_of_2(ev))
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_E=be, BLOCK_EV=bev, num_warps=4, num_stages=1)
    width = max(be, bev)
    if dtype == torch.float32:
        # 3xTF32 products (see precision) triple the operand registers: 32 x 32 tiles, one warpgroup. On
        # sm_90 that keeps E <= 64 free of spills and E = 128 to ~1 KB (IEEE FMA dots spilled 55-63 KB).
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_E=be, BLOCK_EV=bev, num_warps=4, num_stages=1)
    if backward:
        # dQ's blocks (dkdv_config swaps them for dK/dV): the program's own block is 64, wgmma's M per
        # warpgroup, so every product of both kernels runs on wgmma; the loop block shrinks with the head
        # dim so the float32 accumulators (two of [64, E] in dK/dV) stay in registers.
        bn = 64 if width <= 64 else 32 if width <= 128 else 16
        return dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_E=be, BLOCK_EV=bev, num_warps=4 if width <= 64 else 8,
                    num_stages=2)
    bm = 128 if width <= 128 else 64
    bn = 64 if width <= 128 else 32
    if causal and width <= 64:
        bn = 32  # more, smaller diagonal blocks: less masked work on the diagonal
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=be, BLOCK_EV=bev, num_warps=8 if bm == 128 else 4,
                num_stages=3 if width <= 128 else 2)


def dkdv_config(cfg):
    """The dK/dV kernel's blocks from the backward config (which is dQ's): the program block (keys here)
    is dQ's BLOCK_M, the query loop block dQ's BLOCK_N, at most 32. Each kernel's products have its own
    program block as their M dimension, the one wgmma needs at 64; the loop block can be smaller, which
    keeps dK/dV's two accumulators in registers (E = 64 with masks and dropout: 64 x 64 spilled)."""
    return dict(cfg, BLOCK_M=min(cfg["BLOCK_N"], 32), BLOCK_N=cfg["BLOCK_M"])


def dkdv_split(cfg):
    """Whether the dK/dV kernel runs two programs a key block, one for dV and one for dK (its SPLIT), from its
    config: when a head-dim block is 256.

    Two [64, 256] float32 accumulators (dK, dV of a 64-key block) are 128 registers a thread on 8 warps, half
    the register file, beside the K, V tiles and the [64, BLOCK_M] score tiles: every all-wgmma tile tried
    spilled (16 x 64 on 8 warps: 24/24 B on Triton 3.6, 308/352 B on 3.9, causal bf16; 32 x 64 w8 472/504 B,
    16 x 64 w16 436/492 B), and 32 x 32 ran every product on mma.sync. Split, each program holds one
    accumulator: 16 x 64 w8 spills nothing (207 | 244 registers causal with GQA, 209 | 221 fp16 with a float
    mask, on 3.6 | 3.9; masks and dropout together, not a gate variant, still spill 56/64 B on 3.9). The cost
    is P recomputed: 5 products a key and query block instead of 4 (+25% for the dK/dV kernel, +14% for the
    backward's 7 with dQ's 3), and the query tiles read twice (the pair of programs is adjacent in the grid,
    so the second read mostly hits L2)."""
    return max(cfg["BLOCK_E"], cfg["BLOCK_EV"]) > 128


def dropout_config(cfg, kernel, dtype):
    """A kernel's config under dropout (kernel "fwd", "dq" or "dkdv", cfg its config without): smaller loop
    blocks, the program block (wgmma's M) unchanged.

    The keep mask is Philox at every element of the tile: four 32-bit counter words go through ten rounds for
    all the elements a thread owns at once, ~4 registers an element beside the tile's own values (dQ's 64 x 64
    tile on 4 warps: 32 elements, ~128 registers). So the backward kernels halve their loop block (dQ's
    BLOCK_N, dK/dV's BLOCK_M; 16 at least, the least K of a tl.dot), every dtype; the forward, whose float32
    accumulator is [BLOCK_M, Ev], halves BLOCK_N and takes 8 warps when the head dim passes 64 (half types;
    float32 keeps its 32 x 32 tile, where neither helped).

    sm_90 compiles of tests/sm90_compile.py's variants (bf16, causal), spilled bytes stored/loaded on Triton
    3.6 | 3.9 before: E = 64 dQ 208/220 | 0 (254 registers); with a bool mask and key padding dQ 468/484 | 0
    (254), and with GQA besides dK/dV 60/60 | 40/40; E = 128 with a float mask and a window forward 1120/1088 |
    408/592, dQ 0 | 20/20, dK/dV 0 | 80/124; packed, E = 128 and Ev = 64, dK/dV 64/60 | 0 (255). After: none
    spills on either (255 registers at most), every product still on wgmma. (E = 256 forward, not a variant
    there: 64 x 32 on 4 warps spilled up to 128/156 | 136/180, 64 x 16 on 8 warps none, 232 registers.)"""
    if kernel == "dq":
        return dict(cfg, BLOCK_N=max(cfg["BLOCK_N"] // 2, 16))
    if kernel == "dkdv":
        return dict(cfg, BLOCK_M=max(cfg["BLOCK_M"] // 2, 16))
    if dtype == torch.float32 or max(cfg["BLOCK_E"], cfg["BLOCK_EV"]) <= 64:
        return cfg
    return dict(cfg, BLOCK_N=max(cfg["BLOCK_N"] // 2, 16), num_warps=8)


# Autotuning (FUSEDLM_AUTOTUNE=1, CUDA only): the candidates below, pruned to those whose tiles fit
# shared memory for the head dims at hand, timed once per key (head dims, causal, masks, dropout,
# varlen; the Autotuner adds the tensors' dtypes to the key). Off by default: the first call of each
# key compiles and times every candidate, which a test suite or a short benchmark cannot afford.
_FWD_CANDIDATES = [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2),
                   (128, 128, 8, 2)]
_BWD_CANDIDATES = [(64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2),
                   (128, 32, 8, 2)]
_TUNE_KEY = ["BLOCK_E", "BLOCK_EV", "CAUSAL", "WINDOW", "VARLEN", "HAS_MASK", "HAS_KPM", "DROPOUT", "PRECISION"]
SHARED_LIMIT = 232448  # bytes of shared memory a block may use on sm_90


def _tile_bytes(bm, bn, stages, be, bev, itemsize, backward):
    """Shared memory a config needs (calibrated on the sm_90 compiles of tests/sm90_compile.py): the
    forward streams key/value tiles, the dK/dV kernel streams query/dO tiles past a fixed key tile."""
    if backward:
        return (stages * bm + bn) * (be + bev) * itemsize
    return (bm * max(be, bev) + stages * bn * (be + bev)) * itemsize


def _prune(configs, named_args, backward=False, **kwargs):
    """Drop the candidates whose tiles would not fit shared memory. Triton hands the positional
    arguments in ``named_args`` and the keyword ones (the head-dim blocks) in ``kwargs``."""
    args = {**named_args, **kwargs}
    be, bev = args["BLOCK_E"], args["BLOCK_EV"]
    itemsize = args["Q"].element_size()
    fit = [c for c in configs if _tile_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, be, bev,
                                             itemsize, backward) <= SHARED_LIMIT * 0.9]
    return fit or configs[-1:]


def tuning_configs(candidates):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in candidates]


def autotune_enabled(device):
    return device.type == "cuda" and os.environ.get("FUSEDLM_AUTOTUNE", "0") == "1"


def _tuned(kernel, candidates, backward):
    prune = functools.partial(_prune, backward=backward)
    return triton.autotune(configs=tuning_configs(candidates), key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": prune})(kernel)


def _launch_blocks(launch, kernel, tuned, grid_of, args, cfg, flags, device):
    """Launch with the fixed config, or through the autotuner (grid from the chosen block shapes)."""
    if autotune_enabled(device):
        launch(tuned, lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"]), *args,
               BLOCK_E=cfg["BLOCK_E"], BLOCK_EV=cfg["BLOCK_EV"], **flags)
    else:
        launch(kernel, grid_of(cfg["BLOCK_M"], cfg["BLOCK_N"]), *args, **cfg, **flags)
