"""Backend selection: which implementation of an op runs.

Three backends, best first:
    "cuda"    the C++ kernels in csrc/ (fusedlm._cuda): the extension fusedlm._C built by setup.py where
              CUDA is present, on CUDA tensors; on CPU tensors when FUSEDLM_CUDA_CPU=1, through the CPU
              harness that runs the same kernel source on the host (for tests);
    "triton"  the Triton kernels in fusedlm.kernels, on CUDA tensors, or on CPU tensors when
              TRITON_INTERPRET=1 (Triton's interpreter: slow, for tests);
    "torch"   the plain PyTorch reference in fusedlm.reference (always there).

The process default starts as the environment variable FUSEDLM_BACKEND (or "auto"), and is changed
with set_backend() or, for a block, use_backend(). A per-call ``backend=`` wins over both. "auto"
picks, per call, the first backend that can serve that call, and "cuda" only for the ops a GPU run
has verified (fusedlm/cuda_verified.json); a backend named explicitly that cannot serve the call raises
ValueError saying why, never falls back silently.
"""
import contextlib
import importlib
import importlib.util
import json
import os
import pathlib

BACKENDS = ("cuda", "triton", "torch")
_AUTO = "auto"

# Ops the CUDA extension implements (names as passed to select()); filled from fusedlm._cuda.OPS once
# its ops are registered. Every other op is one the "cuda" backend cannot serve.
CUDA_OPS = set()


def _read_cuda_verified():
    """{"sm_90": frozenset(ops), ...} from fusedlm/cuda_verified.json ({arch: {"ops": [...], "why": ...}})."""
    path = pathlib.Path(__file__).with_name("cuda_verified.json")
    try:
        data = json.loads(path.read_text())
        return {arch: frozenset(entry.get("ops", [])) for arch, entry in data.items() if arch.startswith("sm_")}
    except (OSError, ValueError, AttributeError):
        return {}


_CUDA_VERIFIED = _read_cuda_verified()  # read at import: a file read inside torch.compile's trace breaks it
_ARCH = {}  # CUDA device index -> "sm_XY", filled on first use (no CUDA call at import)


def device_arch(device=None):
    """"sm_XY" of a CUDA device (None: the current one), or None for CPU tensors / no GPU."""
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index if device is not None else None
    index = torch.cuda.current_device() if index is None else index
    if index not in _ARCH:
        major, minor = torch.cuda.get_device_capability(index)
        _ARCH[index] = f"sm_{major}{minor}"
    return _ARCH[index]


def cuda_verified_ops(device=None):
    """The ops "auto" may run on the cuda backend for tensors on ``device`` (None: the current GPU): those
    the GPU script found correct and at least as fast as triton on a GPU of the same architecture
    (fusedlm/cuda_verified.json, read once at import). Empty for CPU tensors (the harness is a test mode)
    and for an architecture no GPU run has measured."""
    arch = device_arch(device)
    return _CUDA_VERIFIED.get(arch, frozenset()) if arch else frozenset()


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")



# Triton reads TRITON_INTERPRET when a kernel is decorated (when fusedlm.kernels is imported), so the
# value at import time is the one that holds for the whole process.
_INTERPRET = env_flag("TRITON_INTERPRET")


def triton_interpret() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def _import_error(module):
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure to import means "not usable", with the reason kept
        return f"{type(e).__name__}: {e}"
    return None


_why_not_cache = {}


def enable_interpreter():
    """Turn on Triton's CPU interpreter for this process (what ``fusedlm verify`` does without a GPU).

    Works only before Triton is imported (Triton reads TRITON_INTERPRET when its own and our kernels
    are decorated); returns False if it already was, without the interpreter.
    """
    global _INTERPRET
    if _INTERPRET:
        return True
    import sys

    if "triton" in sys.modules:
        return False  # Triton's own jit functions were decorated without the interpreter
    os.environ["TRITON_INTERPRET"] = "1"
    _INTERPRET = True
    _why_not_cache.clear()
    return True


