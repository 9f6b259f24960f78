"""fusedlm's benchmarks: every op against its peers, in the same run, on the same inputs.

What is measured, and why
-------------------------
memory-bound ops (rms_norm, rms_norm_residual, layer_norm, swiglu, rope) do a few FLOPs per byte:
bandwidth is their limit. Each counts the fewest bytes it must move, and the run measures the device's
copy bandwidth (a 1 GiB ``Tensor.copy_``, read + write counted) as the practical ceiling. So is a decode
step's attention over a KV cache (kv_cache_decode: one query row, it reads the whole cache once):

    gbps            = counted bytes / median time
    frac_of_copy_bw = gbps / copy bandwidth      (1.0: as fast as copying the bytes the op cannot avoid)

compute-bound ops (attention, attention_padded, lora_linear, deberta_attention, deberta_attention_padded)
are matmuls: each counts its FLOPs (the formulas are in the op modules and benchmarks/README.md), and the
run measures a bf16 matmul (``torch.matmul`` of two 8192 x 8192 matrices, 2 * 8192^3 FLOPs) as the
practical ceiling:

    tflops          = counted FLOPs / median time
    frac_of_matmul  = tflops / matmul TFLOP/s    (1.0: as fast as cuBLAS on a large square GEMM)

``rel_err`` checks every row against a reference provider (torch-eager for the memory-bound ops, a
PyTorch SDPA backend for attention, PEFT for LoRA, transformers' module in float32 for DeBERTa);
``vs_baseline`` (LoRA, DeBERTa) is a row's median time over the baseline provider's, same mode.
``--autotune`` sets FUSEDLM_AUTOTUNE=1 (fusedlm's attention kernels then autotune their block shapes on
the first call of each kind, untimed); every compute row records whether it was on.

The modules
-----------
cases.py       what an op module defines: Case, Bound, MemoryOp, ComputeOp, Sizes, the provider errors,
               and the helpers op modules share (inputs, fusedlm's providers, peer imports)
harness.py     environment, timing, peak memory, the two ceilings, the loop over providers and modes, rows
report.py      markdown, summaries, console lines, the output files; plots.py the plots
registry.py    every op, and --ops selection
cli.py         the command line (``fusedlm bench``, ``python -m fusedlm.bench``, benchmarks/bench_*.py)
ops_*.py       one per op family: norm, swiglu, rope, kv_cache, attention, lora, deberta (+ deberta_peers.py,
               deberta_report.py)

Run:  python -m fusedlm.bench [--ops memory|attention|lora|deberta|<op>,...] [--out DIR] [--quick]
      TRITON_INTERPRET=1 python -m fusedlm.bench --cpu-smoke                              (no GPU needed)
"""
from .cli import main, script_main

__all__ = ["main", "script_main"]
