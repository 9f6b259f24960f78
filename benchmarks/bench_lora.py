#!/usr/bin/env python3
"""Benchmark fusedlm.lora_linear against PEFT's lora.Linear and the frozen base linear alone.

bf16, 16384 tokens, 4096 -> 4096, rank 16, frozen base weight; fwd, bwd and fwd+bwd (gradients for
x, lora_a, lora_b), as TFLOP/s, the fraction of a measured bf16 matmul, and each provider's time over
the base linear's (fwd + dx only; the target for fusedlm is <= 1.15x). A thin front end of
fusedlm.bench (inputs, FLOP counts and providers in fusedlm/bench/ops_lora.py); see benchmarks/README.md.

    python benchmarks/bench_lora.py [--quick] [--out DIR] [--tokens 8192]
    TRITON_INTERPRET=1 python benchmarks/bench_lora.py --cpu-smoke      # harness check, no GPU
"""
import sys

from fusedlm.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("lora"))  # --ops lora --tag lora, then the command line
