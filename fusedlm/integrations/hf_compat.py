"""What the installed transformers offers, found out rather than assumed from a version number.

patch_model replaces a module's forward with a fused one only where it knows what the original computes.
transformers changes its modules between releases (5.17 -> 5.25 renamed ``past_key_values`` to ``cache``,
turned the rotary function into an ``nn.Module`` when Hugging Face's ``kernels`` package is installed,
moved attention weights to output-capturing hooks), so each hook is checked on the installed version:

- ``known_forward(cls, role)``: the original forward's code, parsed, with its docstring, comments and
  type annotations dropped and ``past_key_values`` read as ``cache``, hashes to one of the forms fusedlm's
  replacement was written against (``KNOWN_FORWARDS``, collected on transformers 5.17 and 5.25). Another
  form means the module does something the fused forward might not: patch_model leaves it and says so.
- ``causal_lm_loss()``: transformers' ``ForCausalLMLoss``, when its code (and ``fixed_cross_entropy``'s)
  is a known form: the loss a causal LM's patched forward reproduces through linear_cross_entropy.
- ``cache_keyword(fn)``: the name under which a layer's forward takes the KV cache.
- ``rotary_matches(fn)``: the modeling module's ``apply_rotary_pos_emb`` (a function, or the kernels
  package's module around one) gives Llama's rotate-half rotary on small float64 inputs.
- ``has_mask_part(name)``: whether ``transformers.masking_utils`` has a mask factory (5.17 has no
  ``remap_positions_for_packed_sequence``).
- ``weights_requested(module, kwargs)``: whether this forward must return attention weights: the
  ``output_attentions`` keyword where the model passes it down (5.17), else the output-capturing hooks'
  collector or the config (5.24+: the weights are collected from the attention module's output by hooks).
"""
import ast
import functools
import hashlib
import inspect
import textwrap

import torch

# role -> digests of the original forwards the fused replacement reproduces (see _digest). To add a form:
# check that the fused forward computes what the new original does, then add its digest (printed by
# ``python -m fusedlm.integrations.hf_compat``) here.
KNOWN_FORWARDS = {
    "rms_norm": {"927263a8c5df472e"},          # Llama/Mistral/Qwen2RMSNorm, 5.17 .. 5.25
    "mlp": {"8253ce8eb6523737"},               # Llama/Mistral/Qwen2MLP: down(act(gate(x)) * up(x))
    "decoder_layer": {"55fe046bf772616c"},     # Llama/Mistral/Qwen2DecoderLayer (past_key_values or cache)
    "post_norm_output": {"b6fae13c95780ce6"},  # Bert/Roberta/DebertaV2 (Self)Output: LayerNorm(drop(dense(h)) + x)
    "deberta_attention": {"9ce6c9969b7ab3ba",  # DisentangledSelfAttention.forward
                          "ff8b81300809ed0f"},  # and its disentangled_attention_bias
    "causal_lm": {"021a068ad35f4cb2",          # Llama/Mistral/Qwen2ForCausalLM.forward, 5.17 (inline slice)
                  "1aa18027679774d7"},         # 5.25 (slice_logits_to_keep)
    "causal_lm_softcap": {"0a0a08a58e749a95",  # Gemma2ForCausalLM.forward (final_logit_softcapping), 5.17
                          "054da0ceaffc0d53"},  # 5.25
    "causal_lm_loss": {"dac3d0e00862a0a7",     # transformers.loss.loss_utils.ForCausalLMLoss, 5.17 .. 5.25
                       "c6282422ff29c191"},     # and the fixed_cross_entropy it calls
}


class _Normalise(ast.NodeTransformer):
    """Drops annotations and reads past_key_values as cache (the 5.2x rename), so that only what the code
    computes is compared."""

    RENAMES = {"past_key_values": "cache"}

    def visit_Name(self, node):
        node.id = self.RENAMES.get(node.id, node.id)
        return node

    def visit_keyword(self, node):
        node.arg = self.RENAMES.get(node.arg, node.arg)
        self.generic_visit(node)
        return node

    def visit_arg(self, node):
        node.arg = self.RENAMES.get(node.arg, node.arg)
        node.annotation = None
        return node

    def visit_AnnAssign(self, node):  # x: T = v  ->  x = v
        if node.value is None:
            return None
        return ast.copy_location(ast.Assign(targets=[node.target], value=self.visit(node.value)), node)

    def visit_FunctionDef(self, node):
        node.name = "_"  # what it computes, not what it is called
        node.returns = None
        node.decorator_list = []
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        self.generic_visit(node)
        return node


