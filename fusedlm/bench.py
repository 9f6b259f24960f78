"""The benchmark harness of fusedlm's ops: memory-bound and compute-bound, each against its peers.

What the ops are, their inputs, the work each counts and their providers: fusedlm/bench_ops.py.
This module times them, measures the two ceilings, and writes the rows (JSON, markdown, a summary).

What is measured, and why
-------------------------
memory-bound ops (rms_norm, rms_norm_residual, layer_norm, swiglu, rope) do a few FLOPs per byte:
bandwidth is their limit. Each counts the fewest bytes it must move, and the run measures the device's
copy bandwidth (a 1 GiB ``Tensor.copy_``, read + write counted) as the practical ceiling:

    gbps            = counted bytes / median time
    frac_of_copy_bw = gbps / copy bandwidth      (1.0: as fast as copying the bytes the op cannot avoid)

compute-bound ops (attention, attention_padded, lora_linear) are matmuls: each counts its FLOPs (the
formulas are in bench_ops and benchmarks/README.md), and the run measures a bf16 matmul
(``torch.matmul`` of two 8192 x 8192 matrices, 2 * 8192^3 FLOPs) as the practical ceiling:

    tflops          = counted FLOPs / median time
    frac_of_matmul  = tflops / matmul TFLOP/s    (1.0: as fast as cuBLAS on a large square GEMM)

Every provider of a case runs on the same input values, in the same process, right after each other.
``rel_err`` is max over the compared tensors of ||x - x_ref|| / ||x_ref||, against ``rel_err_vs``: the
outputs (fwd) or gradients (bwd, fwd+bwd) of torch-eager for the memory-bound ops, of a PyTorch SDPA
backend for attention (flash first), of PEFT for LoRA. So a fast wrong kernel cannot pass unnoticed.
``vs_baseline`` (LoRA) is a row's median time over the base linear's, same mode.

Modes
  fwd      the training forward: the inputs require grad, so autograd records the graph and each
           implementation saves what its backward needs, as in a training step.
  bwd      the backward alone: the forward runs once, then
           ``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)`` is timed.
  fwd+bwd  forward then ``torch.autograd.grad`` (default for the compute-bound ops, with fwd and bwd).

Timing: on CUDA, ``triton.testing.do_bench`` (median; it flushes L2 before every repetition, so inputs
come from HBM as in a model whose working set dwarfs L2). ``--cpu-smoke`` runs the same code path on
tiny CPU tensors timed with time.perf_counter: a check of the harness, never a performance figure.
``--autotune`` sets FUSEDLM_AUTOTUNE=1 (fusedlm's attention kernels then autotune their block shapes
on the first call of each kind, untimed); every compute row records whether it was on.

Run:  python -m fusedlm.bench [--ops memory|attention|lora|<op>,...] [--out DIR] [--quick]  (or: fusedlm bench)
      TRITON_INTERPRET=1 python -m fusedlm.bench --cpu-smoke                              (no GPU needed)
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fusedlm
from fusedlm import _backend
from fusedlm.bench_ops import (  # noqa: F401  (re-exported: the op definitions used to live here)
    ALL_OPS, COMPUTE_OPS, FAMILIES, MEMORY_PROVIDERS, OP_BY_NAME, OPS, SMOKE_SIZES, Bound, Case,
    ProviderUnavailable, Sizes, select_ops)

COPY_BYTES_GPU = 1 << 30      # 1 GiB per buffer: far beyond L2 (50 MiB on H100/H200), many waves of SMs
COPY_BYTES_SMOKE = 8 << 20
MATMUL_N_GPU = 8192           # the matmul ceiling: (n, n) @ (n, n) in the run's dtype
MATMUL_N_SMOKE = 256
# A row whose outputs differ from the reference's by more than this is flagged in the markdown table.
# Two correct bf16 implementations differ by about one output rounding (u = 2^-8 ~ 4e-3).
REL_ERR_FLAG = 2e-2
DEFAULT_MODES = {"memory": ("fwd", "bwd"), "compute": ("fwd", "bwd", "fwd+bwd")}
MODES = ("fwd", "bwd", "fwd+bwd")


# --------------------------------------------------------------------------------------------------
# Environment, timing, memory.
# --------------------------------------------------------------------------------------------------

def _git_commit():
    if os.environ.get("FUSEDLM_GIT_COMMIT"):
        return os.environ["FUSEDLM_GIT_COMMIT"]
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module):
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001
        return None


def environment(device):
    """What every row records about where it was measured."""
    import triton

    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "peft": _version("peft"),
        "fusedlm": getattr(fusedlm, "__version__", None),
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def time_cuda(fn, quick):
    """Median ms over repetitions, L2 flushed before each (triton.testing.do_bench)."""
    import triton.testing

    warmup, rep = (10, 40) if quick else (25, 100)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def time_cpu(fn, reps=1):
    """Median ms of ``reps`` calls with time.perf_counter (the smoke test: the caller already warmed up)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn, device):
    """Peak CUDA memory one call allocates beyond what was allocated before it (outputs, saved
    tensors, workspaces), or None off CUDA. The inputs are the same for every provider, so this is
    the part that differs between them."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def host_ms(fn, device, calls=10):
    """Median host time to issue one call (no synchronisation), or None off CUDA.

    do_bench times on the device; when a call takes longer to issue on the host than the device
    takes to run it (Python, dispatch, autograd bookkeeping), the device waits and the row measures
    the host. host_ms close to median_ms flags such a launch-bound row; in a model the host usually
    runs ahead and this overhead hides.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def measure_copy_bandwidth(run):
    """GB/s of dst.copy_(src) on buffers of run.copy_bytes each; bytes counted = read + write."""
    n = run.copy_bytes
    src = torch.ones(n, dtype=torch.uint8, device=run.device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()
    ms = run.time(fn) if run.device.type == "cuda" else time_cpu(fn, reps=3)
    del src, dst
    return 2 * n / (ms * 1e6), ms


def measure_matmul_tflops(run):
    """TFLOP/s of torch.matmul on two (n, n) matrices of the run's dtype: 2 n^3 FLOPs."""
    n = run.matmul_n
    gen = torch.Generator(device=run.device).manual_seed(run.seed)
    a = torch.randn(n, n, generator=gen, device=run.device, dtype=torch.float32).to(run.dtype)
    b = torch.randn(n, n, generator=gen, device=run.device, dtype=torch.float32).to(run.dtype)
    fn = lambda: torch.matmul(a, b)  # noqa: E731
    fn()
    ms = run.time(fn) if run.device.type == "cuda" else time_cpu(fn, reps=3)
    del a, b
    return 2 * n ** 3 / (ms * 1e9), ms


# --------------------------------------------------------------------------------------------------
# One run.
# --------------------------------------------------------------------------------------------------

class Run:
    """Settings and shared state of one benchmark run (what the op definitions read: device, dtype,
    sizes, seqlens, seed, smoke, compiled)."""

    def __init__(self, args):
        self.smoke = args.cpu_smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if self.smoke else torch.bfloat16)
        self.sizes = SMOKE_SIZES if self.smoke else Sizes()
        if args.tokens:
            self.sizes = dataclasses.replace(self.sizes, tokens=args.tokens)
        if args.hidden:
            self.sizes = dataclasses.replace(self.sizes, hidden=args.hidden)
        self.quick = args.quick
        self.seqlens = tuple(args.seqlens or (self.sizes.attn_quick_seqlens if self.quick else self.sizes.attn_seqlens))
        self.padded_seqlens = tuple(args.seqlens or (self.sizes.attn_padded_quick_seqlens if self.quick
                                                     else self.sizes.attn_seqlens))
        self.modes = None  # None: each kind's DEFAULT_MODES
        if args.modes:
            self.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
            bad = set(self.modes) - set(MODES)
            if bad or not self.modes:
                raise ValueError(f"--modes: expected a comma list of {list(MODES)}, got {args.modes!r}")
        self.providers = None if args.providers in (None, "", "all") else {
            p.strip() for p in args.providers.split(",") if p.strip()}
        self.copy_bytes = COPY_BYTES_SMOKE if self.smoke else COPY_BYTES_GPU
        self.matmul_n = MATMUL_N_SMOKE if self.smoke else MATMUL_N_GPU
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else None
        self.seed = args.seed
        self.env = environment(self.device)
        self.copy_gbps = None
        self.matmul_tflops = None
        self._compiled = {}

    def modes_for(self, kind):
        return self.modes or DEFAULT_MODES[kind]

    def wants_provider(self, name):
        return self.providers is None or name in self.providers

    def out_of_time(self):
        return self.deadline is not None and time.monotonic() > self.deadline

    def time(self, fn):
        return time_cuda(fn, self.quick) if self.device.type == "cuda" else time_cpu(fn)

    def compiled(self, fn, **options):
        """torch.compile(fn, **options), one per (fn, options) for the whole run."""
        key = (fn, tuple(sorted(options.items())))
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, **options)
        return self._compiled[key]

    def autotune(self):
        """Whether fusedlm's attention kernels autotune here (FUSEDLM_AUTOTUNE=1 on a CUDA device)."""
        if _backend.why_unavailable("triton") is not None:
            return False
        from fusedlm.kernels.attention import autotune_enabled
        return bool(autotune_enabled(self.device))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _cotangents(outs, seed):
    """grad_outputs with the same values for every provider, in each output's own memory layout."""
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    cots = []
    for o in outs:
        g = torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32)
        cots.append(torch.empty_like(o).copy_(g))  # empty_like keeps o's strides
    return cots


