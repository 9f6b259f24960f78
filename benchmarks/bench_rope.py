#!/usr/bin/env python3
"""Benchmark rope (apply_rotary_pos_emb): q (4, 32, 4096, 128), k (4, 8, 4096, 128), 16384 tokens.

fusedlm against PyTorch eager, torch.compile and Liger-Kernel (when installed), forward and backward,
as GB/s and the fraction of the measured copy bandwidth. A thin front end of fusedlm.bench, which
holds the inputs, the byte counts and the timing; see benchmarks/README.md.

    python benchmarks/bench_rope.py [--quick] [--out DIR] [--modes fwd,bwd] [--providers ...]
    TRITON_INTERPRET=1 python benchmarks/bench_rope.py --cpu-smoke      # harness check, no GPU
"""
import sys

from fusedlm.bench import main

if __name__ == "__main__":
    # Arguments given on the command line come after these defaults, so they win.
    sys.exit(main(["--ops", "rope", "--tag", "rope", *sys.argv[1:]]))
