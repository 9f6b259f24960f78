"""Generation for the reference causal LM (Llama): a static KV cache on ``fusedlm.kv_cache_attention``,
greedy and sampled decoding (temperature, top-k, top-p), eos, a batch of left-padded prompts.

Static cache (gpt-fast's): per layer keys / values (B, S_max, Hkv, D) allocated once for prompt +
max_new_tokens, and ``seqlens`` int32 (B,) on the device, advanced by tensor ops. Sequence b keeps its
real tokens at cache slots 0, 1, ..., so a token's slot is also its rotary position: transformers counts
positions over real tokens only (``attention_mask.cumsum(-1) - 1``), and so does this cache.

Prefill: each prompt's real tokens moved to the front of its row (left padding becomes right padding),
the whole (B, S) block written at slots [0, S) with causal attention (query i sees slots <= i, so a real
token sees only real ones), then ``seqlens`` set to the real lengths: the pads written past them are
never read and the next tokens overwrite them.

Decode step (``decode_step``): one token per sequence through the layers (kv_cache_attention with Lq = 1
and the new k / v), the norm, lm_head and the pick. Tensor ops only: no ``.item()``, no Python branch on
a tensor's value, so ``torch.compile(fullgraph=True)`` takes it and a CUDA graph can capture it. The
random draws (exponential noise for sampling) are made outside the step with the caller's generator
and passed in. Whether every sequence has finished is read back only every ``STOP_CHECK`` steps, outside
the step; the output is then trimmed where transformers would have stopped.

Shapes: B batch, S prompt (padded) length, L new tokens per call (S at prefill, 1 when decoding),
S_max cache capacity, H / Hkv query / key-value heads, D head dim, V vocab.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import fusedlm

from . import _common as C

STOP_CHECK = 8  # decode steps between read-backs of "every sequence finished" (a host sync each)


@dataclass
class StaticCache:
    keys: list            # per layer (B, S_max, Hkv, D), rotated keys
    values: list          # per layer (B, S_max, Hkv, D)
    seqlens: torch.Tensor  # int32 (B,): tokens each sequence holds
    cos: torch.Tensor     # (S_max, D) rotary table at positions 0 .. S_max - 1, in the model's dtype
    sin: torch.Tensor

    @classmethod
    def allocate(cls, model, batch, capacity):
        """An empty cache for ``model`` (a LlamaForCausalLM): ``batch`` sequences of up to ``capacity`` tokens."""
        cfg, w = model.config, model.lm_head.weight
        shape = (batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        cos, sin = model.model.rotary_emb(torch.arange(capacity, device=w.device), w.dtype)
        return cls([w.new_zeros(shape) for _ in layers], [w.new_zeros(shape) for _ in layers],
                   torch.zeros(batch, dtype=torch.int32, device=w.device), cos, sin)


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits: argmax, or a draw from softmax(logits / temperature)
    restricted to the top_k tokens and then to the smallest set holding top_p of the probability
    (transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in that order)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None


# ---------------------------------------------------------------------------------------------------
# The model over the cache


def _attend_plain(q, k, v, k_cache, v_cache, seqlens, cos, sin):
    """kv_cache_attention in plain PyTorch, the way transformers computes it (rotary in the model's dtype,
    sdpa with a bool mask): q (B, L, H, D), k, v (B, L, Hkv, D) written at slots seqlens[b] + [0, L)."""
    B, L = q.shape[:2]
    pos = seqlens.long()[:, None] + torch.arange(L, device=q.device)  # (B, L) slot = rotary position
    q, k = (t.unflatten(0, (B, L)) for t in C.apply_rope(q.flatten(0, 1), k.flatten(0, 1), cos[pos].flatten(0, 1),
                                                         sin[pos].flatten(0, 1), use_kernels=False))
    rows = (torch.arange(B, device=q.device)[:, None].expand(B, L), pos)
    k_cache.index_put_(rows, k)
    v_cache.index_put_(rows, v)
    slots = torch.arange(k_cache.shape[1], device=q.device)
    allowed = slots[None, None, :] <= pos[:, :, None]  # (B, L, S_max): causal, hence within the sequence
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         attn_mask=allowed[:, None], enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)  # (B, L, H, D)


def _attention(attn, h, cache, layer):
    """LlamaAttention over the cache: h (B, L, hidden) -> (B, L, hidden); writes this layer's keys."""
    B, L, _ = h.shape
    D = attn.config.head_dim
    q = attn.q_proj(h).view(B, L, -1, D)  # (B, L, H, D)
    k = attn.k_proj(h).view(B, L, -1, D)  # (B, L, Hkv, D)
    v = attn.v_proj(h).view(B, L, -1, D)
    kc, vc = cache.keys[layer], cache.values[layer]
    if attn.config.use_kernels:  # rotary fused into the cache write
        out = fusedlm.kv_cache_attention(q, kc, vc, cache.seqlens, k=k, v=v, cos=cache.cos, sin=cache.sin)
    else:
        out = _attend_plain(q, k, v, kc, vc, cache.seqlens, cache.cos, cache.sin)
    return attn.o_proj(out.reshape(B, L, -1))


