"""What the reference models share: the packed token layout, the ops each model switches with
``use_kernels``, and the output objects.

Packed layout. Every model runs on packed tokens, (T, hidden) with T the real tokens of the batch, and
int32 ``cu_seqlens`` (N + 1,) marking where each of N sequences starts (FlashAttention's varlen layout).
A padded batch is unpacked once at the embeddings (``fusedlm.unpad_input`` on the ids) and padded once at
the end, so no kernel ever touches a padded token and no (S, S) mask is built on the fast path.

Op switch. Each op below takes ``use_kernels``: True calls the fusedlm op (process default backend),
False computes the same thing in plain PyTorch, the way Hugging Face's modules do it, op for op where
their rounding matters (RMSNorm rounds to the input dtype before the weight). The False path is the
reference the tests hold the True path to.
"""
import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import fusedlm


# ---------------------------------------------------------------------------------------------------
# Outputs (the Hugging Face attribute names)


@dataclass
class CausalLMOutput:
    loss: Optional[torch.Tensor]    # scalar, mean over the non-ignored shifted labels
    logits: Optional[torch.Tensor]  # (B, S, vocab), zeros at padded positions; None when not asked for


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor                # (B, S, hidden), zeros at padded positions
    pooler_output: Optional[torch.Tensor] = None   # (B, hidden), BERT only


# ---------------------------------------------------------------------------------------------------
# Packed layout


@dataclass
class Packing:
    """Where the packed tokens (T,) came from and which sequence each belongs to."""
    indices: Optional[torch.Tensor]  # int64 (T,) positions in the flattened (B * S) batch; None: all B * S real
    cu_seqlens: torch.Tensor         # int32 (N + 1,) sequence starts in the packed axis, from 0 to T
    max_seqlen: int                  # the longest sequence
    batch: int
    seqlen: int
    cp_group: Optional[object] = None  # context parallelism: this rank holds a zigzag shard of every sequence
    #                                    (fusedlm.distributed's varlen layout); None: the whole sequences

    def pack(self, x):
        """(B, S, ...) -> (T, ...), the real tokens."""
        flat = x.reshape(self.batch * self.seqlen, *x.shape[2:])
        return flat if self.indices is None else flat[self.indices]

    def unpack(self, x, use_kernels):
        """(T, ...) -> (B, S, ...), zeros at the padded positions."""
        if self.indices is None:
            return x.reshape(self.batch, self.seqlen, *x.shape[1:])
        if use_kernels:
            return fusedlm.pad_input(x, self.indices, self.batch, self.seqlen)
        out = x.new_zeros(self.batch * self.seqlen, *x.shape[1:])
        return out.index_copy(0, self.indices, x).reshape(self.batch, self.seqlen, *x.shape[1:])

    def sequence_ids(self):
        """int64 (T,): the sequence of each packed token."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)

    def positions_in_sequence(self):
        """int64 (T,): each token's position counted from the start of its sequence."""
        seq = self.sequence_ids()
        return torch.arange(seq.numel(), device=seq.device) - self.cu_seqlens.long()[seq]


def _check_ids(input_ids, inputs_embeds):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("input_ids / inputs_embeds: expected exactly one of them, got "
                         f"{'both' if input_ids is not None else 'neither'}")
    x = input_ids if input_ids is not None else inputs_embeds
    want = 2 if input_ids is not None else 3
    if x.dim() != want:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(f"{name}: expected a {want}-D tensor ({'(B, S)' if want == 2 else '(B, S, hidden)'}), "
                         f"got shape {tuple(x.shape)}")
    return x.shape[0], x.shape[1]


def make_packing(batch, seqlen, device, attention_mask=None, position_ids=None, cu_seqlens=None,
                 split_on_positions=False):
    """The packed layout of a (batch, seqlen) input.

    cu_seqlens:     int32 (N + 1,) for a batch of one holding N packed sequences (all tokens real).
    attention_mask: (B, S), 1 / True = real token: each row one sequence of its real tokens.
    position_ids:   (B, S) or (1, S) with ``split_on_positions`` and no mask: a new sequence starts wherever
                    a position is not the previous one + 1 (transformers' packed-sequence detection).
    Otherwise each row is one sequence.
    """
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("cu_seqlens: packed sequences take no attention_mask, got both")
        if batch != 1:
            raise ValueError(f"cu_seqlens: expected a batch of one packed row, got batch size {batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected a 1-D tensor (N + 1,), got shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        if int(cu[0]) != 0 or int(cu[-1]) != seqlen or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {seqlen} (the sequence "
                             f"length), got {cu.tolist()}")
        return Packing(None, cu, int((cu[1:] - cu[:-1]).max()), batch, seqlen)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, seqlen):
            raise ValueError(f"attention_mask: expected shape (B, S) = {(batch, seqlen)}, got "
                             f"{tuple(attention_mask.shape)}")
        mask = attention_mask.to(device=device, dtype=torch.bool)
        if not bool(mask.all()):
            _, indices, cu, max_seqlen = fusedlm.unpad_input(mask, mask)  # the ids are packed by the caller
            return Packing(indices, cu, max_seqlen, batch, seqlen)
    if split_on_positions and attention_mask is None and position_ids is not None:
        pos = position_ids.to(device).expand(batch, seqlen)
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        where = torch.nonzero(starts.flatten()).flatten()
        cu = torch.cat([where, torch.tensor([batch * seqlen], device=device)]).to(torch.int32)
        return Packing(None, cu, int((cu[1:] - cu[:-1]).max()), batch, seqlen)
    cu = torch.arange(0, batch * seqlen + 1, max(seqlen, 1), device=device, dtype=torch.int32)[:batch + 1]
    return Packing(None, cu, seqlen, batch, seqlen)


