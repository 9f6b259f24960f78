"""The "fusedlm" entry of transformers' attention registry: an attention function and its mask function.

How a registered attention runs in transformers 5 (masking_utils.py, modeling_utils.py): the model
builds its mask once per forward through ``ALL_MASK_ATTENTION_FUNCTIONS[impl]`` (here
:func:`fusedlm_attention_mask`); without an entry there transformers builds no mask at all and padding
and causality would be silently lost. Then every attention layer calls ``ALL_ATTENTION_FUNCTIONS[impl]``
(here :func:`fusedlm_attention_forward`) with query (B, H, L, D), key / value (B, Hkv, S, D), that mask
and keywords (dropout, scaling, sliding_window, is_causal, position_ids, cu_seq_lens_q/k with
max_length_q/k, output_attentions, softcap, s_aux, ...) and expects ``(output (B, L, H, Dv), weights)``.

Like transformers' FlashAttention path (and unlike its sdpa path), the mask function builds no
(B, 1, L, S) mask for the standard patterns: it hands over the 2-D padding mask (B, S) or None, and
the attention function turns causality, windows and padding into kernel arguments:

    no mask or padding (B, S), L == S    scaled_dot_product_attention(is_causal, key_padding_mask, window)
    KV cache, one query (L == 1 < S)     the keys outside the window dropped; nothing else to mask
                                         (scaled_dot_product_attention then runs the split-KV decode
                                         kernel of kv_cache_attention)
    static cache, one query: a           its row as the key padding mask, as above
    (B, 1, 1, S) bool mask
    KV cache, L > 1 queries, causal      varlen_attention on the unpadded tokens: its causal mask aligns
                                         bottom-right per sequence, the KV-cache alignment (the
                                         queries are the last L positions)
    cu_seq_lens_q/k given, or position   varlen_attention over the packed sequences (as FlashAttention)
    ids restarting in a batch of one
    a (B, 1, L, S) mask                  scaled_dot_product_attention(attn_mask=...), bool or additive

A mask pattern the mask function does not recognise (a model's or_/and_mask_function overlays,
chunked or bidirectional-window attention, several packed rows in one batch) gets the full bool mask
that transformers' sdpa path builds, so it stays right. What the kernels cannot serve (attention
weights for ``output_attentions``, logit softcapping, attention sinks, a position bias) runs the
model's own eager attention for that call, on a mask built to the same rules (transformers' sdpa
function would return no weights and refuses softcapping), or its sdpa function where the model has
no eager one.
"""
import functools
import inspect
import sys

import torch

from ..ops.attention import scaled_dot_product_attention, varlen_attention
from ..ops.padding import pad_input, unpad_input
from . import hf_compat

# Keywords of the ops that newer versions of fusedlm accept; where they are missing the same
# semantics come from a bool mask (correct, but it costs an (L, S) mask).
_SDPA_WINDOW = "window_size" in inspect.signature(scaled_dot_product_attention).parameters
_VARLEN_WINDOW = "window_size" in inspect.signature(varlen_attention).parameters
_VARLEN_DROPOUT = "dropout_p" in inspect.signature(varlen_attention).parameters
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# The mask function
# ----------------------------------------------------------------------------------------------

def _closure(fn):
    """A function's free variables by name (what a transformers mask factory captured)."""
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def _factory_codes(mu):
    """{code object of a mask factory's inner function: its part} for the factories this transformers'
    masking_utils has (5.17 has no remap_positions_for_packed_sequence)."""
    makers = {
        "window": lambda: mu.sliding_window_overlay(1),
        "packed": lambda: mu.packed_sequence_mask_function(None),
        "remap": lambda: mu.remap_positions_for_packed_sequence(mu.causal_mask_function, None),
        "and": lambda: mu.and_masks(mu.causal_mask_function),
    }
    codes = {mu.causal_mask_function.__code__: "causal", mu.bidirectional_mask_function.__code__: "bidirectional"}
    for part, make in makers.items():
        try:
            codes[make().__code__] = part
        except (AttributeError, TypeError):  # this version has no such factory (or another signature)
            continue
    return codes


