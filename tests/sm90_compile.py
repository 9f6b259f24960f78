"""Compile every Triton kernel variant the launchers use for Hopper (sm_90), without a GPU.

The interpreter runs kernels as NumPy and forgives what the compiler does not (type mismatches across
branches, unsupported ops, huge register tiles). This script drives the real host launchers with CPU
tensors and a ``launch`` that, instead of running, builds the kernel's signature from the arguments and
compiles it for sm_90 with Triton's own compiler (ptxas ships in the triton wheel). It must run without
TRITON_INTERPRET. Prints one line per variant; exit status 1 if any fails to compile.

    python tests/sm90_compile.py
"""
import os
import sys
import time

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}
seen, failures = set(), []


def _sig(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def aot_launch(kernel, grid, *args, **meta):
    """A ``launch`` for the host launchers that compiles for sm_90 instead of running."""
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner):  # every candidate config that survives the pruning
        named = dict(zip(kernel.fn.arg_names, args))  # as Triton's Autotuner calls the pruner
        prune = getattr(kernel, "early_config_prune", None)
        for c in (prune(kernel.configs, named, **meta) if prune else kernel.configs):
            aot_launch(kernel.fn, grid, *args, **meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        return
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    names = kernel.arg_names
    signature = {n: _sig(a) for n, a in zip(names, args)}
    signature.update({n: "constexpr" for n in meta})
    key = (kernel.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(meta.items())),
           tuple(sorted(options.items())))
    if key in seen:
        return
    seen.add(key)
    label = f"{kernel.fn.__name__} {dict(meta)} {options} {sorted(set(s for s in signature.values() if s.startswith('*')))}"
    t0 = time.time()
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=dict(meta)),
                                  target=TARGET, options=options)
        shared = compiled.metadata.shared
        if shared > SHARED_LIMIT:
            raise RuntimeError(f"needs {shared} bytes of shared memory, the H100/H200 limit is {SHARED_LIMIT}")
        print(f"ok   {time.time() - t0:5.2f}s smem={shared:6d} {label}", flush=True)
    except Exception as e:  # noqa: BLE001
        failures.append(label)
        print(f"FAIL {label}\n     {type(e).__name__}: {str(e)[:2000]}", flush=True)


def variants():
    """Drive each host launcher through the cases the op layer produces."""
    from fusedlm.kernels import norm, swiglu

    def progs(device, rows):
        return min(rows, 132)

    for dt in (torch.bfloat16, torch.float32):  # float16 compiles as bfloat16 does
        for n in (4096, 65536):  # one-pass and looped
            x = torch.randn(8, n, dtype=dt)
            w = torch.randn(n, dtype=dt)
            for is_rms in (True, False):
                for res in (None, torch.randn(8, n, dtype=dt)):
                    wb = (w, None if is_rms else w)
                    y, s, mean, rstd = norm.norm_fwd(aot_launch, x, res, *wb, 1e-6, 0.0, is_rms)
                    norm.norm_fwd(aot_launch, x, res, None, None, 1e-6, 0.0, is_rms)
                    norm.norm_bwd(aot_launch, progs, x, x, w, res, torch.empty(8), torch.empty(8), 0.0, is_rms,
                                  True, not is_rms)
                    norm.norm_bwd(aot_launch, progs, x, x, None, None, torch.empty(8), torch.empty(8), 0.0,
                                  is_rms, False, False)
        g = torch.randn(16, 11008, dtype=dt)
        swiglu.swiglu_fwd(aot_launch, g, g)
        swiglu.swiglu_bwd(aot_launch, g, g, g)
    from fusedlm.kernels import rope
    for dt in (torch.bfloat16, torch.float32):  # float16 compiles as bfloat16 does
        q = torch.randn(2, 32, 16, 128, dtype=dt)
        k = torch.randn(2, 8, 16, 128, dtype=dt)
        for rot in (128, 64):
            cos = torch.randn(2, 16, rot, dtype=dt)
            for interleaved in (False, True):
                for backward in (False, True):
                    rope.rope(aot_launch, q, k, cos, cos, interleaved, False, backward)


