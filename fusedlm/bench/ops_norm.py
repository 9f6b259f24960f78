"""Benchmarks of the norms: rms_norm, rms_norm with the fused residual add, layer_norm (memory-bound).

Providers: torch-eager (the plain PyTorch the models run; the rel_err yardstick), fusedlm, torch-native
(``F.rms_norm``), torch.compile of torch-eager, and Liger-Kernel's modules when it imports.
"""
import torch
import torch.nn.functional as F

import fusedlm

from .cases import MemoryOp, bind_params, nbytes, randn, shape_str

RMS_EPS = 1e-6
LN_EPS = 1e-5


def rms_norm_torch(x, weight):
    """Hugging Face LlamaRMSNorm.forward: statistics in float32, scaled in the input dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return weight * h.to(dtype)


def rms_norm_native(x, weight):
    """PyTorch's own RMSNorm (a fused kernel in recent releases)."""
    return F.rms_norm(x, (x.shape[-1],), weight, RMS_EPS)


def rms_norm_residual_torch(x, residual, weight):
    """The pre-norm residual add as a decoder layer writes it: s = x + residual; (norm(s), s)."""
    s = x + residual
    return rms_norm_torch(s, weight), s


def layer_norm_torch(x, weight, bias):
    """nn.LayerNorm's forward."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LN_EPS)


# Liger-Kernel peers: each takes the provider's own inputs and returns a zero-argument callable.
# Liger may write into buffers it is given: harmless for timing, since every provider gets its own
# clone of the inputs, whose first outputs are the ones checked.

def _liger_rms_norm(t):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    n = t["x"].shape[-1]
    try:
        # in_place=False: by default Liger writes dx over dy, and the timing loop reuses dy.
        mod = LigerRMSNorm(n, eps=RMS_EPS, in_place=False)
    except TypeError:  # releases without the in_place switch
        mod = LigerRMSNorm(n, eps=RMS_EPS)
    bind_params(mod, weight=t["weight"])
    return lambda: mod(t["x"])


def _liger_rms_norm_residual(t):
    from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm

    mod = bind_params(LigerFusedAddRMSNorm(t["x"].shape[-1], eps=RMS_EPS), weight=t["weight"])
    return lambda: mod(t["x"], t["residual"])


def _liger_layer_norm(t):
    from liger_kernel.transformers.layer_norm import LigerLayerNorm

    mod = bind_params(LigerLayerNorm(t["x"].shape[-1], eps=LN_EPS, bias=True), weight=t["weight"], bias=t["bias"])
    return lambda: mod(t["x"])


def _make_norm(with_bias=False, with_residual=False):
    def make(sz, device, dtype, gen):
        t = {"x": randn(gen, device, dtype, sz.tokens, sz.hidden)}
        if with_residual:
            t["residual"] = randn(gen, device, dtype, sz.tokens, sz.hidden)
        t["weight"] = 1.0 + 0.1 * randn(gen, device, dtype, sz.hidden)
        if with_bias:
            t["bias"] = 0.1 * randn(gen, device, dtype, sz.hidden)
        return t
    return make


OPS = [
    MemoryOp(
        name="rms_norm", family="norm", fusedlm_attr="rms_norm",
        make=_make_norm(), grad=("x", "weight"),
        describe=lambda t: f"x{shape_str(t['x'])} w{shape_str(t['weight'])}",
        # M x N rows, element size e:  fwd = (2MN + N) e,  bwd = (3MN + 2N) e.
        # rstd (M floats) is left out: it can be recomputed from x in the backward.
        bytes_doc={"fwd": "read x + write y + read w",
                   "bwd": "read x, dy + write dx + read w + write dw"},
        nbytes=lambda t, mode: (nbytes(t["x"]) * 2 + nbytes(t["weight"]) if mode == "fwd"
                                else nbytes(t["x"]) * 3 + nbytes(t["weight"]) * 2),
        fusedlm_call=lambda backend, x, weight: fusedlm.rms_norm(x, weight, RMS_EPS, backend=backend),
        torch_fn=rms_norm_torch, extra_torch={"torch-native": rms_norm_native},
        liger=_liger_rms_norm,
    ),
    MemoryOp(
        name="rms_norm_residual", family="norm", fusedlm_attr="rms_norm",
        make=_make_norm(with_residual=True), grad=("x", "residual", "weight"),
        describe=lambda t: f"x,residual{shape_str(t['x'])} w{shape_str(t['weight'])}",
        # fwd = (4MN + N) e.  bwd: the gradient reaching s = x + residual is dy through the norm plus
        # ds from s's other use (the next residual); dx and dresidual are that same tensor, written
        # once:  bwd = (4MN + 2N) e.
        bytes_doc={"fwd": "read x, residual + write y, s + read w",
                   "bwd": "read s, dy, ds + write dx (= dresidual) + read w + write dw"},
        nbytes=lambda t, mode: nbytes(t["x"]) * 4 + nbytes(t["weight"]) * (1 if mode == "fwd" else 2),
        fusedlm_call=lambda backend, x, residual, weight: fusedlm.rms_norm(
            x, weight, RMS_EPS, residual=residual, backend=backend),
        torch_fn=rms_norm_residual_torch, liger=_liger_rms_norm_residual,
    ),
    MemoryOp(
        name="layer_norm", family="norm", fusedlm_attr="layer_norm",
        make=_make_norm(with_bias=True), grad=("x", "weight", "bias"),
        describe=lambda t: f"x{shape_str(t['x'])} w,b{shape_str(t['weight'])}",
        # fwd = (2MN + 2N) e,  bwd = (3MN + 3N) e  (mean and rstd recomputable, left out).
        bytes_doc={"fwd": "read x + write y + read w, b",
                   "bwd": "read x, dy + write dx + read w + write dw, db"},
        nbytes=lambda t, mode: (nbytes(t["x"]) * 2 + nbytes(t["weight"], t["bias"]) if mode == "fwd"
                                else nbytes(t["x"]) * 3 + nbytes(t["weight"]) + nbytes(t["weight"], t["bias"])),
        fusedlm_call=lambda backend, x, weight, bias: fusedlm.layer_norm(x, weight, bias, LN_EPS, backend=backend),
        torch_fn=layer_norm_torch, liger=_liger_layer_norm,
    ),
]
