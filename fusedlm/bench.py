"""Benchmarks of the memory-bound ops, and the harness every fusedlm benchmark shares.

Ops: rms_norm, rms_norm with the fused residual add, layer_norm, swiglu, rope (apply_rotary_pos_emb).

What is measured, and why
-------------------------
These ops do a few FLOPs per byte: memory bandwidth is their limit, not arithmetic. So, for each op and
mode, we count the fewest bytes it must move (``OpSpec.bytes_doc`` states the formula, ``OpSpec.nbytes``
computes it), measure the device's copy bandwidth in the same run (a 1 GiB ``Tensor.copy_``, read + write
counted) as the practical ceiling, and report

    gbps            = counted bytes / median time
    frac_of_copy_bw = gbps / copy bandwidth      (1.0: as fast as copying the bytes the op cannot avoid)

Bytes an implementation moves beyond the count (a saved rstd, a float32 partial-sum buffer, a second
pass over x) show up as a lower fraction: the count is the floor, not what a given kernel does.
Every provider runs on the same input values, in the same process, right after each other; a row's
``speedup_vs_compile`` is torch.compile's median time over its own (torch.compile of the plain PyTorch
code is the strongest peer that needs no hand-written kernel). ``rel_err_vs_eager`` is
||out - out_eager|| / ||out_eager|| (the gradients, for bwd rows), so a fast wrong kernel cannot pass
unnoticed.

Modes
  fwd  the training forward: the inputs require grad, so autograd records the graph and each
       implementation saves what its backward needs, as in a training step.
  bwd  the backward alone: the forward runs once, then
       ``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)`` is timed.

Providers
  fusedlm-triton  fusedlm.<op>(..., backend="triton")      (fusedlm-cuda too, where fusedlm._C is built)
  torch-eager     the plain PyTorch code the models run: Hugging Face's LlamaRMSNorm formula,
                  F.layer_norm (nn.LayerNorm), F.silu(gate) * up (LlamaMLP), HF's rotate_half RoPE
  torch-native    F.rms_norm, PyTorch's own fused RMSNorm kernel (rms_norm only)
  torch-compile   torch.compile (default mode) of the torch-eager function
  liger           Liger-Kernel's module/function for the op, when ``liger_kernel`` imports
A provider that is missing or fails leaves a row with ``error`` set and the run goes on.

Timing: on CUDA, ``triton.testing.do_bench`` (median; it flushes L2 before every repetition, so inputs
come from HBM as in a model whose working set dwarfs L2). ``--cpu-smoke`` runs the same code path on
tiny CPU tensors timed with time.perf_counter: a check of the harness, never a performance figure.

Run:  python -m fusedlm.bench [--ops norm,swiglu,rope] [--out DIR] [--quick]      (or: fusedlm bench)
      TRITON_INTERPRET=1 python -m fusedlm.bench --cpu-smoke                     (no GPU needed)
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import _backend

RMS_EPS = 1e-6
LN_EPS = 1e-5
COPY_BYTES_GPU = 1 << 30      # 1 GiB per buffer: far beyond L2 (50 MiB on H100/H200), many waves of SMs
COPY_BYTES_SMOKE = 8 << 20
# A row whose outputs differ from torch-eager's by more than this is flagged in the markdown table.
# Two correct bf16 implementations differ by about one output rounding (u = 2^-8 ~ 4e-3).
REL_ERR_FLAG = 2e-2


# --------------------------------------------------------------------------------------------------
# Plain PyTorch versions of each op: the torch-eager provider and what torch.compile compiles.
# --------------------------------------------------------------------------------------------------

def rms_norm_torch(x, weight):
    """Hugging Face LlamaRMSNorm.forward: statistics in float32, scaled in the input dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return weight * h.to(dtype)


def rms_norm_native(x, weight):
    """PyTorch's own RMSNorm (a fused kernel in recent releases)."""
    return F.rms_norm(x, (x.shape[-1],), weight, RMS_EPS)


def rms_norm_residual_torch(x, residual, weight):
    """The pre-norm residual add as a decoder layer writes it: s = x + residual; (norm(s), s)."""
    s = x + residual
    return rms_norm_torch(s, weight), s


