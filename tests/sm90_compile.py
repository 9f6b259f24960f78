"""Compile every Triton kernel variant the launchers use for Hopper (sm_90) as a real launch would, without a GPU,
and record what the compiler made of each: registers, spills, shared memory, wgmma / mma.sync / TMA counts.

The interpreter runs kernels as NumPy and forgives what the compiler does not (type mismatches across
branches, huge register tiles). This script drives the real host launchers with CPU tensors and a ``launch``
that, instead of running, compiles the kernel for sm_90 with Triton's own compiler (ptxas ships in the wheel).

Specialisation as a launch gets it: Triton's ``JITFunction.run`` binds the arguments with a function made by
``create_function_from_signature`` (pointers and integers aligned / divisible by 16 get the
``tt.divisibility = 16`` attribute, integers equal to 1 become constants) and ``_pack_args`` turns that into
the signature, constexprs and attrs handed to the compiler. We call the same two functions with an sm_90
backend, so the compiled code (vector widths, cp.async pipelining) is the code a launch on an H100/H200 gets
for arguments of the same alignment (CPU tensors are 64-byte aligned, CUDA ones 256: both divisible by 16).

Per kernel and config it records (from ptxas -v and the PTX / TTGIR):
    regs, spill_stores / spill_loads (bytes), stack (bytes), shared (bytes),
    wgmma (wgmma.mma_async), mma_sync (mma.sync, Ampere-style tensor cores), tma (cp.async.bulk.tensor),
    ld_global / st_global (global load / store instructions), ld_global_16B (loads of 16 bytes a thread),
    mma_sync_eligible: dots left on mma.sync whose shape and operand types wgmma takes (M % 64 == 0,
    N % 8 == 0, fp16/bf16 operands, warps a multiple of 4): what the gate forbids in half precision,
    wgmma_serialized: ptxas serialised the wgmma instructions (its C7510 notice),
    inner_loop_local: local-memory instructions (STL / LDL) inside the SASS's innermost loops (from cuobjdump,
    which ships with Triton): whether what spills is paid every tile or once a block.
Results are cached on disk per (Triton version, kernel source hash, specialisation, options) in
~/.cache/fusedlm/sm90 (FUSEDLM_SM90_CACHE): a second run recompiles only kernels whose source changed.

    python tests/sm90_compile.py                # table on stdout; exit 1 if a variant fails to compile
    python tests/sm90_compile.py --json out.json
    python tests/sm90_compile.py --write        # benchmarks/results/sm90_static.{json,md}
    python tests/sm90_compile.py --only '_attn_bwd_dq$'   # only kernels whose name matches (while iterating)
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from sass_loops import inner_loop_local  # noqa: E402  (tests/, this script's folder)

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
CACHE = Path(os.environ.get("FUSEDLM_SM90_CACHE", Path.home() / ".cache" / "fusedlm" / "sm90"))
ROOT = Path(__file__).resolve().parent.parent
_DTYPES = {"bf16", "fp16", "fp32"}

rows, failures, _seen, _binders = [], [], set(), {}
_note = [""]  # a word a driver adds to its rows' configs (the head dim, where the specialisation does not show it)
_only = [None]  # --only: a compiled regex; kernels whose name it does not match are skipped
_default_mode = [True]  # False while driving autotune candidates


def _binder(kernel):
    """Triton's own argument binder for ``kernel``, made for the sm_90 backend (as JITFunction.run makes it)."""
    if kernel not in _binders:
        _binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
    return _binders[kernel]


# What JITFunction.run passes from knobs.compilation besides the kernel's arguments: triton 3.6 passes
# instrumentation_mode, 3.9 fpsan_homomorphic_casts too. Only those this Triton has (a missing one is not an error).
_RUN_KNOBS = [n for n in ("instrumentation_mode", "fpsan_homomorphic_casts") if hasattr(knobs.compilation, n)]


