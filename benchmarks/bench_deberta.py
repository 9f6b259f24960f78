#!/usr/bin/env python3
"""Benchmark fusedlm's DeBERTa disentangled attention against transformers' DisentangledSelfAttention
(eager), FlashDeBERTa and DisentangledFlash.

bf16, deberta-v3-base shapes (H = 12, D = 64, 256 buckets, max_relative_positions 512, c2p + p2c,
share_att_key), B x S = 16384 tokens at S = 128, 512, 2048, 8192 (--quick: 512, 2048); fwd, bwd and
fwd+bwd, time and peak memory, each provider being the whole self-attention module (q/k/v projections
and the pos projections of rel_embeddings included, output projection excluded, weights frozen). Two ops:
deberta_attention (no padding) and deberta_attention_padded (half the tokens real: every provider on the
padded batch, and "-varlen" providers on the packed real tokens: fusedlm.deberta_varlen_attention,
FlashDeBERTa's varlen function, DisentangledFlash's forward_packed). hf-eager-fp32 (S <= 2048) is the
rel_err yardstick, hf-eager the baseline. The summaries end with each provider's speedup and peak memory
over hf-eager's and issue 8's targets (fwd+bwd >= 4x hf-eager and >= 1.5x DisentangledFlash at S = 512,
2048, 8192; not slower than hf-eager at S = 128; peak memory <= 1/4 of hf-eager's at S = 2048). Peers
that are not installed get a row saying so. A thin front end of fusedlm.bench (inputs, FLOP counts and
providers in fusedlm/bench/ops_deberta.py and deberta_peers.py); see benchmarks/README.md.

    python benchmarks/bench_deberta.py [--quick] [--out DIR] [--seqlens 2048] [--modes fwd,fwd+bwd]
    TRITON_INTERPRET=1 python benchmarks/bench_deberta.py --cpu-smoke      # harness check, no GPU
"""
import sys

from fusedlm.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("deberta"))  # --ops deberta --tag deberta, then the command line
