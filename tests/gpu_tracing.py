"""Trace every registered Triton op the way torch.compile does on a GPU, without a GPU.

On CUDA, fusedlm's ops are ``torch.library.triton_op``s: under AOT dispatch (torch.compile) their Python
body is traced with fake tensors and each kernel launch becomes a ``triton_kernel_wrapper_functional``
node through ``wrap_triton``. CPU tests use the interpreter, where that path is not taken. This script
registers the ops the GPU way (TRITON_INTERPRET unset), builds fake CUDA tensors (FakeTensorMode needs
no device), exports forward and backward ops with ``aot_export_module``, and checks that every kernel
the launchers use shows up in the graph. Autotuned attention launches are traced too
(FUSEDLM_AUTOTUNE=1). Exit status 1 on any failure.

    python tests/gpu_tracing.py
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ["FUSEDLM_AUTOTUNE"] = sys.argv[1] if len(sys.argv) > 1 else "0"

import torch  # noqa: E402
from torch._functorch.aot_autograd import aot_export_module  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from fusedlm.ops import attention, deberta, lora, norm, rope, swiglu  # noqa: E402

import fusedlm._triton  # noqa: E402

fusedlm._triton._sm_count = lambda index: 132  # an H100/H200's; there is no device to ask
for family in (attention, deberta, lora, norm, rope, swiglu):
    family._triton_ops()  # not interpreting: each op is a torch.library.triton_op

ops = torch.ops.fusedlm
# the DeBERTa ops' band (host ints from the bucket parameters)
band = band_varlen = list(deberta.relative_band(256, 512))
bf16 = torch.bfloat16


def calls(t):
    """(name, function of fake CUDA tensors that calls registered ops) for every op and its backward."""
    B, H, S, E = 2, 4, 128, 64
    q, k, v = t(B, H, S, E), t(B, 2, S, E), t(B, 2, S, E)
    kpm = torch.ones(B, S, device="cuda", dtype=torch.bool)
    x, w = t(64, 4096), t(4096)
    cu = torch.tensor([0, 100, 256], device="cuda", dtype=torch.int32)
    qp, kp = t(256, H, E), t(256, 2, E)
    seed = torch.zeros(1, device="cuda", dtype=torch.int64)
    pos = t(H, 512, E)
    rel = torch.zeros(2 * S - 1, device="cuda", dtype=torch.int32)
    rel_varlen = torch.zeros(2 * 156 - 1, device="cuda", dtype=torch.int32)
    a, b_ = t(16, 4096), t(4096, 16)
    return [
        ("norm", lambda: (ops.norm_fwd(x, x, w, w, 1e-5, 0.0, False),
                          ops.norm_bwd(x, x, w, x, torch.ones(64, device="cuda"), torch.ones(64, device="cuda"), 0.0,
                                       False, True, True))),
        ("swiglu", lambda: (ops.swiglu_fwd(x, x), ops.swiglu_bwd(x, x, x))),
        ("rope", lambda: ops.rope(q, k, t(S, E), t(S, E), False, False, False)),
        ("attention", lambda: (ops.attention_fwd(q, k, v, None, kpm, None, None, S, S, 0.125, True, False, 0.1, seed),
                               ops.attention_bwd(q, None, q, k, v, q, torch.zeros(B, H, S, device="cuda"), None, kpm,
                                                 None, None, S, S, 0.125, True, False, 0.1, seed))),
        ("varlen", lambda: (ops.attention_fwd(qp, kp, kp, None, None, cu, cu, 156, 156, 0.125, True, True, 0.0, None),
                            ops.attention_bwd(qp, None, qp, kp, kp, qp, torch.zeros(256, H, device="cuda"), None, None,
                                              cu, cu, 156, 156, 0.125, True, True, 0.0, None))),
        ("deberta", lambda: (ops.deberta_fwd(t(B, H, S, E), t(B, H, S, E), t(B, H, S, E), pos, pos, kpm, None, rel,
                                             S, 0.1, 0.1, seed, band),
                             ops.deberta_bwd(t(B, H, S, E), None, t(B, H, S, E), t(B, H, S, E), t(B, H, S, E), pos,
                                             pos, t(B, H, S, E), torch.zeros(B, H, S, device="cuda"), kpm, None, rel,
                                             S, 0.1, 0.1, seed, True, True, band))),
        ("deberta_varlen", lambda: (ops.deberta_fwd(qp, qp, qp, pos, pos, None, cu, rel_varlen, 156, 0.1, 0.0, None,
                                                    band_varlen),
                                    ops.deberta_bwd(qp, torch.zeros(256, H, device="cuda"), qp, qp, qp, pos, pos, qp,
                                                    torch.zeros(256, H, device="cuda"), None, cu, rel_varlen, 156,
                                                    0.1, 0.0,
                                                    None, True, True, band_varlen))),
        ("lora", lambda: (ops.lora_fwd(x, t(4096, 4096), None, a, b_, 2.0, None),
                          ops.lora_bwd(x, x, t(4096, 4096), a, b_, t(64, 16), None, 2.0, True, False, False, True,
                                       True))),
    ]


NAMES = ["norm", "swiglu", "rope", "attention", "varlen", "deberta", "deberta_varlen", "lora"]


class Wrap(torch.nn.Module):
    """The calls of one op family; its tensors are made inside forward so that the export traces them."""

    def __init__(self, name, t):
        super().__init__()
        self.name, self.t = name, t

    def forward(self):
        res = dict(calls(self.t))[self.name]()
        flat = []

        def walk(r):
            if isinstance(r, torch.Tensor):
                flat.append(r)
            elif isinstance(r, (tuple, list)):
                for x in r:
                    walk(x)
        walk(res)
        return tuple(flat)


def main():
    failures = 0
    with FakeTensorMode():
        def t(*shape):
            return torch.randn(*shape, device="cuda", dtype=bf16)

        for name in NAMES:
            try:
                gm, _ = aot_export_module(Wrap(name, t), (), trace_joint=False)
                kernels = sorted({line.split("kernel_idx = ")[1].split(",")[0] for line in str(gm.code).splitlines()
                                  if "triton_kernel_wrapper_functional(" in line})
                if not kernels:
                    raise AssertionError("no Triton kernel in the traced graph: the op was not decomposed")
                print(f"ok   {name}: {len(kernels)} kernel launch(es) traced", flush=True)
            except Exception as e:  # noqa: BLE001
                failures += 1
                print(f"FAIL {name}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
                if os.environ.get("TRACE_DEBUG"):
                    import traceback
                    traceback.print_exc()
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
