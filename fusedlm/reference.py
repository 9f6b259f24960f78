"""Plain PyTorch references: the "torch" backend, the CPU fallback and the yardstick.

Each function computes in float32 (float64 when given float64, which is how the tests and
``fusedlm verify`` build their exact reference) and returns the input dtype, exactly the contract the
fused kernels meet. Autograd differentiates them as they stand.
"""
import torch
import torch.nn.functional as F


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm_ref(x, weight=None, eps=1e-6, offset=0.0, residual=None):
    """y = s / sqrt(mean(s^2) + eps) * (offset + weight), s = x (+ residual, added in x's dtype)."""
    s = x if residual is None else x + residual
    ct = _compute_dtype(s)
    sf = s.to(ct)
    y = sf * torch.rsqrt(sf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (offset + weight.to(ct))
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


def layer_norm_ref(x, weight=None, bias=None, eps=1e-5, residual=None):
    """y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias (biased variance), s as in rms_norm_ref."""
    s = x if residual is None else x + residual
    ct = _compute_dtype(s)
    sf = s.to(ct)
    mean = sf.mean(-1, keepdim=True)
    var = (sf - mean).square().mean(-1, keepdim=True)
    y = (sf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


def swiglu_ref(gate, up):
    """silu(gate) * up, computed in float32."""
    ct = _compute_dtype(gate)
    return (F.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def _rotate(x, interleaved):
    """The 90-degree turn of each rotary pair: (a, b) -> (-b, a)."""
    if interleaved:  # pairs (2i, 2i+1)
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # pairs (i, i + R/2): Hugging Face's rotate_half
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_one(x, cos, sin, interleaved):
    rotary = cos.shape[-1]
    ct = _compute_dtype(x)
    xr = x[..., :rotary].to(ct)
    out = (xr * cos.to(ct) + _rotate(xr, interleaved) * sin.to(ct)).to(x.dtype)
    return torch.cat((out, x[..., rotary:]), dim=-1) if rotary < x.shape[-1] else out


def rope_ref(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """Hugging Face Llama's apply_rotary_pos_emb, with partial rotary (the first R features turn)."""
    if cos.dim() == 2:  # (S, R) shared by the batch
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rope_one(q, cos, sin, interleaved), _rope_one(k, cos, sin, interleaved)