def packed_positions(packing, position_ids, device, restart):
    """int64 (T,) positions of the packed tokens: ``position_ids`` packed when given, otherwise each
    token's index in its row (``restart=False``, Hugging Face's default ``arange(S)`` for every row, padded
    or not) or in its sequence (``restart=True``, for explicitly packed sequences)."""
    if position_ids is not None:
        pos = position_ids.to(device).long().expand(packing.batch, packing.seqlen)
        return packing.pack(pos)
    if restart:
        return packing.positions_in_sequence()
    pos = torch.arange(packing.seqlen, device=device).expand(packing.batch, packing.seqlen)
    return packing.pack(pos)


# ---------------------------------------------------------------------------------------------------
# Ops, each with its plain PyTorch twin


def rms_norm(x, weight, eps, residual, use_kernels):
    """Returns (normed, s) with s = x + residual (s = x without a residual): the fused pre-norm add."""
    if use_kernels:
        if residual is None:
            return fusedlm.rms_norm(x, weight, eps), x
        return fusedlm.rms_norm(x, weight, eps, residual=residual)
    s = x if residual is None else x + residual
    sf = s.float()
    normed = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(s.dtype), s  # rounded to the input dtype before the weight, as LlamaRMSNorm


def lm_loss(hidden, lm_head, target, reduction="mean"):
    """The cross-entropy of lm_head(hidden) (T, vocab) against target (T,) (-100 ignored), through
    fusedlm.linear_cross_entropy: the logits are never made. (The plain path is logits then F.cross_entropy.)"""
    return fusedlm.linear_cross_entropy(hidden, lm_head.weight, target, lm_head.bias, ignore_index=-100,
                                        reduction=reduction)


def layer_norm(x, weight, bias, eps, residual, use_kernels):
    """LayerNorm of x + residual (post-LN blocks: ``LayerNorm(dense(h) + input)``); returns the normed sum."""
    if use_kernels:
        return fusedlm.layer_norm(x, weight, bias, eps, residual=residual)[0] if residual is not None \
            else fusedlm.layer_norm(x, weight, bias, eps)
    s = x if residual is None else x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def swiglu(gate, up, use_kernels):
    return fusedlm.swiglu(gate, up) if use_kernels else F.silu(gate) * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q, k, cos, sin, use_kernels):
    """q (T, H, D), k (T, Hkv, D), cos / sin (T, D) in the rotate_half layout."""
    if use_kernels:
        q, k = fusedlm.apply_rotary_pos_emb(q[None], k[None], cos[None], sin[None], unsqueeze_dim=2)
        return q[0], k[0]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


_VARLEN_HAS_DROPOUT = "dropout_p" in inspect.signature(fusedlm.varlen_attention).parameters


def _padded_attention_with_dropout(q, k, v, packing, causal, scale, dropout_p):
    """Attention dropout on builds whose varlen_attention has none: the sequences padded to (N, H, L, D)
    for fusedlm.scaled_dot_product_attention with a key padding mask, then packed again."""
    N, L = packing.cu_seqlens.numel() - 1, packing.max_seqlen
    slot = packing.sequence_ids() * L + packing.positions_in_sequence()  # each token's place in (N, L)
    qp, kp, vp = (fusedlm.pad_input(t, slot, N, L).transpose(1, 2) for t in (q, k, v))
    kpm = fusedlm.pad_input(torch.ones_like(slot, dtype=torch.bool), slot, N, L)
    out = fusedlm.scaled_dot_product_attention(qp, kp, vp, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                               enable_gqa=k.shape[1] != q.shape[1], key_padding_mask=kpm)
    return out.transpose(1, 2).reshape(N * L, -1, out.shape[-1])[slot]  # (T, H, D)


