#!/usr/bin/env python3
"""Benchmark attention: fusedlm.scaled_dot_product_attention (and varlen_attention on a padded batch).

bf16, B x S = 16384 tokens, 16 heads of 128, S from 1024 to 16384, causal and not, fwd, bwd and
fwd+bwd, against PyTorch's SDPA backends (flash, memory-efficient, cuDNN, math at small S) and
FlexAttention; plus a padded batch (half the keys real) against SDPA with the same mask and fusedlm's
varlen path on the packed tokens. TFLOP/s and the fraction of a measured bf16 matmul. A thin front end
of fusedlm.bench (inputs, FLOP counts and providers in fusedlm/bench/ops_attention.py); see benchmarks/README.md.

    python benchmarks/bench_attention.py [--quick] [--seqlens 1024,4096] [--autotune] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --cpu-smoke      # harness check, no GPU
"""
import sys

from fusedlm.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("attention"))  # --ops attention --tag attention, then the command line
