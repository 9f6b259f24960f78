"""The harness: one run's settings (Run), and the loop that runs every provider of a case in every mode
and turns each result into a JSON row. How it times and measures: measure.py.

Modes
  fwd      the training forward: the inputs require grad, so autograd records the graph and each
           implementation saves what its backward needs, as in a training step.
  bwd      the backward alone: the forward runs once, then
           ``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)`` is timed.
  fwd+bwd  forward then ``torch.autograd.grad``.

Every provider of a case runs on the same input values, in the same process, right after each other.
``rel_err`` is max over the compared tensors of ||x - x_ref|| / ||x_ref||, against ``rel_err_vs``, the
first provider of the case's ``reference`` that ran: so a fast wrong kernel cannot pass unnoticed.
"""
import dataclasses
import time

import torch

from fusedlm import _backend

from .cases import SMOKE_SIZES, Bound, ProviderUnavailable, Sizes
from .measure import (COPY_BYTES_GPU, COPY_BYTES_SMOKE, MATMUL_N_GPU, MATMUL_N_SMOKE, environment, host_ms,
                      peak_extra_bytes, time_cpu, time_cuda)

MODES = ("fwd", "bwd", "fwd+bwd")
DEFAULT_MODES = {"memory": ("fwd", "bwd"), "compute": MODES}


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
        self.seqlens_given = bool(args.seqlens)
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
        from fusedlm.kernels.attention_configs import autotune_enabled
        return bool(autotune_enabled(self.device))

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Rows.
# --------------------------------------------------------------------------------------------------

ROW_KEYS = ("kind", "op", "case", "shape", "dtype", "mode", "provider", "median_ms", "host_ms", "peak_mem_bytes",
            "bytes", "bytes_formula", "gbps", "frac_of_copy_bw", "flops", "flops_formula", "tflops",
            "frac_of_matmul", "baseline", "vs_baseline", "rel_err", "rel_err_vs", "autotune", "params",
            "error", "status")


def new_row(run, **values):
    """A JSON row: every row has every key (None where it does not apply), then the run's ceilings and
    environment."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(values)
    row.update({"copy_gbps": run.copy_gbps, "matmul_tflops": run.matmul_tflops, "smoke": run.smoke, **run.env})
    return row


def measured_row(run, case, shape, base, mode, provider, ms=None, peak=None, rel=None, rel_vs=None, error=None,
                 status=None, host=None, vs_baseline=None):
    """The row of one (case, mode, provider): the work counted and the rate against the kind's ceiling."""
    work, formula = case.work(base, mode, provider)
    memory = case.kind == "memory"
    rate = (work / (ms * 1e6) if memory else work / (ms * 1e9)) if ms else None  # GB/s or TFLOP/s
    ceiling = run.copy_gbps if memory else run.matmul_tflops
    frac = rate / ceiling if rate and ceiling else None
    return new_row(
        run, kind=case.kind, op=case.op, case=case.label, shape=shape, dtype=str(run.dtype).replace("torch.", ""),
        mode=mode, provider=provider, median_ms=ms, host_ms=host, peak_mem_bytes=peak,
        **({"bytes": work, "bytes_formula": formula, "gbps": rate, "frac_of_copy_bw": frac} if memory else
           {"flops": work, "flops_formula": formula, "tflops": rate, "frac_of_matmul": frac}),
        baseline=case.baseline, vs_baseline=vs_baseline, rel_err=rel, rel_err_vs=rel_vs,
        autotune=None if memory else run.autotune(), params=case.params,
        error=error, status=status or ("failed" if error else "ok"))


def ceiling_row(run, op, shape, dtype, ms, bytes_=None, gbps=None, flops=None, tflops=None):
    """The row of the copy or matmul ceiling (kind "ceiling")."""
    return new_row(run, kind="ceiling", op=op, case=op, shape=shape, dtype=dtype, mode="fwd", provider="torch",
                   median_ms=ms, bytes=bytes_, bytes_formula="read src + write dst" if bytes_ else None,
                   gbps=gbps, frac_of_copy_bw=1.0 if gbps else None, flops=flops,
                   flops_formula="2 n^3" if flops else None, tflops=tflops,
                   frac_of_matmul=1.0 if tflops else None, params={}, status="ok")


# --------------------------------------------------------------------------------------------------
# Measuring a case.
# --------------------------------------------------------------------------------------------------

def bench_case(case, run, emit):
    """Measure every provider of ``case`` in every mode; calls ``emit(row)`` for each result."""
    modes = [m for m in run.modes_for(case.kind) if case.modes is None or m in case.modes]
    if not modes:  # e.g. --modes bwd on a forward-only (inference) op: nothing to measure
        return
    base = case.make()
    shape = case.describe(base)
    state = {"ref_name": None, "ref": None, "baseline_ms": {}}

    def row(mode, provider, **kw):
        ms = kw.get("ms")
        if provider == case.baseline and ms:
            state["baseline_ms"][mode] = ms
        base_ms = state["baseline_ms"].get(mode)
        emit(measured_row(run, case, shape, base, mode, provider,
                          vs_baseline=ms / base_ms if ms and base_ms else None, **kw))

    for provider, build in case.providers.items():
        if not run.wants_provider(provider):
            continue
        if run.out_of_time():
            for mode in modes:
                row(mode, provider, error="the --budget-s time budget ran out", status="skipped")
            continue
        _bench_provider(case, run, modes, provider, build, base, state, row)
        run.free()


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
            if "bwd" in modes:
                timed["bwd"] = lambda: torch.autograd.grad(diff_outs, leaves, cots, retain_graph=True)
            else:  # nothing runs the first forward's backward: free what it saved before the next forward
                outs = results["fwd"] = tuple(o.detach() for o in outs)
                del diff_outs
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
