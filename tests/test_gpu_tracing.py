"""The GPU registration path (triton_op + wrap_triton under torch.compile's AOT dispatch) traces every
op's kernels, checked here without a GPU on fake CUDA tensors (see tests/gpu_tracing.py). It caught a
pruning function that read the autotuner's keyword arguments from the wrong place."""
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("autotune", ["0", "1"])
def test_every_op_traces_into_triton_kernels(autotune):
    pytest.importorskip("triton")
    script = Path(__file__).with_name("gpu_tracing.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script), autotune], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    # norm, swiglu, rope, attention, varlen, deberta, deberta_varlen, lora (gpu_tracing.NAMES)
    assert out.stdout.count("ok   ") == 8 and "0 failed" in out.stdout