def _specialise(kernel, args, meta):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run computes them for these arguments."""
    kwargs = dict(meta, debug=False)
    for name in _RUN_KNOBS:  # the compilation knobs JITFunction.run adds to the launch's keywords
        kwargs[name] = getattr(knobs.compilation, name)
    bound, specialization, options = _binder(kernel)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(BACKEND, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _ptxas_figures(log):
    """From ptxas -v: registers (the most any function uses), spill store / load bytes and stack frame bytes
    (summed over the kernel and the functions it calls: a noinline callee reports its own), and whether ptxas
    serialised the wgmma instructions (C7510: e.g. a wgmma pipeline crossing a function call; every wgmma then
    waits for the previous one, which costs the tensor cores' overlap)."""
    def total(pattern):
        return sum(int(x) for x in re.findall(pattern, log))
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    return dict(regs=max(regs, default=0), spill_stores=total(r"(\d+) bytes spill stores"),
                spill_loads=total(r"(\d+) bytes spill loads"), stack=total(r"(\d+) bytes stack frame"),
                wgmma_serialized=int("wgmma.mma_async instructions are serialized" in log))


_OPERAND = re.compile(r"tensor<\d+x\d+x(\w+)")
_RESULT = re.compile(r"-> tensor<(\d+)x(\d+)x")


def _mma_sync_eligible(ttgir, num_warps):
    """Dots left for mma.sync (``tt.dot`` after AccelerateMatmul; wgmma ones are ``ttng.warp_group_dot``)
    whose tile wgmma takes as it is: M % 64 == 0, N % 8 == 0, 16-bit float operands, whole warpgroups."""
    n = 0
    for line in ttgir.splitlines():
        if "= tt.dot " not in line:
            continue
        types = _OPERAND.findall(line.split("->")[0])
        shape = _RESULT.search(line)
        if not shape or len(types) < 2:
            continue
        M, N = int(shape.group(1)), int(shape.group(2))
        if set(types[:2]) <= {"f16", "bf16"} and M % 64 == 0 and N % 8 == 0 and num_warps % 4 == 0:
            n += 1
    return n


def _inner_loop_local(cubin):
    """Local-memory instructions (STL / LDL: spill traffic) inside the innermost loops of the SASS
    (tests/sass_loops.py): a spill there costs a round trip every iteration (every tile); one outside costs
    once a block."""
    from triton.tools.disasm import get_sass
    return inner_loop_local(get_sass(cubin))


def _compile(kernel, signature, constexprs, attrs, options):
    src = ASTSource(kernel, signature, constexprs, attrs)
    key = hashlib.sha256(f"v5-{triton.__version__}-{src.hash()}-{sorted(options.__dict__.items())}".encode()).hexdigest()
    path = CACHE / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text()), True
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # Triton's own cache would skip ptxas and its log
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=TARGET, options=options.__dict__)
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    figures = dict(_ptxas_figures(log.getvalue()), shared=compiled.metadata.shared,
                   wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                   tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
                   ld_global=len(re.findall(r"\bld\.global", ptx)), st_global=len(re.findall(r"\bst\.global", ptx)),
                   ld_global_16B=len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32)", ptx)),
                   mma_sync_eligible=_mma_sync_eligible(ttgir, options.num_warps),
                   inner_loop_local=_inner_loop_local(compiled.asm["cubin"]))
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures))
    return figures, False


def _label(kernel_name, signature, constexprs, options):
    names = list(signature)
    flags = {names[k[0]]: v for k, v in constexprs.items() if isinstance(v, (bool, int, str))}
    blocks = " ".join(f"{k}={v}" for k, v in flags.items() if k.startswith("BLOCK") or k in ("GROUP_M",))
    on = " ".join(k for k, v in flags.items() if v is True)
    prec = flags.get("PRECISION", "")
    return f"{blocks} w{options.num_warps} s{options.num_stages}" + (f" {on}" if on else "") + \
        (f" {prec}" if prec else "")