def _mask_parts(mask_function, mu, closures=True):
    """The parts a transformers mask function is built of, as a set of names among "causal",
    "bidirectional", "window" (a causal sliding window) and "packed", or None when any part is not one
    of these (recognised by the code object of the factories' inner functions). ``closures=False``: the
    combinators' closures may not be read (torch.compile cannot), so only a bare factory is recognised."""
    code = getattr(mask_function, "__code__", None)
    part = _factory_codes(mu).get(code) if code is not None else None
    if part in ("causal", "bidirectional", "window", "packed"):
        return {part}
    if not closures:
        return None
    if part == "remap":
        inner = _mask_parts(_closure(mask_function)["mask_function"], mu)
        return None if inner is None else inner | {"packed"}
    if part == "and":
        parts = set()
        for sub_function in _closure(mask_function)["mask_functions"]:
            sub = _mask_parts(sub_function, mu)
            if sub is None:
                return None
            parts |= sub
        return parts
    return None


def _is_standard(parts, batch_size):
    """True for the patterns the attention function rebuilds from its arguments: causal (with a sliding
    window, packed), bidirectional; packed only in a batch of one (how the attention detects it)."""
    if parts is None or ("causal" in parts) == ("bidirectional" in parts):
        return False
    if "window" in parts and "causal" not in parts:
        return False
    return "packed" not in parts or batch_size == 1


def fusedlm_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                           attention_mask=None, **kwargs):
    """transformers' mask function for "fusedlm": the 2-D bool padding mask (B, S) or None.

    As for FlashAttention the mask is sliced to the last ``kv_length`` keys (sliding-window caches) and
    is None when nothing is padded. Patterns that the attention cannot rebuild from its arguments get
    transformers' sdpa mask, a (B, 1, L, S) bool tensor (see the module docstring).

    A static cache (more key slots than the 2-D mask has columns: the slots past it are empty; or a decoding
    step for which transformers passes ``allow_is_causal_skip=False``, its sign of a compileable cache) gets
    the sdpa mask too, so that keys keep the cache's fixed length and the mask one shape at every step: no
    recompile per token under torch.compile, attention weights as wide as transformers' own.

    Under torch.compile nothing here may depend on tensor values (a guard on them recompiles every step,
    or breaks ``fullgraph=True``) and a mask factory's closure cannot be read: the 2-D mask is handed over
    as it is (no "is anything padded" check), only a bare causal / bidirectional factory counts as standard,
    and whenever the queries are not the whole sequence (decoding, chunked prefill) the sdpa mask is
    built: static shapes, no unpadding (for one query it is only (B, 1, 1, S)).
    """
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    compiling = torch.compiler.is_compiling()
    standard = _is_standard(_mask_parts(mask_function, mu, closures=not compiling), batch_size)
    if compiling and q_length != kv_length:
        standard = False
    if attention_mask is not None and attention_mask.shape[-1] < kv_length:
        standard = False  # a static cache's empty slots: keys keep their full, fixed length
    if q_length == 1 and kwargs.get("allow_is_causal_skip") is False:
        # transformers says so for a compileable (static) cache's decoding step: the same (B, 1, 1, S) mask at
        # every step, the last one too (where the 2-D mask has grown to the cache's length)
        standard = False
    if not standard:
        kwargs.pop("allow_is_causal_skip", None)
        kwargs.pop("allow_is_bidirectional_skip", None)
        return mu.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                            allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if not compiling and attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


# ----------------------------------------------------------------------------------------------
# Masks as bool tensors, for what no kernel argument expresses
# ----------------------------------------------------------------------------------------------

def _token_coords(n_q, n_k, segments, device):
    """(segment, position) of every query and key. Queries sit at the last positions of their sequence
    (bottom-right: a KV cache's new tokens), keys from 0."""
    if segments is None:
        zeros_q = torch.zeros(n_q, dtype=torch.long, device=device)
        zeros_k = torch.zeros(n_k, dtype=torch.long, device=device)
        return zeros_q, torch.arange(n_q, device=device) + (n_k - n_q), zeros_k, torch.arange(n_k, device=device)
    cu_q, cu_k = segments[0].long(), segments[1].long()
    lens_q, lens_k = cu_q.diff(), cu_k.diff()
    seq = torch.arange(lens_q.numel(), device=device)
    seg_q = torch.repeat_interleave(seq, lens_q, output_size=n_q)
    seg_k = torch.repeat_interleave(seq, lens_k, output_size=n_k)
    pos_q = torch.arange(n_q, device=device) - cu_q[seg_q] + (lens_k - lens_q)[seg_q]
    pos_k = torch.arange(n_k, device=device) - cu_k[seg_k]
    return seg_q, pos_q, seg_k, pos_k


