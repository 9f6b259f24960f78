#!/usr/bin/env python3
"""Benchmark the language-model loss: fusedlm.linear_cross_entropy (issue 19).

bf16 hidden (16384, 4096) and LM head (V, 4096), V in {32000, 128256, 256000}, every target counted, plus
V = 128256 with 10 % of the targets ignored; fwd and fwd+bwd (gradients for hidden and the LM head), as
TFLOP/s, the fraction of a measured bf16 matmul and the peak memory one call allocates, against the logits
path F.cross_entropy((hidden @ W.T).float(), target) eager and under torch.compile, Liger-Kernel's
LigerFusedLinearCrossEntropyLoss and Cut Cross-Entropy; the summary ends with issue 19's targets (fwd+bwd
time <= Liger's and <= 1.1x CCE's, peak memory <= CCE's). A thin front end of fusedlm.bench (inputs, FLOP
counts and providers in fusedlm/bench/ops_cross_entropy.py); see benchmarks/README.md.

    python benchmarks/bench_cross_entropy.py [--quick] [--modes fwd+bwd] [--seqlens 32000,128256] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/bench_cross_entropy.py --cpu-smoke      # harness check, no GPU

(--seqlens sets the vocabulary sizes V here.)
"""
import sys

from fusedlm.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main("loss"))  # --ops loss --tag loss, then the command line
