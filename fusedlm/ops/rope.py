"""apply_rotary_pos_emb: validation, backend dispatch, and the Triton op with its autograd.

The kernel and the math are in fusedlm/kernels/rope.py. One op is registered for the Triton backend,
fusedlm::rope, which applies the rotation or (``backward=True``) its transpose to q and k at once;
autograd on it calls the same op with ``backward`` flipped, so it is differentiable any number of
times. Gradients for cos and sin (rarely wanted) are computed in the backward with plain torch ops,
only when asked for. The torch backend is fusedlm.reference.rope_ref, differentiated by autograd.
"""
import torch

from .. import _backend, _validate, reference
from .._autograd import rope_autograd

def _triton_ops():
    """Register the Triton op once, on first use (importing Triton only where it is usable)."""
    global _rope_op
    if _rope_op is not None:
        return _rope_op
    from fusedlm.kernels import rope as K

    from .._triton import launch, register_op

    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
             transposed: bool, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, S, D), k (B, Hkv, S, D) ((B, S, H, D) when ``transposed``); cos, sin (S, R) or
        (B or 1, S, R) -> (q_out, k_out), new tensors; the transposed rotation when ``backward``."""
        return K.rope(launch, q, k, cos, sin, interleaved, transposed, backward)

    op = register_op("rope", rope)

    backward, setup_context = rope_autograd(op)
    op.register_autograd(backward, setup_context=setup_context)
    _rope_op = op
    return op


_rope_op = None


def _validate_rope(q, k, cos, sin, unsqueeze_dim, interleaved):
    """Checks the arguments; returns unsqueeze_dim as 1 or 2."""
    _validate.tensor("q", q, ndim=4)
    _validate.tensor("k", k, ndim=4)
    _validate.tensor("cos", cos)
    _validate.tensor("sin", sin)
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int) or unsqueeze_dim not in (1, 2, -3, -2):
        raise ValueError(f"unsqueeze_dim: expected 1 ((B, H, S, D) inputs) or 2 ((B, S, H, D) inputs), "
                         f"got {unsqueeze_dim!r}")
    unsqueeze_dim = unsqueeze_dim + 4 if unsqueeze_dim < 0 else unsqueeze_dim  # of the 4-D (unsqueezed) cos
    _validate.flag("interleaved", interleaved)
    _validate.same_dtype(q=q, k=k)
    _validate.same_device(q=q, k=k, cos=cos, sin=sin)
    layout = "(B, H, S, D)" if unsqueeze_dim == 1 else "(B, S, H, D)"
    B, S, D = q.shape[0], q.shape[3 - unsqueeze_dim], q.shape[3]
    kb, ks, kd = k.shape[0], k.shape[3 - unsqueeze_dim], k.shape[3]
    if (kb, ks, kd) != (B, S, D):
        raise ValueError(f"k: expected batch, sequence length and head dim (B, S, D) = {(B, S, D)} (those of q, "
                         f"layout {layout} with unsqueeze_dim={unsqueeze_dim}), got {(kb, ks, kd)} from shape "
                         f"{tuple(k.shape)}")
    if cos.dim() not in (2, 3):
        raise ValueError(f"cos: expected a 2-D (S, R) or 3-D (B, S, R) tensor, got {cos.dim()}-D with shape "
                         f"{tuple(cos.shape)}")
    _validate.shape("sin", sin, cos.shape, "the shape of cos")
    rotary = cos.shape[-1]
    if rotary % 2 != 0 or not 2 <= rotary <= D:
        raise ValueError(f"cos: expected an even rotary dim R (the last dimension) with 2 <= R <= D = {D} (the head "
                         f"dim of q), got R = {rotary} from shape {tuple(cos.shape)}")
    if cos.shape[-2] != S:
        raise ValueError(f"cos: expected sequence length {S} (that of q, layout {layout}) in dimension -2, got "
                         f"{cos.shape[-2]} from shape {tuple(cos.shape)}")
    if cos.dim() == 3 and cos.shape[0] not in (B, 1):
        raise ValueError(f"cos: expected batch size {B} (that of q) or 1, got {cos.shape[0]} from shape "
                         f"{tuple(cos.shape)}")
    return unsqueeze_dim


def apply_rotary_pos_emb(q, k, cos, sin, *, unsqueeze_dim=1, interleaved=False, backend=None):
    """Rotary position embedding of q and k: Hugging Face Llama's ``apply_rotary_pos_emb``.

    q:     (B, H, S, D), or (B, S, H, D) with ``unsqueeze_dim=2``; float16 / bfloat16 / float32, any strides.
    k:     (B, Hkv, S, D) (or (B, S, Hkv, D)), q's dtype; Hkv may differ from H (GQA).
    cos, sin: (B, S, R), (1, S, R) or (S, R) (shared by the batch), R even and 2 <= R <= D. Only the first
           R features of each head rotate (partial rotary); the other D - R pass through unchanged.
    interleaved: False pairs features (i, i + R/2) (``rotate_half``); True pairs (2i, 2i + 1).
    Computed in float32; returns new tensors (q_out, k_out) in q's dtype. Differentiable with respect
    to q, k, cos and sin.
    """
    unsqueeze_dim = _validate_rope(q, k, cos, sin, unsqueeze_dim, interleaved)
    kernel_dtype = _validate.kernel_dtype_reason(q, k, cos, sin)
    name = _backend.select("apply_rotary_pos_emb", backend, q.device, {"triton": kernel_dtype, "cuda": kernel_dtype})
    if name == "cuda":
        from .. import _cuda

        return _cuda.rope(q, k, cos, sin, interleaved, unsqueeze_dim == 2)
    if name == "torch":
        return reference.rope_ref(q, k, cos, sin, unsqueeze_dim, interleaved)
    return _triton_ops()(q, k, cos, sin, interleaved, unsqueeze_dim == 2, False)