def _rel_err(got, want):
    """max over the tensors of ||got - want|| / ||want||, in float32 on the device."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want):
        if g is None or g.shape != w.shape:
            return float("inf")
        g, w = g.detach().float(), w.detach().float()
        scale = w.norm().item()
        diff = (g - w).norm().item()
        err = diff / scale if scale > 0 else diff
        worst = max(worst, err if err == err else float("inf"))
    return worst


def _short(e, limit=400):
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[:limit] + "..."


def _row(run, case, shape, base, mode, provider, ms=None, peak=None, rel=None, rel_vs=None, error=None,
         status=None, host=None, vs_baseline=None):
    """One JSON row: every row has every key (None where it does not apply)."""
    work, formula = case.work(base, mode, provider)
    memory = case.kind == "memory"
    rate = (work / (ms * 1e6) if memory else work / (ms * 1e9)) if ms else None  # GB/s or TFLOP/s
    ceiling = run.copy_gbps if memory else run.matmul_tflops
    return {
        "kind": case.kind, "op": case.op, "case": case.label, "shape": shape,
        "dtype": str(run.dtype).replace("torch.", ""), "mode": mode, "provider": provider,
        "median_ms": ms, "host_ms": host, "peak_mem_bytes": peak,
        "bytes": work if memory else None, "bytes_formula": formula if memory else None,
        "gbps": rate if memory else None,
        "frac_of_copy_bw": rate / ceiling if memory and rate and ceiling else None,
        "flops": None if memory else work, "flops_formula": None if memory else formula,
        "tflops": None if memory else rate,
        "frac_of_matmul": rate / ceiling if not memory and rate and ceiling else None,
        "baseline": case.baseline, "vs_baseline": vs_baseline,
        "rel_err": rel, "rel_err_vs": rel_vs,
        "autotune": None if memory else run.autotune(), "params": case.params,
        "error": error, "status": status or ("failed" if error else "ok"),
        "copy_gbps": run.copy_gbps, "matmul_tflops": run.matmul_tflops, "smoke": run.smoke, **run.env,
    }


def bench_case(case, run, emit):
    """Measure every provider of ``case`` in every mode; calls ``emit(row)`` for each result."""
    base = case.make()
    shape = case.describe(base)
    modes = run.modes_for(case.kind)
    state = {"ref_name": None, "ref": None, "baseline_ms": {}}

    def row(mode, provider, **kw):
        ms = kw.get("ms")
        if provider == case.baseline and ms:
            state["baseline_ms"][mode] = ms
        base_ms = state["baseline_ms"].get(mode)
        emit(_row(run, case, shape, base, mode, provider, vs_baseline=ms / base_ms if ms and base_ms else None, **kw))

    for provider, build in case.providers.items():
        if not run.wants_provider(provider):
            continue
        if run.out_of_time():
            for mode in modes:
                row(mode, provider, error="the --budget-s time budget ran out", status="skipped")
            continue
        _bench_provider(case, run, modes, provider, build, base, state, row)
        _free(run)


def _bench_provider(case, run, modes, provider, build, base, state, row):
    """One provider of one case: build, run once (checked against the reference), then time each mode."""
    try:
        # Each provider gets its own copy of the inputs (same values, same strides): some peers write
        # into their inputs, which must not leak into the next provider's measurement.
        t = {k: v.detach().clone().requires_grad_(k in case.grad) if isinstance(v, torch.Tensor) else v
             for k, v in base.items()}
        bound = build(t)
        if not isinstance(bound, Bound):
            bound = Bound(bound, [t[k] for k in case.grad])
        fn, leaves = bound.fn, bound.leaves
        outs = _as_tuple(fn())  # first call: compiles / autotunes; these outputs are the ones checked
        timed = {"fwd": fn}
        results = {"fwd": outs}
        if set(modes) & {"bwd", "fwd+bwd"}:
            diff_outs = [o for o in outs if o.requires_grad]
            cots = bound.cotangents(diff_outs) if bound.cotangents else _cotangents(diff_outs, run.seed + 1)
            timed["bwd"] = lambda: torch.autograd.grad(diff_outs, leaves, cots, retain_graph=True)
            timed["fwd+bwd"] = lambda: torch.autograd.grad(
                [o for o in _as_tuple(fn()) if o.requires_grad], leaves, cots)
            for m in ("bwd", "fwd+bwd"):
                if m in modes:
                    results[m] = timed[m]()  # first backward: compiles; these gradients are checked
        run.sync()
        rel, rel_vs = {m: None for m in modes}, None
        if bound.compare:
            canon = bound.canon or list
            mine = {m: [x.detach() for x in canon(list(results[m]))] for m in modes}
            if state["ref_name"] is None and provider in case.reference:
                state["ref_name"], state["ref"] = provider, mine
            if state["ref_name"] is not None:
                rel_vs = state["ref_name"]
                rel = {m: _rel_err(mine[m], state["ref"][m]) for m in modes}
            del mine
        del results, outs
    except ProviderUnavailable as e:
        for mode in modes:
            row(mode, provider, error=str(e), status=e.status)
        return
    except Exception as e:  # noqa: BLE001 - one provider failing must not stop the others
        for mode in modes:
            row(mode, provider, error=_short(e))
        return
    for mode in modes:
        try:
            peak = peak_extra_bytes(timed[mode], run.device)
            ms = run.time(timed[mode])
            host = host_ms(timed[mode], run.device)
        except Exception as e:  # noqa: BLE001
            row(mode, provider, rel=rel[mode], rel_vs=rel_vs, error=_short(e))
            continue
        row(mode, provider, ms=ms, peak=peak, rel=rel[mode], rel_vs=rel_vs, host=host)


def _free(run):
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Output: JSON rows, markdown tables, a summary, plots.
# --------------------------------------------------------------------------------------------------

def _slug(text):
    return "".join(c.lower() if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def _missing(r):
    """A summary cell for a row without a time."""
    return {None: "—", "unavailable": "n/a", "unsupported": "unsupported", "skipped": "skipped"}.get(
        r and r["status"], "error")


def _compile_ms(rows):
    return {(r["op"], r["mode"]): r["median_ms"] for r in rows
            if r["kind"] == "memory" and r["provider"] == "torch-compile" and r["median_ms"]}


def summary_table(rows):
    """Memory-bound ops: one line per (op, mode), each provider's median ms and % of copy bandwidth."""
    measured = [r for r in rows if r["kind"] == "memory"]
    if not measured:
        return ""
    providers = [p for p in MEMORY_PROVIDERS if any(r["provider"] == p for r in measured)]
    keys = list(dict.fromkeys((r["op"], r["mode"]) for r in measured))
    cell = {(r["op"], r["mode"], r["provider"]): r for r in measured}
    comp = _compile_ms(rows)
    head = ["op", "mode"] + providers + ["fusedlm-triton vs compile"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op, mode in keys:
        cells = [op, mode]
        for p in providers:
            r = cell.get((op, mode, p))
            if r is None or r["median_ms"] is None:
                cells.append(_missing(r))
            else:
                cells.append(f"{r['median_ms']:.3f} ms ({100 * (r['frac_of_copy_bw'] or 0):.0f}%)")
        ours = cell.get((op, mode, "fusedlm-triton"))
        c = comp.get((op, mode))
        cells.append(f"{c / ours['median_ms']:.2f}x" if ours and ours["median_ms"] and c else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compute_summary(rows):
    """Compute-bound ops: a table per op, one line per (case, mode), each provider's median ms and
    TFLOP/s; then fusedlm's speedup over the fastest peer, and each provider's time over the baseline."""
    measured = [r for r in rows if r["kind"] == "compute"]
    tables = []
    for op in dict.fromkeys(r["op"] for r in measured):
        rs = [r for r in measured if r["op"] == op]
        providers = list(dict.fromkeys(r["provider"] for r in rs))
        baseline = next((r["baseline"] for r in rs if r["baseline"]), None)
        keys = list(dict.fromkeys((r["case"], r["mode"]) for r in rs))
        cell = {(r["case"], r["mode"], r["provider"]): r for r in rs}
        head = ["case", "mode"] + providers + ["fusedlm vs fastest peer"]
        if baseline:
            head.append(f"time / {baseline}")
        lines = [f"**{op}**: median ms (TFLOP/s)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for case, mode in keys:
            cells = [case, mode]
            timed = {}
            for p in providers:
                r = cell.get((case, mode, p))
                if r is None or r["median_ms"] is None:
                    cells.append(_missing(r))
                else:
                    timed[p] = r["median_ms"]
                    flag = " **check**" if r["rel_err"] is not None and r["rel_err"] > REL_ERR_FLAG else ""
                    cells.append(f"{r['median_ms']:.3f} ({_tf(r['tflops'])}){flag}")
            ours = {p: ms for p, ms in timed.items() if p.startswith("fusedlm-")}
            peers = {p: ms for p, ms in timed.items() if not p.startswith("fusedlm-") and p != baseline}
            if ours and peers:
                peer = min(peers, key=peers.get)
                cells.append(f"{peers[peer] / min(ours.values()):.2f}x ({peer})")
            else:
                cells.append("—")
            if baseline:
                b = timed.get(baseline)
                cells.append(", ".join(f"{p} {ms / b:.2f}x" for p, ms in timed.items() if p != baseline)
                             if b else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines += _target_lines(rs, baseline)
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _target_lines(rs, baseline):
    """LoRA: whether fusedlm's fwd+bwd is within the target ratio to the baseline (params target_vs_baseline)."""
    out = []
    for r in rs:
        target = r["params"].get("target_vs_baseline")
        if target and r["mode"] == "fwd+bwd" and r["provider"].startswith("fusedlm-") and r["vs_baseline"]:
            verdict = "met" if r["vs_baseline"] <= target else "NOT met"
            out.append(f"{r['case']}: {r['provider']} fwd+bwd = {r['vs_baseline']:.2f}x {baseline} "
                       f"(target <= {target}x: {verdict})")
    return [""] + out if out else []


def summaries(rows):
    """The summary tables of both kinds (the *_summary.md file, and the end of the console output)."""
    parts = []
    if any(r["kind"] == "memory" for r in rows):
        parts.append("**memory-bound ops**: median ms (% of copy bandwidth)\n\n" + summary_table(rows))
    if any(r["kind"] == "compute" for r in rows):
        parts.append(compute_summary(rows))
    return "\n\n".join(parts)


def _ceilings_line(run):
    return (f"Copy bandwidth (`Tensor.copy_` of {run.copy_bytes / 2**20:.0f} MiB, read + write counted): "
            f"**{_fmt(run.copy_gbps, '.0f')} GB/s**. Matmul (`torch.matmul` {run.matmul_n}^3, "
            f"{str(run.dtype).replace('torch.', '')}): **{_fmt(run.matmul_tflops, '.0f')} TFLOP/s**.")


def markdown(rows, run, skipped):
    env = run.env
    comp = _compile_ms(rows)
    mem = [r for r in rows if r["kind"] == "memory"]
    cmp_rows = [r for r in rows if r["kind"] == "compute"]
    lines = ["# fusedlm benchmarks", ""]
    if run.smoke:
        lines += ["**CPU SMOKE TEST: tiny tensors, time.perf_counter, one call. These times check the "
                  "harness; they are not performance figures.**", ""]
    lines += [
        f"{env['gpu']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
        f"liger-kernel {env['liger_kernel'] or 'not installed'} · peft {env['peft'] or 'not installed'} · "
        f"fusedlm {env['fusedlm']} · commit {env['git_commit'] or 'unknown'} · {env['date']}",
        "",
        _ceilings_line(run) + f" dtype {str(run.dtype).replace('torch.', '')}. Timing: "
        + ("time.perf_counter" if run.smoke else "triton.testing.do_bench median, L2 flushed")
        + ". fwd = training forward (inputs require grad); bwd = `torch.autograd.grad` alone; fwd+bwd = both. "
        "`host ms` = time to issue one call on the host; near `median ms`, the row is launch-bound. "
        "`peak MiB` = memory one call allocates beyond its inputs. `rel err` = max ‖x − x_ref‖ / ‖x_ref‖ "
        "over the outputs (fwd) or gradients, against the provider named.",
    ]
    if mem:
        lines += [
            "", "## Memory-bound ops: median ms (% of copy bandwidth)", "",
            "`% copy BW` = (fewest bytes the op must move / time) / copy bandwidth. "
            "`vs compile` = torch.compile's time / this row's time.", "",
            summary_table(rows), "", "### All rows", "",
            "| op | mode | shape | provider | median ms | host ms | GB/s | % copy BW | peak MiB | vs compile "
            "| rel err |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mem:
            if r["median_ms"] is None:
                continue
            c = comp.get((r["op"], r["mode"]))
            peak = r["peak_mem_bytes"]
            lines.append(
                f"| {r['op']} | {r['mode']} | {r['shape']} | {r['provider']} | {r['median_ms']:.4f} | "
                f"{_fmt(r['host_ms'], '.4f')} | {r['gbps']:.0f} | {100 * (r['frac_of_copy_bw'] or 0):.1f}% | "
                f"{_fmt(None if peak is None else peak / 2**20, '.0f')} | "
                f"{_fmt(None if not c else c / r['median_ms'], '.2f')}{'x' if c else ''} | {_rel_cell(r)} |")
    if cmp_rows:
        autotune = sorted({"on" if r["autotune"] else "off" for r in cmp_rows})
        lines += [
            "", "## Compute-bound ops: median ms (TFLOP/s)", "",
            "`% matmul` = (FLOPs counted / time) / the matmul rate above. `fusedlm vs fastest peer` = the "
            "fastest peer's time / fusedlm's fastest (above 1: fusedlm is faster). `time / base-linear` = "
            "each provider's time over the frozen base projection's (LoRA). fusedlm autotune (FUSEDLM_AUTOTUNE): "
            + " / ".join(autotune) + ".", "",
            compute_summary(rows), "", "### All rows", "",
            "| op | case | mode | provider | median ms | host ms | TFLOP/s | % matmul | peak MiB | vs baseline "
            "| rel err | autotune |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in cmp_rows:
            if r["median_ms"] is None:
                continue
            peak = r["peak_mem_bytes"]
            lines.append(
                f"| {r['op']} | {r['case']} | {r['mode']} | {r['provider']} | {r['median_ms']:.4f} | "
                f"{_fmt(r['host_ms'], '.4f')} | {r['tflops']:.1f} | {100 * (r['frac_of_matmul'] or 0):.1f}% | "
                f"{_fmt(None if peak is None else peak / 2**20, '.0f')} | "
                f"{_fmt(r['vs_baseline'], '.2f')}{'x' if r['vs_baseline'] else ''} | {_rel_cell(r)} | "
                f"{'on' if r['autotune'] else 'off'} |")
        lines += ["", "Shapes:", ""]
        lines += [f"- {op} {case}: {shape}" for op, case, shape in
                  dict.fromkeys((r["op"], r["case"], r["shape"]) for r in cmp_rows)]
    errors = [r for r in rows if r["median_ms"] is None and r["kind"] != "ceiling"]
    if errors or skipped:
        lines += ["", "## Not measured", ""]
        seen = {}
        for r in errors:
            seen.setdefault((r["provider"], r["error"]), []).append(r)
        for (provider, error), where in seen.items():
            lines.append(f"- {provider} ({_where(where, rows)}): {error}")
        for name, why in skipped:
            lines.append(f"- {name}: skipped, {why}")
    if mem:
        lines += ["", "## Bytes counted (the fewest each op must move; element size e, weights in e)", ""]
        for op in OPS:
            if any(r["op"] == op.name for r in mem):
                for mode in ("fwd", "bwd"):
                    lines.append(f"- {op.name} {mode}: {op.bytes_doc[mode]}")
    if cmp_rows:
        lines += ["", "## FLOPs counted", ""]
        for op in COMPUTE_OPS:
            if any(r["op"] == op.name for r in cmp_rows):
                for mode, doc in op.work_doc.items():
                    lines.append(f"- {op.name} {mode}: {doc}")
        if any(r["provider"] == "base-linear" for r in cmp_rows):
            lines.append("- lora_linear, provider base-linear: 2MNK fwd, 2MNK bwd (dx only), 4MNK fwd+bwd")
    return "\n".join(lines) + "\n"


def _where(missing, rows):
    """Which (op, case, mode) a list of unmeasured rows covers, compactly: "attention: all", or per case
    ("attention S=1024 B=16: fwd, bwd")."""
    parts = []
    for op in dict.fromkeys(r["op"] for r in missing):
        got = {(r["case"], r["mode"]) for r in missing if r["op"] == op}
        every = {(r["case"], r["mode"]) for r in rows if r["op"] == op}
        if got == every:
            parts.append(f"{op}: all")
            continue
        got_cases = {c for c, _ in got}
        for case in [c for c in dict.fromkeys(r["case"] for r in rows if r["op"] == op) if c in got_cases]:
            modes = [m for m in MODES if (case, m) in got]
            name = op if case == op else f"{op} {case}"
            parts.append(f"{name}: {', '.join(modes)}")
    return "; ".join(parts)


def _tf(x):
    """TFLOP/s for a table cell: three significant figures at most, no exponent."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _rel_cell(r):
    rel = r["rel_err"]
    if rel is None:
        return "—"
    flag = " **check**" if rel > REL_ERR_FLAG else ""
    return f"{rel:.1e}{flag}" + ("" if r["rel_err_vs"] == r["provider"] else f" vs {r['rel_err_vs']}")


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:  # noqa: BLE001 - the plots are optional
        return None


def plot(rows, path):
    """Bar chart of the fraction of copy bandwidth per (op, mode) and provider; None without matplotlib."""
    measured = [r for r in rows if r["kind"] == "memory" and r["frac_of_copy_bw"]]
    plt = _pyplot() if measured else None
    if plt is None:
        return None
    keys = list(dict.fromkeys(f"{r['op']}\n{r['mode']}" for r in measured))
    providers = [p for p in MEMORY_PROVIDERS if any(r["provider"] == p for r in measured)]
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys)), 4))
    for i, p in enumerate(providers):
        vals = {f"{r['op']}\n{r['mode']}": r["frac_of_copy_bw"] for r in measured if r["provider"] == p}
        xs = [j + i * width for j, k in enumerate(keys) if k in vals]
        ax.bar(xs, [vals[k] for k in keys if k in vals], width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=8)
    ax.set_ylabel("fraction of copy bandwidth")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_title(f"{measured[0]['gpu']}, {measured[0]['dtype']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_attention(rows, path):
    """TFLOP/s against S per provider for the dense attention op: a row of panels (one per mode) for
    non-causal, one for causal."""
    measured = [r for r in rows if r["op"] == "attention" and r["tflops"]]
    plt = _pyplot() if measured else None
    if plt is None:
        return None
    modes = [m for m in MODES if any(r["mode"] == m for r in measured)]
    causals = sorted({r["params"]["causal"] for r in measured})
    fig, axes = plt.subplots(len(causals), len(modes), figsize=(3.8 * len(modes), 3.2 * len(causals)),
                             squeeze=False)
    for i, causal in enumerate(causals):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in measured if r["params"]["causal"] == causal and r["mode"] == mode]
            for p in dict.fromkeys(r["provider"] for r in measured):
                pts = sorted((r["params"]["seqlen"], r["tflops"]) for r in sel if r["provider"] == p)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=p)
            ax.set_xscale("log", base=2)
            seqlens = sorted({r["params"]["seqlen"] for r in measured})
            ax.set_xticks(seqlens, [str(x) for x in seqlens], fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{mode}{', causal' if causal else ''}", fontsize=9)
            ax.axhline(measured[0]["matmul_tflops"] or 0, color="gray", lw=0.8, ls="--")
            ax.set_ylim(bottom=0)
            if i == len(causals) - 1:
                ax.set_xlabel("S (B = tokens / S)", fontsize=8)
        axes[i][0].set_ylabel("TFLOP/s (dashed: matmul)", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"attention, {measured[0]['gpu']}, {measured[0]['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(rows, run, out_dir, stem, skipped, final=False):
    """Rewrite the JSON, markdown and summary files (after every case, so a killed run keeps its rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md",
             "summary": out_dir / f"{stem}_summary.md"}
    paths["json"].write_text(json.dumps(rows, indent=1) + "\n")
    paths["md"].write_text(markdown(rows, run, skipped))
    paths["summary"].write_text(summaries(rows) + "\n")
    if final:
        for key, fn, suffix in (("png", plot, ""), ("attention_png", plot_attention, "_attention")):
            png = fn(rows, out_dir / f"{stem}{suffix}.png")
            if png:
                paths[key] = png
    return paths


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------

def _default_out():
    """benchmarks/results/ of the source tree this module belongs to (editable install), else ./"""
    repo = Path(__file__).resolve().parents[1]
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
                    "Liger-Kernel; the compute-bound ones (attention, attention on a padded batch, LoRA "
                    "linear) as TFLOP/s and the fraction of a measured bf16 matmul, against PyTorch's SDPA "
                    "backends, FlexAttention, PEFT. Needs a CUDA device (or --cpu-smoke).")
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
                        f"{','.join(map(str, Sizes.attn_padded_quick_seqlens))})")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run each op once on tiny CPU tensors through the same code path (checks the "
                        "harness, no GPU needed; set TRITON_INTERPRET=1 for the triton provider)")
    p.add_argument("--tokens", type=int, default=None,
                   help="rows of the 2-D ops, B*S for rope and attention, M for lora (default 16384)")
    p.add_argument("--hidden", type=int, default=None, help="norm hidden / swiglu width (default 4096)")
    p.add_argument("--seqlens", type=_int_list, default=None,
                   help=f"attention sequence lengths S, comma list (default "
                        f"{','.join(map(str, Sizes.attn_seqlens))}); B = tokens // S")
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


def _default_tag(ops):
    if len(ops) == len(ALL_OPS):
        return "all"
    if ops == OPS:
        return "memory_bound"
    for family in FAMILIES:
        if ops == [op for op in ALL_OPS if op.family == family or op.kind == family]:
            return family
    return "-".join(op.name for op in ops)


def _print_row(r):
    rel = r["rel_err"]
    rel_s = f"  rel err {rel:.1e}" if rel is not None else ""
    if r["median_ms"] is None:
        if r["status"] not in ("unavailable", "unsupported"):
            what = r["op"] if r["kind"] == "memory" else f"{r['op']} {r['case']}"
            print(f"  {what:18s} {r['mode']:7s} {r['provider']:15s} not measured: {r['error']}", flush=True)
        return
    if r["kind"] == "memory":
        print(f"  {r['op']:18s} {r['mode']:7s} {r['provider']:15s} {r['median_ms']:9.4f} ms "
              f"{r['gbps']:7.0f} GB/s {100 * r['frac_of_copy_bw']:5.1f}% of copy" + rel_s, flush=True)
    else:
        base = f"  {r['vs_baseline']:.2f}x {r['baseline']}" if r["vs_baseline"] and r["provider"] != r["baseline"] else ""
        print(f"  {r['case']:26s} {r['mode']:7s} {r['provider']:21s} {r['median_ms']:9.4f} ms "
              f"{r['tflops']:7.1f} TFLOP/s {100 * (r['frac_of_matmul'] or 0):5.1f}% of matmul" + base + rel_s,
              flush=True)


def _ceiling_row(run, op, shape, dtype, ms, bytes_=None, gbps=None, flops=None, tflops=None):
    return {"kind": "ceiling", "op": op, "case": op, "shape": shape, "dtype": dtype, "mode": "fwd",
            "provider": "torch", "median_ms": ms, "host_ms": None, "peak_mem_bytes": None,
            "bytes": bytes_, "bytes_formula": "read src + write dst" if bytes_ else None, "gbps": gbps,
            "frac_of_copy_bw": 1.0 if gbps else None, "flops": flops,
            "flops_formula": "2 n^3" if flops else None, "tflops": tflops,
            "frac_of_matmul": 1.0 if tflops else None, "baseline": None, "vs_baseline": None,
            "rel_err": None, "rel_err_vs": None, "autotune": None, "params": {}, "error": None, "status": "ok",
            "copy_gbps": run.copy_gbps, "matmul_tflops": run.matmul_tflops, "smoke": run.smoke, **run.env}


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
        os.environ["FUSEDLM_AUTOTUNE"] = "1"  # read by fusedlm.kernels.attention at every launch
    try:
        run = Run(args)
    except ValueError as e:
        print(f"fusedlm bench: {e}", file=sys.stderr)
        return 2
    if run.smoke and _backend.why_unavailable("triton") is not None:
        print(f"note: the fusedlm-triton provider is unavailable: {_backend.why_unavailable('triton')} "
              "(run with TRITON_INTERPRET=1 to include it)", flush=True)

    tag = args.tag or _default_tag(ops)
    stem = f"{tag}_{'cpu-smoke' if run.smoke else _slug(run.env['gpu'])}"
    out_dir = args.out or (Path(tempfile.gettempdir()) / "fusedlm_bench_smoke" if run.smoke else _default_out())

    env = run.env
    print(f"fusedlm bench on {env['gpu']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"liger-kernel {env['liger_kernel'] or 'not installed'}, peft {env['peft'] or 'not installed'}, "
          f"commit {env['git_commit'] or 'unknown'}", flush=True)
    gbps, copy_ms = measure_copy_bandwidth(run)
    run.copy_gbps = gbps
    print(f"copy bandwidth: {gbps:.0f} GB/s ({run.copy_bytes / 2**20:.0f} MiB copy_ in {copy_ms:.4f} ms, "
          "read + write counted)", flush=True)
    tflops, mm_ms = measure_matmul_tflops(run)
    run.matmul_tflops = tflops
    dtype = str(run.dtype).replace("torch.", "")
    print(f"matmul: {tflops:.1f} TFLOP/s (torch.matmul {run.matmul_n}^3 {dtype} in {mm_ms:.4f} ms)", flush=True)
    if any(op.kind == "compute" for op in ops):
        print(f"fusedlm attention autotune (FUSEDLM_AUTOTUNE): {'on' if run.autotune() else 'off'}", flush=True)
    rows = [_ceiling_row(run, "copy", f"({run.copy_bytes},) uint8", "uint8", copy_ms,
                         bytes_=2 * run.copy_bytes, gbps=gbps),
            _ceiling_row(run, "matmul", f"({run.matmul_n},{run.matmul_n})@({run.matmul_n},{run.matmul_n})", dtype,
                         mm_ms, flops=2 * run.matmul_n ** 3, tflops=tflops)]
    skipped = []

    def emit(r):
        rows.append(r)
        _print_row(r)

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

    print("\n" + _ceilings_line(run) + "\n\n" + summaries(rows) + "\n")
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


if __name__ == "__main__":
    sys.exit(main())
