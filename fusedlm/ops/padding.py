"""unpad_input / pad_input: between a padded batch (B, S, ...) and packed tokens (total, ...).

The pair that feeds varlen_attention from a Hugging Face style batch (FlashAttention's bert_padding):

    hidden_unpad, indices, cu_seqlens, max_seqlen = unpad_input(hidden, key_padding_mask)
    out = varlen_attention(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    out = pad_input(out, indices, B, S)

The real tokens (mask True) are packed in row-major order, so sequence b's tokens are contiguous and in
order, whatever the mask looks like (right padding, left padding or holes). Both functions are plain
torch: a gather and its adjoint, a scatter into zeros, as small autograd Functions whose backward is the
other one (each differentiable again, and deterministic: the indices are distinct, so the scatter
writes each row once and never accumulates). ``unpad_input`` reads the mask on the host (the token
count and ``max_seqlen``), one device synchronisation; ``pad_input`` checks its indices are in range,
another: an index out of range would otherwise be a device-side assert.
"""
import torch

__all__ = ["unpad_input", "pad_input"]


class _Gather(torch.autograd.Function):
    """x (N, ...) -> x[indices] (n, ...); backward scatters into zeros."""

    @staticmethod
    def forward(ctx, x, indices):
        ctx.save_for_backward(indices)
        ctx.first = x.shape[0]
        return x.index_select(0, indices)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return _Scatter.apply(grad, indices, ctx.first), None


class _Scatter(torch.autograd.Function):
    """values (n, ...) -> zeros (first, ...) with rows ``indices`` set to values; backward gathers."""

    @staticmethod
    def forward(ctx, values, indices, first):
        ctx.save_for_backward(indices)
        out = values.new_zeros((first, *values.shape[1:]))
        out.index_put_((indices,), values)  # accumulate=False: distinct indices, each row written once
        return out

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return _Gather.apply(grad, indices), None, None


def _check_tensor(name, t, min_ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def _check_size(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value}")


def unpad_input(hidden, key_padding_mask):
    """Pack the real tokens of a padded batch.

    hidden:           (B, S, ...) any dtype (activations, or integer ids such as input_ids).
    key_padding_mask: bool (B, S), True = real token (Hugging Face ``attention_mask == 1``), on hidden's device.
    Returns (hidden_unpad, indices, cu_seqlens, max_seqlen):
        hidden_unpad (total, ...) the real tokens, batch-major then position order;
        indices      int64 (total,) their positions in the flattened B * S axis;
        cu_seqlens   int32 (B + 1,) cumulative real-token counts starting at 0;
        max_seqlen   Python int, the largest real-token count of a sequence (0 for an empty batch).
    Differentiable with respect to hidden (the gradient of a padded position is zero).
    """
    _check_tensor("hidden", hidden, 2)
    _check_tensor("key_padding_mask", key_padding_mask, 0)
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask: expected a bool tensor (True = real token), got {key_padding_mask.dtype}")
    if key_padding_mask.dim() != 2 or tuple(key_padding_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"key_padding_mask: expected shape (B, S) = {tuple(hidden.shape[:2])} (the first two "
                         f"dimensions of hidden), got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != hidden.device:
        raise ValueError(f"key_padding_mask: expected a tensor on {hidden.device} (the device of hidden), "
                         f"got {key_padding_mask.device}")
    B, S = key_padding_mask.shape
    seqlens = key_padding_mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(key_padding_mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if B > 0 else 0
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=hidden.device)
    cu_seqlens[1:] = torch.cumsum(seqlens, dim=0, dtype=torch.int32)
    hidden_unpad = _Gather.apply(hidden.reshape(B * S, *hidden.shape[2:]), indices)
    return hidden_unpad, indices, cu_seqlens, max_seqlen


def pad_input(hidden_unpad, indices, batch, seqlen):
    """The inverse of unpad_input: scatter packed tokens back into a zero-filled (batch, seqlen, ...) tensor.

    hidden_unpad: (total, ...) any dtype; indices: int64 (total,) distinct positions in [0, batch * seqlen)
    (as unpad_input returns them), on hidden_unpad's device; batch, seqlen: Python ints.
    Returns (batch, seqlen, ...) in hidden_unpad's dtype, zeros where no index points. Differentiable
    with respect to hidden_unpad.
    """
    _check_tensor("hidden_unpad", hidden_unpad, 1)
    _check_tensor("indices", indices, 0)
    _check_size("batch", batch)
    _check_size("seqlen", seqlen)
    if indices.dtype != torch.int64:
        raise TypeError(f"indices: expected an int64 tensor, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices: expected a 1-D tensor, got {indices.dim()}-D with shape {tuple(indices.shape)}")
    if indices.shape[0] != hidden_unpad.shape[0]:
        raise ValueError(f"indices: expected {hidden_unpad.shape[0]} entries (the first dimension of hidden_unpad), "
                         f"got {indices.shape[0]}")
    if indices.device != hidden_unpad.device:
        raise ValueError(f"indices: expected a tensor on {hidden_unpad.device} (the device of hidden_unpad), "
                         f"got {indices.device}")
    total = batch * seqlen
    if indices.numel() > 0:
        lo, hi = torch.stack(torch.aminmax(indices)).tolist()  # one synchronisation
        if lo < 0 or hi >= total:
            raise ValueError(f"indices: expected positions in [0, batch * seqlen) = [0, {total}), got values in "
                             f"[{lo}, {hi}]")
    out = _Scatter.apply(hidden_unpad, indices, total)
    return out.reshape(batch, seqlen, *hidden_unpad.shape[1:])
