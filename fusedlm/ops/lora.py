"""lora_linear: validation, backend dispatch, the fused ops with their autograd, and the torch reference.

The kernels and the math are in fusedlm/kernels/lora.py (Triton) and csrc/lora.cu (CUDA C++): one GEMM
with a low-rank pair in its epilogue. Two ops are registered per backend, the same Python around a
different kernel: fusedlm::lora_fwd (x A^T once, then the base GEMM with s * (x A^T) B^T and the bias in its
epilogue) and fusedlm::lora_bwd (dx with the same fused kernel; dA, dB, and dW / db only when asked for,
with torch matmuls for those skinny or optional products); the cuda backend's are fusedlm::lora_fwd_cuda
and fusedlm::lora_bwd_cuda around fusedlm_C::lora_gemm. Autograd on lora_fwd calls lora_bwd. The torch
backend is lora_linear_ref below, differentiated by autograd.

Dropout. The keep mask is drawn by the public function from torch's default generator for x's device,
``keep = torch.rand(x.shape, device=x.device) >= dropout_p`` (so the same torch.manual_seed gives the
same mask, on both backends), and handed to the ops as a bool tensor: it is materialised, one byte per
element of x, and saved for the backward. The 1 / (1 - p) factor is folded into the scaling, so the ops
see x * keep and s / (1 - p) and never round an x_drop.
"""
from typing import Optional

import torch

from .. import _backend, _validate

def lora_linear_ref(x, weight, bias, lora_a, lora_b, scaling, keep=None):
    """y = x W^T + b + scaling * ((x * keep) A^T) B^T, computed in float32 (float64 for float64 input),
    returned in x's dtype. ``scaling`` already includes dropout's 1 / (1 - p) when ``keep`` is given."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    y = xf @ weight.to(ct).t()
    if bias is not None:
        y = y + bias.to(ct)
    xd = xf if keep is None else xf * keep
    y = y + scaling * ((xd @ lora_a.to(ct).t()) @ lora_b.to(ct).t())
    return y.to(x.dtype)


def _empty(device, dtype):
    return torch.empty(0, device=device, dtype=dtype)


def _kernels(backend):
    """(gemm_fwd, gemm_dx, register) for a backend: the fused GEMM's two uses and how its ops register."""
    if backend == "triton":  # (importing Triton only where it is usable)
        from fusedlm.kernels import lora as K

        from .._triton import launch, register_op

        return (lambda *a: K.lora_fwd(launch, *a), lambda *a: K.lora_dx(launch, *a), register_op)
    from .. import _cuda

    return _cuda.lora_fwd, _cuda.lora_dx, _cuda.register_op


def _ops(backend):
    """Register the backend's ops once, on first use; returns the forward op (with autograd)."""
    if backend in _fwd_ops:
        return _fwd_ops[backend]
    gemm_fwd, gemm_dx, register_op = _kernels(backend)
    empty = _empty

    def lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scaling: float, keep: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, K), weight (N, K), bias (N,) or None, lora_a (r, K), lora_b (N, r), keep (M, K) bool or
        None -> (y (M, N), xa (M, r)) with xa = (x * keep) A^T in x's dtype (kept for dB)."""
        xa = torch.mm(x if keep is None else x * keep, lora_a.t())
        y = gemm_fwd(x, weight, bias, xa, lora_b, scaling)
        return y, xa

    def lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, xa: torch.Tensor, keep: Optional[torch.Tensor], scaling: float,
                 need_dx: bool, need_dweight: bool, need_dbias: bool, need_da: bool, need_db: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dx, dweight, dbias, dlora_a, dlora_b), each an empty tensor when not asked for."""

        dyb = torch.mm(dy, lora_b) if (need_dx or need_da) else None  # (M, r)
        dx = gemm_dx(dy, weight, dyb, lora_a, keep, scaling) if need_dx else empty(dy.device, dy.dtype)
        if need_da:
            da = torch.mm(dyb.t(), x if keep is None else x * keep).mul_(scaling)
        else:
            da = empty(dy.device, dy.dtype)
        db = torch.mm(dy.t(), xa).mul_(scaling) if need_db else empty(dy.device, dy.dtype)
        dweight = torch.mm(dy.t(), x) if need_dweight else empty(dy.device, dy.dtype)
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_dbias else empty(dy.device, dy.dtype)
        return dx, dweight, dbias, da, db

    fwd = register_op("lora_fwd", lora_fwd)
    bwd = register_op("lora_bwd", lora_bwd)

    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, scaling, keep = inputs
        _, xa = output
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, keep)
        ctx.scaling = scaling
        ctx.set_materialize_grads(False)

    def backward(ctx, dy, _dxa):
        x, weight, lora_a, lora_b, xa, keep = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dy is None:  # only xa (internal, never exposed) could have been used
            return None, None, None, None, None, None, None
        dx, dw, dbias, da, db = bwd(dy, x, weight, lora_a, lora_b, xa, keep, ctx.scaling,
                                    need[0], need[1], need[2], need[3], need[4])
        return (dx if need[0] else None, dw if need[1] else None, dbias if need[2] else None,
                da if need[3] else None, db if need[4] else None, None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    _fwd_ops[backend] = fwd
    return fwd


_fwd_ops = {}


def _triton_ops():
    return _ops("triton")


def _cuda_reason(x):
    """Why the cuda backend's kernel (csrc/lora.cu) cannot take this call, or None."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the cuda LoRA kernel takes float16 or bfloat16 (tensor cores), got {x.dtype}"
    return None