def aot_launch(kernel, grid, *args, **meta):
    """A ``launch`` for the host launchers that compiles for sm_90 instead of running."""
    if isinstance(kernel, Autotuner):  # every candidate config that survives the pruning
        named = dict(zip(kernel.fn.arg_names, args))  # as Triton's Autotuner calls the pruner
        prune = getattr(kernel, "early_config_prune", None)
        _default_mode.append(False)
        try:
            for c in (prune(kernel.configs, named, **meta) if prune else kernel.configs):
                aot_launch(kernel.fn, grid, *args, **meta, **c.kwargs, num_warps=c.num_warps,
                           num_stages=c.num_stages)
        finally:
            _default_mode.pop()
        return
    default = _default_mode[-1]
    name = kernel.fn.__name__
    if _only[0] is not None and not _only[0].search(name):
        return
    t0 = time.time()
    try:
        signature, constexprs, attrs, options = _specialise(kernel, args, meta)
    except Exception as e:  # noqa: BLE001
        failures.append(name)
        print(f"FAIL {name}: cannot bind the arguments: {type(e).__name__}: {e}", flush=True)
        return
    dtype = next((v[1:] for v in signature.values() if v.startswith("*") and v[1:] in _DTYPES), "-")
    label = _label(name, signature, constexprs, options) + (f" {_note[0]}" if _note[0] else "")
    key = (name, dtype, label, str(attrs), str(sorted(signature.items())))
    if key in _seen:
        return
    _seen.add(key)
    try:
        figures, cached = _compile(kernel, signature, constexprs, attrs, options)
    except Exception as e:  # noqa: BLE001
        failures.append(f"{name} {dtype} {label}")
        print(f"FAIL {name} {dtype} {label}\n     {type(e).__name__}: {str(e)[:2000]}", flush=True)
        return
    row = dict(kernel=name, dtype=dtype, config=label, default=default, **figures)
    rows.append(row)
    print(f"{'cache' if cached else f'{time.time() - t0:5.1f}s'} {_row_text(row)}", flush=True)


def _row_text(r):
    return (f"{r['kernel']:<20} {r['dtype']:<4} {'def ' if r['default'] else 'tune'} regs={r['regs']:3d} "
            f"spill={r['spill_stores']}/{r['spill_loads']} loop_local={r['inner_loop_local']} "
            f"{'WGMMA-SERIALIZED ' if r['wgmma_serialized'] else ''}smem={r['shared']:6d} wgmma={r['wgmma']} "
            f"mma.sync={r['mma_sync']} (wgmma-able {r['mma_sync_eligible']}) tma={r['tma']} ld={r['ld_global']}"
            f"({r['ld_global_16B']}x16B) st={r['st_global']}  {r['config']}")


# ---------------------------------------------------------------------------------------------------
# The launch cases: each host launcher driven through the cases the op layer produces, with the block
# shapes a CUDA device gets (the launchers' configs are keyed on device.type).


@contextlib.contextmanager
def cuda_configs():
    from fusedlm.kernels import attention_configs, deberta, lora

    saved = attention_configs.block_config, attention_configs.autotune_enabled, lora._config, deberta.block_config
    cuda = torch.device("cuda")
    attention_configs.block_config = lambda e, ev, causal, dtype, device, backward=False: saved[0](
        e, ev, causal, dtype, cuda, backward)
    lora._config = lambda M, N, K, R, dtype, device, *masked: saved[2](M, N, K, R, dtype, cuda, *masked)
    deberta.block_config = lambda d, dtype, device, *args, **kw: saved[3](d, dtype, cuda, *args, **kw)
    try:
        yield
    finally:
        attention_configs.block_config, attention_configs.autotune_enabled, lora._config, deberta.block_config = saved


def memory_bound_variants():
    from fusedlm.kernels import norm, rope, swiglu

    def progs(device, rows):
        return min(rows, 264)

    for dt in (torch.bfloat16, torch.float32):  # float16 compiles as bfloat16 does
        for n in (4096, 16384, 65536):  # a common width, the widest kept in one pass, a looped one
            x = torch.randn(8, n, dtype=dt)
            w = torch.randn(n, dtype=dt)
            for is_rms in (True, False):
                for res in (None, torch.randn(8, n, dtype=dt)):
                    wb = (w, None if is_rms else w)
                    norm.norm_fwd(aot_launch, x, res, *wb, 1e-6, 0.0, is_rms)
                    norm.norm_bwd(aot_launch, progs, x, x, w, res, torch.empty(8), torch.empty(8), 0.0, is_rms,
                                  True, not is_rms)
        g = torch.randn(16, 11008, dtype=dt)
        swiglu.swiglu_fwd(aot_launch, g, g)
        swiglu.swiglu_bwd(aot_launch, g, g, g)
        q = torch.randn(2, 32, 16, 128, dtype=dt)
        k = torch.randn(2, 8, 16, 128, dtype=dt)
        for rot in (128, 64):
            cos = torch.randn(2, 16, rot, dtype=dt)
            for interleaved in (False, True):
                for backward in (False, True):
                    rope.rope(aot_launch, q, k, cos, cos, interleaved, False, backward)


