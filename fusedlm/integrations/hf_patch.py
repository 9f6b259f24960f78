"""patch_model: a loaded transformers model's modules swapped for fused ones, in place.

How modules are swapped: by changing the *class* of the module object to a subclass made once per
original class (``Fused<Name>``, whose forward calls the fused op), not by building a new module
(DeBERTa's attention, below, is the one exception). So parameters stay the same objects (an optimizer
built before keeps working), state-dict keys, hooks (accelerate's device hooks, transformers' output
capturing) and ``isinstance`` checks against the original class all stay as they were. Norm
subclasses also derive from ``fusedlm.nn.RMSNorm`` / ``fusedlm.nn.LayerNorm`` (and take their forward,
which accepts ``residual``); the MLP one derives from ``fusedlm.nn.SwiGLUMLP``. A module whose class
is already a ``Fused`` one is left alone: a second ``patch_model`` changes nothing more.

Per family (``config.model_type``), what is replaced:

    llama, mistral, qwen2   attention: "fusedlm" through the registry (set_attn_implementation);
                            <P>RMSNorm -> fused rms_norm; <P>MLP -> fused swiglu (silu activations only);
                            <P>DecoderLayer -> the residual add before post_attention_layernorm fused
                            into it; the modeling module's apply_rotary_pos_emb -> fused rotary;
                            <P>ForCausalLM: the training loss (labels given) through linear_cross_entropy,
                            never making the logits (hf_loss.py)
    gemma2                  Gemma2ForCausalLM: the training loss, with its final logit softcap, as above
                            (its attention, norms and MLP run as they are)
    bert, roberta           attention: "fusedlm" through the registry; every torch.nn.LayerNorm -> fused
                            layer_norm; <P>SelfOutput / <P>Output -> residual add fused into their LayerNorm
    deberta-v2              DisentangledSelfAttention -> fusedlm.models' fused module (a new module object
                            sharing the projections: hf_deberta.py); LayerNorms and DebertaV2SelfOutput /
                            DebertaV2Output as for BERT
    any model               PEFT LoRA ``Linear`` layers -> fused lora_linear

In the post-norm encoders both residual adds of a layer are fused. In the pre-norm decoders the add
after the MLP is not: it is the decoder layer's output, which hooks, gradient checkpointing and
output_hidden_states observe, so the sum has to exist anyway, and fusing it into the next layer's
input norm would mean rewriting the model's layer loop.

The rotary function is patched in the model family's modeling module, so every model of that family in
the process uses it (it computes the same thing; inputs it does not take go to the original function).
"""
import sys
import warnings
import weakref
from collections import Counter

import torch
from torch import nn

from .. import nn as fused_nn
from ..ops.lora import lora_linear
from ..ops.rope import apply_rotary_pos_emb as fused_apply_rotary_pos_emb
from . import hf_compat, hf_deberta, hf_loss
from .fused_classes import fused_class
from .hf_attention import register

COUNT_KEYS = ("attention", "deberta_attention", "rms_norm", "layer_norm", "residual_norm", "swiglu", "rotary",
              "lora_linear", "linear_cross_entropy")

# model_type -> (class-name prefix, kind)
_FAMILIES = {
    "llama": ("Llama", "decoder"),
    "mistral": ("Mistral", "decoder"),
    "qwen2": ("Qwen2", "decoder"),
    "bert": ("Bert", "encoder"),
    "roberta": ("Roberta", "encoder"),
    "deberta-v2": ("DebertaV2", "deberta"),
    "gemma2": ("Gemma2", "lm_loss"),  # only the causal-LM loss (its final logit softcap): hf_loss.py
}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ROTARY_COUNTED = weakref.WeakSet()  # attention modules already counted under "rotary"


def _is_fused(module):
    return "_fusedlm_original" in type(module).__dict__


def _swap_class(module, mixin, **attrs):
    """Turn ``module`` into an instance of ``Fused<its class>`` with ``mixin`` first in the MRO (the mixin's
    forward, everything else the original's: fused_classes.py). ``attrs``: class attributes of the fused
    class (what the installed transformers was found to offer)."""
    module.__class__ = fused_class((mixin,), type(module), tuple(sorted(attrs.items())))


# ----------------------------------------------------------------------------------------------
# Forwards of the swapped classes
# ----------------------------------------------------------------------------------------------

