"""A transformers causal LM trained through fusedlm.linear_cross_entropy: the loss from the final hidden states
and the LM head, without the (tokens, vocab) logits.

patch_model gives a Llama / Mistral / Qwen2 / Gemma-2 ``<P>ForCausalLM`` its own ``forward`` (an instance
attribute, ``LMLossForward``; the class stays transformers', so ``save_pretrained``'s architectures, the
modeling-module lookups and ``isinstance`` are untouched). When it runs the fused path:

    labels given, and the model in training mode (``model.train()``), or the call passes ``return_logits=False``

and nothing below forbids it, it runs what transformers' forward runs, up to the LM head: ``self.model(...)``
with the same arguments, the hidden states sliced by ``logits_to_keep`` as transformers slices them, then
the loss as transformers' ``ForCausalLMLoss`` defines it, computed by linear_cross_entropy:

    labels shifted (position i predicts labels[i + 1], the last predicts nothing; or ``shift_labels`` as given),
    ``ignore_index`` (-100) ignored, Gemma-2's ``final_logit_softcapping`` as the op's ``softcap``;
    mean over the tokens not ignored, or with ``num_items_in_batch`` (gradient accumulation, as the Trainer
    passes it) the sum divided by it.

``logits_to_keep`` keeps its meaning: the loss covers the kept positions only, with labels given for those
positions (transformers computes its loss on the kept logits; labels of another length fail there as here).
The output is transformers' ``CausalLMOutputWithPast`` with ``logits=None`` (and the cache, hidden states and
attentions as transformers returns them); ``return_dict=False`` gives its tuple (``None`` entries left out,
as transformers leaves them out).

Everything else runs transformers' own forward, unchanged: no labels (evaluation without labels, generate),
evaluation mode (so the Trainer's evaluation gets its logits for metrics), ``return_logits=True``, a loss
function replaced by the user (``model.loss_function``), an LM head that is not a plain ``nn.Linear`` or has
hooks (PEFT wrappers, accelerate's device hooks), labels that are not int64. Where the installed transformers'
forward or loss is not a form fusedlm knows (hf_compat digests), patch_model leaves the forward and says so.
"""
import dataclasses
import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.cross_entropy import linear_cross_entropy
from . import hf_compat

_CALL_ARGS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "use_cache")  # passed to self.model


def causal_lm_loss(hidden, lm_head, labels, *, softcap=None, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **_):
    """transformers' ForCausalLMLoss(lm_head(hidden) [softcapped], labels, ...) through linear_cross_entropy.

    hidden (..., D) the kept positions' final hidden states; labels (...) int64 of the same positions, shifted
    here (or ``shift_labels`` given shifted). Other keywords (those the model passes on) are ignored, as
    transformers' loss ignores them. Returns a float32 scalar."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(h.device)
    if target.numel() != h.shape[0]:
        raise ValueError(f"labels: expected one label per position the logits are kept for ({h.shape[0]}: "
                         f"hidden states {tuple(hidden.shape)} after logits_to_keep), got {tuple(shift_labels.shape)}")
    weight, bias = lm_head.weight, lm_head.bias
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):  # nn.Linear would run in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        h, weight, bias = h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        loss = linear_cross_entropy(h, weight, target, bias, ignore_index=int(ignore_index),
                                    reduction="mean" if num_items_in_batch is None else "sum", softcap=softcap)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _legacy_slice(hidden, logits_to_keep):
    """transformers up to 5.2x's inline slice (``hidden_states[:, slice_indices, :]``)."""
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden[:, index, :]


