"""What a run writes: the JSON rows, a markdown file (summaries, every row, what was not measured, the
byte and FLOP formulas), a summary file, the console lines, and plots when matplotlib is there."""
import json

from .cases import MEMORY_PROVIDERS
from .harness import MODES
from .registry import ALL_OPS, OWN_SUMMARY

# A row whose outputs differ from the reference's by more than this is flagged in the markdown table.
# Two correct bf16 implementations differ by about one output rounding (u = 2^-8 ~ 4e-3).
REL_ERR_FLAG = 2e-2


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def mib(n):
    return "—" if n is None else f"{n / 2**20:.0f}"


def _missing(r):
    """A summary cell for a row without a time."""
    return {None: "—", "unavailable": "n/a", "unsupported": "unsupported", "skipped": "skipped"}.get(
        r and r["status"], "error")


def _compile_ms(rows):
    return {(r["op"], r["mode"]): r["median_ms"] for r in rows
            if r["kind"] == "memory" and r["provider"] == "torch-compile" and r["median_ms"]}


def summary_table(rows):
    """Memory-bound ops: one line per (op, mode), each provider's median ms and % of copy bandwidth (the ops
    with a summary of their own, OWN_SUMMARY, are in their report instead)."""
    measured = [r for r in rows if r["kind"] == "memory" and r["op"] not in OWN_SUMMARY]
    if not measured:
        return ""
    providers = [p for p in MEMORY_PROVIDERS if any(r["provider"] == p for r in measured)]
    cell = {(r["op"], r["mode"], r["provider"]): r for r in measured}
    comp = _compile_ms(rows)
    head = ["op", "mode"] + providers + ["fusedlm-triton vs compile"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op, mode in dict.fromkeys((r["op"], r["mode"]) for r in measured):
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
        cell = {(r["case"], r["mode"], r["provider"]): r for r in rs}
        head = ["case", "mode"] + providers + ["fusedlm vs fastest peer"]
        if baseline:
            head.append(f"time / {baseline}")
        lines = [f"**{op}**: median ms (TFLOP/s)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for case, mode in dict.fromkeys((r["case"], r["mode"]) for r in rs):
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
    """Whether fusedlm's fwd+bwd is within the target ratio to the baseline (params target_vs_baseline)."""
    out = []
    for r in rs:
        target = r["params"].get("target_vs_baseline")
        if target and r["mode"] == "fwd+bwd" and r["provider"].startswith("fusedlm-") and r["vs_baseline"]:
            verdict = "met" if r["vs_baseline"] <= target else "NOT met"
            out.append(f"{r['case']}: {r['provider']} fwd+bwd = {r['vs_baseline']:.2f}x {baseline} "
                       f"(target <= {target}x: {verdict})")
    return [""] + out if out else []


def summaries(rows):
    """The summary tables of both kinds (the *_summary.md file, and the end of the console output), then
    the reports of the ops that have one (DeBERTa: speedups, peak memory, the issue's targets)."""
    parts = []
    table = summary_table(rows)
    if table:
        parts.append("**memory-bound ops**: median ms (% of copy bandwidth)\n\n" + table)
    if any(r["kind"] == "compute" for r in rows):
        parts.append(compute_summary(rows))
    parts += [op.report(rows) for op in ALL_OPS if op.report is not None]
    return "\n\n".join(p for p in parts if p)


def ceilings_line(run):
    return (f"Copy bandwidth (`Tensor.copy_` of {run.copy_bytes / 2**20:.0f} MiB, read + write counted): "
            f"**{fmt(run.copy_gbps, '.0f')} GB/s**. Matmul (`torch.matmul` {run.matmul_n}^3, "
            f"{str(run.dtype).replace('torch.', '')}): **{fmt(run.matmul_tflops, '.0f')} TFLOP/s**.")


def _env_line(env):
    peers = " · ".join(f"{name} {env[key] or 'not installed'}" for name, key in
                       (("liger-kernel", "liger_kernel"), ("peft", "peft"), ("flashdeberta", "flashdeberta"),
                        ("disentangled-flash", "disentangled_flash")))
    return (f"{env['gpu']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · {peers} · "
            f"fusedlm {env['fusedlm']} · commit {env['git_commit'] or 'unknown'} · {env['date']}")


def _row_line(r, ident, rate, tail):
    """A line of an "All rows" table: the row's names, its times, its rate cells, peak memory, the rest."""
    peak = r["peak_mem_bytes"]
    cells = [*ident, f"{r['median_ms']:.4f}", fmt(r["host_ms"], ".4f"), *rate,
             fmt(None if peak is None else peak / 2**20, ".0f"), *tail]
    return "| " + " | ".join(cells) + " |"


def markdown(rows, run, skipped):
    comp = _compile_ms(rows)
    mem = [r for r in rows if r["kind"] == "memory"]
    cmp_rows = [r for r in rows if r["kind"] == "compute"]
    lines = ["# fusedlm benchmarks", ""]
    if run.smoke:
        lines += ["**CPU SMOKE TEST: tiny tensors, time.perf_counter, one call. These times check the "
                  "harness; they are not performance figures.**", ""]
    lines += [
        _env_line(run.env), "",
        ceilings_line(run) + f" dtype {str(run.dtype).replace('torch.', '')}. Timing: "
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
            if r["median_ms"] is not None:
                c = comp.get((r["op"], r["mode"]))
                lines.append(_row_line(
                    r, [r["op"], r["mode"], r["shape"], r["provider"]],
                    [f"{r['gbps']:.0f}", f"{100 * (r['frac_of_copy_bw'] or 0):.1f}%"],
                    [f"{fmt(None if not c else c / r['median_ms'], '.2f')}{'x' if c else ''}", _rel_cell(r)]))
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
            if r["median_ms"] is not None:
                lines.append(_row_line(
                    r, [r["op"], r["case"], r["mode"], r["provider"]],
                    [f"{r['tflops']:.1f}", f"{100 * (r['frac_of_matmul'] or 0):.1f}%"],
                    [f"{fmt(r['vs_baseline'], '.2f')}{'x' if r['vs_baseline'] else ''}", _rel_cell(r),
                     "on" if r["autotune"] else "off"]))
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
    for kind, title in (("memory", "## Bytes counted (the fewest each op must move; element size e, weights in e)"),
                        ("compute", "## FLOPs counted")):
        ops = [op for op in ALL_OPS if op.kind == kind and any(r["op"] == op.name for r in rows)]
        if ops:
            lines += ["", title, ""]
            lines += [f"- {op.name} {mode}: {doc}" for op in ops for mode, doc in op.work_doc.items()]
    if any(r["provider"] == "base-linear" for r in cmp_rows):
        lines.append("- lora_linear, provider base-linear: 2MNK fwd, 2MNK bwd (dx only), 4MNK fwd+bwd")
    reports = [op.report(rows) for op in ALL_OPS if op.report is not None]
    lines += [part for text in reports if text for part in ("", text)]
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


def write_outputs(rows, run, out_dir, stem, skipped, final=False):
    """Rewrite the JSON, markdown and summary files (after every case, so a killed run keeps its rows);
    the plots too when ``final``."""
    from .plots import PLOTS

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md",
             "summary": out_dir / f"{stem}_summary.md"}
    paths["json"].write_text(json.dumps(rows, indent=1) + "\n")
    paths["md"].write_text(markdown(rows, run, skipped))
    paths["summary"].write_text(summaries(rows) + "\n")
    if final:
        for key, fn, suffix in PLOTS:
            png = fn(rows, out_dir / f"{stem}{suffix}.png")
            if png:
                paths[key] = png
    return paths


def print_row(r):
    """The console line of a row (unavailable and unsupported rows are listed once, at the end)."""
    rel = r["rel_err"]
    rel_s = f"  rel err {rel:.1e}" if rel is not None else ""
    if r["median_ms"] is None:
        if r["status"] not in ("unavailable", "unsupported"):
            what = r["op"] if r["case"] == r["op"] else f"{r['op']} {r['case']}"
            print(f"  {what:18s} {r['mode']:7s} {r['provider']:15s} not measured: {r['error']}", flush=True)
        return
    if r["kind"] == "memory":
        what = r["op"] if r["case"] == r["op"] else f"{r['op']} {r['case']}"
        print(f"  {what:18s} {r['mode']:7s} {r['provider']:20s} {r['median_ms']:9.4f} ms "
              f"{r['gbps']:7.0f} GB/s {100 * r['frac_of_copy_bw']:5.1f}% of copy" + rel_s, flush=True)
    else:
        base = (f"  {r['vs_baseline']:.2f}x {r['baseline']}" if r["vs_baseline"] and r["provider"] != r["baseline"]
                else "")
        print(f"  {r['case']:26s} {r['mode']:7s} {r['provider']:21s} {r['median_ms']:9.4f} ms "
              f"{r['tflops']:7.1f} TFLOP/s {100 * (r['frac_of_matmul'] or 0):5.1f}% of matmul" + base + rel_s,
              flush=True)
