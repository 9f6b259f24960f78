"""Helpers shared by the op test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""
import pytest
import torch

import fusedlm
from fusedlm.verify import BOUNDS


def assert_within(rows, dtype):
    """Every (quantity, relative error) row of check_case within the dtype's bound."""
    bad = [(q, e) for q, e in rows if not e <= BOUNDS[dtype]]
    assert not bad, f"over the {dtype} bound {BOUNDS[dtype]:.1e}: {bad}"


def triton_or_skip():
    if fusedlm._backend.why_unavailable("triton") is not None:
        pytest.skip("triton unavailable")


class RecordFusedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every <namespace>::<name containing ``part``> op call (op, args, kwargs) reaching the
    dispatcher; namespaces: fusedlm's Triton ops by default, "fusedlm_C" for the C++ extension's."""

    def __init__(self, part, namespaces=("fusedlm",)):
        super().__init__()
        self.part = part
        self.namespaces = namespaces
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in self.namespaces and self.part in func.name():
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def detach_clone(x, requires_grad=False):
    """Fresh leaves from a (nested) call's arguments, for opcheck."""
    if isinstance(x, torch.Tensor):
        y = x.detach().clone()
        return y.requires_grad_(True) if requires_grad and y.is_floating_point() else y
    if isinstance(x, (list, tuple)):
        return type(x)(detach_clone(a, requires_grad) for a in x)
    return x


@pytest.fixture(autouse=True)
def nan_filled_outputs():
    """torch.empty (in C++ too) fills new float tensors with NaN in deterministic mode: an element a kernel
    fails to write shows as an infinite error (imported by the cuda backend's test modules)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def dev():
    """The device the cuda backend's tests run on: CUDA where there is a GPU, else CPU (the harness)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def cuda_harness():
    """FUSEDLM_CUDA_CPU=1 for the importing test module (imported there: a module-scoped autouse fixture), so
    the cuda backend's kernels run on CPU through the SIMT harness."""
    from fusedlm import _backend

    mp = pytest.MonkeyPatch()
    mp.setenv("FUSEDLM_CUDA_CPU", "1")
    why = _backend.why_unavailable("cuda")
    assert why is None, f"the cuda backend must be usable here (CPU harness): {why}"
    yield
    mp.undo()
