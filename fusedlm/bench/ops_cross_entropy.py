"""Benchmark of the language-model loss from the hidden states and the LM head (compute-bound, issue 19):
fusedlm.linear_cross_entropy against the logits path ``F.cross_entropy((hidden @ W.T).float(), target)``
eager and under torch.compile, Liger-Kernel's LigerFusedLinearCrossEntropyLoss and Cut Cross-Entropy.

Cases: bf16 hidden (N, D) and LM head W (V, D), int64 targets, reduction "mean", no bias; N = 16384 tokens
(--tokens), D = 4096 (--hidden), V in {32000, 128256, 256000} (--seqlens sets the V list), every target
counted; plus V = 128256 with 10 % of the targets ignore_index (-100, at random positions): the case where
an implementation can skip the ignored tokens. Gradients for hidden and W. Modes fwd and fwd+bwd only
(--modes bwd gives no rows): Liger computes both gradients inside its forward, so a "bwd" row would time a
scaling of stored gradients for it against a real backward for the others.

Providers (run order):
  torch-eager      F.cross_entropy((hidden @ W.T).float(), target): bf16 logits, loss in float32 (what
                   transformers' ForCausalLMLoss does); the yardstick of rel_err (float32 in --cpu-smoke)
  torch-compile    the same under torch.compile(dynamic=False)
  fusedlm-triton   fusedlm.linear_cross_entropy(hidden, W, target, backend="triton") (fusedlm-cuda where the
                   extension is built and serves it)
  fusedlm-torch    backend="torch" (float32, chunked): --cpu-smoke only, or when --providers names it (on a
                   GPU its float32 matmuls take seconds a call)
  liger            liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss()(W, hidden, target); CUDA only
  cce              cut_cross_entropy.linear_cross_entropy(hidden, W, target) with its defaults (impl "cce",
                   filter_eps "high": gradient entries below the threshold are skipped, as its users run it);
                   CUDA only
A peer out of device memory on its first forward + backward gets a row with status "oom".

FLOPs counted, N' = the tokens counted (N less the ignored ones; an implementation need not touch an ignored
token): fwd 2 N' V D (the logits); bwd 6 N' V D (the logits recomputed, as a fused implementation that never
stores them must: 2 N' V D, then dh = dz W and dW = dz^T h: 4 N' V D); fwd+bwd 8 N' V D. The same count for
every provider, so TFLOP/s ranks as time does: the logits path stores its logits and does 6 N' V D, Liger
computes the gradients inside its forward (6 N' V D there, no recompute).
"""
import torch
import torch.nn.functional as F

import fusedlm

from .cases import (Case, ComputeOp, ProviderUnavailable, device_generator, fusedlm_providers, import_peer,
                    oom_guard, randn, shape_str)

LCE_FLOPS_DOC = {
    "fwd": "2 N' V D (the logits; N' = tokens not ignored)",
    "bwd": "6 N' V D (the logits recomputed 2 N' V D, as a fused loss that never stores them must; "
           "dh = dz W and dW = dz^T h, 4 N' V D)",
    "fwd+bwd": "8 N' V D",
}
VOCABS = (32000, 128256, 256000)
IGNORED_VOCAB = 128256         # the case with ignored targets
IGNORED_FRACTION = 0.1
SMOKE = {"tokens": 64, "hidden": 32, "vocabs": (100,), "ignored_vocab": 100}
# Issue 19's targets, judged on the GPU run (fwd+bwd, bf16).
LIGER_TARGET = 1.0    # fusedlm's time <= Liger's fused loss ...
CCE_TARGET = 1.1      # ... and <= 1.1x Cut Cross-Entropy's
MEMORY_TARGET = 1.0   # peak memory <= CCE's


def torch_loss(hidden, weight, target):
    """The logits path: bf16 logits, the loss in float32, mean over the targets not ignored (-100)."""
    return F.cross_entropy((hidden @ weight.T).float(), target)


