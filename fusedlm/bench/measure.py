"""Where and how a run measures: the environment every row records, timing, peak memory, and the two
ceilings (copy bandwidth for the memory-bound ops, a bf16 matmul for the compute-bound ones).

Timing: on CUDA, ``triton.testing.do_bench`` (median; it flushes L2 before every repetition, so inputs
come from HBM as in a model whose working set dwarfs L2). ``--cpu-smoke`` runs the same code path on
tiny CPU tensors timed with time.perf_counter: a check of the harness, never a performance figure.
"""
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import fusedlm

COPY_BYTES_GPU = 1 << 30      # 1 GiB per buffer: far beyond L2 (50 MiB on H100/H200), many waves of SMs
COPY_BYTES_SMOKE = 8 << 20
MATMUL_N_GPU = 8192           # the matmul ceiling: (n, n) @ (n, n) in the run's dtype
MATMUL_N_SMOKE = 256
# Peers whose installed version every row records (distribution name -> row key).
PEER_VERSIONS = {"liger-kernel": "liger_kernel", "peft": "peft", "flashdeberta": "flashdeberta",
                 "disentangled-flash": "disentangled_flash"}


# --------------------------------------------------------------------------------------------------
# Environment.
# --------------------------------------------------------------------------------------------------

def _git_commit():
    if os.environ.get("FUSEDLM_GIT_COMMIT"):
        return os.environ["FUSEDLM_GIT_COMMIT"]
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(distribution):
    from importlib.metadata import PackageNotFoundError, version

    for name in (distribution, distribution.replace("-", "_")):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def environment(device):
    """What every row records about where it was measured."""
    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()})"
    env = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    env.update({key: _version(dist) for dist, key in PEER_VERSIONS.items()})
    env.update({"fusedlm": getattr(fusedlm, "__version__", None), "python": platform.python_version(),
                "git_commit": _git_commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return env


# --------------------------------------------------------------------------------------------------
# Timing and memory.
# --------------------------------------------------------------------------------------------------

def time_cuda(fn, quick):
    """Median ms over repetitions, L2 flushed before each (triton.testing.do_bench)."""
    import triton.testing

    warmup, rep = (10, 40) if quick else (25, 100)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def time_cpu(fn, reps=1):
    """Median ms of ``reps`` calls with time.perf_counter, no synchronisation (the smoke test, where the
    caller already warmed up; and the host time to issue a CUDA call)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn, device):
    """Peak CUDA memory one call allocates beyond what was allocated before it (outputs, saved
    tensors, workspaces), or None off CUDA. The inputs are the same for every provider, so this is
    the part that differs between them."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def host_ms(fn, device, calls=10):
    """Median host time to issue one call (no synchronisation), or None off CUDA.

    do_bench times on the device; when a call takes longer to issue on the host than the device
    takes to run it (Python, dispatch, autograd bookkeeping), the device waits and the row measures
    the host. host_ms close to median_ms flags such a launch-bound row; in a model the host usually
    runs ahead and this overhead hides.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    ms = time_cpu(fn, reps=calls)
    torch.cuda.synchronize(device)
    return ms


def _time_ceiling(run, fn):
    fn()  # warm-up
    return run.time(fn) if run.device.type == "cuda" else time_cpu(fn, reps=3)


def measure_copy_bandwidth(run):
    """GB/s of dst.copy_(src) on buffers of run.copy_bytes each; bytes counted = read + write."""
    n = run.copy_bytes
    src = torch.ones(n, dtype=torch.uint8, device=run.device)
    dst = torch.empty_like(src)
    ms = _time_ceiling(run, lambda: dst.copy_(src))
    del src, dst
    return 2 * n / (ms * 1e6), ms


def measure_matmul_tflops(run):
    """TFLOP/s of torch.matmul on two (n, n) matrices of the run's dtype: 2 n^3 FLOPs."""
    n = run.matmul_n
    gen = torch.Generator(device=run.device).manual_seed(run.seed)
    a = torch.randn(n, n, generator=gen, device=run.device, dtype=torch.float32).to(run.dtype)
    b = torch.randn(n, n, generator=gen, device=run.device, dtype=torch.float32).to(run.dtype)
    ms = _time_ceiling(run, lambda: torch.matmul(a, b))
    del a, b
    return 2 * n ** 3 / (ms * 1e9), ms
