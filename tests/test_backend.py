"""Backend selection: available_backends, set_backend, use_backend, FUSEDLM_BACKEND, per-call backend=."""
import os
import subprocess
import sys

import pytest
import torch

import fusedlm
from fusedlm import _backend


def test_available_backends_best_first_and_torch_always():
    avail = fusedlm.available_backends()
    assert avail[-1] == "torch"
    order = ["cuda", "triton", "torch"]
    assert avail == [b for b in order if b in avail]
    if not torch.cuda.is_available():
        # Without a GPU the cuda backend exists only as the CPU harness, switched on by FUSEDLM_CUDA_CPU=1.
        assert ("cuda" in avail) == (os.environ.get("FUSEDLM_CUDA_CPU") == "1")
        assert ("triton" in avail) == (os.environ.get("TRITON_INTERPRET") == "1")


def test_set_and_use_backend_restore():
    fusedlm.set_backend("torch")
    assert fusedlm.get_backend() == "torch"
    with fusedlm.use_backend(None):
        assert fusedlm.get_backend() == "auto"
    assert fusedlm.get_backend() == "torch"
    fusedlm.set_backend(None)
    assert fusedlm.get_backend() == "auto"


def test_use_backend_restores_after_an_exception():
    fusedlm.set_backend(None)
    with pytest.raises(RuntimeError):
        with fusedlm.use_backend("torch"):
            raise RuntimeError("boom")
    assert fusedlm.get_backend() == "auto"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"backend: expected one of .*'triton'.*got 'tritonn'"):
        fusedlm.set_backend("tritonn")
    with pytest.raises(ValueError, match="got 'nope'"):
        fusedlm.rms_norm(torch.randn(2, 4), backend="nope")


def test_unavailable_backend_cannot_be_set():
    if "cuda" in fusedlm.available_backends():
        pytest.skip("the CUDA extension is built here")
    with pytest.raises(ValueError, match="'cuda' is not available here: .*fusedlm._C"):
        fusedlm.set_backend("cuda")


def test_auto_dispatch_picks_the_backend_that_serves_the_call(monkeypatch):
    calls = []
    real = _backend.select

    def spy(op, backend, device, cannot_serve=None):
        name = real(op, backend, device, cannot_serve)
        calls.append(name)
        return name

    monkeypatch.setattr(_backend, "select", spy)
    x = torch.randn(2, 8)
    fusedlm.rms_norm(x)
    expected = "triton" if "triton" in fusedlm.available_backends() else "torch"
    assert calls[-1] == expected
    fusedlm.rms_norm(x.double())  # float64: the kernels cannot take it, auto falls to torch
    assert calls[-1] == "torch"
    with fusedlm.use_backend("torch"):
        fusedlm.rms_norm(x)
    assert calls[-1] == "torch"
    fusedlm.rms_norm(x, backend="torch")
    assert calls[-1] == "torch"


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import fusedlm, torch\n"
            "try:\n    fusedlm.swiglu(torch.randn(2), torch.randn(2), backend='triton')\n"
            "except ValueError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ERR swiglu: backend 'triton' cannot serve this call" in out.stdout, out.stderr


@pytest.mark.parametrize("value,expected", [("torch", "torch"), ("", "auto")])
def test_env_sets_the_initial_default(value, expected):
    env = dict(os.environ, FUSEDLM_BACKEND=value)
    out = subprocess.run([sys.executable, "-c", "import fusedlm; print(fusedlm.get_backend())"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == expected, out.stderr


def test_env_with_an_unknown_name_fails_loudly():
    env = dict(os.environ, FUSEDLM_BACKEND="fast")
    out = subprocess.run([sys.executable, "-c", "import fusedlm"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "FUSEDLM_BACKEND" in out.stderr


@pytest.mark.parametrize("triton_version,numpy_version,broken", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False), ("3.9.0", "2.5.0", False)])
def test_interpreter_fault_of_old_triton_with_new_numpy(monkeypatch, triton_version, numpy_version, broken):
    """Triton 3.6's interpreter raises inside kernels with numpy >= 2.4 (seen here): the triton backend then
    says so on CPU instead of failing in every kernel."""
    numpy = pytest.importorskip("numpy")
    triton = pytest.importorskip("triton")
    from fusedlm import _backend

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    why = _backend._interpreter_fault()
    assert (why is not None) == broken
    if broken:
        assert "numpy<2.4" in why and triton_version in why