def attention_variants():
    """The attention kernels with the block shapes a GPU would get (block_config keyed on a CUDA device)."""
    from fusedlm.kernels import attention

    cpu_config, cpu_autotune = attention.block_config, attention.autotune_enabled
    attention.block_config = lambda e, ev, causal, dtype, device, backward=False: cpu_config(
        e, ev, causal, dtype, torch.device("cuda"), backward)
    try:
        attention.autotune_enabled = lambda device: True  # the autotuning candidates, common cases
        for dt, e in [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256)]:
            q = torch.randn(1, 2, 64, e, dtype=dt)
            out, lse = attention.attention_fwd(aot_launch, q, q, q, None, None, None, None, 64, 64, 0.1, True, False,
                                               0.0, None)
            attention.attention_bwd(aot_launch, out, None, q, q, q, out, lse, None, None, None, None, 64, 64, 0.1, True,
                                    False, 0.0, None)
        attention.autotune_enabled = cpu_autotune
        for dt, e, ev, causal, extras in [
            (torch.bfloat16, 128, 128, False, ()), (torch.bfloat16, 128, 128, True, ()),
            (torch.bfloat16, 64, 64, True, ("kpm", "bool", "dropout")), (torch.float16, 256, 256, False, ("float",)),
            (torch.bfloat16, 96, 40, False, ("kpm",)), (torch.float32, 80, 80, True, ()),
            (torch.bfloat16, 128, 64, True, ("varlen",)), (torch.bfloat16, 192, 192, True, ("gqa",)),
        ]:
            B, H, L = 2, 4, 64
            hkv = 2 if "gqa" in extras or "varlen" in extras else H
            seed = torch.tensor([7]) if "dropout" in extras else None
            mask = None
            if "bool" in extras:
                mask = torch.ones(L, L, dtype=torch.bool)
            if "float" in extras:
                mask = torch.zeros(B, 1, L, L, dtype=dt)
            kpm = torch.ones(B, L, dtype=torch.bool) if "kpm" in extras else None
            if "varlen" in extras:
                q, k, v = torch.randn(B * L, H, e, dtype=dt), torch.randn(B * L, hkv, e, dtype=dt), \
                    torch.randn(B * L, hkv, ev, dtype=dt)
                cu = torch.tensor([0, L, 2 * L], dtype=torch.int32)
                args = (q, k, v, None, None, cu, cu, L, L, 0.1, causal, True, 0.0, None)
            else:
                q, k, v = torch.randn(B, H, L, e, dtype=dt), torch.randn(B, hkv, L, e, dtype=dt), \
                    torch.randn(B, hkv, L, ev, dtype=dt)
                args = (q, k, v, mask, kpm, None, None, L, L, 0.1, causal, False, 0.1 if seed is not None else 0.0,
                        seed)
            out, lse = attention.attention_fwd(aot_launch, *args)
            attention.attention_bwd(aot_launch, torch.randn_like(out), None, q, k, v, out, torch.zeros_like(lse), *args[3:])
    finally:
        attention.block_config, attention.autotune_enabled = cpu_config, cpu_autotune


def lora_variants():
    """The fused LoRA GEMM with the block shapes a GPU would get (_config keyed on a CUDA device)."""
    from fusedlm.kernels import lora

    cpu_config = lora._config
    lora._config = lambda M, N, K, R, dtype, device: cpu_config(M, N, K, R, dtype, torch.device("cuda"))
    try:
        for dt in (torch.bfloat16, torch.float32):
            for M, K, N, r in [(256, 4096, 4096, 16), (67, 130, 96, 1), (8, 96, 40, 256)]:
                x, w = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
                a, b, xa = torch.randn(r, K, dtype=dt), torch.randn(N, r, dtype=dt), torch.randn(M, r, dtype=dt)
                for bias in (None, torch.randn(N, dtype=dt)):
                    lora.lora_fwd(aot_launch, x, w, bias, xa, b, 2.0)
                for keep in (None, torch.rand(M, K) >= 0.5):
                    lora.lora_dx(aot_launch, torch.randn(M, N, dtype=dt), w, xa, a, keep, 2.0)
    finally:
        lora._config = cpu_config


def deberta_variants():
    """Forward and both backward kernels: every position-term combination, key padding, the dtypes."""
    from fusedlm.kernels import deberta

    cpu_config = deberta.block_config
    deberta.block_config = lambda d, dtype, device, kernel="fwd": cpu_config(d, dtype, torch.device("cuda"), kernel)
    try:
        B, H, S = 2, 2, 64
        for dt, d, terms, kpm in [(torch.bfloat16, 64, "c2p,p2c", True), (torch.bfloat16, 64, "c2p,p2c", False),
                                  (torch.bfloat16, 64, "c2p", False), (torch.bfloat16, 64, "p2c", True),
                                  (torch.bfloat16, 64, "", False), (torch.float16, 128, "c2p,p2c", True),
                                  (torch.float32, 64, "c2p,p2c", True), (torch.float32, 128, "c2p,p2c", False),
                                  (torch.bfloat16, 256, "c2p,p2c", True), (torch.bfloat16, 40, "c2p,p2c", False)]:
            q, k, v = (torch.randn(B, H, S, d, dtype=dt) for _ in range(3))
            pk = torch.randn(H, 512, d, dtype=dt) if "c2p" in terms else None
            pq = torch.randn(H, 512, d, dtype=dt) if "p2c" in terms else None
            mask = torch.ones(B, S, dtype=torch.bool) if kpm else None
            idx = torch.zeros(2 * S - 1, dtype=torch.int32)
            out, lse = deberta.deberta_fwd(aot_launch, q, k, v, pk, pq, mask, None, idx, S, 0.1, 0.0, None)
            deberta.deberta_bwd(aot_launch, torch.randn_like(out), None, q, k, v, pk, pq, out, torch.zeros_like(lse),
                                mask, None, idx, S, 0.1, 0.0, None, pk is not None, pq is not None)
        # packed sequences with dropout and a gradient reaching lse (the training configuration)
        q = torch.randn(B * S, H, 64, dtype=torch.bfloat16)
        pos = torch.randn(H, 512, 64, dtype=torch.bfloat16)
        cu = torch.tensor([0, S, 2 * S], dtype=torch.int32)
        seed = torch.tensor([7])
        out, lse = deberta.deberta_fwd(aot_launch, q, q, q, pos, pos, None, cu, idx, S, 0.1, 0.1, seed)
        deberta.deberta_bwd(aot_launch, out, lse, q, q, q, pos, pos, out, lse, None, cu, idx, S, 0.1, 0.1, seed,
                            True, True)
    finally:
        deberta.block_config = cpu_config



if __name__ == "__main__":
    variants()
    attention_variants()
    lora_variants()
    deberta_variants()
    print(f"{len(seen)} variants compiled for sm_90, {len(failures)} failed")
    sys.exit(1 if failures or not seen else 0)
