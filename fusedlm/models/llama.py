"""Llama (Llama 2 / 3 and the models shaped like it) as a causal LM on fusedlm's ops.

Pre-norm decoder: RMSNorm with the residual add fused into it, rotary position embedding (rope_theta,
"linear" and "llama3" scaling), grouped-query causal attention over packed sequences, SwiGLU MLP.
Module and parameter names are transformers' LlamaForCausalLM's, so its state dict loads unchanged.

Shapes: B batch, S padded length, T real (packed) tokens, H / Hkv query / key-value heads, D head dim.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _common as C
from . import generation


def _context_parallel_packing(B, S, device, attention_mask, position_ids, cu_seqlens, group):
    """The packed layout of one rank's shard (fusedlm.distributed.shard_lm_batch): rows of S = L / W tokens, or one
    packed row with the *global* cu_seqlens; positions: position_ids packed, else the shard's global positions."""
    import torch.distributed as dist

    from fusedlm.distributed import shard_positions, varlen_shard_positions

    if attention_mask is not None:
        raise ValueError("attention_mask: expected None with cp_group (padding is not supported under context "
                         "parallelism: pack the sequences with cu_seqlens), got a mask")
    W, r = dist.get_world_size(group), dist.get_rank(group)
    cu_local = None if cu_seqlens is None else torch.div(cu_seqlens.to(device), W, rounding_mode="floor")
    packing = C.make_packing(B, S, device, None, None, cu_local)
    packing.cp_group = group
    if position_ids is not None:
        positions = packing.pack(position_ids.to(device).long().expand(B, S))
    elif cu_seqlens is None:
        positions = shard_positions(S * W, W, r, "zigzag", device).repeat(B)
    else:
        positions = varlen_shard_positions(cu_seqlens.to(device), W, r)
    return packing, positions


def _reject_sharded_positions(position_ids):
    """Without cp_group, position_ids that jump forward to a position other than 0 (3 then 12) are neither one
    sequence nor packed ones restarting at 0: they are what shard_lm_batch gives a context-parallel rank, run as
    if whole. Refused by name (one small read back, as the packing detection already does)."""
    pos = position_ids.long()
    if pos.dim() < 1 or pos.shape[-1] < 2:
        return
    jump = (pos[..., 1:] != pos[..., :-1] + 1) & (pos[..., 1:] != 0)
    if bool(jump.any()):
        r, i = torch.nonzero(jump.reshape(-1, jump.shape[-1]))[0].tolist()
        row = pos.reshape(-1, pos.shape[-1])[r]
        raise ValueError(f"position_ids: expected positions that go up by 1 or restart at 0 (packed sequences), "
                         f"got {int(row[i])} then {int(row[i + 1])} at index {i + 1}; a context-parallel shard "
                         f"(fusedlm.distributed.shard_lm_batch) needs cp_group=, without it nothing is parallel")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: as many as query heads (no GQA)
    head_dim: Optional[int] = None             # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None        # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None      # an int or a list of them: where generate stops a sequence
    use_kernels: bool = True

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: expected a divisor of num_attention_heads "
                             f"({self.num_attention_heads}), got {self.num_key_value_heads}")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act: expected 'silu' (the SwiGLU MLP), got {self.hidden_act!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_scaling: expected rope_type 'default', 'linear' or 'llama3', got {rope_type!r}")

    @classmethod
    def from_hf(cls, hf_config, use_kernels=True):
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"rope_parameters: partial_rotary_factor 1.0 expected for Llama, got {rope}")
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        return C.hf_config_fields(cls, hf_config, rope_theta=theta, rope_scaling=scaling, use_kernels=use_kernels)