def _dense_mask(batch, n_q, n_k, key_padding_mask, causal, window, segments, device):
    """(B, 1, L, S) bool, True = attends: the same sequence, causal (bottom-right), within the window
    (``W - 1`` keys back, and ahead too when not causal: FlashAttention's reading), not padding."""
    seg_q, pos_q, seg_k, pos_k = _token_coords(n_q, n_k, segments, device)
    allowed = seg_q[:, None] == seg_k[None, :]
    offset = pos_q[:, None] - pos_k[None, :]  # how far key j lies behind query i
    if causal:
        allowed &= offset >= 0
    if window is not None:
        allowed &= offset <= window - 1
        if not causal:
            allowed &= offset >= 1 - window
    allowed = allowed[None, None].expand(batch, 1, n_q, n_k)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


@functools.lru_cache(maxsize=2)
def _band(n_q, n_k, causal, window, device):
    """(L, S) bool window mask, made once per shape: every windowed layer of a forward asks for the same
    one (two kept at most: each is L * S bytes). Made outside inference mode, so that a mask cached
    during generation can be saved for a backward later."""
    with torch.inference_mode(False):
        return _dense_mask(1, n_q, n_k, None, causal, window, None, device)[0, 0]


# ----------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------

def _fallback_reason(module, query, key, value, attention_mask, softcap, kwargs):
    if hf_compat.weights_requested(module, kwargs):
        return "output_attentions (the fused kernels return no attention weights)"
    if softcap is not None:
        return "logit softcapping"
    for name in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            return name
    if query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype}"
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
            return "a mask that is neither (B, S) nor (B, 1, L, S)"
        if attention_mask.dim() == 4 and attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
            return f"a {attention_mask.dtype} 4-D mask"
    return None


def _is_packed(position_ids, batch, n_q):
    """Position ids that restart inside a batch of one (transformers' _is_packed_sequence)."""
    if position_ids is None or batch != 1 or n_q == 1 or tuple(position_ids.shape) != (1, n_q):
        return False
    if torch.compiler.is_compiling():  # transformers then saw the packing and built a 4-D mask (see above)
        return False
    increasing = torch.arange(n_q, device=position_ids.device) + position_ids.min()
    return bool((increasing != position_ids[0]).any())


def _segments(query, attention_mask, kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) of a padding-free packed batch, else None: the
    cu_seq_lens_* keywords, or position ids that restart (as transformers' FlashAttention path)."""
    if attention_mask is not None:
        return None
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    cu_q, cu_k, max_q, max_k = (kwargs.get(n) for n in names)
    if any(x is None for x in (cu_q, cu_k, max_q, max_k)):
        if not _is_packed(kwargs.get("position_ids"), query.shape[0], query.shape[2]):
            return None
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(kwargs["position_ids"])
    return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)


def _window_kw(window, causal):
    return {"window_size": (window - 1, 0 if causal else window - 1)}


def _sdpa(query, key, value, key_padding_mask, causal, window, dropout, scale):
    """(B, H, L, E) attention with L == S (or not causal); returns (B, L, H, Ev)."""
    extra = {}
    if window is not None:
        if _SDPA_WINDOW and query.shape[2] == key.shape[2]:  # window_size aligns top-left, as is_causal
            extra = _window_kw(window, causal)
        else:
            extra["attn_mask"] = _band(query.shape[2], key.shape[2], causal, window, query.device)
    out = scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=causal, scale=scale,
                                       enable_gqa=query.shape[1] != key.shape[1], key_padding_mask=key_padding_mask,
                                       **extra)
    return out.transpose(1, 2)


