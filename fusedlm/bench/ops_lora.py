"""Benchmark of the fused LoRA linear (compute-bound): fusedlm.lora_linear against PEFT's lora.Linear,
torch.compile of the plain formula, and the frozen base linear alone (the baseline)."""
import torch.nn as nn
import torch.nn.functional as F

import fusedlm

from .cases import (Bound, Case, ComputeOp, bind_params, device_generator, fusedlm_providers, import_peer, randn,
                    shape_str)

LORA_FLOPS_DOC = {
    "fwd": "2MNK + 2Mr(K + N)  (x W^T, then (x A^T) B^T)",
    "bwd": "2MNK + 4Mr(K + N)  (dx = dy W + (dy B) A; dA, dB; W frozen: no dW)",
    "fwd+bwd": "4MNK + 6Mr(K + N)",
}
LORA_BASE_FLOPS_DOC = {"fwd": "2MNK", "bwd": "2MNK (dx only)", "fwd+bwd": "4MNK"}
LORA_TARGET = 1.15  # fusedlm's goal: fwd+bwd within 1.15x of the frozen base linear's time


def lora_torch(x, weight, lora_a, lora_b, scaling):
    """PEFT's lora.Linear forward without dropout: base(x) + lora_B(lora_A(x)) * scaling."""
    return F.linear(x, weight) + F.linear(F.linear(x, lora_a), lora_b) * scaling


def _peft_builder(scaling):
    """PEFT's own lora.Linear (get_peft_model on a one-Linear module), using our tensors as its weights."""
    def build(t):
        peft = import_peer("peft")
        r, n_out, n_in = t["lora_a"].shape[0], t["weight"].shape[0], t["weight"].shape[1]

        class OneLinear(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(n_in, n_out, bias=False, device=t["x"].device, dtype=t["x"].dtype)

            def forward(self, x):
                return self.proj(x)

        model = peft.get_peft_model(OneLinear(), peft.LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=0.0,
                                                                 target_modules=["proj"]))
        layer = model.base_model.model.proj
        if abs(layer.scaling["default"] - scaling) > 1e-6:
            raise RuntimeError(f"PEFT's scaling is {layer.scaling['default']}, expected {scaling}")
        bind_params(layer.base_layer, weight=t["weight"])
        bind_params(layer.lora_A["default"], weight=t["lora_a"])
        bind_params(layer.lora_B["default"], weight=t["lora_b"])
        x = t["x"]
        return lambda: layer(x)
    return build


def lora_cases(run):
    """bf16 lora.Linear, M = tokens, K -> N, rank r, frozen base weight, no bias, no dropout; gradients
    for x, lora_a, lora_b. The plain base linear (dx only) is the baseline."""
    sz = run.sizes
    M, K, N, r = sz.tokens, sz.lora_in, sz.lora_out, sz.lora_rank
    scaling = sz.lora_alpha / r

    def make():
        gen = device_generator(run, 7)
        return {"x": randn(gen, run.device, run.dtype, M, K),
                "weight": randn(gen, run.device, run.dtype, N, K, scale=K ** -0.5),
                "lora_a": randn(gen, run.device, run.dtype, r, K, scale=K ** -0.5),
                "lora_b": randn(gen, run.device, run.dtype, N, r, scale=r ** -0.5)}

    flops = {"fwd": 2 * M * N * K + 2 * M * r * (K + N), "bwd": 2 * M * N * K + 4 * M * r * (K + N),
             "fwd+bwd": 4 * M * N * K + 6 * M * r * (K + N)}
    base_flops = {"fwd": 2 * M * N * K, "bwd": 2 * M * N * K, "fwd+bwd": 4 * M * N * K}

    def work(t, mode, provider):
        if provider == "base-linear":
            return base_flops[mode], LORA_BASE_FLOPS_DOC[mode]
        return flops[mode], LORA_FLOPS_DOC[mode]

    def bind(backend, t):
        x, w, a, b = t["x"], t["weight"], t["lora_a"], t["lora_b"]
        return lambda: fusedlm.lora_linear(x, w, None, a, b, scaling, backend=backend)

    def compiled(t):
        fn = run.compiled(lora_torch)
        return lambda: fn(t["x"], t["weight"], t["lora_a"], t["lora_b"], scaling)

    providers = {
        # The reference line: the frozen base projection alone, fwd + dx.
        "base-linear": lambda t: Bound(lambda: F.linear(t["x"], t["weight"]), [t["x"]], compare=False),
        "peft": _peft_builder(scaling),
        **fusedlm_providers(bind),
        "torch-compile": compiled,
    }
    return [Case(op="lora_linear", kind="compute", label=f"{M}x{K}->{N} r={r}", make=make,
                 describe=lambda t: (f"x{shape_str(t['x'])} W{shape_str(t['weight'])} frozen, "
                                     f"A{shape_str(t['lora_a'])} B{shape_str(t['lora_b'])}, scaling {scaling:g}, "
                                     "no bias, no dropout"),
                 grad=("x", "lora_a", "lora_b"), work=work, providers=providers,
                 reference=("peft", "torch-compile"), baseline="base-linear",
                 params={"tokens": M, "in_features": K, "out_features": N, "rank": r, "scaling": scaling,
                         "target_vs_baseline": LORA_TARGET})]


OPS = [ComputeOp("lora_linear", "lora", ("lora_linear",), lora_cases, LORA_FLOPS_DOC)]