def rope_inv_freq(config):
    """(D/2,) float32 inverse frequencies, Hugging Face's for the rope types supported."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":  # positions divided by factor
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":  # long wavelengths divided by factor, short ones kept, a smooth blend between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.inv_freq = nn.Buffer(rope_inv_freq(config), persistent=False)

    def forward(self, positions, dtype):  # positions (T,) -> cos, sin (T, D) in dtype
        freqs = positions[:, None].float() * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class LlamaRMSNorm(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.variance_epsilon, self.config = config.rms_norm_eps, config

    def forward(self, x, residual=None):  # -> (normed, x + residual)
        return C.rms_norm(x, self.weight, self.variance_epsilon, residual, self.config.use_kernels)


class LlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, H, Hkv, D = config, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, Hkv * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, Hkv * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin, packing):  # x (T, hidden), cos / sin (T, D)
        T, D, fast = x.shape[0], self.config.head_dim, self.config.use_kernels
        q = self.q_proj(x).view(T, -1, D)  # (T, H, D)
        k = self.k_proj(x).view(T, -1, D)  # (T, Hkv, D)
        v = self.v_proj(x).view(T, -1, D)
        q, k = C.apply_rope(q, k, cos, sin, fast)
        p = self.config.attention_dropout if self.training else 0.0
        out = C.attention(q, k, v, packing, causal=True, dropout_p=p, use_kernels=fast)  # (T, H, D)
        return self.o_proj(out.reshape(T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, bias = config, config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):  # (T, hidden) -> (T, hidden)
        return self.down_proj(C.swiglu(self.gate_proj(x), self.up_proj(x), self.config.use_kernels))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config)
        self.post_attention_layernorm = LlamaRMSNorm(config)

    def forward(self, x, residual, cos, sin, packing):
        """x: the previous block's output (T, hidden); residual: the stream before it (None in layer 0).
        Returns (this block's output, the stream before it): each add is fused into the next norm."""
        h, residual = self.input_layernorm(x, residual)
        x = self.self_attn(h, cos, sin, packing)
        h, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, x, positions, packing):  # x (T, hidden) embedded tokens, positions (T,)
        cos, sin = self.rotary_emb(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, packing)
        return self.norm(x, residual)[0]  # (T, hidden)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids (B, S), attention_mask=None, position_ids=None, labels=None, *, cu_seqlens=None,
    inputs_embeds=None, return_logits=None) -> CausalLMOutput(loss, logits (B, S, vocab) or None).

    Padded batches: ``attention_mask`` (B, S), 1 = real token; left or right padding; logits are zeros at
    padded positions. Packed sequences: a batch of one with ``cu_seqlens`` (int32 offsets, positions then
    restart at 0 in each sequence) or with ``position_ids`` that restart (a new sequence wherever a position
    is not the previous one + 1, as transformers detects packing). ``labels`` (B, S): the LM loss on
    logits[:, :-1] against labels[:, 1:], -100 ignored, mean over the rest (Hugging Face's loss), and no
    prediction from a padded position (Hugging Face would count the last left pad predicting the first token).
    With ``use_kernels`` the loss is fusedlm.linear_cross_entropy on the final hidden states and the LM head
    (the (tokens, vocab) logits are never made); without, logits then F.cross_entropy.
    ``return_logits``: None (default) returns the logits when no ``labels`` are given and None with them;
    True always returns them (computed for that), False never. ``shift_labels`` (B, S): targets already shifted
    (token t predicts shift_labels[t]), instead of ``labels``.

    Context parallelism: ONLY WITH ``cp_group``. ``cp_group=None`` (the default) means no context parallelism
    at all: the inputs are taken as whole sequences, and a rank's shard passed without its group would attend
    within its own tokens only (position_ids that jump, as a zigzag shard's do, are refused: ValueError).
    With ``cp_group`` (a torch.distributed group of W ranks) and the inputs of one rank from
    ``fusedlm.distributed.shard_lm_batch`` (input_ids (B, S/W) in the zigzag layout, their global position_ids,
    shift_labels, the global cu_seqlens for packed rows): the attention is context-parallel
    (fusedlm.distributed.context_parallel_varlen_attention), rotary positions are the shard's global ones,
    and the loss is the sum over this rank's tokens over the group's token count, all-reduced: the same value on
    every rank. Each rank's backward gives the gradient through its own tokens: sum the parameter gradients over
    the group (FSDP2 over that mesh dimension with ``set_gradient_divide_factor`` leaving a sum, see
    examples/train_long_context.py). No padding mask and no attention dropout there.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_hf(cls, hf_model, use_kernels=True):
        """A model with ``hf_model``'s config (a transformers LlamaForCausalLM) and weights; bos / eos from its
        generation config where it has one (what its generate stops on)."""
        config = LlamaConfig.from_hf(hf_model.config, use_kernels)
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(getattr(hf_model, "generation_config", None), name, None)
            if value is not None:
                setattr(config, name, value)
        return C.load_from_hf(cls(config), hf_model)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, *, cu_seqlens=None,
                inputs_embeds=None, return_logits=None, shift_labels=None, cp_group=None):
        B, S = C._check_ids(input_ids, inputs_embeds)
        device, fast = self.lm_head.weight.device, self.config.use_kernels
        if labels is not None and shift_labels is not None:
            raise ValueError("labels / shift_labels: expected at most one of them, got both")
        if cp_group is None:  # no context parallelism: the inputs are whole sequences
            if position_ids is not None and attention_mask is None and cu_seqlens is None:
                _reject_sharded_positions(position_ids)
            packing = C.make_packing(B, S, device, attention_mask, position_ids, cu_seqlens, split_on_positions=True)
            positions = C.packed_positions(packing, position_ids, device, restart=cu_seqlens is not None)
        else:
            if labels is not None:
                raise ValueError("labels: with cp_group expected shift_labels (shifted before sharding: "
                                 "fusedlm.distributed.shard_lm_batch), got labels")
            packing, positions = _context_parallel_packing(B, S, device, attention_mask, position_ids, cu_seqlens,
                                                           cp_group)
        x = self.model.embed_tokens(packing.pack(input_ids)) if input_ids is not None else packing.pack(inputs_embeds)
        hidden = self.model(x, positions, packing)  # (T, hidden)
        has_labels = labels is not None or shift_labels is not None
        want_logits = not has_labels if return_logits is None else bool(return_logits)
        logits = loss = None
        if want_logits or (has_labels and not fast):
            logits = packing.unpack(self.lm_head(hidden), fast)
        if has_labels:
            if shift_labels is not None:
                shifted = shift_labels.to(device)
            else:
                shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].to(device)
            if attention_mask is not None:  # a padded position predicts nothing (with left padding the
                shifted = shifted.masked_fill(attention_mask.to(device) == 0, -100)  # last pad would)
            if cp_group is not None:  # the sum over this rank's tokens / the group's count, reduced over the group
                target = packing.pack(shifted)
                local = C.lm_loss(hidden, self.lm_head, target, "sum") if fast else F.cross_entropy(
                    logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum")
                from fusedlm.distributed.training import global_mean

                loss = global_mean(local, (target != -100).sum(), cp_group)
            elif fast:  # on the packed tokens: the padded positions are not there at all
                loss = C.lm_loss(hidden, self.lm_head, packing.pack(shifted))
            else:
                loss = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=-100)
        return C.CausalLMOutput(loss=loss, logits=logits if want_logits else None)

    def generate(self, input_ids, max_new_tokens, attention_mask=None, *, do_sample=False, temperature=1.0,
                 top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, generator=None, compile=False):
        """Decoding over a static KV cache (fusedlm.kv_cache_attention): -> (B, S + n) int64, the prompts
        followed by n <= max_new_tokens new tokens (n < max_new_tokens only when every sequence finished).

        input_ids (B, S); attention_mask (B, S), 1 = real token: left-padded prompts of different lengths,
        positions counted over the real tokens (transformers' generate). Greedy by default; ``do_sample``
        draws from softmax(logits / temperature) within ``top_k`` and ``top_p`` (transformers' warpers) with
        ``generator`` (a torch.Generator on the model's device, for reproducible draws).
        eos_token_id: an int or a list (None: the config's); a sequence that emitted one then emits
        ``pad_token_id`` (None: the config's, else the first eos). ``compile``: run the decode step under
        torch.compile(fullgraph=True). See fusedlm/models/generation.py.
        """
        return generation.generate(self, input_ids, max_new_tokens, attention_mask, do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id, generator=generator, compile=compile)
