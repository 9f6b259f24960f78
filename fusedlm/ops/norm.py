"""rms_norm and layer_norm: validation, backend dispatch, and the Triton ops with their autograd.

The kernels and the math are in fusedlm/kernels/norm.py. Two ops are registered for the Triton
backend, fusedlm::norm_fwd and fusedlm::norm_bwd, both serving RMSNorm and LayerNorm (``is_rms``);
autograd on norm_fwd calls norm_bwd. The torch backend is fusedlm.reference, differentiated by autograd.
"""
from typing import Optional

import torch

from .. import _backend, _validate, reference

def _triton_ops():
    """Register the Triton ops once, on first use (importing Triton only where it is usable)."""
    global _fwd_op
    if _fwd_op is not None:
        return _fwd_op
    from fusedlm.kernels import norm as K

    from .._triton import launch, num_programs, register_op, unit_stride

    def norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], eps: float, offset: float, is_rms: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, N) rows -> (y, s, mean, rstd); s empty without residual, mean empty for RMSNorm."""
        return K.norm_fwd(launch, unit_stride(x), unit_stride(residual), unit_stride(weight), unit_stride(bias),
                          eps, offset, is_rms)

    def norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: Optional[torch.Tensor],
                 dsum: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, offset: float,
                 is_rms: bool, need_dw: bool, need_db: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (ds, dweight, dbias); dweight/dbias float32 (N,), empty when not asked for."""
        return K.norm_bwd(launch, num_programs, unit_stride(dy), unit_stride(s), unit_stride(weight),
                          unit_stride(dsum), mean, rstd, offset, is_rms, need_dw, need_db)

    fwd = register_op("norm_fwd", norm_fwd)
    bwd = register_op("norm_bwd", norm_bwd)

    def setup_context(ctx, inputs, output):
        x, residual, weight, bias, eps, offset, is_rms = inputs
        _, s, mean, rstd = output
        ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
        ctx.offset, ctx.is_rms = offset, is_rms
        ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)

    def backward(ctx, dy, dsum, _dmean, _drstd):
        s, weight, mean, rstd = ctx.saved_tensors
        need_dw = weight is not None and ctx.needs_input_grad[2]
        need_db = ctx.has_bias and ctx.needs_input_grad[3]
        if dy is None:  # only the returned sum is used downstream
            ds, dw, db = dsum, None, None
        else:
            dsum = dsum if ctx.has_residual else None
            ds, dw, db = bwd(dy, s, weight, dsum, mean, rstd, ctx.offset, ctx.is_rms, need_dw, need_db)
            dw = dw.to(weight.dtype) if need_dw else None
            db = db.to(ctx.bias_dtype) if need_db else None
        return ds, ds if ctx.has_residual else None, dw, db, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    _fwd_op = fwd
    return fwd


_fwd_op = None


def _validate_norm(op, x, weight, bias, residual, eps):
    _validate.tensor("x", x, min_ndim=1)
    n = x.shape[-1]
    if n < 1:
        raise ValueError(f"x: expected a last (hidden) dimension of size >= 1, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        _validate.tensor(name, t, ndim=1, optional=True)
        _validate.shape(name, t, (n,), "the hidden size, x.shape[-1]")
    _validate.tensor("residual", residual, optional=True)
    _validate.shape("residual", residual, x.shape, "the shape of x")
    _validate.same_dtype(x=x, residual=residual)
    _validate.same_device(x=x, weight=weight, bias=bias, residual=residual)
    return _validate.number("eps", eps, non_negative=True)


def _dispatch(op, x, weight, bias, residual, eps, offset, is_rms, backend):
    kernel_dtype = _validate.kernel_dtype_reason(x, residual, weight, bias)
    name = _backend.select(op, backend, x.device, {"triton": kernel_dtype, "cuda": kernel_dtype})
    if name == "cuda":
        from .. import _cuda

        return _cuda.norm(x, weight, bias, residual, eps, offset, is_rms)
    if name == "torch":
        if is_rms:
            return reference.rms_norm_ref(x, weight, eps, offset, residual)
        return reference.layer_norm_ref(x, weight, bias, eps, residual)
    shape, n = x.shape, x.shape[-1]
    y, s, _, _ = _triton_ops()(x.reshape(-1, n), None if residual is None else residual.reshape(-1, n),
                               weight, bias, eps, offset, is_rms)
    return y.view(shape) if residual is None else (y.view(shape), s.view(shape))


def rms_norm(x, weight=None, eps=1e-6, *, offset=0.0, residual=None, backend=None):
    """RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * (offset + weight)``.

    x:        (..., N) float16 / bfloat16 / float32, any N >= 1, any strides.
    weight:   (N,) or None (no scale). Any float dtype; its gradient comes back in its dtype.
    offset:   added to weight (1.0 gives Gemma's ``(1 + weight)``); needs a weight.
    residual: same shape and dtype as x. When given, ``s = x + residual`` (in x's dtype) is normalised
              and the op returns ``(normed, s)``: the fused pre-norm residual add. Else ``normed``.
    Statistics are computed in float32; the output has x's dtype.
    """
    eps = _validate_norm("rms_norm", x, weight, None, residual, eps)
    offset = _validate.number("offset", offset)
    if weight is None and offset != 0.0:
        raise ValueError(f"offset: scales the weight, so it needs one; got weight=None and offset={offset}")
    return _dispatch("rms_norm", x, weight, None, residual, eps, offset, True, backend)


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None, backend=None):
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    x: (..., N); weight, bias: (N,) or None; biased variance, statistics in float32, output in x's
    dtype. ``residual`` as in :func:`rms_norm`: returns ``(normed, x + residual)``.
    """
    eps = _validate_norm("layer_norm", x, weight, bias, residual, eps)
    return _dispatch("layer_norm", x, weight, bias, residual, eps, 0.0, False, backend)