def forward_cached(model, ids, cache):
    """ids (B, L) at slots cache.seqlens[b] + [0, L) -> final hidden states (B, L, hidden); fills the cache
    there (``cache.seqlens`` is not advanced: that is the caller's)."""
    x, residual = model.model.embed_tokens(ids), None
    for i, layer in enumerate(model.model.layers):  # LlamaDecoderLayer.forward, attention over the cache
        h, residual = layer.input_layernorm(x, residual)
        x = _attention(layer.self_attn, h, cache, i)
        h, residual = layer.post_attention_layernorm(x, residual)
        x = layer.mlp(h)
    return model.model.norm(x, residual)[0]


# ---------------------------------------------------------------------------------------------------
# Picking the next token


def _filtered(logits, sampling):
    """float32 logits (B, V) scaled by 1 / temperature, -inf outside top_k and outside top_p."""
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ascending, order = torch.sort(logits, dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - sampling.top_p  # the tail holding <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def pick(logits, sampling, noise=None):
    """The next token (B,) int64 from logits (B, V): argmax, or with ``sampling.do_sample`` a draw made by
    the exponential race argmax(p / noise), noise ~ Exp(1) (B, V): the same law as torch.multinomial(p, 1),
    with no host synchronisation and the randomness drawn by the caller."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    probs = _filtered(logits.float(), sampling).softmax(-1)
    return (probs / noise).argmax(-1)


def _finish(token, finished, eos, pad):
    """A finished sequence emits ``pad``; one that emits an eos (int64 (E,)) finishes. -> (token, finished)."""
    token = torch.where(finished, torch.full_like(token, pad), token)
    return token, finished | (token[:, None] == eos[None, :]).any(-1)


@torch.no_grad()
def decode_step(model, cache, token, finished, eos, pad, sampling, noise=None):
    """One decode step: token (B,) int64, the last one picked, into the cache; -> (next token (B,),
    finished (B,) bool). Advances ``cache.seqlens`` by one in place. Tensor ops only (compilable with
    fullgraph, capturable in a CUDA graph); ``eos`` int64 (E,) (E = 0: no eos), ``pad`` an int,
    ``noise`` (B, V) float32 Exp(1) draws when sampling."""
    hidden = forward_cached(model, token[:, None], cache)[:, 0]  # (B, hidden)
    cache.seqlens.add_(1)
    nxt = pick(model.lm_head(hidden), sampling, noise)
    return _finish(nxt, finished, eos, pad)


# ---------------------------------------------------------------------------------------------------
# generate


def _check(input_ids, max_new_tokens, attention_mask, sampling):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids: expected an integer tensor (B, S), got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (that of input_ids), got "
                         f"{tuple(attention_mask.shape)}")
    if sampling.do_sample:
        if not sampling.temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {sampling.temperature}")
        if sampling.top_k is not None and (not isinstance(sampling.top_k, int) or sampling.top_k < 1):
            raise ValueError(f"top_k: expected None or an int >= 1, got {sampling.top_k!r}")
        if sampling.top_p is not None and not 0 < sampling.top_p <= 1:
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {sampling.top_p!r}")


_compiled = None


def compiled_decode_step():
    """decode_step under torch.compile(fullgraph=True), made once."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(decode_step, fullgraph=True)
    return _compiled


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, attention_mask=None, *, do_sample=False, temperature=1.0,
             top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, generator=None, compile=False):
    """See LlamaForCausalLM.generate."""
    sampling = Sampling(do_sample, float(temperature), top_k, None if top_p is None else float(top_p))
    _check(input_ids, max_new_tokens, attention_mask, sampling)
    device = model.lm_head.weight.device
    ids = input_ids.to(device)
    if max_new_tokens == 0:
        return ids
    B, S = ids.shape
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)  # transformers pads with the eos when unset
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)

    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    lengths = real.sum(1)  # (B,)
    front = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices  # real tokens first, in order
    cache = StaticCache.allocate(model, B, S + max_new_tokens)
    hidden = forward_cached(model, ids.gather(1, front), cache)  # (B, S, hidden)
    cache.seqlens.copy_(lengths)
    last = hidden.gather(1, (lengths - 1).clamp(min=0)[:, None, None].expand(B, 1, hidden.shape[-1]))[:, 0]
    logits = model.lm_head(last)  # (B, V)

    def noise():
        if not do_sample:
            return None
        return torch.empty(logits.shape, dtype=torch.float32, device=device).exponential_(generator=generator)

    step = compiled_decode_step() if compile else decode_step
    token, finished = _finish(pick(logits, sampling, noise()), torch.zeros_like(real[:, 0]), eos_t, pad)
    tokens, all_done = [token], [finished.all()]
    for t in range(1, max_new_tokens):
        if eos and t % STOP_CHECK == 0 and bool(all_done[-1]):
            break
        token, finished = step(model, cache, token, finished, eos_t, pad, sampling, noise())
        tokens.append(token)
        all_done.append(finished.all())
    new = torch.stack(tokens, 1)  # (B, steps)
    if eos:  # transformers stops at the step where the last sequence finished
        done = torch.stack(all_done)
        new = new[:, :int(done.int().argmax()) + 1] if bool(done.any()) else new
    return torch.cat([ids, new], dim=1)