def attention(q, k, v, packing, *, causal, scale=None, dropout_p=0.0, use_kernels):
    """Attention within each packed sequence: q (T, H, D), k, v (T, Hkv, D) -> (T, H, D). With
    ``packing.cp_group`` the tokens are this rank's zigzag shard and the attention is context-parallel
    (fusedlm.distributed, ring; the plain path runs its blocks on the torch backend)."""
    if packing.cp_group is not None:
        return _context_parallel_attention(q, k, v, packing, causal, scale, dropout_p, use_kernels)
    if use_kernels and dropout_p > 0 and not _VARLEN_HAS_DROPOUT:
        return _padded_attention_with_dropout(q, k, v, packing, causal, scale, dropout_p)
    if use_kernels:
        extra = {"dropout_p": dropout_p} if dropout_p > 0 else {}
        return fusedlm.varlen_attention(q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen,
                                        packing.max_seqlen, causal=causal, scale=scale, **extra)
    seq = packing.sequence_ids()
    allowed = seq[:, None] == seq[None, :]  # (T, T) block diagonal
    if causal:
        allowed = allowed & torch.ones_like(allowed).tril()
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=allowed, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


def _context_parallel_attention(q, k, v, packing, causal, scale, dropout_p, use_kernels):
    import torch.distributed as dist

    from fusedlm.distributed import context_parallel_varlen_attention

    if dropout_p > 0:
        raise ValueError(f"attention_dropout: expected 0 in training with context parallelism (not supported), "
                         f"got {dropout_p}")
    W = dist.get_world_size(packing.cp_group)
    # the local offsets are the global ones / W (every sequence holds 2 of its 2W chunks here)
    return context_parallel_varlen_attention(q, k, v, packing.cu_seqlens * W, packing.max_seqlen * W,
                                             group=packing.cp_group, causal=causal, scale=scale,
                                             backend=None if use_kernels else "torch")


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name):
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act: expected one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm's parameters (weight, bias) and attributes, with the residual add and the op
    switch: forward(x, residual=None) -> LayerNorm(x + residual)."""

    def __init__(self, hidden_size, eps, config):
        super().__init__()
        self.normalized_shape, self.eps, self.config = (hidden_size,), eps, config
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x, residual=None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual, self.config.use_kernels)


class PostLNOutput(nn.Module):
    """dense -> dropout -> LayerNorm(+ input), the post-LN encoders' block ending (BERT's BertSelfOutput and
    BertOutput, DeBERTa's alike; only in_features differs)."""

    def __init__(self, config, in_features):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, input_tensor):  # (T, in_features), (T, hidden) -> (T, hidden)
        return self.LayerNorm(self.dropout(self.dense(h)), input_tensor)


class Intermediate(nn.Module):
    """The encoders' feed-forward up projection with its activation (BertIntermediate's names)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x):  # (T, hidden) -> (T, intermediate)
        return self.act(self.dense(x))


def encoder_inputs(word_embeddings, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                   cu_seqlens):
    """An encoder's forward arguments packed: (packing, embeds (T, E), token types (T,), positions (T,)).
    Token types default to 0; positions to Hugging Face's arange(S) per row, restarting in each sequence
    given by cu_seqlens."""
    B, S = _check_ids(input_ids, inputs_embeds)
    device = word_embeddings.weight.device
    packing = make_packing(B, S, device, attention_mask, None, cu_seqlens)
    positions = packed_positions(packing, position_ids, device, restart=cu_seqlens is not None)
    types = torch.zeros(B, S, dtype=torch.long, device=device) if token_type_ids is None else token_type_ids
    embeds = word_embeddings(packing.pack(input_ids)) if input_ids is not None else packing.pack(inputs_embeds)
    return packing, embeds, packing.pack(types.to(device)), positions


def has_holes(padding):
    """True when some row of a (B, S) bool padding mask has real tokens that are not one contiguous run
    ([1, 1, 0, 1, 1]): packing the real tokens would change the distances between them."""
    starts = padding[:, :1].long() + (padding[:, 1:] & ~padding[:, :-1]).sum(dim=1, keepdim=True)
    return bool((starts > 1).any())


def hf_config_fields(cls, hf_config, **overrides):
    """The fields of dataclass ``cls`` read from a transformers config (those it has), plus overrides."""
    names = [f for f in cls.__dataclass_fields__ if f != "use_kernels"]
    values = {n: getattr(hf_config, n) for n in names if hasattr(hf_config, n)}
    values.update(overrides)
    return cls(**values)


def load_from_hf(model, hf_model):
    """Load ``hf_model``'s weights (strict: the same names and shapes) and match its dtype / device."""
    param = next(hf_model.parameters())
    model.to(device=param.device, dtype=param.dtype)
    model.load_state_dict(hf_model.state_dict())
    return model.train(hf_model.training)


def scale_for(head_dim, factor=1):
    return 1.0 / math.sqrt(head_dim * factor)