def _validate_lora(x, weight, bias, lora_a, lora_b, scaling, dropout_p):
    """Checks every argument; returns (scaling, dropout_p) as floats."""
    _validate.tensor("x", x, min_ndim=1)
    _validate.tensor("weight", weight, ndim=2)
    _validate.tensor("bias", bias, ndim=1, optional=True)
    _validate.tensor("lora_a", lora_a, ndim=2)
    _validate.tensor("lora_b", lora_b, ndim=2)
    k = x.shape[-1]
    if k < 1:
        raise ValueError(f"x: expected a last (in_features) dimension of size >= 1, got shape {tuple(x.shape)}")
    n, r = weight.shape[0], lora_a.shape[0]
    if n < 1:
        raise ValueError(f"weight: expected at least one output feature, got shape {tuple(weight.shape)}")
    _validate.shape("weight", weight, (n, k), "(out_features, in_features) with in_features = x.shape[-1]")
    if r < 1:
        raise ValueError(f"lora_a: expected a rank r >= 1 in dimension 0, got shape {tuple(lora_a.shape)}")
    _validate.shape("lora_a", lora_a, (r, k), "(r, in_features) with in_features = x.shape[-1]")
    _validate.shape("lora_b", lora_b, (n, r),
                    "(out_features, r): out_features = weight.shape[0], rank r = lora_a.shape[0]")
    _validate.shape("bias", bias, (n,), "(out_features,) with out_features = weight.shape[0]")
    _validate.same_dtype(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    _validate.same_device(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    scaling = _validate.number("scaling", scaling)
    dropout_p = _validate.number("dropout_p", dropout_p, non_negative=True)
    if not dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    return scaling, dropout_p


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, *, dropout_p=0.0, backend=None):
    """A linear layer with a LoRA adapter (PEFT's ``lora.Linear``), fused:
    ``y = x @ weight.T + bias + scaling * (dropout(x) @ lora_a.T) @ lora_b.T``.

    x:       (..., in_features) float16 / bfloat16 / float32 (float64 on the torch backend), any strides.
    weight:  (out_features, in_features); bias: (out_features,) or None; lora_a: (r, in_features);
             lora_b: (out_features, r) (PEFT's shapes: ``lora_A.weight``, ``lora_B.weight``). All in x's
             dtype (TypeError otherwise) and on x's device. Any rank r >= 1 (1 to 256 is the tested range).
    scaling: a number, PEFT's ``alpha / r``.
    dropout_p: dropout probability in [0, 1) on the LoRA branch only (the base projection sees x as is).
             The keep mask is ``torch.rand(x.shape, device=x.device) >= dropout_p``, drawn from torch's
             default generator (the same torch.manual_seed gives the same result on either backend;
             torch.compile with inductor draws its own random numbers). The mask is materialised (one
             byte per element of x) and reused by the backward. Pass 0.0 in eval mode.
    Returns (..., out_features) in x's dtype. The Triton backend accumulates in float32 and rounds once;
    x @ lora_a.T is rounded to x's dtype before the fused epilogue (as PEFT's layer does). Gradients
    for x, lora_a, lora_b, and for weight / bias only when they require grad (a frozen base costs no
    dW work).
    """
    scaling, dropout_p = _validate_lora(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    keep = None
    if dropout_p > 0.0:
        keep = torch.rand(x.shape, device=x.device) >= dropout_p
        scaling = scaling / (1.0 - dropout_p)
    name = _backend.select("lora_linear", backend, x.device, {
        "triton": _validate.kernel_dtype_reason(x),
        "cuda": _cuda_reason(x),
    })
    if name == "torch":
        return lora_linear_ref(x, weight, bias, lora_a, lora_b, scaling, keep)
    k, n = x.shape[-1], weight.shape[0]
    y, _ = _ops(name)(x.reshape(-1, k), weight, bias, lora_a, lora_b, scaling,
                      None if keep is None else keep.reshape(-1, k))
    return y.view(*x.shape[:-1], n)