def _call(fn, t):
    h, w, y = t["hidden"], t["weight"], t["target"]
    return lambda: fn(h, w, y)


def _guarded(run, make_fn):
    """A builder: make_fn(t) -> the loss callable, probed once for out-of-memory on a CUDA device."""
    def build(t):
        fn = make_fn(t)
        if run.device.type == "cuda":
            oom_guard(fn, [t["hidden"], t["weight"]])
        return fn
    return build


def _needs_cuda(run, what):
    if run.device.type != "cuda":
        raise ProviderUnavailable(f"{what} runs Triton kernels on CUDA tensors only")


def _liger(run):
    def make(t):
        _needs_cuda(run, "Liger-Kernel's fused linear cross-entropy")
        loss = import_peer("liger_kernel.transformers", "liger-kernel").LigerFusedLinearCrossEntropyLoss()
        h, w, y = t["hidden"], t["weight"], t["target"]
        return lambda: loss(w, h, y)
    return _guarded(run, make)


def _cce(run):
    def make(t):
        _needs_cuda(run, "Cut Cross-Entropy")
        cce = import_peer("cut_cross_entropy", "cut-cross-entropy")
        h, w, y = t["hidden"], t["weight"], t["target"]
        return lambda: cce.linear_cross_entropy(h, w, y)
    return _guarded(run, make)


def _vocabs(run):
    if run.smoke:
        return SMOKE["vocabs"], SMOKE["ignored_vocab"]
    if run.seqlens_given:
        return run.seqlens, (IGNORED_VOCAB if IGNORED_VOCAB in run.seqlens else None)
    return VOCABS, IGNORED_VOCAB


def lce_cases(run):
    """One case per V (every target counted), then V = 128256 with 10 % of the targets ignored."""
    N, D = (SMOKE["tokens"], SMOKE["hidden"]) if run.smoke else (run.sizes.tokens, run.sizes.hidden)
    vocabs, ignored_vocab = _vocabs(run)
    specs = [(V, 0) for V in vocabs] + ([(ignored_vocab, round(IGNORED_FRACTION * N))] if ignored_vocab else [])
    cases = []
    for V, n_ignored in specs:
        counted = N - n_ignored

        def make(V=V, n_ignored=n_ignored):
            gen = device_generator(run, 19_000 + V)
            cpu = torch.Generator().manual_seed(run.seed * 7919 + V)
            target = torch.randint(0, V, (N,), generator=cpu)
            target[torch.randperm(N, generator=cpu)[:n_ignored]] = -100
            return {"hidden": randn(gen, run.device, run.dtype, N, D),
                    "weight": randn(gen, run.device, run.dtype, V, D, scale=D ** -0.5),
                    "target": target.to(run.device)}

        flops = {"fwd": 2 * counted * V * D, "bwd": 6 * counted * V * D, "fwd+bwd": 8 * counted * V * D}

        def bind(backend, t):
            h, w, y = t["hidden"], t["weight"], t["target"]
            return lambda: fusedlm.linear_cross_entropy(h, w, y, backend=backend)

        def compiled(t):
            return _call(run.compiled(torch_loss, dynamic=False), t)

        providers = {
            "torch-eager": _guarded(run, lambda t: _call(torch_loss, t)),
            "torch-compile": _guarded(run, compiled),
            **fusedlm_providers(bind),
        }
        if run.smoke or (run.providers and "fusedlm-torch" in run.providers):
            providers["fusedlm-torch"] = lambda t: bind("torch", t)
        providers["liger"] = _liger(run)
        providers["cce"] = _cce(run)
        label = f"V={V}" + (f" ignored={n_ignored}" if n_ignored else "")
        cases.append(Case(
            op="linear_cross_entropy", kind="compute", label=label, make=make,
            describe=lambda t, n_ignored=n_ignored: (
                f"hidden{shape_str(t['hidden'])} W{shape_str(t['weight'])} target{shape_str(t['target'])} "
                f"({n_ignored} = -100), no bias, reduction mean"),
            grad=("hidden", "weight"), work=lambda t, mode, provider, f=flops: (f[mode], LCE_FLOPS_DOC[mode]),
            providers=providers, reference=("torch-eager", "torch-compile"), modes=("fwd", "fwd+bwd"),
            params={"tokens": N, "hidden": D, "vocab": V, "ignored": n_ignored, "counted_tokens": counted,
                    "logits_bytes_fp32": N * V * 4}))
    return cases