def _version(text):
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    parts = (text.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


def _interpreter_fault():
    """Why Triton's CPU interpreter cannot run the kernels here, or None. Triton 3.6's interpreter fails on
    numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python scalars" inside kernels): seen with
    3.6.0; 3.7.1, 3.8.0 and 3.9.0 run them."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter fails with numpy {numpy.__version__} "
                f"(install numpy<2.4, or triton>=3.7)")
    return None


def why_unavailable(name):
    """None if backend ``name`` is usable in this process, else the reason it is not."""
    key = (name, os.environ.get("FUSEDLM_CUDA_CPU", "")) if name == "cuda" else name
    if key in _why_not_cache:
        return _why_not_cache[key]
    import torch

    if name == "torch":
        why = None
    elif name == "triton":
        # Decide before importing Triton: it must not be imported before TRITON_INTERPRET is set
        # (its own library functions are decorated at import), see enable_interpreter().
        if importlib.util.find_spec("triton") is None:
            why = "triton is not installed"
        elif not (torch.cuda.is_available() or triton_interpret()):
            why = "no CUDA device and TRITON_INTERPRET is not set"
        else:
            why = _import_error("triton") or _import_error("fusedlm.kernels")
            if why is None and triton_interpret() and not torch.cuda.is_available():
                why = _interpreter_fault()
    elif name == "cuda":
        from . import _cuda

        why = _cuda.why_unavailable()
        if why is None and not (torch.cuda.is_available() or _cuda.harness_enabled()):
            why = ("no CUDA device for fusedlm._C" if _cuda.has_cuda_build() else
                   "the CUDA extension fusedlm._C is not built") + \
                " (FUSEDLM_CUDA_CPU=1 runs its kernels on CPU through the SIMT harness)"
        if why is None:
            CUDA_OPS.update(_cuda.OPS)
    else:
        raise ValueError(f"backend: expected one of {BACKENDS + (_AUTO,)} or None, got {name!r}")
    _why_not_cache[key] = why
    return why


def available_backends():
    """The backends usable in this process, best first (always ends with "torch")."""
    return [b for b in BACKENDS if why_unavailable(b) is None]


def _check_name(name):
    if name is None:
        return _AUTO
    if not isinstance(name, str) or name not in BACKENDS + (_AUTO,):
        raise ValueError(f"backend: expected one of {BACKENDS + (_AUTO,)} or None, got {name!r}")
    return name


def _initial_default():
    env = os.environ.get("FUSEDLM_BACKEND")
    if not env:
        return _AUTO
    try:
        return _check_name(env.strip().lower())
    except ValueError as e:
        raise ValueError(f"FUSEDLM_BACKEND: {e}") from None


_default = _initial_default()


def get_backend():
    """The process default: "auto" or a backend name."""
    return _default


def set_backend(name):
    """Set the process default backend; None means "auto".

    Raises ValueError for an unknown name, or for a backend that is not usable in this process.
    """
    global _default
    name = _check_name(name)
    if name != _AUTO:
        why = why_unavailable(name)
        if why is not None:
            raise ValueError(f"backend: {name!r} is not available here: {why}")
    _default = name


@contextlib.contextmanager
def use_backend(name):
    """Context manager: make ``name`` the default inside the block, restore the previous one after."""
    previous = _default
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def select(op, backend, device, cannot_serve=None):
    """The backend that runs one call of ``op`` on tensors on ``device``.

    backend:      the call's ``backend=`` argument (None: the process default).
    cannot_serve: optional dict backend -> reason (or None), for cases a backend cannot handle (a
                  feature it lacks); a backend missing from it serves every valid case on its devices.
                  The "cuda" backend serves only the ops in CUDA_OPS.
    """
    name = _check_name(backend) if backend is not None else _default
    cannot_serve = cannot_serve or {}

    def reason(b):
        why = why_unavailable(b)
        if why is None and b == "cuda":
            from . import _cuda

            why = _cuda.why_not_device(device)
        if why is None and b == "cuda" and op not in CUDA_OPS:
            why = f"fusedlm._C has no kernel for {op}"
        if why is None and b == "triton" and device.type != "cuda" and not triton_interpret():
            why = f"the tensors are on {device} and TRITON_INTERPRET is not set"
        if why is None and b != "torch" and device.type not in ("cuda", "cpu"):
            why = f"the tensors are on {device}"
        if why is None:
            why = cannot_serve.get(b)
        return why

    if name == _AUTO:
        for b in BACKENDS:
            if b == "cuda" and op not in cuda_verified_ops(device):
                continue  # not yet checked on a GPU: auto keeps triton
            if reason(b) is None:
                return b
        raise AssertionError("the torch backend serves every case")  # pragma: no cover
    why = reason(name)
    if why is not None:
        raise ValueError(f"{op}: backend {name!r} cannot serve this call: {why}")
    return name
