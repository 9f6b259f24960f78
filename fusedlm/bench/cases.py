"""What an op module defines for the harness: cases, providers, and the helpers they share.

An op module (ops_norm.py, ops_attention.py, ...) describes each op as a ``MemoryOp`` (memory-bound: the
work counted is the fewest bytes it must move, reported as GB/s against the measured copy bandwidth) or a
``ComputeOp`` (matmul work: FLOPs, reported as TFLOP/s against a measured bf16 matmul). Both expand into
``Case`` objects: the inputs (made once, the same values for every provider), the inputs that get
gradients, the work per mode, and the providers, an ordered ``name -> builder`` map.

A builder takes that provider's own copy of the inputs and returns the callable to time, or a ``Bound``
when the provider differentiates other tensors than the case's (varlen attention on packed tokens),
compares other tensors (the real tokens of a padded batch) or needs its own output gradients. A builder
that cannot run here raises ``ProviderUnavailable`` (not installed, needs CUDA), ``ProviderUnsupported``
(an SDPA backend with no kernel for the case), ``ProviderOOM`` or ``ProviderSkipped`` (a fusedlm function
this build lacks): a row with the reason, and the run goes on. The outputs of the first provider of
``Case.reference`` that runs are the yardstick of every row's ``rel_err``; ``Case.baseline`` names the
provider every row's ``vs_baseline`` divides by.
"""
import dataclasses
import importlib
from typing import Callable, Optional

import torch

from fusedlm import _backend


class ProviderUnavailable(RuntimeError):
    """A peer that cannot run here (not installed, needs a CUDA device): a row's error, not a failure."""
    status = "unavailable"


class ProviderUnsupported(ProviderUnavailable):
    """A peer that runs here but has no kernel for this case (an SDPA backend refusing a mask)."""
    status = "unsupported"


class ProviderOOM(ProviderUnavailable):
    """A peer that runs out of device memory on this case: a row with status "oom", not a crash."""
    status = "oom"


class ProviderSkipped(ProviderUnavailable):
    """A provider left out on purpose (a fusedlm function this build does not have yet)."""
    status = "skipped"


@dataclasses.dataclass
class Bound:
    """A provider bound to its inputs, when the defaults (differentiate the case's ``grad`` inputs,
    compare the outputs and gradients as they are, random output gradients) do not fit."""
    fn: Callable                               # the forward: timed as "fwd", called again by "fwd+bwd"
    leaves: list                               # the tensors "bwd" and "fwd+bwd" differentiate
    canon: Optional[Callable] = None           # [tensors] -> [tensors] compared across providers
    cotangents: Optional[Callable] = None      # [differentiable outputs] -> grad_outputs
    compare: bool = True                       # False: another function (the base linear); no rel_err


@dataclasses.dataclass
class Case:
    """One measurement point, run by every provider in every mode."""
    op: str
    kind: str                                  # "memory" (bytes, GB/s) or "compute" (FLOPs, TFLOP/s)
    label: str                                 # the case's name in summary tables
    make: Callable[[], dict]                   # -> the inputs (called once; each provider gets a clone)
    describe: Callable[[dict], str]            # inputs -> the row's shape string
    grad: tuple                                # the inputs that get gradients
    work: Callable[[dict, str, str], tuple]    # (inputs, mode, provider) -> (bytes or FLOPs, formula)
    providers: dict                            # name -> builder(inputs) -> callable or Bound, in run order
    reference: tuple = ()                      # yardstick: the first of these providers that runs
    baseline: Optional[str] = None             # vs_baseline = median_ms / this provider's (same mode)
    params: dict = dataclasses.field(default_factory=dict)  # recorded in every row
    modes: Optional[tuple] = None              # the modes the case has (None: all; ("fwd",): forward only)


