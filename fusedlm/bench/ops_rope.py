"""Benchmark of rope, apply_rotary_pos_emb (memory-bound): fusedlm against Hugging Face Llama's plain
PyTorch, torch.compile of it, and Liger-Kernel's liger_rotary_pos_emb when it imports."""
import torch

import fusedlm

from .cases import MemoryOp, nbytes, randn, shape_str


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_torch(q, k, cos, sin):
    """Hugging Face Llama's apply_rotary_pos_emb (unsqueeze_dim=1), in the input dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _liger_rope(t):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    # It rotates q/k in place when their storage is (B, S, H, D): every provider has its own clone.
    return lambda: liger_rotary_pos_emb(t["q"], t["k"], t["cos"], t["sin"])


def _make_rope(sz, device, dtype, gen):
    b, d = sz.rope_batch, sz.rope_head_dim
    if sz.tokens % b:
        raise ValueError(f"--tokens {sz.tokens} is not a multiple of the rope batch {b}")
    s = sz.tokens // b

    def heads(h):
        # The layout a Hugging Face attention layer hands to apply_rotary_pos_emb:
        # q_proj(x).view(B, S, H, D).transpose(1, 2), a (B, H, S, D) view of (B, S, H, D) storage.
        return randn(gen, device, dtype, b, s, h, d).transpose(1, 2)

    # Real rotary tables (LlamaRotaryEmbedding, base 10000): cos[..., i] == cos[..., i + D/2].
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().expand(b, s, d).contiguous().to(device, dtype)
    sin = emb.sin().expand(b, s, d).contiguous().to(device, dtype)
    return {"q": heads(sz.rope_heads), "k": heads(sz.rope_kv_heads), "cos": cos, "sin": sin}


OPS = [
    MemoryOp(
        name="rope", family="rope", fusedlm_attr="apply_rotary_pos_emb",
        make=_make_rope, grad=("q", "k"),
        describe=lambda t: (f"q{shape_str(t['q'])} k{shape_str(t['k'])} cos,sin{shape_str(t['cos'])} "
                            f"tokens={t['q'].shape[0] * t['q'].shape[2]}, q/k in (B,S,H,D) storage"),
        # fwd = 2(|q| + |k|) e + |cos| e: q and k are read and written once; cos and sin are each
        # read at half their size, since the API guarantees cos[..., i] == cos[..., i + D/2].
        # bwd: the same traffic on dq_out/dk_out -> dq/dk (cos, sin are constants: no gradient).
        bytes_doc={"fwd": "read q, k + write q_out, k_out + read half of cos, sin",
                   "bwd": "read dq_out, dk_out + write dq, dk + read half of cos, sin"},
        nbytes=lambda t, mode: 2 * nbytes(t["q"], t["k"]) + nbytes(t["cos"], t["sin"]) // 2,
        fusedlm_call=lambda backend, q, k, cos, sin: fusedlm.apply_rotary_pos_emb(q, k, cos, sin, backend=backend),
        torch_fn=rope_torch, liger=_liger_rope,
    ),
]