def _varlen(q, k, v, segments, causal, window, dropout, scale):
    """Packed (total, H, E) attention; falls to a bool mask where this fusedlm's varlen_attention lacks
    the window or the dropout. Returns (total_q, H, Ev)."""
    cu_q, cu_k, max_q, max_k = segments
    if (window is None or _VARLEN_WINDOW) and (dropout == 0.0 or _VARLEN_DROPOUT):
        extra = {} if window is None else _window_kw(window, causal)
        if dropout:
            extra["dropout_p"] = dropout
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale, **extra)
    mask = _dense_mask(1, q.shape[0], k.shape[0], None, causal, window, segments, q.device)
    out = scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, dropout_p=dropout, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def _fused_attention(query, key, value, attention_mask, dropout, scale, causal, window, kwargs):
    """Dispatch to the fused ops (see the module docstring); returns (B, L, H, Ev)."""
    B, H, L, _ = query.shape
    S = key.shape[2]
    segments = _segments(query, attention_mask, kwargs)
    if segments is not None:  # padding-free: (B * L, H, E) tokens
        q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
        return _varlen(q, k, v, segments, causal, window, dropout, scale).view(B, L, H, -1)
    if (attention_mask is not None and attention_mask.dim() == 4 and L == 1 and attention_mask.dtype == torch.bool
            and attention_mask.shape[1] == 1):
        # one query over a static cache: its (B, 1, 1, S) mask is a key padding mask (a view: no sync, and
        # scaled_dot_product_attention then takes the split-KV decode kernel)
        return _sdpa(query, key, value, attention_mask[:, 0, 0, :].expand(B, S), False, None, dropout, scale)
    if attention_mask is not None and attention_mask.dim() == 4:  # it says everything, as in sdpa
        out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           scale=scale, enable_gqa=H != key.shape[1])
        return out.transpose(1, 2)
    padding = attention_mask
    if L == 1 and S > 1 and causal:  # one new token: it sees every cached key, the window aside
        if window is not None and S > window:
            key, value = key[:, :, -window:], value[:, :, -window:]
            padding = None if padding is None else padding[:, -window:]
        return _sdpa(query, key, value, padding, False, None, dropout, scale)
    if L == S or not causal:
        return _sdpa(query, key, value, padding, causal, window, dropout, scale)
    # L > 1 new tokens against a longer cache, causal: bottom-right alignment through varlen_attention
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, L|S, heads, E)
    if padding is None:
        step_q = torch.arange(B + 1, dtype=torch.int32, device=query.device)
        segments = (step_q * L, step_q * S, L, S)
        out = _varlen(q.reshape(B * L, H, -1), k.reshape(B * S, *k.shape[2:]), v.reshape(B * S, *v.shape[2:]),
                      segments, True, window, dropout, scale)
        return out.view(B, L, H, -1)
    q_u, indices_q, cu_q, max_q = unpad_input(q, padding[:, -L:])
    k_u, indices_k, cu_k, max_k = unpad_input(k, padding)
    v_u = v.reshape(B * S, *v.shape[2:]).index_select(0, indices_k)
    out = _varlen(q_u, k_u, v_u, (cu_q, cu_k, max_q, max_k), True, window, dropout, scale)
    return pad_input(out, indices_q, B, L)


def _fallback(module, query, key, value, attention_mask, dropout, scaling, causal, window, softcap, kwargs):
    """The model's own eager attention (or transformers' sdpa) on a mask built to the same rules."""
    B, _, L, _ = query.shape
    S = key.shape[2]
    if attention_mask is None or attention_mask.dim() == 2:
        segments = _segments(query, attention_mask, kwargs)
        attention_mask = _dense_mask(B, L, S, attention_mask, causal, window, segments, query.device)
    if softcap is not None:
        kwargs["softcap"] = softcap
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=False, **kwargs)
    if attention_mask.dtype == torch.bool:  # eager adds the mask to the scores
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def fusedlm_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers' attention function for "fusedlm" (``AttentionInterface``).

    query (B, H, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev); attention_mask what
    :func:`fusedlm_attention_mask` returned, or a (B, 1, L, S) mask a caller passed. Returns
    ``(output (B, L, H, Ev), None)``, or the eager path's ``(output, weights)`` where it falls back.
    """
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = int(sliding_window) if sliding_window else None
    if attention_mask is not None and attention_mask.dim() == 2:
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.bool()
        if key.shape[2] > attention_mask.shape[1]:  # a static cache: slots past the mask hold nothing yet
            key, value = key[:, :, :attention_mask.shape[1]], value[:, :, :attention_mask.shape[1]]
        if tuple(attention_mask.shape) != (query.shape[0], key.shape[2]):
            raise ValueError(f"attention_mask: expected a (batch, key length) = {(query.shape[0], key.shape[2])} "
                             f"padding mask, got shape {tuple(attention_mask.shape)}")
    if _fallback_reason(module, query, key, value, attention_mask, softcap, kwargs) is not None:
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, causal, window, softcap, kwargs)
    return _fused_attention(query, key, value, attention_mask, dropout, scaling, causal, window, kwargs), None


def register():
    """Add "fusedlm" to transformers' attention registry and its mask registry (idempotent).

    Then ``AutoModel.from_config(cfg, attn_implementation="fusedlm")``, ``from_pretrained(...,
    attn_implementation="fusedlm")`` and ``model.set_attn_implementation("fusedlm")`` work for every
    model that uses the registry.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("fusedlm", fusedlm_attention_forward)
    AttentionMaskInterface.register("fusedlm", fusedlm_attention_mask)