@dataclasses.dataclass
class Sizes:
    tokens: int = 16384        # rows of the 2-D ops; B * S for rope and attention; M of lora_linear
    hidden: int = 4096         # norm hidden size, swiglu intermediate size
    rope_batch: int = 4
    rope_heads: int = 32
    rope_kv_heads: int = 8
    rope_head_dim: int = 128
    attn_heads: int = 16
    attn_head_dim: int = 128
    attn_seqlens: tuple = (1024, 2048, 4096, 8192, 16384)   # B = tokens // S (at least 1)
    attn_quick_seqlens: tuple = (1024, 4096, 16384)          # with --quick
    attn_padded_quick_seqlens: tuple = (4096,)               # attention_padded with --quick
    attn_math_max_seqlen: int = 2048   # SDPA's math backend materialises (B, H, S, S) scores: small S only
    lora_in: int = 4096
    lora_out: int = 4096
    lora_rank: int = 16
    lora_alpha: int = 32       # PEFT's scaling = alpha / r
    deberta_heads: int = 12    # deberta-v3-base: H = 12, D = 64, 256 buckets, max_relative_positions 512
    deberta_head_dim: int = 64
    deberta_buckets: int = 256
    deberta_max_rel: int = 512
    deberta_seqlens: tuple = (128, 512, 2048, 8192)          # B = tokens // S (128: B = 128; 8192: B = 2)
    deberta_quick_seqlens: tuple = (512, 2048)               # with --quick
    deberta_ref_max_seqlen: int = 2048  # the float32 eager yardstick (S x S fp32 scores): up to this S
    kv_batches: tuple = (1, 8, 64)     # kv_cache_decode: batch x cache length, one query row per sequence
    kv_seqlens: tuple = (1024, 4096, 16384, 32768, 131072)
    kv_quick_seqlens: tuple = (4096, 32768, 131072)          # with --quick
    kv_heads: int = 32                 # Llama-3-8B-like GQA: H = 32, Hkv = 8, E = 128
    kv_kv_heads: int = 8
    kv_head_dim: int = 128
    kv_block_size: int = 16            # the paged layout's block
    kv_max_cache_bytes: int = 16 << 30  # K + V of one layout above this: the case is left out (B=64 x 128k)
    kv_math_max_cache_bytes: int = 256 << 20  # sdpa-math / fusedlm-torch (float32, GQA expanded): up to this


SMOKE_SIZES = Sizes(tokens=48, hidden=200, rope_batch=2, rope_heads=4, rope_kv_heads=2, rope_head_dim=32,
                    attn_heads=2, attn_head_dim=16, attn_seqlens=(16, 48), attn_quick_seqlens=(16, 48),
                    attn_padded_quick_seqlens=(48,),
                    attn_math_max_seqlen=48, lora_in=72, lora_out=80, lora_rank=4, lora_alpha=8,
                    deberta_heads=2, deberta_head_dim=16, deberta_buckets=8, deberta_max_rel=16,
                    deberta_seqlens=(16, 48), deberta_quick_seqlens=(16, 48), deberta_ref_max_seqlen=48,
                    kv_batches=(1, 3), kv_seqlens=(16, 40), kv_quick_seqlens=(40,), kv_heads=4, kv_kv_heads=2,
                    kv_head_dim=16)


# --------------------------------------------------------------------------------------------------
# The two kinds of op.
# --------------------------------------------------------------------------------------------------

# Column order of the memory-bound summary table.
MEMORY_PROVIDERS = ["torch-eager", "fusedlm-triton", "fusedlm-cuda", "torch-native", "torch-compile", "liger"]


@dataclasses.dataclass
class MemoryOp:
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
    liger: Optional[Callable] = None          # builder(inputs) of the Liger-Kernel peer
    kind = "memory"
    report = None

    @property
    def fusedlm_attrs(self):
        return (self.fusedlm_attr,)

    @property
    def work_doc(self):
        return self.bytes_doc

    def cases(self, run):
        """The one case of a memory-bound op, at run.sizes; providers: torch-eager (the yardstick)
        first, fusedlm, the other plain-torch ones, torch.compile of torch-eager, Liger-Kernel."""
        def make():
            return self.make(run.sizes, run.device, run.dtype, torch.Generator().manual_seed(run.seed))

        def work(t, mode, provider):
            if mode == "fwd+bwd":
                return self.nbytes(t, "fwd") + self.nbytes(t, "bwd"), "fwd + bwd"
            return self.nbytes(t, mode), self.bytes_doc[mode]

        def calls(fn):  # a builder that calls fn on the provider's inputs
            return lambda t: (lambda: fn(**t))

        builders = {"torch-eager": calls(self.torch_fn)}
        builders.update(fusedlm_providers(lambda backend, t: (lambda: self.fusedlm_call(backend, **t))))
        builders.update({name: calls(fn) for name, fn in self.extra_torch.items()})
        torch_fn = self.torch_fn
        builders["torch-compile"] = lambda t: calls(run.compiled(torch_fn))(t)
        if self.liger is not None:
            builders["liger"] = _liger_builder(self.liger)
        return [Case(op=self.name, kind="memory", label=self.name, make=make, describe=self.describe,
                     grad=self.grad, work=work, providers=builders, reference=("torch-eager",))]