def _hooked(module):
    """Whether forward hooks would see ``module``'s call: its own, or global ones (nn.modules.module's
    registries, read defensively). A norm that is hooked is called as transformers calls it, on ``x +
    residual`` alone, so a hook sees the tensors it would unpatched (the fused residual add passes two)."""
    registries = (module._forward_hooks, module._forward_pre_hooks,
                  getattr(nn.modules.module, "_global_forward_hooks", None),
                  getattr(nn.modules.module, "_global_forward_pre_hooks", None))
    return any(bool(r) for r in registries if r is not None)


def _add_and_norm(norm, x, residual):
    """(norm(x + residual), x + residual): fused into the norm, or, when the norm is hooked, the add first
    and the norm called on one tensor as transformers calls it."""
    if _hooked(norm):
        total = x + residual
        return norm(total), total
    return norm(x, residual)


class _PreNormDecoderLayer(nn.Module):
    """Llama / Mistral / Qwen2 decoder layer with ``h + attn`` fused into post_attention_layernorm:
    transformers' forward, except that rms_norm(x, residual=...) returns (norm(x + residual), x + residual).
    The KV cache reaches the attention under the keyword the original layer uses (``_fusedlm_cache``:
    "past_key_values" up to transformers 5.2x, then "cache"); the model may pass it under either."""

    _fusedlm_cache = "cache"

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        other = kwargs.pop("past_key_values", None)
        cache = other if cache is None else cache
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        kwargs[self._fusedlm_cache] = cache
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=use_cache,
                                          position_embeddings=position_embeddings, **kwargs)
        hidden_states, residual = _add_and_norm(self.post_attention_layernorm, hidden_states, residual)
        return residual + self.mlp(hidden_states)


class _PostNormOutput(nn.Module):
    """BERT-style ``LayerNorm(dropout(dense(h)) + input)`` with the add fused into the norm."""

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dropout(self.dense(hidden_states))
        return _add_and_norm(self.LayerNorm, hidden_states, input_tensor)[0]


class _FusedLoraLinear(nn.Module):
    """PEFT ``lora.Linear`` whose forward runs fusedlm.lora_linear when one plain LoRA adapter is active;
    everything else (adapters disabled or merged, several adapters, DoRA and other variants, lora_bias,
    mixed-adapter batches, dtypes the op does not take) runs PEFT's own forward."""

    def _fusedlm_adapter(self, x, args, kwargs):
        if args or kwargs or self.disable_adapters or self.merged or x.dtype not in _DTYPES:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant or self.lora_bias.get(active[0]):
            return None
        if type(self.lora_dropout[active[0]]) not in (nn.Dropout, nn.Identity):
            return None
        return active[0]

    def forward(self, x, *args, **kwargs):
        adapter = self._fusedlm_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if torch.is_autocast_enabled(x.device.type):  # as nn.Linear would: all in the autocast dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        elif weight.dtype != x.dtype:
            return super().forward(x, *args, **kwargs)
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        a = self.lora_A[adapter].weight.to(x.dtype)
        b = self.lora_B[adapter].weight.to(x.dtype)
        return lora_linear(x, weight, bias, a, b, float(self.scaling[adapter]), dropout_p=p)


def _rotary_fits(q, k, cos, sin, unsqueeze_dim):
    """The inputs fusedlm.apply_rotary_pos_emb takes (else the original function runs)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)) or unsqueeze_dim not in (1, 2):
        return False
    if q.dim() != 4 or k.dim() != 4 or q.dtype not in _DTYPES or k.dtype != q.dtype:
        return False
    seq = 3 - unsqueeze_dim
    if cos.dim() not in (2, 3) or sin.shape != cos.shape or cos.shape[-1] % 2 or cos.shape[-1] > q.shape[-1]:
        return False
    if q.shape[seq] != cos.shape[-2] or k.shape[seq] != cos.shape[-2] or k.shape[-1] != q.shape[-1]:
        return False
    return cos.dim() == 2 or (cos.shape[0] in (1, q.shape[0]) and k.shape[0] == q.shape[0])


def _fused_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *args, **kwargs):
        if args or kwargs or not _rotary_fits(q, k, cos, sin, unsqueeze_dim):
            return original(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)
        return fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    name = getattr(original, "__name__", type(original).__name__)
    apply_rotary_pos_emb.__doc__ = "fusedlm.apply_rotary_pos_emb in place of transformers' " + name
    apply_rotary_pos_emb._fusedlm_original = original
    return apply_rotary_pos_emb


def _install_rotary(modeling, original):
    """Route the modeling module's rotary calls through the fused op. A plain function is replaced in the
    module. With Hugging Face's ``kernels`` package installed, transformers 5.2x makes it an ``nn.Module``
    instance that kernels pickles by its global name and rebuilds from the global's type: that object stays
    the module's global, and only its forward (an instance attribute) becomes the fused one."""
    if isinstance(original, nn.Module):
        forward = original.forward
        original.forward = _fused_rotary(forward)
        original._fusedlm_original = forward
    else:
        modeling.apply_rotary_pos_emb = _fused_rotary(original)