def layer_norm_torch(x, weight, bias):
    """nn.LayerNorm's forward."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LN_EPS)


def swiglu_torch(gate, up):
    """LlamaMLP's act_fn(gate_proj(x)) * up_proj(x), in the input dtype."""
    return F.silu(gate) * up


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_torch(q, k, cos, sin):
    """Hugging Face Llama's apply_rotary_pos_emb (unsqueeze_dim=1), in the input dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# --------------------------------------------------------------------------------------------------
# Liger-Kernel peers. Each builder takes the provider's own input tensors and returns a zero-argument
# callable. Liger writes into buffers it is given (its RoPE rotates q/k in place when their storage is
# (B, S, H, D); its SwiGLU backward writes da/db over the saved inputs): harmless for timing, and every
# provider gets its own clone of the inputs, whose first outputs are the ones checked.
# --------------------------------------------------------------------------------------------------

def _bind(module, **tensors):
    """Make ``module`` use our tensors as its parameters (same values and dtype for every provider)."""
    for name, value in tensors.items():
        delattr(module, name)          # drop the module's own float32 Parameter ...
        setattr(module, name, value)   # ... a plain attribute now: gradients flow to our leaf
    return module


def _liger_rms_norm(t):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    n = t["x"].shape[-1]
    try:
        # in_place=False: by default Liger writes dx over dy, and the timing loop reuses dy.
        mod = LigerRMSNorm(n, eps=RMS_EPS, in_place=False)
    except TypeError:  # releases without the in_place switch
        mod = LigerRMSNorm(n, eps=RMS_EPS)
    _bind(mod, weight=t["weight"])
    return lambda: mod(t["x"])


def _liger_rms_norm_residual(t):
    from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm

    mod = _bind(LigerFusedAddRMSNorm(t["x"].shape[-1], eps=RMS_EPS), weight=t["weight"])
    return lambda: mod(t["x"], t["residual"])


def _liger_layer_norm(t):
    from liger_kernel.transformers.layer_norm import LigerLayerNorm

    mod = _bind(LigerLayerNorm(t["x"].shape[-1], eps=LN_EPS, bias=True), weight=t["weight"], bias=t["bias"])
    return lambda: mod(t["x"])


def _liger_swiglu(t):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return lambda: LigerSiLUMulFunction.apply(t["gate"], t["up"])


def _liger_rope(t):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return lambda: liger_rotary_pos_emb(t["q"], t["k"], t["cos"], t["sin"])


# --------------------------------------------------------------------------------------------------
# The ops: inputs, byte counts, providers.
# --------------------------------------------------------------------------------------------------

def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclasses.dataclass
class Sizes:
    tokens: int = 16384        # rows of the 2-D ops; B * S for rope
    hidden: int = 4096         # norm hidden size, swiglu intermediate size
    rope_batch: int = 4
    rope_heads: int = 32
    rope_kv_heads: int = 8
    rope_head_dim: int = 128


SMOKE_SIZES = Sizes(tokens=24, hidden=200, rope_batch=2, rope_heads=4, rope_kv_heads=2, rope_head_dim=32)


@dataclasses.dataclass
class OpSpec:
    name: str
    family: str                               # what --ops and the thin scripts select by: norm/swiglu/rope
    fusedlm_attr: str                         # the public function; the op is skipped if it is missing
    make: Callable[[Sizes, torch.device, torch.dtype, torch.Generator], dict]
    grad: tuple                               # inputs that get gradients in bwd mode
    describe: Callable[[dict], str]           # the shape string of a row
    bytes_doc: dict                           # mode -> the formula nbytes computes, in words
    nbytes: Callable[[dict, str], int]        # (inputs, mode) -> fewest bytes moved
    fusedlm_call: Callable                    # (backend, **inputs) -> outputs
    torch_fn: Callable                        # torch-eager, and what torch.compile compiles
    extra_torch: dict = dataclasses.field(default_factory=dict)  # more plain-torch providers
    liger: Optional[Callable] = None


def _make_norm(with_bias=False, with_residual=False):
    def make(sz, device, dtype, gen):
        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device, dtype)
        t = {"x": randn(sz.tokens, sz.hidden)}
        if with_residual:
            t["residual"] = randn(sz.tokens, sz.hidden)
        t["weight"] = 1.0 + 0.1 * randn(sz.hidden)
        if with_bias:
            t["bias"] = 0.1 * randn(sz.hidden)
        return t
    return make


def _make_swiglu(sz, device, dtype, gen):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device, dtype)
    return {"gate": randn(sz.tokens, sz.hidden), "up": randn(sz.tokens, sz.hidden)}


def _make_rope(sz, device, dtype, gen):
    b, d = sz.rope_batch, sz.rope_head_dim
    if sz.tokens % b:
        raise ValueError(f"--tokens {sz.tokens} is not a multiple of the rope batch {b}")
    s = sz.tokens // b

    def heads(h):
        # The layout a Hugging Face attention layer hands to apply_rotary_pos_emb:
        # q_proj(x).view(B, S, H, D).transpose(1, 2), a (B, H, S, D) view of (B, S, H, D) storage.
        x = torch.randn(b, s, h, d, generator=gen, dtype=torch.float32).to(device, dtype)
        return x.transpose(1, 2)

    # Real rotary tables (LlamaRotaryEmbedding, base 10000): cos[..., i] == cos[..., i + D/2].
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().expand(b, s, d).contiguous().to(device, dtype)
    sin = emb.sin().expand(b, s, d).contiguous().to(device, dtype)
    return {"q": heads(sz.rope_heads), "k": heads(sz.rope_kv_heads), "cos": cos, "sin": sin}


def _shape(t):
    return "(" + ",".join(str(n) for n in t.shape) + ")"


OPS = [
    OpSpec(
        name="rms_norm", family="norm", fusedlm_attr="rms_norm",
        make=_make_norm(), grad=("x", "weight"),
        describe=lambda t: f"x{_shape(t['x'])} w{_shape(t['weight'])}",
        # M x N rows, element size e:  fwd = (2MN + N) e,  bwd = (3MN + 2N) e.
        # rstd (M floats) is left out: it can be recomputed from x in the backward.
        bytes_doc={"fwd": "read x + write y + read w",
                   "bwd": "read x, dy + write dx + read w + write dw"},
        nbytes=lambda t, mode: (_nbytes(t["x"]) * 2 + _nbytes(t["weight"]) if mode == "fwd"
                                else _nbytes(t["x"]) * 3 + _nbytes(t["weight"]) * 2),
        fusedlm_call=lambda backend, x, weight: fusedlm.rms_norm(x, weight, RMS_EPS, backend=backend),
        torch_fn=rms_norm_torch, extra_torch={"torch-native": rms_norm_native},
        liger=_liger_rms_norm,
    ),
    OpSpec(
        name="rms_norm_residual", family="norm", fusedlm_attr="rms_norm",
        make=_make_norm(with_residual=True), grad=("x", "residual", "weight"),
        describe=lambda t: f"x,residual{_shape(t['x'])} w{_shape(t['weight'])}",
        # fwd = (4MN + N) e.  bwd: the gradient reaching s = x + residual is dy through the norm plus
        # ds from s's other use (the next residual); dx and dresidual are that same tensor, written
        # once:  bwd = (4MN + 2N) e.
        bytes_doc={"fwd": "read x, residual + write y, s + read w",
                   "bwd": "read s, dy, ds + write dx (= dresidual) + read w + write dw"},
        nbytes=lambda t, mode: _nbytes(t["x"]) * 4 + _nbytes(t["weight"]) * (1 if mode == "fwd" else 2),
        fusedlm_call=lambda backend, x, residual, weight: fusedlm.rms_norm(
            x, weight, RMS_EPS, residual=residual, backend=backend),
        torch_fn=rms_norm_residual_torch, liger=_liger_rms_norm_residual,
    ),
    OpSpec(
        name="layer_norm", family="norm", fusedlm_attr="layer_norm",
        make=_make_norm(with_bias=True), grad=("x", "weight", "bias"),
        describe=lambda t: f"x{_shape(t['x'])} w,b{_shape(t['weight'])}",
        # fwd = (2MN + 2N) e,  bwd = (3MN + 3N) e  (mean and rstd recomputable, left out).
        bytes_doc={"fwd": "read x + write y + read w, b",
                   "bwd": "read x, dy + write dx + read w + write dw, db"},
        nbytes=lambda t, mode: (_nbytes(t["x"]) * 2 + _nbytes(t["weight"], t["bias"]) if mode == "fwd"
                                else _nbytes(t["x"]) * 3 + _nbytes(t["weight"]) + _nbytes(t["weight"], t["bias"])),
        fusedlm_call=lambda backend, x, weight, bias: fusedlm.layer_norm(x, weight, bias, LN_EPS, backend=backend),
        torch_fn=layer_norm_torch, liger=_liger_layer_norm,
    ),
    OpSpec(
        name="swiglu", family="swiglu", fusedlm_attr="swiglu",
        make=_make_swiglu, grad=("gate", "up"),
        describe=lambda t: f"gate,up{_shape(t['gate'])}",
        # fwd = 3MI e,  bwd = 5MI e  (silu(gate) recomputed from gate, never stored).
        bytes_doc={"fwd": "read gate, up + write h",
                   "bwd": "read gate, up, dh + write dgate, dup"},
        nbytes=lambda t, mode: _nbytes(t["gate"]) * (3 if mode == "fwd" else 5),
        fusedlm_call=lambda backend, gate, up: fusedlm.swiglu(gate, up, backend=backend),
        torch_fn=swiglu_torch, liger=_liger_swiglu,
    ),
    OpSpec(
        name="rope", family="rope", fusedlm_attr="apply_rotary_pos_emb",
        make=_make_rope, grad=("q", "k"),
        describe=lambda t: (f"q{_shape(t['q'])} k{_shape(t['k'])} cos,sin{_shape(t['cos'])} "
                            f"tokens={t['q'].shape[0] * t['q'].shape[2]}, q/k in (B,S,H,D) storage"),
        # fwd = 2(|q| + |k|) e + |cos| e: q and k are read and written once; cos and sin are each
        # read at half their size, since the API guarantees cos[..., i] == cos[..., i + D/2].
        # bwd: the same traffic on dq_out/dk_out -> dq/dk (cos, sin are constants: no gradient).
        bytes_doc={"fwd": "read q, k + write q_out, k_out + read half of cos, sin",
                   "bwd": "read dq_out, dk_out + write dq, dk + read half of cos, sin"},
        nbytes=lambda t, mode: 2 * _nbytes(t["q"], t["k"]) + _nbytes(t["cos"], t["sin"]) // 2,
        fusedlm_call=lambda backend, q, k, cos, sin: fusedlm.apply_rotary_pos_emb(q, k, cos, sin, backend=backend),
        torch_fn=rope_torch, liger=_liger_rope,
    ),
]
OP_BY_NAME = {op.name: op for op in OPS}
FAMILIES = sorted({op.family for op in OPS})
PROVIDERS = ["torch-eager", "fusedlm-triton", "fusedlm-cuda", "torch-native", "torch-compile", "liger"]


def select_ops(spec):
    """'all', or a comma list of op names and family names -> [OpSpec] in OPS order."""
    if spec in (None, "", "all"):
        return list(OPS)
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    unknown = wanted - set(OP_BY_NAME) - set(FAMILIES)
    if unknown:
        raise ValueError(f"--ops: unknown {sorted(unknown)}; expected op names {list(OP_BY_NAME)} "
                         f"or families {FAMILIES}")
    return [op for op in OPS if op.name in wanted or op.family in wanted]


def provider_builders(op, run):
    """name -> builder(inputs) -> zero-argument callable; torch-eager first (the others' yardstick)."""
    builders = {"torch-eager": lambda t: (lambda: op.torch_fn(**t))}
    for backend in ("triton", "cuda"):
        why = _backend.why_unavailable(backend)
        if backend == "cuda" and why is not None:
            continue  # the extension is not built here: no row at all, `fusedlm info` says why
        builders[f"fusedlm-{backend}"] = _fusedlm_builder(op, backend, why)
    for name, fn in op.extra_torch.items():
        builders[name] = (lambda f: lambda t: (lambda: f(**t)))(fn)
    compiled = run.compiled(op.torch_fn)
    builders["torch-compile"] = lambda t: (lambda: compiled(**t))
    if op.liger is not None:
        builders["liger"] = _liger_builder(op.liger)
    return {k: v for k, v in builders.items() if run.wants_provider(k)}


def _fusedlm_builder(op, backend, why_unavailable):
    def builder(t):
        if why_unavailable is not None:  # e.g. Triton on a CPU without TRITON_INTERPRET=1
            raise ProviderUnavailable(f"backend {backend!r} is not usable here: {why_unavailable}")
        if backend == "cuda":
            # The extension may not cover every op yet: a backend that says it cannot serve the
            # call is a gap to report, not a failure of the run. (A Triton gap is a failure.)
            try:
                op.fusedlm_call(backend, **t)
            except ValueError as e:
                if "cannot serve" in str(e):
                    raise ProviderUnavailable(str(e)) from None
        return lambda: op.fusedlm_call(backend, **t)
    return builder


def _liger_builder(build):
    def builder(t):
        try:
            import liger_kernel  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "not available", reason kept
            raise ProviderUnavailable(f"liger_kernel is not importable ({type(e).__name__}: {e})") from None
        return build(t)
    return builder


class ProviderUnavailable(RuntimeError):
    """A peer that is not installed here: recorded as a row's error, not a failure of the run."""


# --------------------------------------------------------------------------------------------------
# Environment, timing, memory.
# --------------------------------------------------------------------------------------------------

def _git_commit():
    if os.environ.get("FUSEDLM_GIT_COMMIT"):
        return os.environ["FUSEDLM_GIT_COMMIT"]
    repo = Path(__file__).resolve().parents[1]
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


def _version(module):
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001
        return None


def environment(device):
    """What every row records about where it was measured."""
    import triton

    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "fusedlm": getattr(fusedlm, "__version__", None),
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def time_cuda(fn, quick):
    """Median ms over repetitions, L2 flushed before each (triton.testing.do_bench)."""
    import triton.testing

    warmup, rep = (10, 40) if quick else (25, 100)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def time_cpu(fn, reps=1):
    """Median ms of ``reps`` calls with time.perf_counter (the smoke test: the caller already warmed up)."""
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
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def measure_copy_bandwidth(run):
    """GB/s of dst.copy_(src) on buffers of run.copy_bytes each; bytes counted = read + write."""
    n = run.copy_bytes
    src = torch.ones(n, dtype=torch.uint8, device=run.device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()
    ms = run.time(fn) if run.device.type == "cuda" else time_cpu(fn, reps=3)
    del src, dst
    return 2 * n / (ms * 1e6), ms


# --------------------------------------------------------------------------------------------------
# One run.
# --------------------------------------------------------------------------------------------------

class Run:
    """Settings and shared state of one benchmark run."""

    def __init__(self, args):
        self.smoke = args.cpu_smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if self.smoke else torch.bfloat16)
        self.sizes = SMOKE_SIZES if self.smoke else Sizes()
        if args.tokens:
            self.sizes = dataclasses.replace(self.sizes, tokens=args.tokens)
        if args.hidden:
            self.sizes = dataclasses.replace(self.sizes, hidden=args.hidden)
        self.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = set(self.modes) - {"fwd", "bwd"}
        if bad:
            raise ValueError(f"--modes: expected fwd and/or bwd, got {sorted(bad)}")
        self.providers = None if args.providers in (None, "", "all") else {
            p.strip() for p in args.providers.split(",") if p.strip()}
        self.quick = args.quick
        self.copy_bytes = COPY_BYTES_SMOKE if self.smoke else COPY_BYTES_GPU
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else None
        self.seed = args.seed
        self.env = environment(self.device)
        self.copy_gbps = None
        self._compiled = {}

    def wants_provider(self, name):
        return self.providers is None or name in self.providers

    def out_of_time(self):
        return self.deadline is not None and time.monotonic() > self.deadline

    def time(self, fn):
        return time_cuda(fn, self.quick) if self.device.type == "cuda" else time_cpu(fn)

    def compiled(self, fn):
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn)
        return self._compiled[fn]

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _cotangents(outs, seed):
    """grad_outputs with the same values for every provider, in each output's own memory layout."""
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    cots = []
    for o in outs:
        g = torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32)
        cots.append(torch.empty_like(o).copy_(g))  # empty_like keeps o's strides
    return cots


