#!/usr/bin/env python3
"""Benchmark swiglu: silu(gate) * up.

fusedlm against PyTorch eager, torch.compile and Liger-Kernel (when installed), forward and backward,
as GB/s and the fraction of the measured copy bandwidth. A thin front end of fusedlm.bench (inputs and
byte counts in fusedlm/bench/ops_swiglu.py); see benchmarks/README.md.

    python benchmarks/bench_swiglu.py [--quick] [--out DIR] [--modes fwd,bwd] [--providers ...]
    TRITON_INTERPRET=1 python benchmarks/bench_swiglu.py --cpu-smoke      # harness check, no GPU
"""
import sys

from fusedlm.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("swiglu"))  # --ops swiglu --tag swiglu, then the command line
