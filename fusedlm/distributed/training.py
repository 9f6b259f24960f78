"""Training a causal LM on sequences sharded over a context-parallel group: the batch each rank gets and the
loss reduced over the group (used by fusedlm.models.LlamaForCausalLM's ``cp_group`` and
examples/train_long_context.py).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .layout import check_length, shard_positions, varlen_shard_indices, varlen_shard_positions


def shard_lm_batch(input_ids, labels=None, *, group=None, cu_seqlens=None, ignore_index=-100):
    """This rank's part of a causal-LM batch, in fusedlm.distributed's zigzag varlen layout.

    input_ids (B, S): B sequences of S tokens (S divisible by 2W), or a batch of one row packing several
    sequences with ``cu_seqlens`` (int32 global offsets, each length divisible by 2W). labels (B, S) or None.
    The labels are shifted *before* sharding (token t's target is labels[t + 1]; the last token of each
    sequence predicts nothing: ``ignore_index``), so every rank's tokens carry their true targets although
    their neighbours sit on other ranks.
    Returns a dict for ``LlamaForCausalLM.forward(**batch, cp_group=group)``: input_ids (B, S/W), position_ids
    (B, S/W) (the tokens' global positions within their sequences), shift_labels (B, S/W) when labels are
    given, cu_seqlens (the global offsets, unchanged) when given.
    """
    W, r = dist.get_world_size(group), dist.get_rank(group)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a 2-D (B, S) tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    B, S = input_ids.shape
    dev = input_ids.device
    if labels is not None and tuple(labels.shape) != (B, S):
        raise ValueError(f"labels: expected shape {(B, S)} (that of input_ids), got {tuple(labels.shape)}")
    if cu_seqlens is None:
        check_length("input_ids", S, W, "zigzag", "a sequence length S")  # never a token dropped
        idx = shard_positions(S, W, r, "zigzag", dev)
        cut = lambda t: t.index_select(1, idx)
        positions = idx.expand(B, -1)
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens: expected a batch of one packed row, got batch size {B}")
        if int(cu_seqlens[-1]) != S or int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens: expected offsets from 0 to the packed row's {S} tokens, got "
                             f"{int(cu_seqlens[0])} .. {int(cu_seqlens[-1])}")
        idx = varlen_shard_indices(cu_seqlens, W, r).to(dev)
        cut = lambda t: t.index_select(1, idx)
        positions = varlen_shard_positions(cu_seqlens, W, r).to(dev)[None]
    batch = {"input_ids": cut(input_ids), "position_ids": positions}
    if labels is not None:
        shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
        if cu_seqlens is not None:  # a sequence's last token would predict the next sequence's first
            shifted = shifted.clone()
            shifted[:, (cu_seqlens[1:].long() - 1).to(dev)] = ignore_index
        batch["shift_labels"] = cut(shifted)
    if cu_seqlens is not None:
        batch["cu_seqlens"] = cu_seqlens
    return batch


class _SumOverGroup(torch.autograd.Function):
    """Forward: the all-reduced sum of x over the group. Backward: the identity. Every rank backpropagates the
    same total; d(total)/d(x_r) = 1 and only rank r holds x_r, so each rank takes its own share and nothing is
    communicated (an all-reduce of the gradient would count it W times)."""

    @staticmethod
    def forward(ctx, x, group):
        total = x.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def global_mean(local_sum, local_count, group=None):
    """The mean over all the group's tokens: (sum of local sums) / (sum of local counts), the same value on every
    rank. Its backward gives each rank the gradient of that mean through its own tokens (the context-parallel
    attention's backward carries the cross-rank terms), so a parameter's full gradient is the *sum* over the
    group's ranks of what each rank computes (FSDP2 over that mesh dimension with a gradient divide factor that
    leaves it a sum; an all_reduce SUM without FSDP)."""
    # counted in int64 (a bfloat16 count is exact only up to 256) and divided in float64: one rounding to
    # local_sum's dtype, of the mean
    count = torch.as_tensor(local_count, device=local_sum.device).detach().to(torch.int64).clone()
    dist.all_reduce(count, group=group)
    mean = (local_sum.to(torch.float64) / count.to(torch.float64)).to(local_sum.dtype)
    return _SumOverGroup.apply(mean, group)
