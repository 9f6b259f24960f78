"""Benchmarks of attention (compute-bound): fusedlm.scaled_dot_product_attention on dense batches,
causal and not, and on a padded batch (key_padding_mask, and varlen_attention on the packed tokens),
against PyTorch's SDPA backends (flash, memory-efficient, cuDNN, math at small S) and FlexAttention."""
import warnings

import torch
import torch.nn.functional as F

import fusedlm

from .cases import (Bound, Case, ComputeOp, ProviderUnavailable, ProviderUnsupported, device_generator,
                    fusedlm_providers, padded_lengths, randn, shape_str)

ATTN_FLOPS_DOC = {
    "fwd": "4 B H S^2 E (QK^T and PV, 2 S^2 E each per head), half of it causal",
    "bwd": "2.5 x fwd (QK^T recomputed, dV, dP, dQ, dK)",
    "fwd+bwd": "3.5 x fwd",
}
ATTN_PADDED_FLOPS_DOC = {
    "fwd": "4 H E sum_b len_b^2: real query x real key pairs only (padded queries earn no credit)",
    "bwd": "2.5 x fwd",
    "fwd+bwd": "3.5 x fwd",
}
BWD_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}   # attention's FLOPs per mode over the forward's


def sdpa_backend(run, backend):
    """(torch.nn.attention.sdpa_kernel, [SDPBackend.<backend>]) for restricting SDPA to one backend, or
    ProviderUnavailable (no CUDA device for it, or a torch without sdpa_kernel)."""
    if run.device.type != "cuda" and backend != "MATH":
        raise ProviderUnavailable(f"SDPA's {backend} backend needs a CUDA device")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        raise ProviderUnavailable(f"torch.nn.attention.sdpa_kernel is missing ({e})") from None
    return sdpa_kernel, [getattr(SDPBackend, backend)]


def _sdpa_builder(run, backend, causal, mask_key=None):
    """F.scaled_dot_product_attention restricted to one SDPA backend (torch.nn.attention.sdpa_kernel)."""
    def build(t):
        sdpa_kernel, which = sdpa_backend(run, backend)
        q, k, v, mask = t["q"], t["k"], t["v"], t[mask_key] if mask_key else None

        def fn():
            with sdpa_kernel(which):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        _probe_sdpa(fn, backend)
        return fn
    return build


