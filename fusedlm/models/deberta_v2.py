"""DeBERTa-v2 / v3 encoders on fusedlm's ops.

Post-LN encoder like BERT, with disentangled attention: besides content-to-content scores, a query reads
relative-position embeddings through the keys (c2p) and a key through the queries (p2c), the relative
distance put in log buckets (``position_buckets``). v2 configs add absolute positions to the input
(``position_biased_input``), v3 configs share the content projections for the positions
(``share_att_key``) and layer-normalise the relative embeddings (``norm_rel_ebd="layer_norm"``).
Module and parameter names are transformers' DebertaV2Model's, so its state dict loads unchanged.

Shapes: B batch, S padded length, T real (packed) tokens, H heads, D head dim, 2 * span relative rows.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import fusedlm
from fusedlm.ops.deberta import make_log_bucket_position

from . import _common as C


@dataclass
class DebertaV2Config:
    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    pad_token_id: Optional[int] = 0
    embedding_size: Optional[int] = None       # None: hidden_size (else an embed_proj maps it up)
    position_biased_input: bool = True
    relative_attention: bool = False
    max_relative_positions: int = -1           # < 1: max_position_embeddings
    position_buckets: int = -1                 # <= 0: no buckets, span = max_relative_positions
    pos_att_type: Optional[list] = None        # any of "c2p", "p2c" (or "c2p|p2c")
    share_att_key: bool = False
    norm_rel_ebd: str = "none"                 # "layer_norm" normalises the relative embeddings
    conv_kernel_size: int = 0
    use_kernels: bool = True

    def __post_init__(self):
        if isinstance(self.pos_att_type, str):
            self.pos_att_type = [t.strip() for t in self.pos_att_type.lower().split("|")]
        self.pos_att_type = list(self.pos_att_type or [])
        if not set(self.pos_att_type) <= {"c2p", "p2c"}:
            raise ValueError(f"pos_att_type: expected any of 'c2p', 'p2c', got {self.pos_att_type}")
        self.pos_att_type = [t for t in ("c2p", "p2c") if t in self.pos_att_type]  # each term once
        if self.max_relative_positions < 1:
            self.max_relative_positions = self.max_position_embeddings
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        if self.conv_kernel_size > 0:
            raise ValueError(f"conv_kernel_size: the convolution layer of DeBERTa-v2-xlarge is not supported "
                             f"(expected 0, got {self.conv_kernel_size})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads: expected a divisor of hidden_size ({self.hidden_size}), "
                             f"got {self.num_attention_heads}")
        C.activation(self.hidden_act)

    @property
    def span(self):
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @classmethod
    def from_hf(cls, hf_config, use_kernels=True):
        head_size = hf_config.hidden_size // hf_config.num_attention_heads
        if getattr(hf_config, "attention_head_size", None) not in (None, head_size):
            raise ValueError(f"hf_config: attention_head_size other than hidden_size / heads is not supported, "
                             f"got {hf_config.attention_head_size}")
        return C.hf_config_fields(cls, hf_config, use_kernels=use_kernels,
                                  pos_att_type=hf_position_terms(getattr(hf_config, "pos_att_type", None)))


def hf_position_terms(pos_att_type):
    """The position terms transformers' DeBERTa-v2 computes for a config's ``pos_att_type`` (a list, or a
    "c2p|p2c" string): c2p and p2c where named, each once; it ignores every other entry ("none", "p2p")."""
    if isinstance(pos_att_type, str):
        pos_att_type = [t.strip() for t in pos_att_type.lower().split("|")]
    return [t for t in ("c2p", "p2c") if t in (pos_att_type or [])]


def deberta_attention_packed_ref(q, k, v, pos_key, pos_query, packing, position_buckets, max_relative_positions,
                                 scale, dropout_p):
    """Plain PyTorch disentangled attention on packed tokens, Hugging Face's math on a (H, T, T) score
    matrix masked to each sequence: q, k, v (T, H, D), pos_key / pos_query (H, 2 span, D) or None."""
    span = position_buckets if position_buckets > 0 else max_relative_positions
    pos = packing.positions_in_sequence()
    rel = pos[:, None] - pos[None, :]  # (T, T): i - j within a sequence
    if position_buckets > 0:
        rel = make_log_bucket_position(rel, position_buckets, max_relative_positions)
    idx = torch.clamp(rel.long() + span, 0, 2 * span - 1).expand(q.shape[1], -1, -1)  # (H, T, T)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (H, T, D)
    scores = q @ k.transpose(-1, -2) * scale
    if pos_key is not None:  # c2p: q_i . pos_key[idx(i, j)]
        scores = scores + torch.gather(q @ pos_key.transpose(-1, -2), -1, idx) * scale
    if pos_query is not None:  # p2c: k_j . pos_query[idx(i, j)] (idx(i, j) = idx of -bucket(j - i))
        p2c = torch.gather(k @ pos_query.transpose(-1, -2), -1, idx.transpose(-1, -2))  # [h, j, i]
        scores = scores + p2c.transpose(-1, -2) * scale
    seq = packing.sequence_ids()
    scores = scores.masked_fill(seq[:, None] != seq[None, :], float("-inf"))
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p, training=dropout_p > 0)
    return (probs @ v).transpose(0, 1)  # (T, H, D)


class DisentangledSelfAttention(nn.Module):
    """Disentangled self-attention, transformers' DisentangledSelfAttention's parameters and names.

    forward_packed(x (T, hidden), packing, rel_embeddings (2 span, hidden)) -> (T, hidden): what the model
    calls. forward(hidden_states (B, S, hidden), attention_mask, output_attentions=False, query_states=None,
    relative_pos=None, rel_embeddings=None) -> (context (B, S, hidden), None): transformers' call, for
    use in place of its module (``from_hf``); the padding is read off its (B, 1, S, S) or (B, S) mask.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        self.share_att_key, self.pos_att_type = config.share_att_key, list(config.pos_att_type)
        self.relative_attention = config.relative_attention
        self.position_buckets, self.max_relative_positions = config.position_buckets, config.max_relative_positions
        self.query_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.key_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.value_proj = nn.Linear(config.hidden_size, config.hidden_size)
        if self.relative_attention and not self.share_att_key:
            if "c2p" in self.pos_att_type:
                self.pos_key_proj = nn.Linear(config.hidden_size, config.hidden_size)
            if "p2c" in self.pos_att_type:
                self.pos_query_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    @classmethod
    def from_hf(cls, module, config=None, use_kernels=True):
        """Ours in place of a transformers DisentangledSelfAttention, sharing its projection modules (and
        so its parameters, PEFT adapters included). ``config``: the HF config (optional; the module's
        attributes are enough)."""
        cfg = DebertaV2Config(
            hidden_size=module.query_proj.in_features, num_attention_heads=module.num_attention_heads,
            hidden_dropout_prob=getattr(getattr(module, "pos_dropout", None), "p", 0.0),
            attention_probs_dropout_prob=module.dropout.p, relative_attention=module.relative_attention,
            max_relative_positions=getattr(module, "max_relative_positions", -1),
            max_position_embeddings=getattr(config, "max_position_embeddings", 512),
            position_buckets=getattr(module, "position_buckets", -1),
            pos_att_type=hf_position_terms(module.pos_att_type),
            share_att_key=module.share_att_key, use_kernels=use_kernels)
        if module.attention_head_size * module.num_attention_heads != module.query_proj.in_features:
            raise ValueError(f"module: attention_head_size * heads must equal hidden_size, got "
                             f"{module.attention_head_size} * {module.num_attention_heads} != "
                             f"{module.query_proj.in_features}")
        with torch.device("meta"):  # no weights of our own: the module's are put in their place below
            ours = cls(cfg)
        for name, child in module.named_children():  # projections and dropouts, shared
            setattr(ours, name, child)
        return ours.train(module.training)

    def _heads(self, x):  # (N, hidden) -> (N, H, D)
        return x.view(x.shape[0], self.num_attention_heads, self.attention_head_size)

    def _positions(self, rel_embeddings):
        """(pos_key, pos_query), each (H, 2 span, D) or None: the relative embeddings projected per head for
        the c2p and p2c terms (None for a term the config does not have)."""
        rel = self.pos_dropout(rel_embeddings[:2 * self.config.span])  # (2 span, hidden)
        pos_key = pos_query = None
        if "c2p" in self.pos_att_type:
            proj = self.key_proj if self.share_att_key else self.pos_key_proj
            pos_key = self._heads(proj(rel)).transpose(0, 1)  # (H, 2 span, D)
        if "p2c" in self.pos_att_type:
            proj = self.query_proj if self.share_att_key else self.pos_query_proj
            pos_query = self._heads(proj(rel)).transpose(0, 1)
        return pos_key, pos_query

    def forward_packed(self, x, packing, rel_embeddings=None):
        fast, D = self.config.use_kernels, self.attention_head_size
        q, k, v = self._heads(self.query_proj(x)), self._heads(self.key_proj(x)), self._heads(self.value_proj(x))
        factor = 1 + len(self.pos_att_type)  # each enabled term adds to the scores' variance
        p = self.dropout.p if self.training else 0.0
        if not self.relative_attention:
            out = C.attention(q, k, v, packing, causal=False, scale=C.scale_for(D, factor), dropout_p=p,
                              use_kernels=fast)
            return out.reshape(x.shape[0], -1)
        pos_key, pos_query = self._positions(rel_embeddings)
        if fast:
            out = fusedlm.deberta_varlen_attention(q, k, v, pos_key, pos_query, packing.cu_seqlens, packing.max_seqlen,
                                                   position_buckets=self.position_buckets,
                                                   max_relative_positions=self.max_relative_positions, dropout_p=p)
        else:
            out = deberta_attention_packed_ref(q, k, v, pos_key, pos_query, packing, self.position_buckets,
                                               self.max_relative_positions, C.scale_for(D, factor), p)
        return out.reshape(x.shape[0], -1)  # (T, hidden)

    def forward_padded(self, x, key_padding_mask, rel_embeddings=None):
        """x (B, S, hidden), key_padding_mask (B, S) bool -> (B, S, hidden): the dense fused op, positions
        counted over the padded layout (transformers' positions, also where real tokens are not contiguous).
        Padded query rows are zeros."""
        B, S = x.shape[:2]
        q, k, v = (self._heads(proj(x).reshape(B * S, -1)).view(B, S, self.num_attention_heads, -1).transpose(1, 2)
                   for proj in (self.query_proj, self.key_proj, self.value_proj))  # (B, H, S, D)
        p = self.dropout.p if self.training else 0.0
        pos_key, pos_query = self._positions(rel_embeddings) if self.relative_attention else (None, None)
        if not self.relative_attention:  # content scores only: plain attention over the padded batch
            factor = 1 + len(self.pos_att_type)  # transformers counts the named terms even so
            out = fusedlm.scaled_dot_product_attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=p,
                                                       scale=C.scale_for(self.attention_head_size, factor))
        else:
            out = fusedlm.deberta_attention(q, k, v, pos_key, pos_query, key_padding_mask=key_padding_mask,
                                            position_buckets=self.position_buckets,
                                            max_relative_positions=self.max_relative_positions, dropout_p=p)
        # Padded rows read zeros, as the packed path leaves them: the result at every position is then the
        # same whichever path a batch takes (a batch with holes runs this one, a row of it alone the other)
        return out.transpose(1, 2).reshape(B, S, -1).masked_fill(~key_padding_mask[:, :, None], 0)

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                relative_pos=None, rel_embeddings=None):
        if output_attentions:
            raise ValueError("output_attentions: the fused attention returns no probabilities, got True")
        if query_states is not None and query_states is not hidden_states:
            raise ValueError("query_states: separate query states (DeBERTa's enhanced mask decoder) are not "
                             "supported, got a tensor")
        B, S = hidden_states.shape[:2]
        mask = attention_mask.bool()
        if mask.dim() == 4:  # (B, 1, S, S), the outer product of the padding mask with itself
            kpm = mask[:, 0].diagonal(dim1=-2, dim2=-1)
            if not torch.equal(mask[:, 0], kpm[:, :, None] & kpm[:, None, :]):
                raise ValueError("attention_mask: expected the (B, 1, S, S) outer product of a padding mask, "
                                 "got another mask")
        elif mask.dim() == 2:
            kpm = mask
        else:
            raise ValueError(f"attention_mask: expected (B, S) or (B, 1, S, S), got shape {tuple(mask.shape)}")
        packing = C.make_packing(B, S, hidden_states.device, kpm)
        out = self.forward_packed(packing.pack(hidden_states), packing, rel_embeddings)
        return packing.unpack(out, self.config.use_kernels), None


