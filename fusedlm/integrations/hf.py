"""Hugging Face drop-in: fusedlm's kernels inside transformers (and PEFT) models.

    from fusedlm.integrations import hf

    hf.register()                       # "fusedlm" in transformers' attention + mask registries
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fusedlm")
    counts = hf.patch_model(model)      # in place: attention, norms, SwiGLU, rotary, DeBERTa attention, LoRA

``register`` and the attention it registers: hf_attention.py. ``patch_model`` (what it replaces per
model family, and how): hf_patch.py; DeBERTa-v2's attention: hf_deberta.py. transformers (and peft, for
LoRA layers) must be installed to use this module; ``import fusedlm`` does not need them.
"""
from .hf_attention import fusedlm_attention_forward, fusedlm_attention_mask, register
from .hf_patch import COUNT_KEYS, patch_model

__all__ = ["register", "patch_model", "COUNT_KEYS", "fusedlm_attention_forward", "fusedlm_attention_mask"]
