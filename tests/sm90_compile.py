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
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64"}
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
        spill = getattr(compiled, "n_spills", None)
        print(f"ok   {time.time() - t0:5.2f}s {label}" + (f" spills={spill}" if spill else ""), flush=True)
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
    try:
        from fusedlm.kernels import rope
    except ImportError:
        return
    for dt in (torch.bfloat16, torch.float32):  # float16 compiles as bfloat16 does
        q = torch.randn(2, 32, 16, 128, dtype=dt)
        k = torch.randn(2, 8, 16, 128, dtype=dt)
        for rot in (128, 64):
            cos = torch.randn(2, 16, rot, dtype=dt)
            for interleaved in (False, True):
                for backward in (False, True):
                    rope.rope(aot_launch, q, k, cos, cos, interleaved, False, backward)


if __name__ == "__main__":
    variants()
    print(f"{len(seen)} variants compiled for sm_90, {len(failures)} failed")
    sys.exit(1 if failures or not seen else 0)
