"""Helpers shared by the op test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""
import pytest
import torch

import fusedlm
from fusedlm.verify import BOUNDS, rel_err


def assert_within(rows, dtype):
    """Every (quantity, relative error) row of check_case within the dtype's bound. A float32 failure also says
    what this machine's own float32 matmul and exp give now: whether the machine or the op is off."""
    bad = [(q, e) for q, e in rows if not e <= BOUNDS[dtype]]
    if bad and dtype == torch.float32:
        bad += [("this machine's float32 matmul, measured now", float32_matmul_error()),
                ("this machine's float32 exp, measured now", float32_exp_error())]
    assert not bad, f"over the {dtype} bound {BOUNDS[dtype]:.1e}: {bad}"


def float32_matmul_error():
    """Norm-wise relative error of this machine's float32 batched matmul (CPU) against float64 on the same
    rounded values, at the first attention test's shapes: IEEE float32 gives ~1e-7 there, bfloat16 x 3 ~4e-6,
    TF32 ~3e-4."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, 67, 64, generator=gen).float()
    b = torch.randn(2, 4, 64, 67, generator=gen).float()
    return rel_err(torch.matmul(a, b), torch.matmul(a.double(), b.double()))


def float32_exp_error():
    """Largest relative error of this machine's float32 torch.exp (its vectorised kernel: 4096 values) against
    float64 over [-30, 0], softmax's range (6e-8 on the machine this was written on, half a float32 ulp)."""
    x = torch.linspace(-30.0, 0.0, 4096)
    want = torch.exp(x.double())
    return ((torch.exp(x).double() - want).abs() / want).max().item()


def reduced_float32_settings():
    """torch's settings that let float32 matmuls run in lower precision, where one is set: {name: value}. The
    per-backend fp32_precision settings read "none" (inherit, down to IEEE) or "ieee" unless lowered."""
    settings = {"torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
                "torch.backends.fp32_precision": torch.backends.fp32_precision,
                "torch.backends.mkldnn.matmul.fp32_precision": torch.backends.mkldnn.matmul.fp32_precision,
                "torch.backends.cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision}
    return {name: value for name, value in settings.items() if value not in ("highest", "none", "ieee")}


def cpu_facts():
    """What picks the CPU kernels: torch's CPU capability, the matrix extensions the CPU reports, threads."""
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux
        pass
    ext = sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_fp16"))
    return f"torch capability {torch.backends.cpu.get_cpu_capability()}, " \
           f"{' '.join(ext) or 'no AMX / avx512 bf16 / fp16'}, {torch.get_num_threads()} threads"


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