# ----------------------------------------------------------------------------------------------
# patch_model
# ----------------------------------------------------------------------------------------------

def _families(model):
    """(transformers PreTrainedModel, modeling module, prefix, kind) of each distinct config in model."""
    from transformers import PreTrainedModel

    seen = set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and id(m.config) not in seen:
            seen.add(id(m.config))
            prefix, kind = _FAMILIES.get(getattr(m.config, "model_type", None), (None, None))
            yield m, sys.modules[type(m).__module__], prefix, kind


def _unknown(cls, role, left, methods=("forward",)):
    """True (and the reason added to ``left``) when ``cls``'s code is not a form fused ``role`` reproduces."""
    if hf_compat.known_forward(cls, role, methods):
        return False
    left.append(f"{cls.__name__} (its {'/'.join(methods)} is not one fusedlm knows in transformers "
                f"{_transformers_version()}: run as it is)")
    return True


def _transformers_version():
    import transformers

    return transformers.__version__


def _patch_norms(model, modeling, prefix, kind, counts, left):
    rms_cls = getattr(modeling, f"{prefix}RMSNorm", None) if kind == "decoder" else None
    if rms_cls is not None and any(type(m) is rms_cls for m in model.modules()) and _unknown(rms_cls, "rms_norm", left):
        rms_cls = None
    for name, m in model.named_modules():
        if rms_cls is not None and type(m) is rms_cls:
            m.offset = 0.0
            _swap_class(m, fused_nn.RMSNorm)
            counts["rms_norm"] += 1
        elif kind != "decoder" and type(m) is nn.LayerNorm:
            if len(m.normalized_shape) != 1:
                left.append(f"{name} (LayerNorm over {tuple(m.normalized_shape)})")
                continue
            _swap_class(m, fused_nn.LayerNorm)
            counts["layer_norm"] += 1


def _patch_decoder(model, modeling, prefix, counts, left):
    mlp_cls = getattr(modeling, f"{prefix}MLP", None)
    layer_cls = getattr(modeling, f"{prefix}DecoderLayer", None)
    attention_cls = getattr(modeling, f"{prefix}Attention", None)
    present = {type(m) for m in model.modules()}
    if mlp_cls in present and _unknown(mlp_cls, "mlp", left):
        mlp_cls = None
    cache_name = None
    if layer_cls in present and not _unknown(layer_cls, "decoder_layer", left):
        cache_name = hf_compat.cache_keyword(layer_cls.forward)
        if cache_name is None:
            left.append(f"{layer_cls.__name__} (takes its KV cache under no keyword fusedlm knows)")
    for name, m in model.named_modules():
        if mlp_cls is not None and type(m) is mlp_cls:
            if type(m.act_fn).__name__ in ("SiLUActivation", "SiLU"):
                _swap_class(m, fused_nn.SwiGLUMLP)
                counts["swiglu"] += 1
            else:
                left.append(f"{name} (activation {type(m.act_fn).__name__}, not SiLU)")
        elif cache_name is not None and type(m) is layer_cls:
            if isinstance(m.post_attention_layernorm, fused_nn.RMSNorm):
                _swap_class(m, _PreNormDecoderLayer, _fusedlm_cache=cache_name)
                counts["residual_norm"] += 1
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None:
        left.append(f"{modeling.__name__} rotary (no apply_rotary_pos_emb function)")
        return
    if not hasattr(original, "_fusedlm_original"):
        if not hf_compat.rotary_matches(original):
            left.append(f"{modeling.__name__}.apply_rotary_pos_emb (does not compute Llama's rotary on a probe)")
            return
        _install_rotary(modeling, original)
    for m in model.modules():
        if type(m) is attention_cls and m not in _ROTARY_COUNTED:
            _ROTARY_COUNTED.add(m)
            counts["rotary"] += 1