def attention_variants():
    from fusedlm.kernels import attention, attention_backward, attention_configs

    # FUSEDLM_SM90_DEFAULTS_ONLY=1: only the configs a launch gets by default (not the opt-in autotune candidates
    # and tensor-descriptor forward: 38 rows, a third of the attention group's compile time). .ci/run sets it for
    # its second (oldest-versions) run; the README's test command compiles everything.
    opt_in = os.environ.get("FUSEDLM_SM90_DEFAULTS_ONLY", "0") != "1"
    with cuda_configs():
        attention_configs.autotune_enabled = lambda device: True  # the autotuning candidates, common cases
        for dt, e in [(torch.bfloat16, 64), (torch.bfloat16, 128)] if opt_in else []:
            q = torch.randn(1, 2, 64, e, dtype=dt)
            out, lse = attention.attention_fwd(aot_launch, q, q, q, None, None, None, None, 64, 64, 0.1, True,
                                               False, 0.0, None)
            attention_backward.attention_bwd(aot_launch, out, None, q, q, q, out, lse, None, None, None, None, 64,
                                             64, 0.1, True, False, 0.0, None)
        attention_configs.autotune_enabled = lambda device: False
        os.environ["FUSEDLM_TMA"] = "1"  # the opt-in tensor-descriptor forward (not a default config)
        _default_mode.append(False)
        try:
            for dt, e, causal in [(torch.bfloat16, 64, True), (torch.bfloat16, 128, False)] if opt_in else []:
                q = torch.randn(2, 4, 64, e, dtype=dt)
                attention.attention_fwd(aot_launch, q, q, q, None, None, None, None, 64, 64, 0.1, causal, False, 0.0,
                                        None)
        finally:
            _default_mode.pop()
            del os.environ["FUSEDLM_TMA"]
        for dt, e, ev, causal, extras in [
            (torch.bfloat16, 64, 64, True, ()), (torch.bfloat16, 64, 64, False, ()),
            (torch.bfloat16, 128, 128, False, ()), (torch.bfloat16, 128, 128, True, ()),
            (torch.bfloat16, 64, 64, True, ("kpm", "bool", "dropout")), (torch.float16, 256, 256, False, ("float",)),
            (torch.bfloat16, 96, 40, False, ("kpm",)), (torch.float16, 128, 128, True, ()),
            (torch.float32, 64, 64, True, ()), (torch.float32, 128, 128, False, ()),
            (torch.bfloat16, 128, 64, True, ("varlen",)), (torch.bfloat16, 192, 192, True, ("gqa",)),
            (torch.bfloat16, 64, 64, True, ("window",)), (torch.bfloat16, 128, 128, False, ("window", "kpm")),
            # dropout's Philox registers beside the features that add their own (attention_configs.dropout_config)
            (torch.bfloat16, 64, 64, True, ("dropout",)),
            (torch.bfloat16, 64, 64, True, ("gqa", "bool", "kpm", "dropout")),
            (torch.bfloat16, 128, 128, True, ("float", "window", "dropout")),
            (torch.bfloat16, 128, 64, True, ("varlen", "dropout")),
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
                args = (q, k, v, None, None, cu, cu, L, L, 0.1, causal, True, 0.1 if seed is not None else 0.0, seed)
            else:
                q, k, v = torch.randn(B, H, L, e, dtype=dt), torch.randn(B, hkv, L, e, dtype=dt), \
                    torch.randn(B, hkv, L, ev, dtype=dt)
                args = (q, k, v, mask, kpm, None, None, L, L, 0.1, causal, False, 0.1 if seed is not None else 0.0,
                        seed)
            # sliding window: Mistral's (W - 1, 0) with causal, a two-sided band without
            window = ((31, 0) if causal else (16, 16)) if "window" in extras else None
            out, lse = attention.attention_fwd(aot_launch, *args, window)
            attention_backward.attention_bwd(aot_launch, torch.randn_like(out), None, q, k, v, out,
                                             torch.zeros_like(lse), *args[3:], window)


def lora_variants():
    from fusedlm.kernels import lora

    with cuda_configs():
        for dt in (torch.bfloat16, torch.float32):
            for M, K, N, r in [(256, 4096, 4096, 16), (67, 130, 96, 1), (8, 96, 40, 256)]:
                x, w = torch.randn(M, K, dtype=dt), torch.randn(N, K, dtype=dt)
                a, b, xa = torch.randn(r, K, dtype=dt), torch.randn(N, r, dtype=dt), torch.randn(M, r, dtype=dt)
                for bias in (None, torch.randn(N, dtype=dt)):
                    lora.lora_fwd(aot_launch, x, w, bias, xa, b, 2.0)
                for keep in (None, torch.rand(M, K) >= 0.5):
                    lora.lora_dx(aot_launch, torch.randn(M, N, dtype=dt), w, xa, a, keep, 2.0)


def deberta_variants():
    """Forward and both backward kernels: every position-term combination, key padding, the dtypes."""
    from fusedlm.kernels import deberta, deberta_backward
    from fusedlm.ops.deberta import relative_band, relative_index_table

    with cuda_configs():
        B, H, S = 2, 2, 64
        # a real table and its band (all three tile kinds and the band kernel get compiled)
        idx = relative_index_table(S, 256, 512, torch.device("cpu"))
        band = relative_band(256, 512)
        for dt, d, terms, kpm in [(torch.bfloat16, 64, "c2p,p2c", True), (torch.bfloat16, 64, "c2p,p2c", False),
                                  (torch.bfloat16, 64, "c2p", False), (torch.bfloat16, 64, "p2c", True),
                                  (torch.bfloat16, 64, "", False), (torch.float16, 128, "c2p,p2c", True),
                                  (torch.float32, 64, "c2p,p2c", True), (torch.float32, 128, "c2p,p2c", False),
                                  (torch.bfloat16, 256, "c2p,p2c", True), (torch.bfloat16, 40, "c2p,p2c", False)]:
            _note[0] = f"D={d}"  # D = 40 and D = 64 share BLOCK_D = 64: the row says which
            q, k, v = (torch.randn(B, H, S, d, dtype=dt) for _ in range(3))
            pk = torch.randn(H, 512, d, dtype=dt) if "c2p" in terms else None
            pq = torch.randn(H, 512, d, dtype=dt) if "p2c" in terms else None
            mask = torch.ones(B, S, dtype=torch.bool) if kpm else None
            out, lse = deberta.deberta_fwd(aot_launch, q, k, v, pk, pq, mask, None, idx, S, 0.1, 0.0, None, band)
            deberta_backward.deberta_bwd(aot_launch, torch.randn_like(out), None, q, k, v, pk, pq, out, torch.zeros_like(lse),
                                mask, None, idx, S, 0.1, 0.0, None, pk is not None, pq is not None, band)
        # float16 at D = 64 with key padding and dropout (dense batches in training)
        _note[0] = "D=64"
        q, k, v = (torch.randn(B, H, S, 64, dtype=torch.float16) for _ in range(3))
        pos = torch.randn(H, 512, 64, dtype=torch.float16)
        mask = torch.ones(B, S, dtype=torch.bool)
        seed = torch.tensor([7])
        out, lse = deberta.deberta_fwd(aot_launch, q, k, v, pos, pos, mask, None, idx, S, 0.1, 0.1, seed, band)
        deberta_backward.deberta_bwd(aot_launch, torch.randn_like(out), None, q, k, v, pos, pos, out, lse, mask, None,
                                     idx, S, 0.1, 0.1, seed, True, True, band)
        # packed sequences with dropout and a gradient reaching lse (the training configuration)
        q = torch.randn(B * S, H, 64, dtype=torch.bfloat16)
        pos = torch.randn(H, 512, 64, dtype=torch.bfloat16)
        cu = torch.tensor([0, S, 2 * S], dtype=torch.int32)
        seed = torch.tensor([7])
        out, lse = deberta.deberta_fwd(aot_launch, q, q, q, pos, pos, None, cu, idx, S, 0.1, 0.1, seed, band)
        deberta_backward.deberta_bwd(aot_launch, out, lse, q, q, q, pos, pos, out, lse, None, cu, idx, S, 0.1, 0.1, seed,
                            True, True, band)
        # band bounds equal to 1 (position_buckets = 2 gives D_HI = 1, max_relative_positions = 1 IDX_HI = 1): Triton
        # makes an integer argument equal to 1 a constant, which the kernels' opaque moves (_fresh) must take
        _note[0] = "D=64 band=1"
        q = torch.randn(B, H, S, 64, dtype=torch.bfloat16)
        out, lse = deberta.deberta_fwd(aot_launch, q, q, q, pos, pos, None, None, idx, S, 0.1, 0.0, None, (-2, 1, 0, 1))
        deberta_backward.deberta_bwd(aot_launch, out, None, q, q, q, pos, pos, out, lse, None, None, idx, S, 0.1, 0.0, None,
                                     True, True, (-2, 1, 0, 1))
        _note[0] = ""


def kv_cache_variants():
    """Decode (Lq = 1, GQA 4) and speculative rows over contiguous and paged caches, with the append kernel."""
    from fusedlm.kernels import kv_cache

    real, programs = kv_cache.num_splits, kv_cache.num_programs
    kv_cache.num_splits = lambda n, capacity, block_n, device: real(n, capacity, block_n, torch.device("cuda"))
    kv_cache.num_programs = lambda device, rows: min(rows, 264)  # an H100's 132 SMs, two programs each
    bc = kv_cache.block_config
    kv_cache.block_config = lambda g_rows, e, ev, dtype, device: bc(g_rows, e, ev, dtype, torch.device("cuda"))
    try:
        # decode over contiguous and paged caches (the benchmark's shapes), speculative rows with a window, the
        # widest head (32-key blocks)
        for dt, e, lq, paged, window in [(torch.bfloat16, 128, 1, False, None), (torch.bfloat16, 128, 1, True, None),
                                         (torch.bfloat16, 64, 4, False, (63, 0)), (torch.float16, 256, 1, True, None)]:
            B, H, Hkv = 2, 32, 8
            q = torch.randn(B, lq, H, e, dtype=dt)
            cache = torch.randn(64, 16, Hkv, e, dtype=dt) if paged else torch.randn(B, 4096, Hkv, e, dtype=dt)
            table = torch.zeros(B, 32, dtype=torch.int32) if paged else None
            lens = torch.zeros(B, dtype=torch.int32)
            new = torch.randn(B, lq, Hkv, e, dtype=dt)
            cos = torch.randn(4096, e, dtype=torch.float32)
            kv_cache.kv_cache_append(aot_launch, q, cache, cache, lens, new, new, cos, cos, table, False)
            kv_cache.kv_cache_fwd(aot_launch, q, cache, cache, lens, table, lq, True, 0.1, window or (-1, -1))
            if not paged and lq == 1:  # scaled_dot_product_attention's decode route: key padding, not causal
                kpm = torch.ones(B, cache.shape[1], dtype=torch.bool)
                kv_cache.kv_cache_fwd(aot_launch, q, cache, cache, lens, None, 0, False, 0.1, (-1, -1), kpm)
    finally:
        kv_cache.num_splits, kv_cache.num_programs, kv_cache.block_config = real, programs, bc


def cross_entropy_variants():
    """The loss forward and the backward's dz tile: Llama-3's head (D 4096, V 128256) and an odd one, smoothing,
    softcap and z-loss switched on together and off."""
    from fusedlm.kernels import cross_entropy as K

    bc = K.block_config
    K.block_config = lambda d, dtype, device: bc(d, dtype, torch.device("cuda"))
    try:
        for dt, D, V, extras in [(torch.bfloat16, 4096, 128256, False), (torch.bfloat16, 4096, 128256, True),
                                 (torch.float32, 4096, 128256, False)]:
            h, w = torch.randn(64, D, dtype=dt), torch.randn(V, D, dtype=dt)
            bias = torch.randn(V, dtype=dt) if extras else None
            t, perm, n = torch.zeros(64, dtype=torch.int64), torch.arange(64), torch.tensor(64)
            kw = dict(softcap=30.0 if extras else None, smoothing=0.1 if extras else 0.0, z_loss=1e-4 if extras else 0.0)
            prec = "tf32x3" if dt == torch.float32 else "tf32"
            K.lce_fwd(aot_launch, h, w, bias, t, perm, n, kw["softcap"], kw["smoothing"], kw["z_loss"], prec)
            K.lce_dz(aot_launch, torch.empty(64, 4096, dtype=dt), h, w, bias, t, perm, n, torch.zeros(64),
                     torch.ones(64), 0, 0, kw["softcap"], kw["smoothing"], kw["z_loss"], prec)
    finally:
        K.block_config = bc


def _run_group(group):
    """Run some drivers (in a worker process): their rows and failures."""
    for driver in group:
        driver()
    return rows, failures


def run_all(jobs=None):
    """Every driver; on ``jobs`` processes (default: up to 2 CPUs, env FUSEDLM_SM90_JOBS). The attention
    kernels (with the decode ones) take about as long as all the others together, so two groups halve the cold
    run on 2 cores."""
    groups = [(attention_variants, kv_cache_variants),
              (deberta_variants, lora_variants, memory_bound_variants, cross_entropy_variants)]
    jobs = jobs or int(os.environ.get("FUSEDLM_SM90_JOBS", min(2, os.cpu_count() or 1)))
    if jobs < 2:
        _run_group([d for g in groups for d in g])
        return rows, failures
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(len(groups)) as pool:
        for got_rows, got_failures in pool.map(_run_group, groups):
            rows.extend(got_rows)
            failures.extend(got_failures)
    return rows, failures


def markdown(rows):
    lines = [f"# Static sm_90 compile of every kernel variant (Triton {triton.__version__})", "",
             "Generated by `python tests/sm90_compile.py --write` (no GPU: Triton's compiler and ptxas for sm_90, with the "
             "specialisation a launch gets). `def` = a default launch config, `tune` = an autotune candidate "
             "(FUSEDLM_AUTOTUNE=1). Spills in bytes (stores/loads), shared memory in bytes (limit 232448), "
             "instruction counts static in the PTX. `loop` = local-memory instructions (spill traffic) inside the "
             "innermost loops of the SASS, paid every iteration. `wgmma-able`: dots left on mma.sync that wgmma could take. "
             "`ld (16 B)`: global load instructions (those moving 16 bytes a thread), `st`: global stores.", "",
             "| kernel | dtype | kind | config | regs | spill st/ld | loop | smem | wgmma | mma.sync | wgmma-able | tma | "
             "ld (16 B) | st |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {'def' if r['default'] else 'tune'} | {r['config']} | "
                     f"{r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['inner_loop_local']} | {r['shared']} | {r['wgmma']} | "
                     f"{r['mma_sync']} | {r['mma_sync_eligible']} | {r['tma']} | {r['ld_global']} ({r['ld_global_16B']}) | "
                     f"{r['st_global']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/sm90_static.{json,md}")
    parser.add_argument("--only", metavar="REGEX", help="compile only the kernels whose name matches (re.search)")
    a = parser.parse_args()
    if a.only:
        assert not a.write, "--only compiles part of the table: not with --write"
        _only[0] = re.compile(a.only)
    t0 = time.time()
    run_all()
    doc = dict(triton=triton.__version__, torch=torch.__version__, target="sm_90", rows=rows, failures=failures)
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1))
    if a.write:
        out = ROOT / "benchmarks" / "results"
        (out / "sm90_static.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "sm90_static.md").write_text(markdown(rows))
    print(f"{len(rows)} variants compiled for sm_90 in {time.time() - t0:.0f}s, {len(failures)} failed")
    sys.exit(1 if failures or not rows else 0)
