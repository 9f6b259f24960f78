"""``fusedlm bench`` / ``python -m fusedlm.bench``: the arguments, and a run from the ceilings to the files.

Run:  python -m fusedlm.bench [--ops memory|attention|lora|deberta|<op>,...] [--out DIR] [--quick]
      TRITON_INTERPRET=1 python -m fusedlm.bench --cpu-smoke                              (no GPU needed)
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

import fusedlm
from fusedlm import _backend

from .cases import Sizes
from .harness import MODES, Run, bench_case, ceiling_row
from .measure import measure_copy_bandwidth, measure_matmul_tflops
from .registry import FAMILIES, OP_BY_NAME, default_tag, select_ops
from .report import REL_ERR_FLAG, ceilings_line, print_row, summaries, write_outputs


def default_out(smoke=False):
    """Where results go: a temp dir for --cpu-smoke; else benchmarks/results/ of the source tree this
    module belongs to (editable install), else ./benchmarks/results."""
    if smoke:
        return Path(tempfile.gettempdir()) / "fusedlm_bench_smoke"
    repo = Path(__file__).resolve().parents[2]
    if (repo / "benchmarks").is_dir():
        return repo / "benchmarks" / "results"
    return Path("benchmarks") / "results"


def _int_list(text):
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="fusedlm bench",
        description="Throughput of fusedlm's ops against their peers, in the same run on the same inputs: "
                    "the memory-bound ops (rms_norm, rms_norm+residual, layer_norm, swiglu, rope) as GB/s and "
                    "the fraction of the measured copy bandwidth, against PyTorch eager, torch.compile and "
                    "Liger-Kernel, and a decode step's attention over a KV cache (contiguous and paged) against "
                    "PyTorch's SDPA backends and FlexAttention; the compute-bound ones (attention, attention on "
                    "a padded batch, LoRA "
                    "linear, DeBERTa attention dense and padded/packed) as TFLOP/s and the fraction of a "
                    "measured bf16 matmul, against PyTorch's SDPA backends, FlexAttention, PEFT, transformers' "
                    "DeBERTa module, FlashDeBERTa and DisentangledFlash. Needs a CUDA device (or --cpu-smoke).")
    p.add_argument("--ops", default="all",
                   help=f"comma list of ops {list(OP_BY_NAME)} or families {FAMILIES} (default: all)")
    p.add_argument("--providers", default="all",
                   help="comma list of provider names, e.g. fusedlm-triton,sdpa-flash,flex,peft (default: all)")
    p.add_argument("--modes", default=None,
                   help=f"comma list of {list(MODES)} (default: fwd,bwd for the memory-bound ops, "
                        "fwd,bwd,fwd+bwd for the compute-bound ones)")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default: benchmarks/results/; a temp dir with --cpu-smoke)")
    p.add_argument("--tag", default=None,
                   help="file name prefix (default: memory_bound, attention, lora, all, or the ops chosen)")
    p.add_argument("--quick", action="store_true",
                   help="shorter timing loops (do_bench warmup 10 ms, rep 40 ms) and fewer attention lengths "
                        f"(S = {','.join(map(str, Sizes.attn_quick_seqlens))}; padded: "
                        f"{','.join(map(str, Sizes.attn_padded_quick_seqlens))}; DeBERTa: "
                        f"{','.join(map(str, Sizes.deberta_quick_seqlens))})")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run each op once on tiny CPU tensors through the same code path (checks the "
                        "harness, no GPU needed; set TRITON_INTERPRET=1 for the triton provider)")
    p.add_argument("--tokens", type=int, default=None,
                   help="rows of the 2-D ops, B*S for rope and attention, M for lora (default 16384)")
    p.add_argument("--hidden", type=int, default=None, help="norm hidden / swiglu width (default 4096)")
    p.add_argument("--seqlens", type=_int_list, default=None,
                   help=f"attention and DeBERTa sequence lengths S, comma list (default "
                        f"{','.join(map(str, Sizes.attn_seqlens))}; DeBERTa "
                        f"{','.join(map(str, Sizes.deberta_seqlens))}); B = tokens // S. kv_cache_decode: "
                        f"the cache lengths T (default {','.join(map(str, Sizes.kv_seqlens))}, "
                        f"B = {','.join(map(str, Sizes.kv_batches))})")
    p.add_argument("--autotune", action="store_true",
                   help="set FUSEDLM_AUTOTUNE=1: fusedlm's attention kernels autotune their block shapes "
                        "(on the first, untimed call of each kind; slow to start). Default: the environment's "
                        "value, normally off. Recorded in every compute row")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default bfloat16 (float32 with --cpu-smoke)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new measurement after this many seconds (rows marked skipped)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _slug(text):
    return "".join(c.lower() if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


def _ceilings(run):
    """Measure the copy bandwidth and the matmul rate (printed, kept on ``run``); their two rows."""
    gbps, copy_ms = measure_copy_bandwidth(run)
    run.copy_gbps = gbps
    print(f"copy bandwidth: {gbps:.0f} GB/s ({run.copy_bytes / 2**20:.0f} MiB copy_ in {copy_ms:.4f} ms, "
          "read + write counted)", flush=True)
    tflops, mm_ms = measure_matmul_tflops(run)
    run.matmul_tflops = tflops
    dtype = str(run.dtype).replace("torch.", "")
    print(f"matmul: {tflops:.1f} TFLOP/s (torch.matmul {run.matmul_n}^3 {dtype} in {mm_ms:.4f} ms)", flush=True)
    n = run.matmul_n
    return [ceiling_row(run, "copy", f"({run.copy_bytes},) uint8", "uint8", copy_ms,
                        bytes_=2 * run.copy_bytes, gbps=gbps),
            ceiling_row(run, "matmul", f"({n},{n})@({n},{n})", dtype, mm_ms, flops=2 * n ** 3, tflops=tflops)]


def main(argv=None) -> int:
    """Entry point of ``fusedlm bench`` / ``python -m fusedlm.bench``.

    Returns 0 when every fusedlm provider measured ran and agreed with the reference, 1 when one
    failed or disagreed, 2 when it cannot run here (no CUDA device without --cpu-smoke, bad arguments).
    """
    try:
        args = parse_args(argv)
        ops = select_ops(args.ops)
    except ValueError as e:
        print(f"fusedlm bench: {e}", file=sys.stderr)
        return 2
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("fusedlm bench: no CUDA device here (torch "
              f"{torch.__version__}, torch.cuda.is_available() is False). The benchmarks measure GPU "
              "throughput; run them on a GPU machine (scripts/gpu_run.sh), or use --cpu-smoke to check "
              "the harness on tiny CPU tensors.", file=sys.stderr)
        return 2
    if args.autotune:
        os.environ["FUSEDLM_AUTOTUNE"] = "1"  # read by fusedlm.kernels.attention_configs at every launch
    try:
        run = Run(args)
    except ValueError as e:
        print(f"fusedlm bench: {e}", file=sys.stderr)
        return 2
    if run.smoke and _backend.why_unavailable("triton") is not None:
        print(f"note: the fusedlm-triton provider is unavailable: {_backend.why_unavailable('triton')} "
              "(run with TRITON_INTERPRET=1 to include it)", flush=True)

    stem = f"{args.tag or default_tag(ops)}_{'cpu-smoke' if run.smoke else _slug(run.env['gpu'])}"
    out_dir = args.out or default_out(run.smoke)
    env = run.env
    print(f"fusedlm bench on {env['gpu']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          + ", ".join(f"{name} {env[name.replace('-', '_')] or 'not installed'}"
                      for name in ("liger-kernel", "peft", "flashdeberta", "disentangled-flash"))
          + f", commit {env['git_commit'] or 'unknown'}", flush=True)
    rows = _ceilings(run)
    if any(op.kind == "compute" for op in ops):
        print(f"fusedlm attention autotune (FUSEDLM_AUTOTUNE): {'on' if run.autotune() else 'off'}", flush=True)
    skipped = []

    def emit(r):
        rows.append(r)
        print_row(r)

    for op in ops:
        missing = [a for a in op.fusedlm_attrs if getattr(fusedlm, a, None) is None]
        if missing:
            why = f"fusedlm.{missing[0]} does not exist in this build"
            print(f"{op.name}: skipped, {why}", flush=True)
            skipped.append((op.name, why))
            continue
        print(f"{op.name}:", flush=True)
        for case in op.cases(run):
            bench_case(case, run, emit)
            write_outputs(rows, run, out_dir, stem, skipped)
    for why in dict.fromkeys(f"{r['provider']}: {r['error']}" for r in rows
                             if r["status"] in ("unavailable", "unsupported")):
        print(f"not measured: {why}", flush=True)
    paths = write_outputs(rows, run, out_dir, stem, skipped, final=True)

    print("\n" + ceilings_line(run) + "\n\n" + summaries(rows) + "\n")
    print("results: " + ", ".join(str(p) for p in paths.values()))
    ours = [r for r in rows if r["provider"].startswith("fusedlm-")]
    failed = [r for r in ours if r["status"] == "failed"]
    flagged = [r for r in ours if r["rel_err"] is not None and not r["rel_err"] <= REL_ERR_FLAG]
    for r in failed:
        print(f"FAILED {r['op']} {r['case']} {r['mode']} {r['provider']}: {r['error']}", file=sys.stderr)
    for r in flagged:
        print(f"CHECK {r['op']} {r['case']} {r['mode']} {r['provider']}: rel err vs {r['rel_err_vs']} "
              f"{r['rel_err']:.2e} > {REL_ERR_FLAG}", file=sys.stderr)
    return 1 if failed or flagged else 0


def script_main(family, argv=None):
    """The benchmarks/bench_<family>.py scripts: ``main`` on that family, tagged with its name; arguments
    given on the command line come after these defaults, so they win."""
    return main(["--ops", family, "--tag", family, *(sys.argv[1:] if argv is None else argv)])