class DebertaV2Embeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, E = config, config.embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, E, config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, E) \
            if config.position_biased_input else None
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, E) if config.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(E, config.hidden_size, bias=False) if E != config.hidden_size else None
        self.LayerNorm = C.LayerNorm(config.hidden_size, config.layer_norm_eps, config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, embeds, token_types, positions):  # embeds (T, E), token_types / positions (T,)
        if self.position_embeddings is not None:
            embeds = embeds + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            embeds = embeds + self.token_type_embeddings(token_types)
        if self.embed_proj is not None:
            embeds = self.embed_proj(embeds)
        return self.dropout(self.LayerNorm(embeds))  # (T, hidden)


class DebertaV2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = DisentangledSelfAttention(config)
        self.output = C.PostLNOutput(config, config.hidden_size)

    def forward(self, x, packing, rel_embeddings):
        return self.output(self.self.forward_packed(x, packing, rel_embeddings), x)


class DebertaV2Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = DebertaV2Attention(config)
        self.intermediate = C.Intermediate(config)
        self.output = C.PostLNOutput(config, config.intermediate_size)

    def forward(self, x, packing, rel_embeddings):  # (T, hidden) -> (T, hidden)
        x = self.attention(x, packing, rel_embeddings)
        return self.output(self.intermediate(x), x)


