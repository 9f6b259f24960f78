"""Benchmark of a decode step's attention over a KV cache (memory-bound, forward only):
fusedlm.kv_cache_attention on a contiguous and on a paged cache, against PyTorch's SDPA backends with a
one-row query and FlexAttention.

A decode step reads every cached key and value row once and does 4 H E FLOPs per cached token: at 2 bytes an
element that is 4 H E / (2 Hkv E 2) = H / Hkv FLOPs per byte (4 with GQA 32/8), far below any GPU's ridge
point, so the fewest bytes it must move over the measured copy bandwidth is its floor (issue 18):

    bytes = B T Hkv (E + Ev) e  (the K and V rows attended)  +  B H E e (read q)  +  B H Ev e (write out)

Every sequence is full (cache_seqlens = T = the contiguous cache's capacity), so the bytes count is exactly
the cache. The paged layout's block table (4 bytes per block_size tokens, under 0.1% at block 16) is left
out. Cases: B in Sizes.kv_batches x T in Sizes.kv_seqlens, H = 32, Hkv = 8, E = 128, one query row; a
(B, T) whose K + V cache exceeds Sizes.kv_max_cache_bytes (16 GiB: B = 64 x 128k, 32 GiB) is left out, as
the case holds the cache in both layouts and each provider gets its own copy, unless the GPU has memory for
three copies (an H200 runs B = 64 x 128k; an H100 cannot hold it: _cache_cap).

Providers (run order: the yardstick candidates first):
  sdpa-math                 F.scaled_dot_product_attention, SDPBackend.MATH, enable_gqa=True (small caches)
  sdpa-flash, sdpa-cudnn,   the same restricted to that backend; q (B, H, 1, E), the cache in transformers'
  sdpa-efficient            StaticCache layout (B, Hkv, T, E), copied once outside the timing; enable_gqa=True,
                            or where the backend has no GQA kernel, K / V repeated to H heads outside the timing
                            (as transformers' repeat_kv; the time then includes reading 4x the bytes)
  fusedlm-torch[-paged]     fusedlm.kv_cache_attention(backend="torch"), the float32 reference (small caches)
  fusedlm-triton            fusedlm.kv_cache_attention(q (B, 1, H, E), k_cache (B, T, Hkv, E), ...), contiguous
  fusedlm-triton-paged      the same on pools (num_blocks, 16, Hkv, E) through a block table whose blocks are
                            a random permutation of the pool (fusedlm-cuda[-paged] where the extension is built)
  flex                      FlexAttention, torch.compile(dynamic=False), enable_gqa=True, no block mask
Outputs are compared as (B, 1, H, Ev); the yardstick of rel_err is the first of sdpa-math, sdpa-flash,
sdpa-cudnn, sdpa-efficient, fusedlm-torch that runs.
"""
import dataclasses

import torch
import torch.nn.functional as F

import fusedlm

from .cases import (Bound, Case, ProviderOOM, ProviderUnavailable, ProviderUnsupported, device_generator,
                    fusedlm_providers, randn, shape_str)
from .ops_attention import _probe_sdpa, _raise_recompile_limit, sdpa_backend

KV_BYTES_DOC = {
    "fwd": "read the K and V rows attended B T Hkv (E + Ev) e + read q B H E e + write out B H Ev e "
           "(a paged cache's block table, 4 B per block, left out)",
}
# Issue 18's targets, judged on the GPU run (fusedlm-triton, bf16).
BW_TARGET = 0.85              # of the copy bandwidth ...
BW_TARGET_TOKENS = 256 * 1024  # ... once B x T >= 256k tokens
SDPA_TARGET = 1.5             # fastest SDPA backend's time / fusedlm's
PAGED_TARGET = 1.05           # paged time / contiguous time
SDPA_BACKENDS = {"sdpa-math": "MATH", "sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION"}


def cache_bytes(B, T, Hkv, E, element_size):
    """K + V of a (B, T, Hkv, E) cache in one layout."""
    return 2 * B * T * Hkv * E * element_size


