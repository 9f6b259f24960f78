#!/usr/bin/env python3
"""Benchmark fusedlm.deberta_attention against transformers' DisentangledSelfAttention (eager) and FlashDeBERTa.

bf16, deberta-v3-base shapes (H = 12, D = 64, 256 buckets, max_relative_positions 512, c2p + p2c,
share_att_key), B x S = 16384 tokens at S = 512, 2048, 8192 (B = 2; --quick: 512, 2048); fwd, bwd and
fwd+bwd, each provider being the whole self-attention module (q/k/v projections and the pos projections
of rel_embeddings included, output projection excluded, weights frozen). hf-eager-fp32 (S <= 2048) is the
rel_err yardstick, hf-eager the baseline. After the harness's tables this appends (to the
deberta_*_summary.md and .md files, and prints) each provider's speedup and peak memory over hf-eager's,
and the issue's targets at S = 2048 (>= 4x hf-eager and >= 1.5x FlashDeBERTa fwd+bwd, peak memory <= 1/4
of hf-eager's). A thin front end of fusedlm.bench (inputs, FLOP counts and providers in
fusedlm/bench_ops.py); see benchmarks/README.md.

    python benchmarks/bench_deberta.py [--quick] [--out DIR] [--seqlens 2048]
    TRITON_INTERPRET=1 python benchmarks/bench_deberta.py --cpu-smoke      # harness check, no GPU
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

from fusedlm.bench import _default_out, main
from fusedlm.bench_ops import deberta_report


def report(argv):
    """Append deberta_report to the newest <tag>_*.json's .md and _summary.md, and print it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tag", default="deberta")
    p.add_argument("--cpu-smoke", action="store_true")
    args, _ = p.parse_known_args(argv)
    out = args.out or (Path(tempfile.gettempdir()) / "fusedlm_bench_smoke" if args.cpu_smoke else _default_out())
    found = sorted(out.glob(f"{args.tag}_*.json"), key=lambda f: f.stat().st_mtime)
    if not found:
        return
    js = found[-1]
    text = deberta_report(json.loads(js.read_text()))
    if not text:
        return
    print("\n" + text + "\n")
    stem = js.with_suffix("")
    for f in (Path(f"{stem}.md"), Path(f"{stem}_summary.md")):
        if f.exists():
            f.write_text(f.read_text().rstrip("\n") + "\n\n" + text + "\n")


if __name__ == "__main__":
    # Arguments given on the command line come after these defaults, so they win.
    argv = ["--ops", "deberta", "--tag", "deberta", *sys.argv[1:]]
    rc = main(argv)
    if rc != 2:
        report(argv)
    sys.exit(rc)
