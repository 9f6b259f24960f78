"""Where the CUDA toolkit is: the folder holding bin/nvcc and include/cuda_runtime_api.h.

Used by setup.py (loaded as a file: the standard library only, no torch) to build fusedlm._C, by
scripts/gpu_run.sh to set CUDA_HOME, and by ``fusedlm info``. torch's own detection takes the folder
above the first ``nvcc`` on the PATH, which is wrong when that nvcc is a wrapper script or a symlink
farm (/usr/local/bin/nvcc -> CUDA_HOME=/usr/local, no CUDA headers there). The order here:

1. ``CUDA_HOME`` or ``CUDA_PATH`` when set (the user said so; a folder without the headers is an error);
2. the ``nvcc`` on the PATH, symlinks resolved;
3. the folder that nvcc itself reports running from (``nvcc --dryrun`` prints ``_HERE_=<toolkit>/bin``):
   right for wrapper scripts;
4. torch's detection (``torch.utils.cpp_extension.CUDA_HOME``), when torch is importable;
5. /usr/local/cuda.

``find_cuda_home()`` returns ``(path, how)`` or ``(None, why not)``.
"""
import os
import shutil
import subprocess

HEADER = os.path.join("include", "cuda_runtime_api.h")


def is_toolkit(path):
    """True when ``path`` holds a CUDA toolkit's runtime header and its nvcc."""
    return bool(path) and os.path.isfile(os.path.join(path, HEADER)) and os.path.isfile(os.path.join(path, "bin", "nvcc"))


def _nvcc_reported_home(nvcc):
    """The toolkit folder nvcc says it runs from (its --dryrun ``_HERE_`` line), or None."""
    try:
        run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (run.stdout + run.stderr).splitlines():
        line = line.lstrip("#$ ").strip()
        if line.startswith("_HERE_="):
            return os.path.dirname(os.path.normpath(line.split("=", 1)[1]))
    return None


def _torch_home():
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 - torch missing or broken: this way of finding it is out
        return None
    return CUDA_HOME


def find_cuda_home(environ=None, which=shutil.which, torch_home=_torch_home):
    """``(toolkit folder, how it was found)``, or ``(None, why none was found)``; see the module docstring."""
    environ = os.environ if environ is None else environ
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(name):
            path = environ[name]
            if is_toolkit(path):
                return path, f"${name}"
            return None, f"${name}={path} holds no CUDA toolkit (no bin/nvcc and {HEADER} there)"
    nvcc = which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        path = os.path.dirname(os.path.dirname(real))
        if is_toolkit(path):
            return path, f"nvcc on the PATH ({nvcc}" + (f" -> {real})" if real != nvcc else ")")
        path = _nvcc_reported_home(nvcc)
        if is_toolkit(path):
            return path, f"the folder nvcc reports running from ({nvcc} is a wrapper)"
    path = torch_home()
    if is_toolkit(path):
        return path, "torch.utils.cpp_extension's detection"
    if is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, ("no CUDA toolkit found: set CUDA_HOME to the folder holding bin/nvcc and " + HEADER
                  + (f" (nvcc on the PATH, {nvcc}, does not lead to one)" if nvcc else " (no nvcc on the PATH)"))


if __name__ == "__main__":  # scripts/gpu_run.sh: `export CUDA_HOME=$(python fusedlm/_toolkit.py)`
    import sys

    home, how = find_cuda_home()
    print(f"CUDA toolkit: {home} ({how})" if home else how, file=sys.stderr)
    print(home or "")
    sys.exit(0 if home else 1)
