"""Benchmark of swiglu, silu(gate) * up (memory-bound): fusedlm against LlamaMLP's plain PyTorch,
torch.compile of it, and Liger-Kernel's LigerSiLUMulFunction when it imports."""
import torch.nn.functional as F

import fusedlm

from .cases import MemoryOp, nbytes, randn, shape_str


def swiglu_torch(gate, up):
    """LlamaMLP's act_fn(gate_proj(x)) * up_proj(x), in the input dtype."""
    return F.silu(gate) * up


def _liger_swiglu(t):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    # Its backward writes dgate/dup over the saved inputs: every provider has its own clone of them.
    return lambda: LigerSiLUMulFunction.apply(t["gate"], t["up"])


def _make_swiglu(sz, device, dtype, gen):
    return {"gate": randn(gen, device, dtype, sz.tokens, sz.hidden),
            "up": randn(gen, device, dtype, sz.tokens, sz.hidden)}


OPS = [
    MemoryOp(
        name="swiglu", family="swiglu", fusedlm_attr="swiglu",
        make=_make_swiglu, grad=("gate", "up"),
        describe=lambda t: f"gate,up{shape_str(t['gate'])}",
        # fwd = 3MI e,  bwd = 5MI e  (silu(gate) recomputed from gate, never stored).
        bytes_doc={"fwd": "read gate, up + write h",
                   "bwd": "read gate, up, dh + write dgate, dup"},
        nbytes=lambda t, mode: nbytes(t["gate"]) * (3 if mode == "fwd" else 5),
        fusedlm_call=lambda backend, gate, up: fusedlm.swiglu(gate, up, backend=backend),
        torch_fn=swiglu_torch, liger=_liger_swiglu,
    ),
]