def _probe_sdpa(fn, backend):
    """Run once; "No available kernel" (the backend refuses this case) -> ProviderUnsupported, with the
    reasons torch gives as warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except RuntimeError as e:
            if not any(m in str(e).lower() for m in ("no available kernel", "no viable backend")):
                raise
            why = "; ".join(dict.fromkeys(str(w.message).strip().replace("\n", " ") for w in caught))
            raise ProviderUnsupported(f"SDPA's {backend} backend has no kernel for this case"
                                      + (f": {why}" if why else "")) from None


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex_builder(run, causal, padded):
    """FlexAttention (torch.nn.attention.flex_attention) under torch.compile(dynamic=False): one static
    compile per shape. Causal and key padding as block masks made once, outside the timing."""
    def build(t):
        if run.device.type != "cuda":
            raise ProviderUnavailable("FlexAttention is benchmarked on a CUDA device only (its compiled "
                                      "Triton kernels)")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise ProviderUnavailable(f"torch.nn.attention.flex_attention is missing ({e})") from None
        _raise_recompile_limit()  # a static compile per (shape, mask): more than dynamo's default 8
        q, k, v = t["q"], t["k"], t["v"]
        B, _, S, _ = q.shape
        if padded:
            lens = t["lens"]

            def padding_mod(b, h, q_idx, kv_idx):
                return kv_idx < lens[b]
            block_mask = create_block_mask(padding_mod, B, None, S, S, device=q.device)
        elif causal:
            block_mask = create_block_mask(_causal_mod, None, None, S, S, device=q.device)
        else:
            block_mask = None
        flex = run.compiled(flex_attention, dynamic=False)
        return lambda: flex(q, k, v, block_mask=block_mask)
    return build


def _raise_recompile_limit(limit=64):
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


def _padded(build):
    """A dense provider on a padded batch (builder -> builder)."""
    return lambda t: _padded_bound(t, build(t))


def _padded_bound(t, fn):
    """Compare the real tokens only (rows of out, dq, dk, dv), and differentiate with the case's output
    gradient, zero at the padded queries (no loss reads them)."""
    kpm = t["kpm"]
    return Bound(fn, [t["q"], t["k"], t["v"]],
                 canon=lambda xs: [x.transpose(1, 2)[kpm] for x in xs],
                 cotangents=lambda outs: [torch.empty_like(outs[0]).copy_(t["dout"].transpose(1, 2))])


def _varlen_bind(backend, t):
    """fusedlm.varlen_attention on the real tokens, packed once outside the timing (fusedlm.unpad_input),
    as a model that stays unpadded from the embedding on would call it."""
    kpm = t["kpm"]
    packed = [fusedlm.unpad_input(t[n].detach().transpose(1, 2), kpm) for n in ("q", "k", "v")]
    q, k, v = (p[0].detach().requires_grad_() for p in packed)
    _, _, cu, max_len = packed[0]
    return Bound(lambda: fusedlm.varlen_attention(q, k, v, cu, cu, max_len, max_len, backend=backend),
                 [q, k, v], cotangents=lambda outs: [t["dout"][kpm]])


def attention_cases(run, padded=False):
    """bf16 (B, H, S, E) attention at B * S = tokens, for each S in run.seqlens: causal and not (dense),
    or non-causal with half the keys real per sequence (padded, S in run.padded_seqlens)."""
    sz = run.sizes
    H, E = sz.attn_heads, sz.attn_head_dim
    cases = []
    for S in (run.padded_seqlens if padded else run.seqlens):
        B = max(1, sz.tokens // S)
        lens = padded_lengths(B, S, run.seed) if padded else None
        for causal in ((False,) if padded else (False, True)):
            pairs = sum(n * n for n in lens) if padded else B * S * S * (0.5 if causal else 1.0)
            fwd_flops = 4 * H * E * pairs
            doc = ATTN_PADDED_FLOPS_DOC if padded else ATTN_FLOPS_DOC
            label = f"S={S} B={B}" + (" causal" if causal else "") + (f" real={sum(lens)}/{B * S}" if padded else "")
            params = {"batch": B, "heads": H, "seqlen": S, "head_dim": E, "causal": causal}
            if padded:
                params["real_tokens"] = sum(lens)
            cases.append(Case(
                op="attention_padded" if padded else "attention", kind="compute", label=label,
                make=_attention_make(run, B, S, H, E, lens),
                describe=lambda t, c=causal: (f"q,k,v{shape_str(t['q'])} (B,H,S,E) in (B,S,H,E) storage"
                                              + (", causal" if c else "")
                                              + (", key_padding_mask (B,S), right padding" if "kpm" in t else "")),
                grad=("q", "k", "v"),
                work=lambda t, mode, provider, f=fwd_flops, d=doc: (int(f * BWD_FACTOR[mode]), d[mode]),
                providers=_attention_providers(run, S, causal, padded),
                reference=("sdpa-efficient", "sdpa-cudnn", "sdpa-math") if padded else
                          ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"),
                params=params))
    return cases


def _attention_make(run, B, S, H, E, lens):
    def make():
        gen = device_generator(run, S)

        def heads():  # the layout a Hugging Face attention layer produces: (B, S, H, E) viewed (B, H, S, E)
            return randn(gen, run.device, run.dtype, B, S, H, E).transpose(1, 2)
        t = {"q": heads(), "k": heads(), "v": heads()}
        if lens is not None:
            t["lens"] = torch.tensor(lens, device=run.device, dtype=torch.int32)
            t["kpm"] = torch.arange(S, device=run.device)[None, :] < t["lens"][:, None]   # (B, S), True = real
            t["attn_mask"] = t["kpm"][:, None, None, :]                                    # SDPA's (B, 1, 1, S)
            t["dout"] = randn(gen, run.device, run.dtype, B, S, H, E) * t["kpm"][:, :, None, None]
        return t
    return make


def _attention_providers(run, S, causal, padded):
    """Run order: the yardstick candidates first (rel_err is measured against the first that runs)."""
    small = S <= run.sizes.attn_math_max_seqlen
    if not padded:
        def bind(backend, t):
            q, k, v = t["q"], t["k"], t["v"]
            return lambda: fusedlm.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
        p = {"sdpa-flash": _sdpa_builder(run, "FLASH_ATTENTION", causal)}
        if small:
            p["sdpa-math"] = _sdpa_builder(run, "MATH", causal)
        p.update(fusedlm_providers(bind))
        p["sdpa-cudnn"] = _sdpa_builder(run, "CUDNN_ATTENTION", causal)
        p["sdpa-efficient"] = _sdpa_builder(run, "EFFICIENT_ATTENTION", causal)
        p["flex"] = _flex_builder(run, causal, padded=False)
        return p

    def bind(backend, t):
        q, k, v, kpm = t["q"], t["k"], t["v"], t["kpm"]
        return _padded_bound(t, lambda: fusedlm.scaled_dot_product_attention(
            q, k, v, key_padding_mask=kpm, backend=backend))
    p = {"sdpa-efficient": _padded(_sdpa_builder(run, "EFFICIENT_ATTENTION", False, "attn_mask"))}
    if small:
        p["sdpa-math"] = _padded(_sdpa_builder(run, "MATH", False, "attn_mask"))
    p.update(fusedlm_providers(bind))
    p.update(fusedlm_providers(_varlen_bind, suffix="-varlen"))
    p["sdpa-cudnn"] = _padded(_sdpa_builder(run, "CUDNN_ATTENTION", False, "attn_mask"))
    p["sdpa-flash"] = _padded(_sdpa_builder(run, "FLASH_ATTENTION", False, "attn_mask"))
    p["flex"] = _padded(_flex_builder(run, False, padded=True))
    return p


OPS = [
    ComputeOp("attention", "attention", ("scaled_dot_product_attention",),
              lambda run: attention_cases(run, padded=False), ATTN_FLOPS_DOC),
    ComputeOp("attention_padded", "attention", ("scaled_dot_product_attention", "varlen_attention", "unpad_input"),
              lambda run: attention_cases(run, padded=True), ATTN_PADDED_FLOPS_DOC),
]