# --------------------------------------------------------------------------------------------------
# The op's report: time and peak memory of fwd+bwd per case, and issue 19's targets.
# --------------------------------------------------------------------------------------------------

def lce_report(rows):
    """Markdown: fwd+bwd median ms and peak MiB per case and provider, fusedlm's over Liger's and CCE's;
    then issue 19's targets (GPU runs only)."""
    from .report import _missing

    rs = [r for r in rows if r["op"] == "linear_cross_entropy" and r["mode"] == "fwd+bwd"]
    if not rs:
        return ""
    providers = list(dict.fromkeys(r["provider"] for r in rs))
    head = ["case", *providers, "fusedlm / liger time", "fusedlm / cce time", "fusedlm / cce peak"]
    lines = ["**linear_cross_entropy** fwd+bwd: median ms (peak MiB beyond the inputs)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    targets = []
    cell = {(r["case"], r["provider"]): r for r in rs}
    for case in dict.fromkeys(r["case"] for r in rs):
        cells, got = [case], {}
        for p in providers:
            r = cell.get((case, p))
            if r is None or r["median_ms"] is None:
                cells.append("OOM" if r is not None and r["status"] == "oom" else _missing(r))
                continue
            got[p] = r
            peak = r["peak_mem_bytes"]
            cells.append(f"{r['median_ms']:.2f}" + (f" ({peak / 2**20:.0f})" if peak is not None else ""))
        ours = [p for p in got if p.startswith("fusedlm-") and p != "fusedlm-torch"]
        best = min(ours, key=lambda p: got[p]["median_ms"]) if ours else None
        o = got.get(best)
        liger, cce = got.get("liger"), got.get("cce")
        cells.append(f"{o['median_ms'] / liger['median_ms']:.2f}" if o and liger else "—")
        cells.append(f"{o['median_ms'] / cce['median_ms']:.2f}" if o and cce else "—")
        peak_ok = o and cce and o["peak_mem_bytes"] is not None and cce["peak_mem_bytes"]
        cells.append(f"{o['peak_mem_bytes'] / cce['peak_mem_bytes']:.2f}" if peak_ok else "—")
        lines.append("| " + " | ".join(cells) + " |")
        if o and liger:
            ratio = o["median_ms"] / liger["median_ms"]
            targets.append(f"{case}: {best} {ratio:.2f}x Liger's time (target <= {LIGER_TARGET:g}x: "
                           f"{'met' if ratio <= LIGER_TARGET else 'NOT met'})")
        if o and cce:
            ratio = o["median_ms"] / cce["median_ms"]
            targets.append(f"{case}: {best} {ratio:.2f}x CCE's time (target <= {CCE_TARGET:g}x: "
                           f"{'met' if ratio <= CCE_TARGET else 'NOT met'})")
        if peak_ok:
            ratio = o["peak_mem_bytes"] / cce["peak_mem_bytes"]
            targets.append(f"{case}: {best} peak {ratio:.2f}x CCE's (target <= {MEMORY_TARGET:g}x: "
                           f"{'met' if ratio <= MEMORY_TARGET else 'NOT met'})")
    if rs[0]["smoke"]:  # tiny CPU tensors: nothing to judge
        targets = []
    return "\n".join(lines + ([""] + ["Issue 19's targets:", ""] + [f"- {t}" for t in targets] if targets else []))


OPS = [ComputeOp("linear_cross_entropy", "loss", ("linear_cross_entropy",), lce_cases, LCE_FLOPS_DOC,
                 report=lce_report)]
