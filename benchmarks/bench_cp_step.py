#!/usr/bin/env python3
"""One ring step of context-parallel attention on one GPU: the compute that must hide a K/V transfer.

fusedlm.distributed's ring (zigzag layout, causal) does per step, on a rank holding n tokens (c = n / 2):
    diagonal  step 0: its 2c queries against its own 2c keys, causal        ("2c x 2c causal")
    off       steps 1 .. W-1: c queries x 2c keys or 2c x c, no mask         ("c x 2c")
This times the ring's own step functions (fusedlm/distributed/_ring.py: _block_forward = the block attention
with return_lse and the in-place lse merge; _block_backward = the block's forward recomputed under autograd,
its backward, the dout / dlse weighting and the dq / dK / dV accumulation) with triton.testing.do_bench (median,
L2 flushed), for the shapes fusedlm.distributed.plan's overlap table uses (B = 1, H = 32, Hkv = 8, E = 128,
bfloat16 by default). No communication: this is the compute side of the overlap condition.

    python benchmarks/bench_cp_step.py [--tokens 2048,4096,...] [--out DIR] [--budget-s 120]
    python benchmarks/bench_cp_step.py --cpu-smoke      # tiny shapes on the CPU, torch backend (checks the script)
    python -m fusedlm.distributed.plan --step-times DIR/cp_ring_step_<gpu>.json   # the table from these times

Rows (JSON, one per block shape x mode x n): op "cp_ring_step", block, tokens_per_rank, H, Hkv, E, dtype, mode
(fwd / bwd), median_ms, flops (counted by the ring's own note of the block, the plan's count), tflops, backend,
and the environment (gpu, torch, triton, git commit, date). Exit status 0 when every shape was timed (or cut by
--budget-s), 1 on an error, 2 without a CUDA device (and no --cpu-smoke).
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusedlm.bench.measure import environment  # noqa: E402
from fusedlm.distributed import _ring  # noqa: E402
from fusedlm.distributed._comm import recording  # noqa: E402

BLOCKS = {"c x 2c": ("second", None, False), "2c x 2c causal": (None, None, True)}  # _ring.step_plan's parts


def step_fns(n, H, Hkv, E, dtype, device, backend):
    """(forward step, backward step, resolved backend) on fresh random inputs of one rank holding n tokens."""
    gen = torch.Generator(device=device).manual_seed(n)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    q, k, v = rnd(1, H, n, E), rnd(1, Hkv, n, E), rnd(1, Hkv, n, E)
    backend = _ring.resolve_backend("scaled_dot_product_attention", q, k, v, backend)
    blocks = _ring.DenseBlocks(n, E ** -0.5, backend)
    kv = torch.cat([k.reshape(-1), v.reshape(-1)])
    ct = _ring.compute_dtype(q)
    out_acc = torch.zeros(1, H, n, E, dtype=ct, device=device)
    lse_acc = torch.full((1, H, n), float("-inf"), dtype=ct, device=device)
    out, lse = rnd(1, H, n, E), torch.randn(1, H, n, generator=gen, device=device) + 5.0
    dout = rnd(1, H, n, E)
    dq = torch.zeros(1, H, n, E, dtype=ct, device=device)
    acc = torch.zeros(kv.numel(), dtype=ct, device=device)

    def fwd(plan):
        return lambda: _ring._block_forward(blocks, plan, q, k, v, kv, out_acc, lse_acc)

    def bwd(plan):
        return lambda: _ring._block_backward(blocks, plan, q, k, v, kv, out, lse, dout, dq, acc)

    return fwd, bwd, backend


def counted_flops(fn):
    with recording() as rec:
        fn()
    return sum(f for _, f in rec.blocks)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="2048,4096,8192,16384,32768,65536,131072",
                   help="tokens a rank, n (each even)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --cpu-smoke)")
    p.add_argument("--backend", default=None, help="fusedlm backend of the blocks (default: auto)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--budget-s", type=float, default=None, help="start no new measurement after this many s")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (torch backend)")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), getattr(torch, args.dtype or "float32")
        tokens, H, Hkv, E, backend = [16, 32], 2, 1, 16, args.backend or "torch"
    else:
        if not torch.cuda.is_available():
            print("bench_cp_step: no CUDA device (use --cpu-smoke to check the script)")
            return 2
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype or "bfloat16")
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        H, Hkv, E, backend = args.heads, args.kv_heads, args.head_dim, args.backend
    if any(n % 2 for n in tokens):
        raise ValueError(f"--tokens: expected even token counts (the zigzag halves), got {tokens}")
    env = environment(device)
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    rows, failed = [], False
    for n in tokens:
        try:
            fwd, bwd, resolved = step_fns(n, H, Hkv, E, dtype, device, backend)
            for block, plan in BLOCKS.items():
                for mode, make in (("fwd", fwd), ("bwd", bwd)):
                    if deadline is not None and time.monotonic() > deadline:
                        print(f"budget spent: n = {n} {block} {mode} and later not measured")
                        raise StopIteration
                    fn = make(plan)
                    flops = counted_flops(fn)  # (also the warm-up: compiles, autotuning)
                    if device.type == "cuda":
                        import triton.testing

                        torch.cuda.synchronize()
                        ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                    else:
                        t0 = time.perf_counter()
                        fn()
                        ms = (time.perf_counter() - t0) * 1e3
                    row = dict(op="cp_ring_step", block=block, tokens_per_rank=n, H=H, Hkv=Hkv, E=E,
                               dtype=str(dtype).replace("torch.", ""), mode=mode, median_ms=ms, flops=flops,
                               tflops=flops / (ms * 1e9), backend=resolved, smoke=args.cpu_smoke, **env)
                    rows.append(row)
                    print(f"n {n:>7,}  {block:<15} {mode}  {ms:9.3f} ms  {row['tflops']:7.1f} TFLOP/s  ({resolved})",
                          flush=True)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - a row that says why, and the next size
            failed = True
            print(f"n {n}: FAILED {type(e).__name__}: {e}", flush=True)
            rows.append(dict(op="cp_ring_step", tokens_per_rank=n, error=f"{type(e).__name__}: {e}", **env))
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", env["gpu"].lower()).strip("_")
    path = out / f"cp_ring_step_{'cpu-smoke_' if args.cpu_smoke else ''}{slug}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"rows: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
