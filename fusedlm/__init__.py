"""fusedlm: fused Triton and CUDA kernels for transformer models, bound to PyTorch autograd.

Public API (see the README and shared/API.md): backend selection, and the ops
rms_norm, layer_norm, swiglu, apply_rotary_pos_emb, scaled_dot_product_attention, varlen_attention,
unpad_input, pad_input, deberta_attention, deberta_varlen_attention, kv_cache_attention, linear_cross_entropy,
lora_linear; modules in fusedlm.nn.
"""
from ._backend import available_backends, get_backend, set_backend, use_backend
from .ops.attention import scaled_dot_product_attention, varlen_attention
from .ops.cross_entropy import linear_cross_entropy
from .ops.deberta import deberta_attention, deberta_varlen_attention
from .ops.kv_cache import kv_cache_attention
from .ops.lora import lora_linear
from .ops.norm import layer_norm, rms_norm
from .ops.padding import pad_input, unpad_input
from .ops.rope import apply_rotary_pos_emb
from .ops.swiglu import swiglu

__version__ = "0.1.0"

__all__ = [
    "available_backends", "get_backend", "set_backend", "use_backend",
    "rms_norm", "layer_norm", "swiglu", "apply_rotary_pos_emb",
    "scaled_dot_product_attention", "varlen_attention", "unpad_input", "pad_input", "deberta_attention",
    "deberta_varlen_attention", "kv_cache_attention", "linear_cross_entropy",
    "lora_linear", "nn",
]


def _register_triton_ops():
    """Register every Triton op now, where Triton is usable, so torch.compile finds them defined."""
    from . import _backend

    if _backend.why_unavailable("triton") is None:
        from .ops import attention, cross_entropy, deberta, kv_cache, lora, norm, rope, swiglu

        attention._triton_ops()
        cross_entropy._triton_ops()
        deberta._triton_ops()
        kv_cache._triton_ops()
        lora._triton_ops()
        norm._triton_ops()
        rope._triton_ops()
        swiglu._triton_ops()


_register_triton_ops()


def _register_cuda_ops():
    """Resolve the cuda backend now (import fusedlm._C; with FUSEDLM_CUDA_CPU=1 load, or build once, the CPU
    harness) and register its Python-side ops, so that a first call inside torch.compile finds them: an import
    or a compiler run cannot be traced."""
    from . import _backend

    if _backend.why_unavailable("cuda") is None:
        from .ops import lora

        lora._ops("cuda")


_register_cuda_ops()

from . import nn  # noqa: E402  (fusedlm.nn.RMSNorm etc.; builds on the ops above)
