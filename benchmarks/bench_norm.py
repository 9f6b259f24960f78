#!/usr/bin/env python3
"""Benchmark rms_norm, rms_norm with the fused residual add, and layer_norm.

fusedlm against PyTorch eager, torch.compile and Liger-Kernel (when installed), forward and backward,
as GB/s and the fraction of the measured copy bandwidth. A thin front end of fusedlm.bench (inputs and
byte counts in fusedlm/bench/ops_norm.py); see benchmarks/README.md.

    python benchmarks/bench_norm.py [--quick] [--out DIR] [--modes fwd,bwd] [--providers ...]
    TRITON_INTERPRET=1 python benchmarks/bench_norm.py --cpu-smoke      # harness check, no GPU
"""
import sys

from fusedlm.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("norm"))  # --ops norm --tag norm, then the command line