class LMLossForward:
    """A causal LM's forward with the loss through linear_cross_entropy (module docstring). Installed as the
    model's ``forward`` attribute; takes transformers' arguments (its signature is the original's, plus the
    keyword ``return_logits``) and calls the class's forward wherever the fused path does not apply."""

    def __init__(self, model, cache_name, softcap, slice_in_module):
        self.model = model
        self.cache_name = cache_name            # "cache" or "past_key_values": what this forward takes
        self.softcap = softcap                  # read config.final_logit_softcapping (Gemma-2's forward)
        self.slice_in_module = slice_in_module  # the modeling module's slice_logits_to_keep (else inline)

    @property
    def __signature__(self):
        """transformers' forward's (what generate and the Trainer inspect), plus ``return_logits``."""
        sig = inspect.signature(type(self.model).forward.__get__(self.model))
        params = list(sig.parameters.values())
        extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        return sig.replace(parameters=params[:at] + [extra] + params[at:])

    def __repr__(self):
        return f"<fusedlm linear_cross_entropy forward of {type(self.model).__name__}>"

    def original(self, *args, **kwargs):
        """transformers' forward of this model (its class's)."""
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, *args, return_logits=None, **kwargs):
        model = self.model
        labels = kwargs.get("labels")
        if labels is None and args:
            try:
                labels = self.__signature__.bind_partial(*args).arguments.get("labels")
            except TypeError:
                labels = None
        fused = labels is not None and (model.training if return_logits is None else not return_logits)
        if not fused or not self._fits(labels):
            return self.original(*args, **kwargs)
        signature = self.__signature__
        try:
            arguments = signature.bind(*args, **kwargs).arguments
        except TypeError:  # let transformers' forward raise its own error
            return self.original(*args, **kwargs)
        var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        return self._fused(arguments, dict(arguments.pop(var_keyword, {})))

    def _fits(self, labels):
        model = self.model
        lm_head = getattr(model, "lm_head", None)
        if type(lm_head) is not nn.Linear or _hooked(lm_head):
            return False
        if not (isinstance(labels, torch.Tensor) and labels.dtype == torch.int64):
            return False
        weight = lm_head.weight
        if not weight.dtype.is_floating_point or weight.shape[0] != model.config.vocab_size:
            return False
        known = hf_compat.causal_lm_loss()
        return known is not None and model.loss_function is known

    def _fused(self, arguments, kwargs):
        model = self.model
        return_dict = getattr(model.config, "return_dict", True)  # as transformers' can_return_tuple
        passed = kwargs.pop("return_dict", return_dict)
        return_dict = return_dict if passed is None else passed
        other = "past_key_values" if self.cache_name == "cache" else "cache"
        cache = arguments.get(self.cache_name)
        if cache is None:
            cache = kwargs.pop(other, None)
        call = {name: arguments.get(name) for name in _CALL_ARGS}
        call[self.cache_name] = cache
        outputs = model.model(**call, **kwargs)
        hidden = outputs.last_hidden_state
        logits_to_keep = arguments.get("logits_to_keep", 0)
        if self.slice_in_module:
            hidden = sys.modules[type(model).__module__].slice_logits_to_keep(hidden, logits_to_keep)
        else:
            hidden = _legacy_slice(hidden, logits_to_keep)
        softcap = getattr(model.config, "final_logit_softcapping", None) if self.softcap else None
        loss = causal_lm_loss(hidden, model.lm_head, arguments["labels"], softcap=softcap, **kwargs)
        output_cls = sys.modules[type(model).__module__].CausalLMOutputWithPast
        rest = {f.name: getattr(outputs, f.name, None) for f in dataclasses.fields(output_cls)
                if f.name not in ("loss", "logits")}
        out = output_cls(loss=loss, logits=None, **rest)
        return out if return_dict else out.to_tuple()


def _hooked(module):
    from .hf_patch import _hooked as hooked

    return hooked(module)


def patch_causal_lm(hf_model, modeling, prefix, counts, left):
    """Give ``hf_model`` (when it is ``<prefix>ForCausalLM``) the fused-loss forward; counts["linear_cross_entropy"]
    += 1. What it cannot patch goes to ``left`` (the model keeps transformers' forward)."""
    cls = getattr(modeling, f"{prefix}ForCausalLM", None)
    if cls is None or type(hf_model) is not cls:
        return
    current = hf_model.__dict__.get("forward")
    if isinstance(current, LMLossForward):
        return
    if current is not None:
        left.append(f"{cls.__name__} loss (its forward is already replaced on the instance: run as it is)")
        return
    digest = hf_compat.forward_digest(cls)
    softcap = digest in hf_compat.KNOWN_FORWARDS["causal_lm_softcap"]
    if not softcap and digest not in hf_compat.KNOWN_FORWARDS["causal_lm"]:
        left.append(f"{cls.__name__} loss (its forward is not one fusedlm knows in transformers "
                    f"{_version()}: run as it is)")
        return
    if hf_compat.causal_lm_loss() is None:
        left.append(f"{cls.__name__} loss (transformers {_version()}'s ForCausalLMLoss is not one fusedlm knows: "
                    f"run as it is)")
        return
    cache_name = hf_compat.cache_keyword(cls.forward)
    if cache_name is None or not isinstance(getattr(hf_model, "model", None), nn.Module):
        left.append(f"{cls.__name__} loss (no KV-cache keyword or no .model: run as it is)")
        return
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    in_module = code is not None and "slice_logits_to_keep" in code.co_names
    if in_module and not callable(getattr(modeling, "slice_logits_to_keep", None)):
        left.append(f"{cls.__name__} loss ({modeling.__name__} has no slice_logits_to_keep: run as it is)")
        return
    hf_model.forward = LMLossForward(hf_model, cache_name, softcap, in_module)
    counts["linear_cross_entropy"] += 1


def _version():
    import transformers

    return transformers.__version__