class DebertaV2Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(DebertaV2Layer(config) for _ in range(config.num_hidden_layers))
        if config.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * config.span, config.hidden_size)
        self.norm_rel_ebd = [t.strip() for t in config.norm_rel_ebd.lower().split("|")]
        if "layer_norm" in self.norm_rel_ebd:
            self.LayerNorm = C.LayerNorm(config.hidden_size, config.layer_norm_eps, config)

    def forward(self, x, packing):
        rel = self.rel_embeddings.weight if self.config.relative_attention else None
        if rel is not None and "layer_norm" in self.norm_rel_ebd:
            rel = self.LayerNorm(rel)
        for layer in self.layer:
            x = layer(x, packing, rel)
        return x


class DebertaV2Model(nn.Module):
    """forward(input_ids (B, S), attention_mask=None, token_type_ids=None, position_ids=None, *,
    cu_seqlens=None, inputs_embeds=None) -> EncoderOutput(last_hidden_state (B, S, hidden)).

    Padded batches are packed once at the embeddings and padded once at the end (zeros at padded
    positions); ``cu_seqlens`` marks packed sequences in a batch of one (positions restart in each).
    """

    def __init__(self, config: DebertaV2Config):
        super().__init__()
        self.config = config
        self.embeddings = DebertaV2Embeddings(config)
        self.encoder = DebertaV2Encoder(config)

    @classmethod
    def from_hf(cls, hf_model, use_kernels=True):
        """A model with ``hf_model``'s config (a transformers DebertaV2Model) and weights."""
        return C.load_from_hf(cls(DebertaV2Config.from_hf(hf_model.config, use_kernels)), hf_model)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                cu_seqlens=None, inputs_embeds=None):
        if self.config.relative_attention and attention_mask is not None and C.has_holes(attention_mask.bool()):
            raise ValueError("attention_mask: a row whose real tokens are not contiguous (a 0 between 1s) would "
                             "change DeBERTa's relative distances once packed; expected left or right padding "
                             "(transformers' model patched with fusedlm.integrations.hf takes such masks)")
        packing, embeds, types, positions = C.encoder_inputs(self.embeddings.word_embeddings, input_ids, inputs_embeds,
                                                             attention_mask, token_type_ids, position_ids, cu_seqlens)
        x = self.encoder(self.embeddings(embeds, types, positions), packing)  # (T, hidden)
        return C.EncoderOutput(packing.unpack(x, self.config.use_kernels))
