"""Test setup: Triton's CPU interpreter where there is no GPU, and the backend/device/dtype fixtures.

TRITON_INTERPRET must be set before Triton decorates any kernel, i.e. before fusedlm is imported, so
it is set here at collection time. The device itself is only queried inside fixtures.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedlm  # noqa: E402  (after TRITON_INTERPRET)
from fusedlm.verify import BOUNDS  # noqa: E402
from helpers import cpu_facts, float32_exp_error, float32_matmul_error, reduced_float32_settings  # noqa: E402


def pytest_report_header(config):
    """The machine's float32 matmul precision, measured twice (a first call and a warm one), and what decides
    it: a float32 test failing by ~1e-5 on a machine where this reads ~1e-5 is the machine's arithmetic."""
    first, warm = float32_matmul_error(), float32_matmul_error()
    return [f"float32 matmul relative error against float64: {first:.1e} (first call), {warm:.1e} (warm); IEEE "
            f"float32 gives ~1e-7, the float32 bound is {BOUNDS[torch.float32]:.0e}; float32 exp: "
            f"{float32_exp_error():.1e}", f"CPU: {cpu_facts()}"]


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls():
    """The float32 bounds (fusedlm.verify.BOUNDS) assume IEEE float32 matmuls: a test fails here, naming the
    setting, when something has let torch compute them in TF32 / bfloat16 (torch.set_float32_matmul_precision,
    the fp32_precision settings): before it (the run's setup did), or after it (the test did; then set back)."""
    bad = reduced_float32_settings()
    if bad:
        pytest.fail(f"float32 matmuls are not IEEE before this test: {bad}")
    yield
    bad = reduced_float32_settings()
    if bad:
        torch.set_float32_matmul_precision("highest")  # (sets the per-backend settings back to "ieee" too)
        pytest.fail(f"this test left float32 matmuls not IEEE: {bad}")


def _on_gpu():
    return torch.cuda.is_available()


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Each backend usable here (the triton one on CPU runs under the interpreter)."""
    from fusedlm._backend import why_unavailable

    why = why_unavailable(request.param)
    if why is not None:
        pytest.skip(f"backend {request.param} unavailable: {why}")
    return request.param


@pytest.fixture
def device():
    return "cuda" if _on_gpu() else "cpu"


@pytest.fixture(params=["float32", "float16", "bfloat16"])
def dtype(request):
    """float32 and float16 everywhere; bfloat16 on a GPU only (the interpreter's bf16 is not trusted)."""
    if request.param == "bfloat16" and not _on_gpu():
        pytest.skip("bfloat16 is checked on a GPU")
    return getattr(torch, request.param)


@pytest.fixture
def gpu():
    if not _on_gpu():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _seed_and_default_backend():
    torch.manual_seed(0)
    previous = fusedlm.get_backend()
    yield
    fusedlm.set_backend(None if previous == "auto" else previous)
