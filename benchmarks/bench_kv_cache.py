#!/usr/bin/env python3
"""Benchmark a decode step's attention over a KV cache: fusedlm.kv_cache_attention (issue 18).

bf16, one query row per sequence, H = 32, Hkv = 8, E = 128, B in {1, 8, 64} x cache lengths T in {1k, 4k,
16k, 32k, 128k} (B = 64 x 128k left out: 32 GiB of K + V, over the 16 GiB cap), every sequence full; a
contiguous cache (B, T, Hkv, E) and a paged one (block 16, blocks in a random order), forward only. GB/s of
the cache read and the fraction of the measured copy bandwidth, against PyTorch's SDPA backends (flash,
memory-efficient, cuDNN, math on small caches) with a one-row query and FlexAttention; the summary ends
with issue 18's targets (>= 85% of copy bandwidth once B x T >= 256k tokens, >= 1.5x the fastest SDPA
backend, paged within 5% of contiguous). A thin front end of fusedlm.bench (inputs, byte counts and
providers in fusedlm/bench/ops_kv_cache.py); see benchmarks/README.md.

    python benchmarks/bench_kv_cache.py [--quick] [--seqlens 4096,32768] [--providers ...] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/bench_kv_cache.py --cpu-smoke      # harness check, no GPU
"""
import sys

from fusedlm.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("kv_cache"))  # --ops kv_cache --tag kv_cache, then the command line
