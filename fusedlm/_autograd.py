"""Autograd formulas shared by the registered ops of one op family, the Triton op and the CUDA C++ op alike.

They sit below fusedlm/ops so that fusedlm/_cuda.py (which registers autograd on the C++ ops) and the ops
modules both import them downward.
"""
from . import reference


def rope_autograd(op):
    """(backward, setup_context) of a registered rope op with the signature
    (q, k, cos, sin, interleaved, transposed, backward) -> (q_out, k_out), triton's or cuda's: the input
    gradients are the same op with ``backward`` flipped (the transposed rotation)."""

    def setup_context(ctx, inputs, output):
        q, k, cos, sin, interleaved, transposed, backward = inputs
        need_cos_sin = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        # q and k are kept only for the gradients of cos and sin.
        ctx.save_for_backward(cos, sin, q if need_cos_sin else None, k if need_cos_sin else None)
        ctx.interleaved, ctx.transposed, ctx.backward = interleaved, transposed, backward

    def backward(ctx, dq_out, dk_out):
        cos, sin, q, k = ctx.saved_tensors
        dq, dk = op(dq_out, dk_out, cos, sin, ctx.interleaved, ctx.transposed, not ctx.backward)
        dcos = dsin = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dcos, dsin = _cos_sin_grads((dq_out, dk_out), (q, k), cos, sin, ctx.interleaved,
                                        ctx.transposed, ctx.backward)
        return dq, dk, dcos, dsin, None, None, None

    return backward, setup_context


def _cos_sin_grads(grads, inputs, cos, sin, interleaved, transposed, backward):
    """d(cos), d(sin) of the op from the output gradients g and inputs x of q and k, in float32.

    Per element of the rotary part the forward is ``x * cos + rot(x) * sin``, so
    dcos = sum g * x and dsin = sum g * rot(x); the transposed rotation (``backward``) is
    ``x * cos - rot(x * sin)``, whose dsin is sum rot(g) * x. Sums run over the heads, and over the
    batch where cos/sin are shared by it.
    """
    rotary = cos.shape[-1]
    dcos = dsin = 0
    for g, x in zip(grads, inputs):
        if transposed:  # to (B, H, S, D)
            g, x = g.transpose(1, 2), x.transpose(1, 2)
        g = g[..., :rotary].float()
        x = x[..., :rotary].float()
        dcos = dcos + (g * x).sum(1)
        if backward:
            dsin = dsin + (reference._rotate(g, interleaved) * x).sum(1)
        else:
            dsin = dsin + (g * reference._rotate(x, interleaved)).sum(1)
    if cos.dim() == 2:
        dcos, dsin = dcos.sum(0), dsin.sum(0)
    elif cos.shape[0] != dcos.shape[0]:  # (1, S, R) broadcast over the batch
        dcos, dsin = dcos.sum(0, keepdim=True), dsin.sum(0, keepdim=True)
    return dcos.to(cos.dtype), dsin.to(sin.dtype)
