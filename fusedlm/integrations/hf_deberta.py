"""DeBERTa-v2/v3: transformers' DisentangledSelfAttention replaced by fusedlm.models' fused one.

DeBERTa-v2 does not use transformers' attention registry: its DisentangledSelfAttention builds the
(B*H, S, S) scores itself, from a (B, 1, S, S) mask the encoder expands out of the 2-D padding mask.
``replace_attention`` puts in its place ``fusedlm.models.deberta_v2.DisentangledSelfAttention.from_hf``
(the reference model's module, sharing the projections, so parameters, state-dict keys and PEFT
adapters stay), which reads the padding off that mask, packs the real tokens once and runs
``fusedlm.deberta_varlen_attention`` on them, with the attention-probability dropout in training.

The module put in is an instance of ``FusedDisentangledSelfAttention``, a class deriving from that
module and from transformers' own, so ``isinstance`` checks against transformers' class still hold and
transformers' forward is at hand for what the fused one does not serve: attention probabilities
(``output_attentions``), separate query states (DeBERTa's enhanced mask decoder), relative positions
other than the default ones, and a mask that is not a padding mask's outer product. A padding mask whose
real tokens are not contiguous in a row (``[1, 1, 0, 1, 1]``) runs the dense fused op over the padded
batch instead of the packed one: positions then count over the gaps, as transformers counts them.
"""
import functools

import torch

from ..models._common import has_holes
from ..models.deberta_v2 import DisentangledSelfAttention as FusedModule
from .fused_classes import fused_class



def _relative_positions(length, position_buckets, max_relative_positions, device):
    """The relative positions DebertaV2Encoder passes, (1, S, S): those the fused op computes itself."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    x = torch.empty(length, 0, device=device)
    return build_relative_position(x, x, bucket_size=position_buckets, max_position=max_relative_positions)


@functools.lru_cache(maxsize=2)
def _default_positions(length, position_buckets, max_relative_positions, device):
    """_relative_positions made once per shape for all layers of a forward (two kept at most: each is 8 S^2
    bytes). Eager only: under torch.compile they are built in the graph."""
    return _relative_positions(length, position_buckets, max_relative_positions, device)


class _ServeOrFallBack:
    """forward: the fused module's where it serves the call, transformers' otherwise."""

    def _fusedlm_padding(self, hidden_states, attention_mask, output_attentions, query_states, relative_pos):
        """The (B, S) padding mask when the fused forward serves this call, else None."""
        if output_attentions or (query_states is not None and query_states is not hidden_states):
            return None
        B, S = hidden_states.shape[:2]
        if attention_mask is None or tuple(attention_mask.shape) not in ((B, S), (B, 1, S, S)):
            return None
        padding = attention_mask.bool()
        compiling = torch.compiler.is_compiling()
        if padding.dim() == 4:  # the encoder's outer product of the padding mask with itself
            mask = padding[:, 0]
            padding = mask.diagonal(dim1=-2, dim2=-1)
            outer = padding[:, :, None] & padding[:, None, :]
            if compiling:  # no branch on values under torch.compile: asserted on the device instead
                torch._assert_async(torch.eq(mask, outer).all(), "fusedlm: DeBERTa's 4-D mask is not the outer "
                                    "product of a padding mask; run it uncompiled (transformers' forward then)")
            elif not torch.equal(mask, outer):
                return None
        if relative_pos is not None and self.relative_attention:
            if compiling:
                expected = _relative_positions(S, self.position_buckets, self.max_relative_positions,
                                               hidden_states.device)
                torch._assert_async(torch.eq(relative_pos, expected).all(), "fusedlm: DeBERTa relative positions "
                                    "other than the encoder's; run it uncompiled (transformers' forward then)")
            else:
                expected = _default_positions(S, self.position_buckets, self.max_relative_positions,
                                              hidden_states.device)
                if not torch.equal(relative_pos, expected):
                    return None
        return padding

    def forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                relative_pos=None, rel_embeddings=None):
        padding = self._fusedlm_padding(hidden_states, attention_mask, output_attentions, query_states, relative_pos)
        if padding is None:
            return type(self)._fusedlm_original.forward(self, hidden_states, attention_mask, output_attentions,
                                                         query_states=query_states, relative_pos=relative_pos,
                                                         rel_embeddings=rel_embeddings)
        # Under torch.compile the dense op (static shapes: packing needs the token count on the host); in
        # eager mode too where packing would close gaps that transformers counts positions over
        if torch.compiler.is_compiling() or has_holes(padding):
            return FusedModule.forward_padded(self, hidden_states, padding, rel_embeddings), None
        # the 2-D mask: the fused forward takes it as it is (the 4-D one it would check again)
        return FusedModule.forward(self, hidden_states, padding, rel_embeddings=rel_embeddings)


def replace_attention(module, config):
    """The fused module in place of transformers' DisentangledSelfAttention ``module`` (to be set on its
    parent by the caller): ``FusedDisentangledSelfAttention``, sharing module's projections."""
    original = type(module)
    fused = FusedModule.from_hf(module, config)
    if module.relative_attention:  # what transformers' forward reads besides the shared attributes
        fused.pos_ebd_size = module.pos_ebd_size
    _carry_over(module, fused)
    fused.__class__ = fused_class((_ServeOrFallBack, FusedModule), original)
    return fused


def _carry_over(module, fused):
    """What a user or transformers put on ``module`` besides its layers, onto its replacement: the hooks
    registered on it (every registry nn.Module keeps in its __dict__, whatever this torch version names them:
    the same dict objects, so the hooks' handles still remove them) and plain attributes the fused module
    does not have (``_is_hf_initialized``, a user's own)."""
    for name, value in vars(module).items():
        if name in ("_parameters", "_buffers", "_modules"):
            continue
        mine = vars(fused).get(name)
        if "hook" in name and isinstance(value, dict) and isinstance(mine, dict):
            value.update(mine)  # the same dict object: a hook's handle removes it from there
            vars(fused)[name] = value
        elif name not in vars(fused) and not hasattr(type(fused), name):
            setattr(fused, name, value)
