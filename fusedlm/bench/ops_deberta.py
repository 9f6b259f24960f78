"""Benchmarks of DeBERTa disentangled attention (compute-bound), at deberta-v3-base shapes: H = 12, D = 64,
256 position buckets, max_relative_positions 512, c2p + p2c, share_att_key; B * S = tokens for each S.

deberta_attention         no padding: fusedlm.deberta_attention against transformers' eager module
                          (bf16 the baseline, float32 the yardstick), FlashDeBERTa and DisentangledFlash.
deberta_attention_padded  half the tokens real (right padding), every provider on the padded batch
                          (key padding mask) and, as "-varlen", on the packed real tokens
                          (fusedlm.deberta_varlen_attention, FlashDeBERTa's varlen function,
                          DisentangledFlash's forward_packed); only the real tokens are compared.

What each provider runs, and the two layouts: deberta_peers.py. The report (speedups and peak memory
over hf-eager's, issue 8's targets): deberta_report.py.
"""
import torch
import torch.nn.functional as F

import fusedlm

from . import deberta_peers as peers
from .cases import (Case, ComputeOp, ProviderSkipped, device_generator, fusedlm_providers, padded_lengths, randn,
                    shape_str)
from .deberta_report import EAGER_SPEEDUP_TARGETS, deberta_report

DEBERTA_SCOPE = ("attention module: q/k/v projections + pos projections of rel_embeddings (share_att_key) + "
                 "disentangled attention; output projection excluded; weights frozen")
DEBERTA_FLOPS_DOC = {
    "fwd": "core + proj: core = B H (4 S^2 D + 8 S span D) (QK^T, PV, Q pos_key^T, K pos_query^T); "
           "proj = 6 B S C^2 + 8 span C^2 (q, k, v of hidden; k, q of rel_embeddings), C = H D",
    "bwd": "2.5 core + proj (frozen weights: d hidden, d rel_embeddings only)",
    "fwd+bwd": "3.5 core + 2 proj",
}
DEBERTA_PADDED_FLOPS_DOC = {
    "fwd": "core + proj over the real tokens only: core = H sum_b (4 len_b^2 D + 8 len_b span D); "
           "proj = 6 T C^2 + 8 span C^2, T = sum_b len_b (padded tokens earn no credit)",
    "bwd": "2.5 core + proj",
    "fwd+bwd": "3.5 core + 2 proj",
}


def _flops(lens, H, D, C, span):
    """FLOPs per mode of sequences of these lengths (the formulas above)."""
    core = H * sum(4 * n * n * D + 8 * n * span * D for n in lens)
    proj = 6 * sum(lens) * C * C + 8 * span * C * C
    return {"fwd": core + proj, "bwd": int(2.5 * core) + proj, "fwd+bwd": int(3.5 * core) + 2 * proj}


def _fusedlm_bind(sz):
    """fusedlm.deberta_attention on the padded layout (with the key padding mask on a padded batch)."""
    def bind(backend, t):
        kpm = t.get("kpm")

        def fn():
            q, k, v, pos_key, pos_query = peers.project(t, sz)
            out = fusedlm.deberta_attention(
                q, k, v, pos_key=pos_key, pos_query=pos_query, key_padding_mask=kpm,
                position_buckets=sz.deberta_buckets, max_relative_positions=sz.deberta_max_rel, backend=backend)
            return peers.merge_heads(out)
        return peers.padded_bound(t, fn)
    return bind


def _fusedlm_varlen_bind(sz):
    """fusedlm.deberta_varlen_attention on the packed real tokens; a skipped row where this build lacks it."""
    def bind(backend, t):
        varlen = getattr(fusedlm, "deberta_varlen_attention", None)
        if varlen is None:
            raise ProviderSkipped("fusedlm.deberta_varlen_attention does not exist in this build")
        cu, max_len = t["cu_seqlens"], t["max_seqlen"]

        def fn():
            q, k, v, pos_key, pos_query = peers.project(t, sz, packed=True)
            out = varlen(q, k, v, pos_key, pos_query, cu, max_len, position_buckets=sz.deberta_buckets,
                         max_relative_positions=sz.deberta_max_rel, backend=backend)
            return peers.merge_heads(out, packed=True)
        return peers.packed_bound(t, fn)
    return bind


