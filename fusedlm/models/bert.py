"""BERT (and the encoders shaped like it) on fusedlm's ops.

Post-LN encoder: absolute position and token-type embeddings, bidirectional attention within each
sequence, GELU feed-forward, ``LayerNorm(dense(h) + input)`` with the add fused into the norm.
Module and parameter names are transformers' BertModel's, so its state dict loads unchanged.

Shapes: B batch, S padded length, T real (packed) tokens, H heads, D head dim.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import _common as C


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    add_pooling_layer: bool = True
    use_kernels: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads: expected a divisor of hidden_size ({self.hidden_size}), "
                             f"got {self.num_attention_heads}")
        C.activation(self.hidden_act)

    @classmethod
    def from_hf(cls, hf_config, use_kernels=True, add_pooling_layer=True):
        kind = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute" or getattr(hf_config, "is_decoder", False):
            raise ValueError(f"hf_config: expected an encoder with absolute positions, got "
                             f"position_embedding_type={kind!r}, is_decoder={hf_config.is_decoder}")
        return C.hf_config_fields(cls, hf_config, add_pooling_layer=add_pooling_layer, use_kernels=use_kernels)


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = C.LayerNorm(config.hidden_size, config.layer_norm_eps, config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, embeds, token_types, positions):  # embeds (T, hidden), token_types / positions (T,)
        x = embeds + self.token_type_embeddings(token_types)
        return self.dropout(self.LayerNorm(x, self.position_embeddings(positions)))


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.num_attention_heads = config, config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, packing):  # x (T, hidden) -> (T, hidden)
        T, D = x.shape[0], self.attention_head_size
        q, k, v = (proj(x).view(T, -1, D) for proj in (self.query, self.key, self.value))  # (T, H, D)
        p = self.config.attention_probs_dropout_prob if self.training else 0.0
        out = C.attention(q, k, v, packing, causal=False, dropout_p=p, use_kernels=self.config.use_kernels)
        return out.reshape(T, -1)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = C.PostLNOutput(config, config.hidden_size)

    def forward(self, x, packing):
        return self.output(self.self(x, packing), x)


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = C.Intermediate(config)
        self.output = C.PostLNOutput(config, config.intermediate_size)

    def forward(self, x, packing):  # (T, hidden) -> (T, hidden)
        x = self.attention(x, packing)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, packing):
        for layer in self.layer:
            x = layer(x, packing)
        return x


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):  # (B, S, hidden) -> (B, hidden): tanh(dense(first token))
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """forward(input_ids (B, S), attention_mask=None, token_type_ids=None, position_ids=None, *,
    cu_seqlens=None, inputs_embeds=None) -> EncoderOutput(last_hidden_state (B, S, hidden), pooler_output).

    Padded batches (``attention_mask``, 1 = real token) are packed once at the embeddings and padded once at
    the end (zeros at padded positions). ``cu_seqlens`` (int32 offsets) marks packed sequences in a batch of
    one; their positions restart at 0 unless ``position_ids`` says otherwise.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if config.add_pooling_layer else None

    @classmethod
    def from_hf(cls, hf_model, use_kernels=True):
        """A model with ``hf_model``'s config (a transformers BertModel) and weights."""
        config = BertConfig.from_hf(hf_model.config, use_kernels, add_pooling_layer=hf_model.pooler is not None)
        return C.load_from_hf(cls(config), hf_model)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                cu_seqlens=None, inputs_embeds=None):
        packing, embeds, types, positions = C.encoder_inputs(self.embeddings.word_embeddings, input_ids, inputs_embeds,
                                                             attention_mask, token_type_ids, position_ids, cu_seqlens)
        x = self.encoder(self.embeddings(embeds, types, positions), packing)  # (T, hidden)
        hidden = packing.unpack(x, self.config.use_kernels)
        return C.EncoderOutput(hidden, self.pooler(hidden) if self.pooler is not None else None)