def _rel_err(got, want):
    """max over the tensors of ||got - want|| / ||want||, in float32 on the device."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want):
        if g is None or g.shape != w.shape:
            return float("inf")
        g, w = g.detach().float(), w.detach().float()
        scale = w.norm().item()
        diff = (g - w).norm().item()
        err = diff / scale if scale > 0 else diff
        worst = max(worst, err if err == err else float("inf"))
    return worst


def _short(e, limit=300):
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[:limit] + "..."


def bench_op(op, run, emit):
    """Measure every provider of ``op`` in every mode; calls ``emit(row)`` for each result."""
    gen = torch.Generator().manual_seed(run.seed)
    base = op.make(run.sizes, run.device, run.dtype, gen)
    shape = op.describe(base)
    reference = {}  # torch-eager's outputs and gradients: the yardstick of rel_err_vs_eager

    def row(mode, provider, ms=None, peak=None, rel=None, error=None, status=None, host=None):
        nbytes = op.nbytes(base, mode)
        gbps = nbytes / (ms * 1e6) if ms else None  # bytes / (ms * 1e-3 s) / 1e9
        emit({
            "op": op.name, "shape": shape, "dtype": str(run.dtype).replace("torch.", ""), "mode": mode,
            "provider": provider, "median_ms": ms, "host_ms": host, "gbps": gbps,
            "frac_of_copy_bw": gbps / run.copy_gbps if gbps and run.copy_gbps else None,
            "peak_mem_bytes": peak, "bytes": nbytes, "bytes_formula": op.bytes_doc[mode],
            "rel_err_vs_eager": rel, "error": error, "status": status or ("failed" if error else "ok"),
            "copy_gbps": run.copy_gbps, "smoke": run.smoke, **run.env,
        })

    for provider, build in provider_builders(op, run).items():
        if run.out_of_time():
            for mode in run.modes:
                row(mode, provider, error="the --budget-s time budget ran out", status="skipped")
            continue
        _bench_provider(op, run, provider, build, base, reference, row)
        _free(run)


def _bench_provider(op, run, provider, build, base, reference, row):
    """One provider of one op: build, run once (checked against torch-eager), then time each mode."""
    try:
        # Each provider gets its own copy of the inputs (same values, same strides): some peers write
        # into their inputs, which must not leak into the next provider's measurement.
        t = {k: v.detach().clone().requires_grad_(k in op.grad) for k, v in base.items()}
        fn = build(t)
        outs = _as_tuple(fn())  # first call: compiles / autotunes; these outputs are the ones checked
        timed = {"fwd": fn}
        results = {"fwd": outs}
        if "bwd" in run.modes:
            leaves = [t[k] for k in op.grad]
            diff_outs = [o for o in outs if o.requires_grad]
            cots = _cotangents(diff_outs, run.seed + 1)
            timed["bwd"] = lambda: torch.autograd.grad(diff_outs, leaves, cots, retain_graph=True)
            results["bwd"] = timed["bwd"]()  # first backward: compiles; these gradients are checked
        run.sync()
        if provider == "torch-eager":
            reference.update({m: [x.detach() for x in results[m]] for m in run.modes})
        rel = {m: _rel_err(results[m], reference[m]) if m in reference else None for m in run.modes}
        del results
    except ProviderUnavailable as e:
        for mode in run.modes:
            row(mode, provider, error=str(e), status="unavailable")
        return
    except Exception as e:  # noqa: BLE001 - one provider failing must not stop the others
        for mode in run.modes:
            row(mode, provider, error=_short(e))
        return
    for mode in run.modes:
        try:
            peak = peak_extra_bytes(timed[mode], run.device)
            ms = run.time(timed[mode])
            host = host_ms(timed[mode], run.device)
        except Exception as e:  # noqa: BLE001
            row(mode, provider, rel=rel[mode], error=_short(e))
            continue
        row(mode, provider, ms=ms, peak=peak, rel=rel[mode], host=host)


def _free(run):
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Output: JSON rows, a markdown table, a summary, a plot.
# --------------------------------------------------------------------------------------------------

def _slug(text):
    return "".join(c.lower() if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def _compile_ms(rows):
    return {(r["op"], r["mode"]): r["median_ms"] for r in rows
            if r["provider"] == "torch-compile" and r["median_ms"]}


def summary_table(rows):
    """One line per (op, mode): each provider's median ms and fraction of copy bandwidth."""
    measured = [r for r in rows if r["op"] != "copy"]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in measured)]
    keys = list(dict.fromkeys((r["op"], r["mode"]) for r in measured))
    cell = {(r["op"], r["mode"], r["provider"]): r for r in measured}
    comp = _compile_ms(rows)
    head = ["op", "mode"] + providers + ["fusedlm-triton vs compile"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op, mode in keys:
        cells = [op, mode]
        for p in providers:
            r = cell.get((op, mode, p))
            if r is None or r["median_ms"] is None:
                cells.append({None: "—", "unavailable": "n/a", "skipped": "skipped"}.get(
                    r and r["status"], "error"))
            else:
                cells.append(f"{r['median_ms']:.3f} ms ({100 * (r['frac_of_copy_bw'] or 0):.0f}%)")
        ours = cell.get((op, mode, "fusedlm-triton"))
        c = comp.get((op, mode))
        cells.append(f"{c / ours['median_ms']:.2f}x" if ours and ours["median_ms"] and c else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows, run, skipped):
    env = run.env
    comp = _compile_ms(rows)
    lines = ["# fusedlm memory-bound op benchmarks", ""]
    if run.smoke:
        lines += ["**CPU SMOKE TEST: tiny tensors, time.perf_counter, one call. These times check the "
                  "harness; they are not performance figures.**", ""]
    lines += [
        f"{env['gpu']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
        f"liger-kernel {env['liger_kernel'] or 'not installed'} · fusedlm {env['fusedlm']} · "
        f"commit {env['git_commit'] or 'unknown'} · {env['date']}",
        "",
        f"Copy bandwidth (`Tensor.copy_` of {run.copy_bytes / 2**20:.0f} MiB, read + write counted): "
        f"**{_fmt(run.copy_gbps, '.0f')} GB/s**. dtype {str(run.dtype).replace('torch.', '')}. "
        "Timing: " + ("time.perf_counter" if run.smoke else "triton.testing.do_bench median, L2 flushed")
        + ". fwd = training forward (inputs require grad); bwd = `torch.autograd.grad` alone. "
        "`% copy BW` = (fewest bytes the op must move / time) / copy bandwidth. "
        "`vs compile` = torch.compile's time / this row's time. `host ms` = time to issue one call on "
        "the host; near `median ms`, the row is launch-bound. `peak MiB` = memory one call allocates "
        "beyond its inputs.",
        "",
        "## Summary: median ms (% of copy bandwidth)",
        "",
        summary_table(rows),
        "",
        "## All rows",
        "",
        "| op | mode | shape | provider | median ms | host ms | GB/s | % copy BW | peak MiB | vs compile "
        "| rel err vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for r in rows:
        if r["op"] == "copy":
            continue
        if r["median_ms"] is None:
            errors.append(r)
            continue
        c = comp.get((r["op"], r["mode"]))
        rel = r["rel_err_vs_eager"]
        rel_s = _fmt(rel, ".1e") + (" **check**" if rel is not None and rel > REL_ERR_FLAG else "")
        peak = r["peak_mem_bytes"]
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['shape']} | {r['provider']} | {r['median_ms']:.4f} | "
            f"{_fmt(r['host_ms'], '.4f')} | "
            f"{r['gbps']:.0f} | {100 * (r['frac_of_copy_bw'] or 0):.1f}% | "
            f"{_fmt(None if peak is None else peak / 2**20, '.0f')} | "
            f"{_fmt(None if not c else c / r['median_ms'], '.2f')}{'x' if c else ''} | {rel_s} |")
    if errors or skipped:
        lines += ["", "## Not measured", ""]
        seen = {}
        for r in errors:
            seen.setdefault((r["provider"], r["error"]), []).append(f"{r['op']} {r['mode']}")
        for (provider, error), where in seen.items():
            lines.append(f"- {provider} ({', '.join(where)}): {error}")
        for name, why in skipped:
            lines.append(f"- {name}: skipped, {why}")
    lines += ["", "## Bytes counted (the fewest each op must move; element size e, weights in e)", ""]
    for op in OPS:
        if any(r["op"] == op.name for r in rows):
            for mode in ("fwd", "bwd"):
                lines.append(f"- {op.name} {mode}: {op.bytes_doc[mode]}")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Bar chart of the fraction of copy bandwidth per (op, mode) and provider; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - the plot is optional
        return None
    measured = [r for r in rows if r["op"] != "copy" and r["frac_of_copy_bw"]]
    if not measured:
        return None
    keys = list(dict.fromkeys(f"{r['op']}\n{r['mode']}" for r in measured))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in measured)]
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys)), 4))
    for i, p in enumerate(providers):
        vals = {f"{r['op']}\n{r['mode']}": r["frac_of_copy_bw"] for r in measured if r["provider"] == p}
        xs = [j + i * width for j, k in enumerate(keys) if k in vals]
        ax.bar(xs, [vals[k] for k in keys if k in vals], width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=8)
    ax.set_ylabel("fraction of copy bandwidth")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_title(f"{measured[0]['gpu']}, {measured[0]['dtype']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(rows, run, out_dir, stem, skipped, final=False):
    """Rewrite the JSON, markdown and summary files (after every op, so a killed run keeps its rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md",
             "summary": out_dir / f"{stem}_summary.md"}
    paths["json"].write_text(json.dumps(rows, indent=1) + "\n")
    paths["md"].write_text(markdown(rows, run, skipped))
    paths["summary"].write_text(summary_table(rows) + "\n")
    if final:
        png = plot(rows, out_dir / f"{stem}.png")
        if png:
            paths["png"] = png
    return paths


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------

def _default_out():
    """benchmarks/results/ of the source tree this module belongs to (editable install), else ./"""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "benchmarks").is_dir():
        return repo / "benchmarks" / "results"
    return Path("benchmarks") / "results"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="fusedlm bench",
        description="Throughput of fusedlm's memory-bound ops (rms_norm, rms_norm+residual, layer_norm, "
                    "swiglu, rope) against PyTorch eager, torch.compile and Liger-Kernel, as GB/s and the "
                    "fraction of the measured copy bandwidth. Needs a CUDA device (or --cpu-smoke).")
    p.add_argument("--ops", default="all",
                   help=f"comma list of ops {list(OP_BY_NAME)} or families {FAMILIES} (default: all)")
    p.add_argument("--providers", default="all", help=f"comma list of {PROVIDERS} (default: all)")
    p.add_argument("--modes", default="fwd,bwd", help="fwd, bwd or both (default: fwd,bwd)")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default: benchmarks/results/; a temp dir with --cpu-smoke)")
    p.add_argument("--tag", default=None, help="file name prefix (default: memory_bound, or the ops chosen)")
    p.add_argument("--quick", action="store_true", help="shorter timing loops (do_bench warmup 10 ms, rep 40 ms)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run each op once on tiny CPU tensors through the same code path (checks the "
                        "harness, no GPU needed; set TRITON_INTERPRET=1 for the triton provider)")
    p.add_argument("--tokens", type=int, default=None, help="rows of the 2-D ops, B*S for rope (default 16384)")
    p.add_argument("--hidden", type=int, default=None, help="norm hidden / swiglu width (default 4096)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default bfloat16 (float32 with --cpu-smoke)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new measurement after this many seconds (rows marked skipped)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Entry point of ``fusedlm bench`` / ``python -m fusedlm.bench``.

    Returns 0 when every fusedlm provider measured ran, 1 when one failed, 2 when it cannot run here
    (no CUDA device without --cpu-smoke, bad arguments).
    """
    try:
        args = parse_args(argv)
        ops = select_ops(args.ops)
    except ValueError as e:
        print(f"fusedlm bench: {e}", file=sys.stderr)
        return 2
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("fusedlm bench: no CUDA device here (torch "
              f"{torch.__version__}, torch.cuda.is_available() is False). The benchmarks measure GPU "
              "throughput; run them on a GPU machine (scripts/gpu_run.sh), or use --cpu-smoke to check "
              "the harness on tiny CPU tensors.", file=sys.stderr)
        return 2
    try:
        run = Run(args)
    except ValueError as e:
        print(f"fusedlm bench: {e}", file=sys.stderr)
        return 2
    if run.smoke and _backend.why_unavailable("triton") is not None:
        print(f"note: the fusedlm-triton provider is unavailable: {_backend.why_unavailable('triton')} "
              "(run with TRITON_INTERPRET=1 to include it)", flush=True)

    tag = args.tag or ("memory_bound" if len(ops) == len(OPS) else "-".join(op.name for op in ops))
    stem = f"{tag}_{'cpu-smoke' if run.smoke else _slug(run.env['gpu'])}"
    out_dir = args.out or (Path(tempfile.gettempdir()) / "fusedlm_bench_smoke" if run.smoke else _default_out())

    env = run.env
    print(f"fusedlm bench on {env['gpu']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"liger-kernel {env['liger_kernel'] or 'not installed'}, commit {env['git_commit'] or 'unknown'}",
          flush=True)
    gbps, ms = measure_copy_bandwidth(run)
    run.copy_gbps = gbps
    print(f"copy bandwidth: {gbps:.0f} GB/s ({run.copy_bytes / 2**20:.0f} MiB copy_ in {ms:.4f} ms, "
          "read + write counted)", flush=True)
    rows = [{"op": "copy", "shape": f"({run.copy_bytes},) uint8", "dtype": "uint8", "mode": "fwd",
             "provider": "torch copy_", "median_ms": ms, "host_ms": None, "gbps": gbps, "frac_of_copy_bw": 1.0,
             "peak_mem_bytes": None, "bytes": 2 * run.copy_bytes, "bytes_formula": "read src + write dst",
             "rel_err_vs_eager": None, "error": None, "status": "ok", "copy_gbps": gbps, "smoke": run.smoke,
             **env}]
    skipped = []

    def emit(r):
        rows.append(r)
        if r["median_ms"] is not None:
            rel = r["rel_err_vs_eager"]
            print(f"  {r['op']:18s} {r['mode']} {r['provider']:15s} {r['median_ms']:9.4f} ms "
                  f"{r['gbps']:7.0f} GB/s {100 * r['frac_of_copy_bw']:5.1f}% of copy"
                  + (f"  rel err {rel:.1e}" if rel is not None else ""), flush=True)
        elif r["status"] != "unavailable":
            print(f"  {r['op']:18s} {r['mode']} {r['provider']:15s} not measured: {r['error']}", flush=True)

    for op in ops:
        if getattr(fusedlm, op.fusedlm_attr, None) is None:
            why = f"fusedlm.{op.fusedlm_attr} does not exist in this build"
            print(f"{op.name}: skipped, {why}", flush=True)
            skipped.append((op.name, why))
            continue
        print(f"{op.name}:", flush=True)
        bench_op(op, run, emit)
        write_outputs(rows, run, out_dir, stem, skipped)
    for why in dict.fromkeys(f"{r['provider']}: {r['error']}" for r in rows if r["status"] == "unavailable"):
        print(f"not measured: {why}", flush=True)
    paths = write_outputs(rows, run, out_dir, stem, skipped, final=True)

    print("\n" + summary_table(rows) + "\n")
    print("results: " + ", ".join(str(p) for p in paths.values()))
    failed = [r for r in rows if r["provider"].startswith("fusedlm-") and r["status"] == "failed"]
    flagged = [r for r in rows if r["provider"].startswith("fusedlm-") and r["rel_err_vs_eager"] is not None
               and not r["rel_err_vs_eager"] <= REL_ERR_FLAG]
    for r in failed:
        print(f"FAILED {r['op']} {r['mode']} {r['provider']}: {r['error']}", file=sys.stderr)
    for r in flagged:
        print(f"CHECK {r['op']} {r['mode']} {r['provider']}: rel err vs torch-eager "
              f"{r['rel_err_vs_eager']:.2e} > {REL_ERR_FLAG}", file=sys.stderr)
    return 1 if failed or flagged else 0


if __name__ == "__main__":
    sys.exit(main())