def _patch_post_norm_outputs(model, modeling, prefix, counts, left):
    names = (f"{prefix}SelfOutput", f"{prefix}Output")
    present = {type(m) for m in model.modules()}
    classes = tuple(c for c in (getattr(modeling, n, None) for n in names)
                    if c in present and not _unknown(c, "post_norm_output", left))
    for m in model.modules():
        if type(m) in classes and isinstance(m.LayerNorm, fused_nn.LayerNorm):
            _swap_class(m, _PostNormOutput)
            counts["residual_norm"] += 1


def _select_attention(hf_model, modeling, prefix, kind, counts, left):
    names = (f"{prefix}Attention",) if kind == "decoder" else (f"{prefix}SelfAttention", f"{prefix}CrossAttention")
    classes = tuple(c for c in (getattr(modeling, n, None) for n in names) if c is not None)
    if hf_model.config._attn_implementation == "fusedlm":
        return
    try:
        hf_model.set_attn_implementation("fusedlm")
    except (ValueError, ImportError) as e:
        left.append(f"{type(hf_model).__name__} attention ({e})")
        return
    counts["attention"] += sum(type(m) in classes for m in hf_model.modules())


def _patch_deberta_attention(hf_model, modeling, counts, left):
    cls = getattr(modeling, "DisentangledSelfAttention", None)
    found = [(name, m) for name, m in hf_model.named_modules() if type(m) is cls]
    if found and _unknown(cls, "deberta_attention", left, ("forward", "disentangled_attention_bias")):
        return
    for name, m in found:
        parent, _, child = name.rpartition(".")
        setattr(hf_model.get_submodule(parent), child, hf_deberta.replace_attention(m, hf_model.config))
        counts["deberta_attention"] += 1


def _patch_lora(model, counts, left):
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear, LoraLayer
    except ImportError:
        return
    for name, m in model.named_modules():
        if type(m) is LoraLinear and type(m.base_layer) is nn.Linear:
            _swap_class(m, _FusedLoraLinear)
            counts["lora_linear"] += 1
        elif isinstance(m, LoraLayer) and not _is_fused(m):
            left.append(f"{name} ({type(m).__name__} LoRA layer on a {type(m.get_base_layer()).__name__})")


def patch_model(model):
    """Swap the attention, norms, SwiGLU, rotary and PEFT LoRA layers of a loaded transformers model (or a
    PEFT model around one) for fusedlm's, and a causal LM's training loss for linear_cross_entropy (logits
    None when labels are given in training mode: hf_loss.py), in place; see this module's docstring for
    what per family.

    Returns the counts of what this call replaced, keys ``COUNT_KEYS`` ("attention": attention modules
    now on the "fusedlm" registry entry, "residual_norm": residual adds fused into a norm, "rotary":
    attention modules whose rotary application is fused, "linear_cross_entropy": causal LMs whose loss
    is fused, ...). A second call replaces nothing more
    (all zeros). What it cannot patch it names in one warning and leaves working as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers or PEFT model), got {type(model).__name__}")
    register()
    counts = Counter({k: 0 for k in COUNT_KEYS})
    left = []
    for hf_model, modeling, prefix, kind in _families(model):
        if kind is None:
            left.append(f"{type(hf_model).__name__} (model type {hf_model.config.model_type!r}: no fused "
                        f"mapping; only its PEFT LoRA layers are patched)")
            continue
        if kind == "lm_loss":
            left.append(f"{type(hf_model).__name__} attention, norms and MLP (model type "
                        f"{hf_model.config.model_type!r}: only its causal-LM loss is fused)")
            hf_loss.patch_causal_lm(hf_model, modeling, prefix, counts, left)
            continue
        _patch_norms(hf_model, modeling, prefix, kind, counts, left)
        if kind == "decoder":
            _patch_decoder(hf_model, modeling, prefix, counts, left)
            hf_loss.patch_causal_lm(hf_model, modeling, prefix, counts, left)
        else:
            _patch_post_norm_outputs(hf_model, modeling, prefix, counts, left)
        if kind == "deberta":
            _patch_deberta_attention(hf_model, modeling, counts, left)
        else:
            _select_attention(hf_model, modeling, prefix, kind, counts, left)
    _patch_lora(model, counts, left)
    if left:
        warnings.warn("fusedlm.integrations.hf.patch_model left these as they were (they still work): "
                      + "; ".join(left), stacklevel=2)
    return dict(counts)
