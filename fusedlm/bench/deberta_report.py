"""The DeBERTa benchmark's report: each provider's speedup and peak memory over transformers' eager module,
and issue 8's targets (H200, bf16, deberta-v3-base shapes), each ratio measured in the same run:

    fwd+bwd at S = 512, 2048, 8192: >= 4x hf-eager and >= 1.5x DisentangledFlash
    fwd+bwd at S = 128: not slower than hf-eager
    peak memory at S = 2048: <= 1/4 of hf-eager's

FlashDeBERTa's ratio is reported beside them (no target). Appended to the summaries by the harness.
"""
EAGER_SPEEDUP_TARGETS = {128: 1.0, 512: 4.0, 2048: 4.0, 8192: 4.0}   # S -> fwd+bwd speedup over hf-eager
DF_SPEEDUP_TARGET = 1.5                                              # over DisentangledFlash, at these S:
DF_TARGET_SEQLENS = (512, 2048, 8192)
MEM_TARGET = 0.25                                                    # peak memory over hf-eager's, at S:
MEM_TARGET_SEQLEN = 2048
OURS = "fusedlm-triton"
BASELINES = ("hf-eager", "hf-eager-fp32")
PEER_NAMES = {"disentangled-flash": "DisentangledFlash", "flashdeberta": "FlashDeBERTa"}


def _status(r):
    """What a missing cell says: the row's status, OOM when it ran out of memory."""
    if r is None:
        return "—"
    if r["median_ms"] is not None:
        return "ok"
    err = (r["error"] or "").lower()
    return "OOM" if r["status"] == "oom" or "out of memory" in err else r["status"]


def _ms(r):
    return r["median_ms"] if r is not None else None


def _mib(n):
    return "—" if n is None else f"{n / 2**20:.0f}"


def _met(ok):
    return "met" if ok else "NOT met"


def deberta_report(rows, op, scope):
    """Markdown for ``op``'s rows: a table of each provider's speedup (hf-eager ms / ms) and peak memory per
    (case, mode), then the targets (the dense op) or the fastest of each family (the padded op). '' when
    there are no rows of ``op``."""
    rs = [r for r in rows if r["op"] == op]
    if not rs:
        return ""
    cell = {(r["case"], r["mode"], r["provider"]): r for r in rs}
    providers = [p for p in dict.fromkeys(r["provider"] for r in rs) if p not in BASELINES]
    lines = [f"**{op} vs hf-eager** ({scope}): speedup = hf-eager ms / ms; mem = peak MiB (x of hf-eager's)", "",
             "| case | mode | hf-eager ms | hf-eager peak MiB | " + " | ".join(
                 f"{p} speedup | {p} mem" for p in providers) + " |",
             "|" + "---|" * (4 + 2 * len(providers))]
    verdicts = []
    for case, mode in dict.fromkeys((r["case"], r["mode"]) for r in rs):
        hf = cell.get((case, mode, "hf-eager"))
        hf_ms = _ms(hf)
        cells = [case, mode] + ([f"{hf_ms:.3f}", _mib(hf["peak_mem_bytes"])] if hf_ms else [_status(hf)] * 2)
        for p in providers:
            r = cell.get((case, mode, p))
            if _ms(r) is None:
                cells += [_status(r), "—"]
                continue
            cells.append(f"{hf_ms / r['median_ms']:.2f}x" if hf_ms else f"{r['median_ms']:.3f} ms")
            mem = _mib(r["peak_mem_bytes"])
            if hf_ms and r["peak_mem_bytes"] and hf["peak_mem_bytes"]:
                mem += f" ({r['peak_mem_bytes'] / hf['peak_mem_bytes']:.2f}x)"
            cells.append(mem)
        lines.append("| " + " | ".join(cells) + " |")
        if mode == "fwd+bwd":
            at = {p: cell.get((case, mode, p)) for p in providers + ["hf-eager"]}
            S = next(r["params"]["seqlen"] for r in rs if r["case"] == case)
            verdicts += (_targets if op == "deberta_attention" else _fastest)(at, S)
    return "\n".join(lines + ([""] + verdicts if verdicts else []))


def _targets(at, S):
    """Issue 8's targets at sequence length S, from the fwd+bwd rows ``at`` (provider -> row)."""
    ours, hf = at.get(OURS), at.get("hf-eager")
    if _ms(ours) is None:
        return [f"S={S} fwd+bwd: {OURS} {_status(ours)}"]
    out = []
    if _ms(hf) is None:
        out.append(f"S={S} fwd+bwd: hf-eager {_status(hf)}")
    elif S in EAGER_SPEEDUP_TARGETS:
        x, want = hf["median_ms"] / ours["median_ms"], EAGER_SPEEDUP_TARGETS[S]
        out.append(f"S={S} fwd+bwd: {OURS} {x:.2f}x hf-eager (target >= {want:g}x: {_met(x >= want)})")
        if S == MEM_TARGET_SEQLEN and ours["peak_mem_bytes"] and hf["peak_mem_bytes"]:
            m = ours["peak_mem_bytes"] / hf["peak_mem_bytes"]
            out.append(f"S={S} fwd+bwd: {OURS} peak memory {m:.3f}x hf-eager's (target <= {MEM_TARGET}: "
                       f"{_met(m <= MEM_TARGET)})")
    for peer, name in PEER_NAMES.items():
        r = at.get(peer)
        target = DF_SPEEDUP_TARGET if peer == "disentangled-flash" and S in DF_TARGET_SEQLENS else None
        if _ms(r) is None:
            if r is not None or target:
                out.append(f"S={S}: {name} not measured ({_status(r)}"
                           + (f": {r['error']}" if r is not None and r["error"] else "") + ")")
            continue
        x = r["median_ms"] / ours["median_ms"]
        out.append(f"S={S} fwd+bwd: {OURS} {x:.2f}x {name}"
                   + (f" (target >= {target}x: {_met(x >= target)})" if target else " (no target)"))
    return out


def _fastest(at, S):
    """The padded op at S: the fastest fusedlm provider (padded or packed) over hf-eager and over the
    fastest provider of each peer (padded or packed), fwd+bwd."""
    timed = {p: r["median_ms"] for p, r in at.items() if _ms(r)}
    mine = {p: ms for p, ms in timed.items() if p.startswith("fusedlm-")}
    if not mine:
        return [f"S={S} fwd+bwd: no fusedlm provider measured"]
    best = min(mine, key=mine.get)
    parts = [f"{timed['hf-eager'] / mine[best]:.2f}x hf-eager"] if "hf-eager" in timed else []
    for peer, name in PEER_NAMES.items():
        theirs = {p: ms for p, ms in timed.items() if p.startswith(peer)}
        if theirs:
            fast = min(theirs, key=theirs.get)
            parts.append(f"{theirs[fast] / mine[best]:.2f}x {name} ({fast})")
    return [f"S={S} fwd+bwd: fastest fusedlm ({best}) " + (", ".join(parts) if parts else "alone")]