def _digest(fn):
    """A short hash of what ``fn``'s code computes, or None when its source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None
    node = _Normalise().visit(tree.body[0])
    return hashlib.sha256(ast.dump(node, annotate_fields=False).encode()).hexdigest()[:16]


def forward_digest(cls, method="forward"):
    fn = getattr(cls, method, None)
    return None if fn is None else _digest(fn)


def known_forward(cls, role, methods=("forward",)):
    """True when every one of ``cls``'s ``methods`` is a form the fused replacement for ``role`` was
    written against."""
    return all(forward_digest(cls, m) in KNOWN_FORWARDS[role] for m in methods)


def causal_lm_loss():
    """transformers' ``ForCausalLMLoss`` when it and the ``fixed_cross_entropy`` it calls are the forms
    fusedlm's loss reproduces (shift, ignore_index, num_items_in_batch, shift_labels), else None."""
    try:
        from transformers.loss import loss_utils
    except ImportError:
        return None
    fns = (getattr(loss_utils, "ForCausalLMLoss", None), getattr(loss_utils, "fixed_cross_entropy", None))
    if any(fn is None or _function_digest(fn) not in KNOWN_FORWARDS["causal_lm_loss"] for fn in fns):
        return None
    return fns[0]


@functools.lru_cache(maxsize=None)
def _function_digest(fn):  # asked on every training forward of a patched causal LM: read each function once
    return _digest(fn)


def cache_keyword(fn):
    """"cache" or "past_key_values": the keyword under which ``fn`` takes the KV cache (None: neither)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _rotate_half_rotary(q, k, cos, sin):
    """Llama's rotary on (B, H, S, D) with cos / sin (B, S, D): x * cos + rotate_half(x) * sin."""
    def rotate(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


@functools.lru_cache(maxsize=None)
def _rotary_matches_cached(fn):
    # On the CPU whatever the default device is: models are built (and patched) under torch.device("meta").
    g = torch.Generator().manual_seed(0)
    kw = dict(generator=g, dtype=torch.float64, device="cpu")
    q, k = torch.randn(2, 3, 5, 8, **kw), torch.randn(2, 1, 5, 8, **kw)
    angle = torch.randn(2, 5, 4, **kw).repeat(1, 1, 2)
    cos, sin = angle.cos(), angle.sin()
    try:
        with torch.no_grad():
            got = fn(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - another signature: not the function the fused one replaces
        return False
    want = _rotate_half_rotary(q, k, cos, sin)
    return (isinstance(got, tuple) and len(got) == 2
            and all(isinstance(g_, torch.Tensor) and g_.shape == w.shape and torch.allclose(g_, w, atol=1e-12)
                    for g_, w in zip(got, want)))


def rotary_matches(fn):
    """True when ``fn(q, k, cos, sin)`` is Llama's rotate-half rotary (checked once per function)."""
    try:
        return _rotary_matches_cached(fn)
    except TypeError:  # unhashable callable: check it uncached
        return _rotary_matches_cached.__wrapped__(fn)


def has_mask_part(name):
    from transformers import masking_utils

    return callable(getattr(masking_utils, name, None))


def _capturing_collector():
    """The output-capturing hooks' collector of the running forward (transformers >= 5.24), or None."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    var = getattr(output_capturing, "_active_collector", None)
    try:
        return var.get() if var is not None else None
    except LookupError:
        return None


def weights_requested(module, kwargs):
    """Whether the caller wants this attention call's weights (see the module docstring)."""
    if "output_attentions" in kwargs:
        return bool(kwargs["output_attentions"])
    collector = _capturing_collector()
    if isinstance(collector, dict):
        return "attentions" in collector
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


if __name__ == "__main__":  # digests of the installed transformers' forwards, for KNOWN_FORWARDS
    import importlib

    import transformers

    print("transformers", transformers.__version__)
    for modname, names in [("llama", "LlamaRMSNorm LlamaMLP LlamaDecoderLayer LlamaForCausalLM"),
                           ("mistral", "MistralRMSNorm MistralMLP MistralDecoderLayer MistralForCausalLM"),
                           ("qwen2", "Qwen2RMSNorm Qwen2MLP Qwen2DecoderLayer Qwen2ForCausalLM"),
                           ("gemma2", "Gemma2ForCausalLM"),
                           ("bert", "BertSelfOutput BertOutput"), ("roberta", "RobertaSelfOutput RobertaOutput"),
                           ("deberta_v2", "DebertaV2SelfOutput DebertaV2Output DisentangledSelfAttention")]:
        modeling = importlib.import_module(f"transformers.models.{modname}.modeling_{modname}")
        for name in names.split():
            cls = getattr(modeling, name)
            extra = ["disentangled_attention_bias"] if name == "DisentangledSelfAttention" else []
            print(f"{name:28s}", *(f"{m}={forward_digest(cls, m)}" for m in ["forward", *extra]))
    from transformers.loss import loss_utils

    for name in ("ForCausalLMLoss", "fixed_cross_entropy"):
        print(f"{name:28s}", f"function={_digest(getattr(loss_utils, name))}")
