#!/usr/bin/env python3
"""Benchmark rope (apply_rotary_pos_emb): q (4, 32, 4096, 128), k (4, 8, 4096, 128), 16384 tokens.

fusedlm against PyTorch eager, torch.compile and Liger-Kernel (when installed), forward and backward,
as GB/s and the fraction of the measured copy bandwidth. A thin front end of fusedlm.bench (inputs and
byte counts in fusedlm/bench/ops_rope.py); see benchmarks/README.md.

    python benchmarks/bench_rope.py [--quick] [--out DIR] [--modes fwd,bwd] [--providers ...]
    TRITON_INTERPRET=1 python benchmarks/bench_rope.py --cpu-smoke      # harness check, no GPU
"""
import sys

from fusedlm.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("rope"))  # --ops rope --tag rope, then the command line
