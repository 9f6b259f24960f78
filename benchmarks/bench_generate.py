#!/usr/bin/env python3
"""End-to-end generation throughput (issue 18): tokens/s of a Llama-1B-shaped model (Llama-3.2-1B's shape,
random weights, bf16) at B = 1 and 32, prompt 128, 128 new tokens, greedy, no eos: fusedlm's
LlamaForCausalLM.generate (static KV cache on fusedlm.kv_cache_attention; the decode step eager and under
torch.compile) against transformers' generate on the same weights with its static cache (compiled, its
default CompileConfig: inductor + CUDA graphs, and not) and its dynamic cache. Reports end-to-end tokens/s,
time to first token, decode-only tokens/s and its fraction of the copy bandwidth, compile time, peak memory,
and a teacher-forced greedy check; the summary ends with issue 18's target (>= 1.3x transformers' compiled
static-cache generate at B = 1). The code is fusedlm/bench/e2e_generate.py; see benchmarks/README.md.

    python benchmarks/bench_generate.py                      # B = 1, 32; P = 128, N = 128 (a few minutes)
    python benchmarks/bench_generate.py --quick              # B = 1, N = 64, 2 timed calls
    python benchmarks/bench_generate.py --cpu-smoke          # tiny float32 model on the CPU, seconds
"""
import sys

from fusedlm.bench.e2e_generate import main

if __name__ == "__main__":
    sys.exit(main())