def _make(run, B, S, lens):
    sz = run.sizes
    C, span = sz.deberta_heads * sz.deberta_head_dim, sz.deberta_buckets

    def make():
        gen = device_generator(run, 11 + S)
        t = {"hidden": randn(gen, run.device, run.dtype, B, S, C),
             "rel": randn(gen, run.device, run.dtype, 2 * span, C)}
        for n in "qkv":
            t[f"w{n}"] = randn(gen, run.device, run.dtype, C, C, scale=C ** -0.5)
            t[f"b{n}"] = randn(gen, run.device, run.dtype, C, scale=0.02)
        if lens is not None:
            n_real = torch.tensor(lens, device=run.device, dtype=torch.int32)
            kpm = torch.arange(S, device=run.device)[None, :] < n_real[:, None]      # (B, S), True = real
            t["kpm"] = kpm
            t["hf_mask"] = kpm[:, None, None, :] & kpm[:, None, :, None]              # get_attention_mask's
            t["dout"] = randn(gen, run.device, run.dtype, B, S, C) * kpm[:, :, None]
            t["hidden_packed"] = t["hidden"][kpm]                                     # (T, C), row-major
            t["cu_seqlens"] = F.pad(n_real.cumsum(0, dtype=torch.int32), (1, 0))
            t["max_seqlen"] = max(lens)
        return t
    return make


def _seqlens(run):
    """--seqlens when given, else DeBERTa's own lengths (the attention defaults do not fit it)."""
    if run.seqlens_given:
        return run.seqlens
    return run.sizes.deberta_quick_seqlens if run.quick else run.sizes.deberta_seqlens


def deberta_cases(run, padded=False):
    """bf16 DeBERTa-v2/v3 self-attention at B * S = tokens for each S; dense, or half the tokens real."""
    sz = run.sizes
    H, D, span = sz.deberta_heads, sz.deberta_head_dim, sz.deberta_buckets
    cases = []
    for S in _seqlens(run):
        B = max(1, sz.tokens // S)
        lens = padded_lengths(B, S, run.seed) if padded else None
        flops = _flops(lens or [S] * B, H, D, H * D, span)
        providers = {"hf-eager-fp32": peers.hf_eager(sz, float32=True), "hf-eager": peers.hf_eager(sz)}
        providers.update(fusedlm_providers(_fusedlm_bind(sz)))
        if padded:
            providers.update(fusedlm_providers(_fusedlm_varlen_bind(sz), suffix="-varlen"))
        providers["flashdeberta"] = peers.flashdeberta(sz)
        if padded:
            providers["flashdeberta-varlen"] = peers.flashdeberta_varlen(sz)
        providers["disentangled-flash"] = peers.disentangled_flash(sz)
        if padded:
            providers["disentangled-flash-varlen"] = peers.disentangled_flash_varlen(sz)
        params = {"batch": B, "heads": H, "seqlen": S, "head_dim": D, "position_buckets": span,
                  "max_relative_positions": sz.deberta_max_rel, "scope": DEBERTA_SCOPE}
        if padded:
            params["real_tokens"] = sum(lens)
        elif S in EAGER_SPEEDUP_TARGETS:
            params["target_vs_baseline"] = 1 / EAGER_SPEEDUP_TARGETS[S]
        padding = (f", key padding (B,S), right padding, {sum(lens)} real tokens; -varlen providers take them "
                   "packed (cu_seqlens)") if padded else ", no padding"
        cases.append(Case(
            op="deberta_attention_padded" if padded else "deberta_attention", kind="compute",
            label=f"S={S} B={B}" + (f" real={sum(lens)}/{B * S}" if padded else ""), make=_make(run, B, S, lens),
            describe=lambda t, p=padding: (f"hidden{shape_str(t['hidden'])} rel_embeddings{shape_str(t['rel'])}, "
                                           f"pos_key/pos_query ({H},{2 * span},{D}){p}; " + DEBERTA_SCOPE),
            grad=("hidden", "rel", "hidden_packed") if padded else ("hidden", "rel"),
            work=lambda t, mode, provider, f=flops, d=DEBERTA_PADDED_FLOPS_DOC if padded else DEBERTA_FLOPS_DOC:
                (f[mode], d[mode]),
            providers=providers, reference=("hf-eager-fp32", "hf-eager"), baseline="hf-eager", params=params))
    return cases


OPS = [
    ComputeOp("deberta_attention", "deberta", ("deberta_attention",), deberta_cases, DEBERTA_FLOPS_DOC,
              report=lambda rows: deberta_report(rows, "deberta_attention", DEBERTA_SCOPE)),
    ComputeOp("deberta_attention_padded", "deberta", ("deberta_attention",),
              lambda run: deberta_cases(run, padded=True), DEBERTA_PADDED_FLOPS_DOC,
              report=lambda rows: deberta_report(rows, "deberta_attention_padded", DEBERTA_SCOPE)),
]
