"""The DeBERTa benchmark's peers, and what every DeBERTa provider shares.

Every provider is the whole self-attention module: q/k/v projections of the hidden states, the (shared)
key/query projections of rel_embeddings into pos_key/pos_query, the attention; the output projection
(DebertaV2SelfOutput) is not included. Same weights (frozen), gradients for hidden states and
rel_embeddings. Two layouts:

padded  hidden (B, S, C) -> out (B, S, C). On a padded batch (inputs "kpm", (B, S) True = real token)
        only the real tokens are compared, and the output gradient is zero at padded queries.
packed  the real tokens only, hidden_packed (T, C) with int32 cu_seqlens (B + 1,) -> out (T, C), as a
        model that stays unpadded from the embedding on runs it.

Peers (optional imports: one that is missing or cannot run here gives a row with the reason):
  hf-eager[-fp32]            transformers' DisentangledSelfAttention, ``module(hidden, mask, rel_embeddings=)``
                             with the mask DebertaV2Encoder.get_attention_mask builds.
  flashdeberta               FlashDeBERTa 0.0.x ``flashdeberta.model.FlashDisentangledSelfAttention``, same call
                             (it unpads internally for a padded batch when S >= 1024).
  flashdeberta-varlen        ``flashdeberta.ops.flash_attention_varlen.flash_attention_with_disentangled_varlen(
                             q, k, v (T, H, D), pos_key, pos_query (1, H, 2 span, D), cu_q, cu_k, max_q, max_k,
                             causal, sm_scale, position_buckets, max_relative_distance)`` on our projections.
  disentangled-flash         DisentangledFlash 1.x ``TritonTrainingDisentangledSelfAttention(config,
                             assume_unpadded=)``, ``module(hidden, mask (B, S) bool, rel_embeddings=)``: its fused
                             training path (fused QKV projection of the same weights).
  disentangled-flash-varlen  the same module's ``forward_packed(hidden (T, C), cu_seqlens, max_seqlen,
                             rel_embeddings=, packed_info=)``, the boundaries validated once outside the timing.
"""
import torch
import torch.nn.functional as F

from .cases import Bound, ProviderUnavailable, ProviderUnsupported, bind_params, import_peer, oom_guard


