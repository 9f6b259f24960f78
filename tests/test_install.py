"""fusedlm installed the ways users install it: a wheel (what `pip install .` builds too) in a fresh virtual
environment, the checkout's root on sys.path, the CUDA toolkit found where nvcc really lives, and the
supported version range declared."""
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "FUSEDLM_BACKEND")}
    env.update(extra)
    return env


def test_importing_transformers_from_the_checkout_root():
    """`python -c` from the root puts the root on sys.path: no folder there may pass for another package
    (a top-level kernels/ was taken for Hugging Face's `kernels`, which transformers imports)."""
    pytest.importorskip("transformers")
    code = ("import importlib.util, fusedlm, transformers.activations, transformers.integrations.hub_kernels\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec and spec.origin else '')")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=_clean_env())
    assert run.returncode == 0, run.stderr[-3000:]
    origin = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert not origin.startswith(str(ROOT)), f"`kernels` resolves into the checkout: {origin}"


def test_wheel_in_a_fresh_venv_runs_the_cuda_kernels_on_cpu(tmp_path):
    """Build the wheel, install it into a new virtual environment (torch from the one running the tests), and
    run a cuda-backend op on CPU there: the harness compiles from the csrc/ sources the wheel carries."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), "-q"], capture_output=True, text=True, timeout=600,
                           env=_clean_env(FUSEDLM_SKIP_CUDA_BUILD="1"))
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("fusedlm-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    code = textwrap.dedent("""
        import torch, fusedlm, fusedlm._cuda as cuda
        print(fusedlm.__file__)
        print(cuda.CSRC)
        x, w = torch.randn(3, 40, dtype=torch.float64).float(), torch.rand(40) + 0.5
        y = fusedlm.rms_norm(x, w, 1e-6, backend="cuda")
        ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double())
        print(((y.double() - ref).norm() / ref.norm()).item())
    """)
    run = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env=_clean_env(FUSEDLM_CUDA_CPU="1"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    package_file, csrc, err = run.stdout.strip().splitlines()[-3:]
    assert package_file.startswith(str(venv)), f"fusedlm came from {package_file}, not the wheel"
    assert csrc.startswith(str(venv)) and Path(csrc, "norm.cu").exists()
    assert float(err) < 1e-6


def _fake_toolkit(root):
    """A folder laid out like a CUDA toolkit, whose nvcc answers --dryrun as the real one does."""
    home = root / "cuda-13.0"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime_api.h").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={home}/bin' >&2\necho '#$ _THERE_={home}/bin' >&2\n")
    nvcc.chmod(0o755)
    return home, nvcc


def test_cuda_toolkit_found_behind_a_wrapper_or_a_symlink(tmp_path):
    from fusedlm._toolkit import find_cuda_home

    home, nvcc = _fake_toolkit(tmp_path)
    wrapper = tmp_path / "wrapbin" / "nvcc"  # /usr/local/bin/nvcc-style: a script that runs the real one
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    wrapper.chmod(0o755)
    link = tmp_path / "linkbin" / "nvcc"
    link.parent.mkdir()
    link.symlink_to(nvcc)
    none = lambda: None  # noqa: E731  (torch's own guess: nothing)

    path, how = find_cuda_home({}, which=lambda _: str(wrapper), torch_home=none)
    assert path == str(home) and "reports" in how
    path, how = find_cuda_home({}, which=lambda _: str(link), torch_home=none)
    assert path == str(home) and "PATH" in how
    path, how = find_cuda_home({"CUDA_HOME": str(home)}, which=lambda _: None, torch_home=none)
    assert path == str(home) and how == "$CUDA_HOME"
    path, how = find_cuda_home({"CUDA_HOME": str(tmp_path)}, which=lambda _: str(wrapper), torch_home=none)
    assert path is None and "CUDA_HOME" in how  # a wrong CUDA_HOME is an error, not silently replaced
    path, how = find_cuda_home({}, which=lambda _: None, torch_home=lambda: str(home))
    assert path == str(home) and "torch" in how
    path, how = find_cuda_home({}, which=lambda _: str(tmp_path / "nowhere" / "nvcc"), torch_home=none)
    assert path is None or path == "/usr/local/cuda"
    if path is None:
        assert "CUDA_HOME" in how


def test_the_supported_range_is_declared():
    requires = importlib.metadata.requires("fusedlm") or []
    text = " ".join(requires)
    for bound in ("torch>=2.11", "triton>=3.6", "transformers>=5.17"):
        assert bound in text, f"{bound} not among fusedlm's requirements {requires}"
