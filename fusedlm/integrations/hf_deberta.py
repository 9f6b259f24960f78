"""DeBERTa-v2/v3: transformers' DisentangledSelfAttention on the fused DeBERTa attention.

DeBERTa-v2 does not use transformers' attention registry: its DisentangledSelfAttention builds the
(B*H, S, S) scores itself, from a (B, 1, S, S) mask the encoder expands out of the 2-D padding mask.
patch_model turns each such module into a ``FusedDisentangledSelfAttention``: a class swap to a
subclass with :class:`DisentangledForward` first, so the projections keep their parameters and
state-dict keys. Its forward:

    q, k, v         = query_proj / key_proj / value_proj of the hidden states, (B, H, S, D)
    pos_key         = key_proj (share_att_key) or pos_key_proj of the relative embeddings, (H, 2 span, D), c2p
    pos_query       = query_proj (share_att_key) or pos_query_proj of them, p2c
    padding         = the 2-D key mask recovered from the encoder's (B, 1, S, S) mask
    output          = fusedlm.deberta_attention(q, k, v, pos_key, pos_query, key_padding_mask=padding,
                                                 dropout_p=attention_probs_dropout_prob in training)

It runs transformers' own forward for what the fused op does not express: attention weights
(output_attentions), a separate query_states (DeBERTa's enhanced mask decoder), relative_attention off,
relative positions other than the default ones, a mask that is not a padding mask's outer product,
and attention-probability dropout where this fusedlm's deberta_attention has none.
"""
import functools

import torch
from torch import nn

from ..ops import deberta as deberta_ops

# deberta_attention takes dropout_p from fusedlm's DeBERTa issue on; before that it must be 0.
_HAS_DROPOUT = "deberta_varlen_attention" in dir(deberta_ops)


@functools.lru_cache(maxsize=8)
def _default_positions(length, position_buckets, max_relative_positions, device):
    """The relative positions DebertaV2Encoder passes, (1, S, S): the ones the fused op computes itself."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    x = torch.empty(length, 0, device=device)
    return build_relative_position(x, x, bucket_size=position_buckets, max_position=max_relative_positions)


class DisentangledForward(nn.Module):
    def _fusedlm_padding(self, hidden_states, attention_mask, output_attentions, query_states, relative_pos):
        """The (B, S) key padding mask when the fused op serves this call, else None."""
        if output_attentions or query_states is not None or not self.relative_attention:
            return None
        if self.training and self.dropout.p > 0 and not _HAS_DROPOUT:
            return None
        B, S = hidden_states.shape[:2]
        if attention_mask is None or attention_mask.dim() != 4 or tuple(attention_mask.shape) != (B, 1, S, S):
            return None
        mask = attention_mask.bool()[:, 0]
        padding = mask.any(dim=1)  # key j is real if some query sees it
        if not torch.equal(mask, padding[:, :, None] & padding[:, None, :]):
            return None
        if relative_pos is not None and not torch.equal(
                relative_pos, _default_positions(S, self.position_buckets, self.max_relative_positions,
                                                 hidden_states.device)):
            return None
        return padding

    def _fusedlm_heads(self, x):
        """(..., S, H * D) -> (..., H, S, D)."""
        return x.unflatten(-1, (self.num_attention_heads, -1)).transpose(-2, -3)

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                relative_pos=None, rel_embeddings=None):
        padding = self._fusedlm_padding(hidden_states, attention_mask, output_attentions, query_states, relative_pos)
        if padding is None:
            return super().forward(hidden_states, attention_mask, output_attentions, query_states=query_states,
                                   relative_pos=relative_pos, rel_embeddings=rel_embeddings)
        q, k, v = (self._fusedlm_heads(p(hidden_states)) for p in (self.query_proj, self.key_proj, self.value_proj))
        rel = self.pos_dropout(rel_embeddings)[: 2 * self.pos_ebd_size]
        pos_key = pos_query = None
        if "c2p" in self.pos_att_type:
            pos_key = self._fusedlm_heads(self.key_proj(rel) if self.share_att_key else self.pos_key_proj(rel))
        if "p2c" in self.pos_att_type:
            pos_query = self._fusedlm_heads(self.query_proj(rel) if self.share_att_key else self.pos_query_proj(rel))
        extra = {"dropout_p": self.dropout.p} if self.training and self.dropout.p > 0 else {}
        out = deberta_ops.deberta_attention(q, k, v, pos_key, pos_query, key_padding_mask=padding,
                                            position_buckets=self.position_buckets,
                                            max_relative_positions=self.max_relative_positions, **extra)
        return out.transpose(1, 2).flatten(2), None

