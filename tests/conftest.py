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
