#!/usr/bin/env python3
"""Peak memory DeBERTa attention allocates over forward + backward, against fusedlm's flash attention on
the same shapes (issue 8: at most flash's plus O(H * 2 span * D)). Counted on the CPU, in seconds: the
host launchers run on meta tensors with the kernels skipped (fusedlm/bench/memory.py says what is
counted and what is not). B = 4, H = 12, D = 64, bf16, span 256, c2p + p2c with both position gradients.

    python benchmarks/deberta_memory.py [--json PATH] [--seqlens 512,2048,8192] [--packed]
"""
import argparse
import json
import sys

import torch

from fusedlm.bench.memory import MiB, budget_bytes, deberta_peak_bytes, flash_peak_bytes

B, H, D, SPAN, DTYPE = 4, 12, 64, 256, torch.bfloat16


def rows(seqlens, packed):
    out = []
    for S in seqlens:
        flash = flash_peak_bytes(B, H, S, D, DTYPE, packed=packed)
        deberta = deberta_peak_bytes(B, H, S, D, DTYPE, span=SPAN, packed=packed)
        out.append(dict(B=B, H=H, S=S, D=D, dtype="bfloat16", span=SPAN, packed=packed,
                        flash_bytes=flash, deberta_bytes=deberta, budget_bytes=budget_bytes(H, D, SPAN),
                        flash_mib=flash / MiB, deberta_mib=deberta / MiB, excess_mib=(deberta - flash) / MiB,
                        budget_mib=budget_bytes(H, D, SPAN) / MiB))
    return out


def table(rs):
    lines = ["| S | flash MiB | DeBERTa MiB | DeBERTa - flash MiB | budget H*2span*D*4 B, MiB |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['S']} | {r['flash_mib']:.1f} | {r['deberta_mib']:.1f} | {r['excess_mib']:.1f} | "
              f"{r['budget_mib']:.2f} |" for r in rs]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--seqlens", default="512,2048,8192", help="comma-separated sequence lengths")
    p.add_argument("--packed", action="store_true", help="packed (B S, H, D) inputs with cu_seqlens")
    args = p.parse_args(argv)
    rs = rows([int(s) for s in args.seqlens.split(",")], args.packed)
    layout = "packed" if args.packed else "dense"
    print(f"Peak bytes allocated, forward + backward (B={B}, H={H}, D={D}, bf16, span {SPAN}, {layout}; "
          "inputs and dout not counted)\n")
    print(table(rs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
