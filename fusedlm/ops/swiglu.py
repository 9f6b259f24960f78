"""swiglu: validation, backend dispatch, and the Triton ops with their autograd (kernels/swiglu.py)."""
import torch

from .. import _backend, _validate, reference

_fwd_op = None


def _rows(t):
    """(..., N) -> (M, N) with unit stride along N, a view where the strides allow it."""
    from .._triton import unit_stride

    return unit_stride(t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t)


def _triton_ops():
    """Register fusedlm::swiglu_fwd / swiglu_bwd once, with autograd."""
    global _fwd_op
    if _fwd_op is not None:
        return _fwd_op
    from fusedlm.kernels import swiglu as K

    from .._triton import launch, register_op

    def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return K.swiglu_fwd(launch, _rows(gate), _rows(up)).view(gate.shape)

    def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dgate, dup = K.swiglu_bwd(launch, _rows(dy), _rows(gate), _rows(up))
        return dgate.view(gate.shape), dup.view(up.shape)

    fwd = register_op("swiglu_fwd", swiglu_fwd)
    bwd = register_op("swiglu_bwd", swiglu_bwd)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return bwd(dy, gate, up)

    fwd.register_autograd(backward, setup_context=setup_context)
    _fwd_op = fwd
    return fwd


CUDA_MAX_ROW = 65535 * 256


def swiglu(gate, up, *, backend=None):
    """SwiGLU activation: ``silu(gate) * up``, silu computed in float32, output in gate's dtype.

    gate, up: the same shape (any rank >= 1), dtype and device; any strides (the two halves of a
    fused gate_up projection work without a copy).
    """
    _validate.tensor("gate", gate, min_ndim=1)
    _validate.tensor("up", up)
    _validate.shape("up", up, gate.shape, "the shape of gate")
    _validate.same_dtype(gate=gate, up=up)
    _validate.same_device(gate=gate, up=up)
    kernel_dtype = _validate.kernel_dtype_reason(gate, up)
    # The CUDA kernel spreads a row over grid axis 1 in 256-feature blocks (at most 65535 of them).
    too_wide = (f"rows wider than {CUDA_MAX_ROW} features (got {gate.shape[-1]}); the triton backend serves them"
                if gate.shape[-1] > CUDA_MAX_ROW else None)
    name = _backend.select("swiglu", backend, gate.device,
                           {"triton": kernel_dtype, "cuda": kernel_dtype or too_wide})
    if name == "cuda":
        from .. import _cuda

        return _cuda.swiglu(gate, up)
    if name == "torch":
        return reference.swiglu_ref(gate, up)
    return _triton_ops()(gate, up)