def _seqlens(run):
    """--seqlens when given (as cache lengths), else the decode lengths of Sizes."""
    if run.seqlens_given:
        return run.seqlens
    return run.sizes.kv_quick_seqlens if run.quick else run.sizes.kv_seqlens


def _make(run, B, T):
    sz = run.sizes
    H, Hkv, E, bs = sz.kv_heads, sz.kv_kv_heads, sz.kv_head_dim, sz.kv_block_size

    def make():
        gen = device_generator(run, 18_000 + 131 * B + T)
        t = {"q": randn(gen, run.device, run.dtype, B, 1, H, E),
             "k_cache": randn(gen, run.device, run.dtype, B, T, Hkv, E),
             "v_cache": randn(gen, run.device, run.dtype, B, T, Hkv, E),
             "cache_seqlens": torch.full((B,), T, dtype=torch.int32, device=run.device)}
        # The paged layout: ceil(T / bs) blocks a sequence, the pool's blocks handed out in a random order.
        nb = -(-T // bs)
        perm = torch.randperm(B * nb, generator=torch.Generator().manual_seed(run.seed + T))
        t["block_table"] = perm.view(B, nb).to(run.device, torch.int32)
        rows = t["block_table"].flatten().long()
        for name in ("k", "v"):
            src = F.pad(t[f"{name}_cache"], (0, 0, 0, 0, 0, nb * bs - T)) if nb * bs != T else t[f"{name}_cache"]
            pool = torch.zeros(B * nb, bs, Hkv, E, device=run.device, dtype=run.dtype)
            pool[rows] = src.reshape(B * nb, bs, Hkv, E)
            t[f"{name}_pool"] = pool
            del src
        return t
    return make


def _keep(t, *names):
    """This provider's copies of ``names``; drops its copies of every other input (the caches are
    large: a provider holds one layout, not both)."""
    kept = [t[n] for n in names]
    for n in list(t):
        if n not in names:
            t[n] = None
    return kept


def _out_bhse(xs):
    """SDPA / Flex output (B, H, 1, Ev) -> fusedlm's (B, 1, H, Ev), the layout compared."""
    return [xs[0].transpose(1, 2)]


def _peer_inputs(t):
    """q (B, H, 1, E) and the cache in transformers' StaticCache layout (B, Hkv, T, E), contiguous (made once,
    outside the timing)."""
    q, k, v = _keep(t, "q", "k_cache", "v_cache")
    t["k_cache"] = t["v_cache"] = None
    try:
        return q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    except torch.OutOfMemoryError as e:
        raise ProviderOOM(f"out of memory making the (B, Hkv, T, E) cache ({str(e).splitlines()[0][:200]})") \
            from None


def _sdpa_builder(run, backend):
    """F.scaled_dot_product_attention with a one-row query, restricted to one SDPA backend: enable_gqa=True,
    or, where the backend has no GQA kernel, K / V repeated to H heads once outside the timing."""
    def build(t):
        sdpa_kernel, which = sdpa_backend(run, backend)
        q, k, v = _peer_inputs(t)

        def call(k, v, gqa):
            def fn():
                with sdpa_kernel(which):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            return fn
        fn = call(k, v, True)
        try:
            _probe_sdpa(fn, backend)
        except ProviderUnsupported as no_gqa:
            groups = q.shape[1] // k.shape[1]
            try:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            except torch.OutOfMemoryError:
                raise ProviderOOM(f"{no_gqa}; and out of memory repeating K / V to {q.shape[1]} heads") from None
            fn = call(k, v, False)
            _probe_sdpa(fn, backend)
        return Bound(fn, [], canon=_out_bhse)
    return build


def _flex_builder(run):
    """FlexAttention under torch.compile(dynamic=False) (one static compile per shape), enable_gqa=True,
    no block mask (a decode row sees every cached key)."""
    def build(t):
        if run.device.type != "cuda":
            raise ProviderUnavailable("FlexAttention is benchmarked on a CUDA device only (its compiled "
                                      "Triton kernels)")
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as e:
            raise ProviderUnavailable(f"torch.nn.attention.flex_attention is missing ({e})") from None
        _raise_recompile_limit()
        q, k, v = _peer_inputs(t)
        flex = run.compiled(flex_attention, dynamic=False)
        return Bound(lambda: flex(q, k, v, enable_gqa=True), [], canon=_out_bhse)
    return build


def _bind(paged):
    def bind(backend, t):
        if paged:
            q, k, v, seqlens, table = _keep(t, "q", "k_pool", "v_pool", "cache_seqlens", "block_table")
        else:
            q, k, v, seqlens = _keep(t, "q", "k_cache", "v_cache", "cache_seqlens")
            table = None
        return lambda: fusedlm.kv_cache_attention(q, k, v, seqlens, block_table=table, backend=backend)
    return bind


def _torch_builder(paged):
    bind = _bind(paged)

    def build(t):
        fn = bind("torch", t)
        try:
            fn()
        except torch.OutOfMemoryError as e:
            raise ProviderOOM(f"out of memory ({str(e).splitlines()[0][:200]})") from None
        return fn
    return build


def _cache_cap(run):
    """The largest K + V cache of one layout a case may hold: Sizes.kv_max_cache_bytes, or on a GPU with the
    memory for it (3 copies: both layouts and a provider's own, with 10% to spare) more: an H200 (141 GB) takes
    B = 64 x 128k (32 GiB a layout), an H100 (80 GB) does not."""
    cap = run.sizes.kv_max_cache_bytes
    total = device_memory(run.device)
    return max(cap, int(total * 0.9) // 3) if total else cap


def device_memory(device):
    """Total memory of a CUDA device in bytes; None elsewhere."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def kv_cache_cases(run):
    """One case per (B, T) of Sizes.kv_batches x the cache lengths whose cache fits (_cache_cap)."""
    sz = run.sizes
    H, Hkv, E, bs = sz.kv_heads, sz.kv_kv_heads, sz.kv_head_dim, sz.kv_block_size
    e = torch.empty((), dtype=run.dtype).element_size()
    cases = []
    cap = _cache_cap(run)
    for B in sz.kv_batches:
        for T in _seqlens(run):
            cache = cache_bytes(B, T, Hkv, E, e)
            if cache > cap:
                continue
            small = cache <= sz.kv_math_max_cache_bytes
            work = cache + 2 * B * H * E * e
            providers = {}
            if small:
                providers["sdpa-math"] = _sdpa_builder(run, "MATH")
            for name in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient"):
                providers[name] = _sdpa_builder(run, SDPA_BACKENDS[name])
            if small:
                providers["fusedlm-torch"] = _torch_builder(paged=False)
                providers["fusedlm-torch-paged"] = _torch_builder(paged=True)
            providers.update(fusedlm_providers(_bind(paged=False)))
            providers.update(fusedlm_providers(_bind(paged=True), suffix="-paged"))
            providers["flex"] = _flex_builder(run)
            cases.append(Case(
                op="kv_cache_decode", kind="memory", label=f"B={B} T={T}", make=_make(run, B, T),
                describe=lambda t, bs=bs: (f"q{shape_str(t['q'])} (B,1,H,E), k,v cache{shape_str(t['k_cache'])} "
                                           f"(B,T,Hkv,E) or pools{shape_str(t['k_pool'])} (block {bs}, "
                                           f"block_table{shape_str(t['block_table'])} a random permutation), "
                                           "cache_seqlens = T"),
                grad=(), modes=("fwd",),
                work=lambda t, mode, provider, w=work: (w, KV_BYTES_DOC["fwd"]),
                providers=providers,
                reference=("sdpa-math", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "fusedlm-torch"),
                params={"batch": B, "cache_len": T, "tokens": B * T, "heads": H, "kv_heads": Hkv, "head_dim": E,
                        "block_size": bs, "cache_bytes": cache}))
    return cases


# --------------------------------------------------------------------------------------------------
# The op's summary: every provider per (B, T), and issue 18's targets.
# --------------------------------------------------------------------------------------------------

def _fastest(timed, pred):
    hits = {p: ms for p, ms in timed.items() if pred(p)}
    return (min(hits, key=hits.get), min(hits.values())) if hits else (None, None)


def _ours(p, paged):
    return (p.startswith("fusedlm-") and not p.startswith("fusedlm-torch")
            and p.endswith("-paged") == paged)


def kv_report(rows):
    """Markdown: median ms (% of copy bandwidth) per case and provider, fusedlm (contiguous) over the
    fastest SDPA backend and over flex, paged over contiguous; then each target, met or not."""
    from .report import REL_ERR_FLAG, _missing

    rs = [r for r in rows if r["op"] == "kv_cache_decode" and r["kind"] == "memory"]
    if not rs:
        return ""
    providers = list(dict.fromkeys(r["provider"] for r in rs))
    head = ["case", *providers, "fusedlm vs fastest SDPA", "fusedlm vs flex", "paged / contiguous"]
    lines = ["**kv_cache_decode** (one decode step, fwd): median ms (% of copy bandwidth)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    targets = []
    cell = {(r["case"], r["provider"]): r for r in rs}
    for case in dict.fromkeys(r["case"] for r in rs):
        cells, timed = [case], {}
        for p in providers:
            r = cell.get((case, p))
            if r is None or r["median_ms"] is None:
                cells.append(_missing(r))
                continue
            timed[p] = r["median_ms"]
            flag = " **check**" if r["rel_err"] is not None and r["rel_err"] > REL_ERR_FLAG else ""
            cells.append(f"{r['median_ms']:.3f} ({100 * (r['frac_of_copy_bw'] or 0):.0f}%){flag}")
        ours, ours_ms = _fastest(timed, lambda p: _ours(p, paged=False))
        paged, paged_ms = _fastest(timed, lambda p: _ours(p, paged=True))
        sdpa, sdpa_ms = _fastest(timed, lambda p: p.startswith("sdpa-"))
        flex_ms = timed.get("flex")
        cells.append(f"{sdpa_ms / ours_ms:.2f}x ({sdpa})" if ours_ms and sdpa_ms else "—")
        cells.append(f"{flex_ms / ours_ms:.2f}x" if ours_ms and flex_ms else "—")
        cells.append(f"{paged_ms / ours_ms:.3f}" if ours_ms and paged_ms else "—")
        lines.append("| " + " | ".join(cells) + " |")
        params = cell[(case, next(iter(timed)))]["params"] if timed else {}
        for p in (ours, paged):
            r = cell.get((case, p)) if p else None
            if r and params.get("tokens", 0) >= BW_TARGET_TOKENS:
                ok = r["frac_of_copy_bw"] >= BW_TARGET
                targets.append(f"{case}: {p} at {100 * r['frac_of_copy_bw']:.0f}% of copy bandwidth (target >= "
                               f"{100 * BW_TARGET:.0f}% once B x T >= 256k: {'met' if ok else 'NOT met'})")
        if ours_ms and sdpa_ms:
            ok = sdpa_ms / ours_ms >= SDPA_TARGET
            targets.append(f"{case}: {ours} {sdpa_ms / ours_ms:.2f}x {sdpa} (target >= {SDPA_TARGET}x the fastest "
                           f"SDPA backend: {'met' if ok else 'NOT met'})")
        if ours_ms and paged_ms:
            ok = paged_ms / ours_ms <= PAGED_TARGET
            targets.append(f"{case}: {paged} {paged_ms / ours_ms:.3f}x {ours} (target: paged within "
                           f"{100 * (PAGED_TARGET - 1):.0f}% of contiguous: {'met' if ok else 'NOT met'})")
    if rs[0]["smoke"]:  # tiny CPU tensors: nothing to judge
        targets = []
    return "\n".join(lines + ([""] + ["Issue 18's targets:", ""] + [f"- {t}" for t in targets] if targets else []))


@dataclasses.dataclass
class KVCacheOp:
    """A memory-bound op with several cases and peers of its own: its summary is its report (the generic
    memory-bound table has one line per op and the norm ops' provider columns)."""
    name: str
    family: str
    fusedlm_attrs: tuple
    work_doc: dict
    report: object
    kind = "memory"

    def cases(self, run):
        return kv_cache_cases(run)


OPS = [KVCacheOp("kv_cache_decode", "kv_cache", ("kv_cache_attention",), KV_BYTES_DOC, kv_report)]