@dataclasses.dataclass
class ComputeOp:
    name: str
    family: str                     # what --ops and the thin scripts select by: attention / lora / deberta
    fusedlm_attrs: tuple            # the public functions used; the op is skipped if one is missing
    make_cases: Callable            # run -> [Case]
    work_doc: dict                  # mode -> the FLOP formula, in words
    report: Optional[Callable] = None  # rows -> markdown appended to the summaries ('' when nothing to say)
    kind = "compute"

    def cases(self, run):
        return self.make_cases(run)


# --------------------------------------------------------------------------------------------------
# Providers shared by the op modules.
# --------------------------------------------------------------------------------------------------

def fusedlm_providers(bind, suffix=""):
    """{"fusedlm-triton<suffix>": builder[, "fusedlm-cuda<suffix>": builder]} for ``bind(backend, inputs)``
    -> callable or Bound. fusedlm-cuda only where the extension is built (``fusedlm info`` says why not)."""
    out = {}
    for backend in ("triton", "cuda"):
        why = _backend.why_unavailable(backend)
        if backend == "cuda" and why is not None:
            continue
        out[f"fusedlm-{backend}{suffix}"] = _fusedlm_builder(backend, bind, why)
    return out


def _fusedlm_builder(backend, bind, why_unavailable):
    def builder(t):
        if why_unavailable is not None:  # e.g. Triton on a CPU without TRITON_INTERPRET=1
            raise ProviderUnavailable(f"backend {backend!r} is not usable here: {why_unavailable}")
        bound = bind(backend, t)
        if backend == "cuda":
            # The extension may not cover every op yet: a backend that says it cannot serve the
            # call is a gap to report, not a failure of the run. (A Triton gap is a failure.)
            try:
                (bound.fn if isinstance(bound, Bound) else bound)()
            except ValueError as e:
                if "cannot serve" in str(e):
                    raise ProviderUnavailable(str(e)) from None
        return bound
    return builder


def import_peer(module, install_hint=None):
    """Import a peer's module; any failure -> ProviderUnavailable naming it and why."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available", reason kept
        hint = f"; pip install {install_hint}" if install_hint else ""
        raise ProviderUnavailable(f"{module} is not installed or not importable ({type(e).__name__}: {e}){hint}") \
            from None


def _liger_builder(build):
    def builder(t):
        import_peer("liger_kernel")
        return build(t)
    return builder


def bind_params(module, **tensors):
    """Make ``module`` use our tensors as its parameters (same values and dtype for every provider)."""
    for name, value in tensors.items():
        delattr(module, name)          # drop the module's own float32 Parameter ...
        setattr(module, name, value)   # ... a plain attribute now: gradients flow to our leaf
    return module


# --------------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------------

def randn(gen, device, dtype, *shape, scale=1.0):
    """Standard normal float32 values from ``gen`` (on the generator's device), times ``scale``, as
    ``dtype`` on ``device``: the same values for a given seed whatever the run's dtype."""
    x = torch.randn(*shape, generator=gen, device=gen.device, dtype=torch.float32)
    return (x * scale if scale != 1.0 else x).to(device, dtype)


def device_generator(run, salt):
    return torch.Generator(device=run.device).manual_seed(run.seed * 1_000_003 + salt)


def padded_lengths(B, S, seed):
    """Real tokens per sequence, in pairs S/2 + d, S/2 - d with d uniform in [0, S/4] (S/2 for an odd
    last one): random lengths, exactly half the keys real in all."""
    gen = torch.Generator().manual_seed(seed + S)
    d = torch.randint(0, S // 4 + 1, (B // 2,), generator=gen).tolist()
    lens = [n for x in d for n in (S // 2 + x, S // 2 - x)] + ([S // 2] if B % 2 else [])
    return [max(1, n) for n in lens]


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def shape_str(t):
    return "(" + ",".join(str(n) for n in t.shape) + ")"


def oom_guard(fn, leaves):
    """Run fn and its backward once (as the harness's first call does, before the timing): out of device
    memory -> ProviderOOM (a row with status "oom", the run goes on)."""
    try:
        out = fn()
        torch.autograd.grad([out], leaves, [torch.ones_like(out)])
        del out
    except torch.OutOfMemoryError as e:
        raise ProviderOOM(f"out of memory ({str(e).splitlines()[0][:200]})") from None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