def deberta_config(sz):
    """transformers' DebertaV2Config of deberta-v3-base's attention (at run.sizes), dropout off."""
    from transformers import DebertaV2Config

    return DebertaV2Config(
        hidden_size=sz.deberta_heads * sz.deberta_head_dim, num_attention_heads=sz.deberta_heads,
        intermediate_size=4 * sz.deberta_heads * sz.deberta_head_dim, relative_attention=True,
        pos_att_type=["c2p", "p2c"], position_buckets=sz.deberta_buckets,
        max_relative_positions=sz.deberta_max_rel, share_att_key=True, norm_rel_ebd="layer_norm",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# --------------------------------------------------------------------------------------------------
# The two layouts, and the projections every fused provider computes itself.
# --------------------------------------------------------------------------------------------------

def padded_bound(t, fn):
    """A provider on the padded layout: differentiate hidden and rel; on a padded batch compare the real
    tokens only (rows of out and of d hidden) with the case's output gradient, zero at padded queries."""
    if "kpm" not in t:
        return Bound(fn, [t["hidden"], t["rel"]])
    kpm = t["kpm"]
    return Bound(fn, [t["hidden"], t["rel"]],
                 canon=lambda xs: [x[kpm] if x.dim() == 3 else x for x in xs],
                 cotangents=lambda outs: [torch.empty_like(outs[0]).copy_(t["dout"])])


def packed_bound(t, fn):
    """A provider on the packed layout: differentiate hidden_packed and rel, with the real rows of the
    padded providers' output gradient (so the gradients compare with theirs)."""
    return Bound(fn, [t["hidden_packed"], t["rel"]], cotangents=lambda outs: [t["dout"][t["kpm"]]])


def project(t, sz, packed=False):
    """DisentangledSelfAttention's projections (share_att_key): q, k, v of the hidden states, (B, H, S, D)
    views of (B, S, H, D) storage, or (T, H, D) when packed; pos_key, pos_query (H, 2 span, D), the key
    and query projections of rel_embeddings."""
    H, D = sz.deberta_heads, sz.deberta_head_dim
    h = t["hidden_packed"] if packed else t["hidden"]

    def heads(w, b):
        x = F.linear(h, w, b).unflatten(-1, (H, D))
        return x if packed else x.transpose(1, 2)

    def pos(w, b):
        return F.linear(t["rel"], w, b).view(-1, H, D).transpose(0, 1).contiguous()

    return (heads(t["wq"], t["bq"]), heads(t["wk"], t["bk"]), heads(t["wv"], t["bv"]),
            pos(t["wk"], t["bk"]), pos(t["wq"], t["bq"]))


def merge_heads(out, packed=False):
    """(B, H, S, D) -> (B, S, H D), or (T, H, D) -> (T, H D)."""
    return out.flatten(-2) if packed else out.transpose(1, 2).flatten(2)


# --------------------------------------------------------------------------------------------------
# The peers.
# --------------------------------------------------------------------------------------------------

def _module(make, t, sz, dtype):
    """``make(config)`` in eval mode on the case's device and ``dtype``, using the case's q/k/v weights."""
    mod = make(deberta_config(sz)).eval().to(device=t["hidden"].device, dtype=dtype)
    for name in ("query", "key", "value"):
        bind_params(getattr(mod, f"{name}_proj"), weight=t[f"w{name[0]}"].to(dtype), bias=t[f"b{name[0]}"].to(dtype))
    return mod


def _require_cuda(t, what):
    if t["hidden"].device.type != "cuda":
        raise ProviderUnavailable(f"{what} are benchmarked on a CUDA device only")


def _encoder_mask(t):
    """The mask DebertaV2Encoder hands its attention modules: (B, 1, S, S) on a padded batch, else an
    all-true (B, 1, 1, S)."""
    if "hf_mask" in t:
        return t["hf_mask"]
    B, S, _ = t["hidden"].shape
    return torch.ones(B, 1, 1, S, dtype=torch.bool, device=t["hidden"].device)


def hf_eager(sz, float32=False):
    """transformers' DisentangledSelfAttention in the run's dtype (the baseline), or in float32 up to
    S = deberta_ref_max_seqlen (the yardstick of rel_err)."""
    def build(t):
        cls = import_peer("transformers.models.deberta_v2.modeling_deberta_v2").DisentangledSelfAttention
        h, rel = t["hidden"], t["rel"]
        if float32 and h.shape[1] > sz.deberta_ref_max_seqlen:
            raise ProviderUnsupported(f"the float32 yardstick runs up to S = {sz.deberta_ref_max_seqlen} only")
        mod = _module(cls, t, sz, torch.float32 if float32 else h.dtype)
        mask = _encoder_mask(t)

        def fn():
            hh, rr = (h.float(), rel.float()) if float32 else (h, rel)
            return mod(hh, mask, output_attentions=False, rel_embeddings=rr)[0]
        oom_guard(fn, [h, rel])
        return padded_bound(t, fn)
    return build


def flashdeberta(sz):
    def build(t):
        _require_cuda(t, "FlashDeBERTa's Triton kernels")
        cls = import_peer("flashdeberta.model", "flashdeberta").FlashDisentangledSelfAttention
        mod = _module(cls, t, sz, t["hidden"].dtype)
        h, rel, mask = t["hidden"], t["rel"], _encoder_mask(t)
        return padded_bound(t, lambda: mod(h, mask, output_attentions=False, rel_embeddings=rel)[0])
    return build


def flashdeberta_varlen(sz):
    def build(t):
        _require_cuda(t, "FlashDeBERTa's Triton kernels")
        varlen = import_peer("flashdeberta.ops.flash_attention_varlen",
                             "flashdeberta").flash_attention_with_disentangled_varlen
        cu, max_len = t["cu_seqlens"], t["max_seqlen"]
        scale = (3 * sz.deberta_head_dim) ** -0.5     # c2p and p2c on: 1 / sqrt(3 D)

        def fn():
            q, k, v, pos_key, pos_query = project(t, sz, packed=True)
            out = varlen(q, k, v, pos_key.unsqueeze(0), pos_query.unsqueeze(0), cu, cu, max_len, max_len,
                         False, scale, sz.deberta_buckets, sz.deberta_max_rel)
            return merge_heads(out, packed=True)
        return packed_bound(t, fn)
    return build


def disentangled_flash(sz):
    def build(t):
        _require_cuda(t, "DisentangledFlash's Triton training kernels")
        df = import_peer("disentangled_flash", "disentangled-flash")
        padded = "kpm" in t
        # Without padding, its fastest path: assume_unpadded skips the mask in the kernels.
        mod = _module(lambda config: df.TritonTrainingDisentangledSelfAttention(config, assume_unpadded=not padded),
                      t, sz, t["hidden"].dtype)
        h, rel = t["hidden"], t["rel"]
        mask = t["kpm"] if padded else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return padded_bound(t, lambda: mod(h, mask, rel_embeddings=rel)[0])
    return build


def disentangled_flash_varlen(sz):
    def build(t):
        _require_cuda(t, "DisentangledFlash's Triton training kernels")
        df = import_peer("disentangled_flash", "disentangled-flash")
        mod = _module(df.TritonTrainingDisentangledSelfAttention, t, sz, t["hidden"].dtype)
        hp, rel, cu, max_len = t["hidden_packed"], t["rel"], t["cu_seqlens"], t["max_seqlen"]
        # Its encoder validates the boundaries once (a host copy) and reuses them in every layer.
        info = df.validate_cu_seqlens(cu, hp.shape[0], max_len)
        return packed_bound(t, lambda: mod.forward_packed(hp, cu, max_len, rel_embeddings=rel, packed_info=info)[0])
    return build
