"""What fusedlm's benchmarks measure: each op's inputs, the work it counts, and its providers.

fusedlm/bench.py is the harness (timing, the two ceilings, rows, markdown, command line); this module
defines what it runs. Two kinds of op:

memory-bound (rms_norm, rms_norm_residual, layer_norm, swiglu, rope): ``OpSpec``. A few FLOPs per
    byte, so the work counted is the fewest bytes the op must move, reported as GB/s and as a fraction
    of the measured copy bandwidth. One case per op, at the sizes of ``Sizes``.
compute-bound (attention, attention_padded, lora_linear): ``ComputeOp``. Matmul work, counted in
    FLOPs, reported as TFLOP/s and as a fraction of the measured bf16 matmul rate. Several cases per op
    (attention: each sequence length, causal and not).

Both expand into ``Case`` objects: the inputs (made once, the same values for every provider), the
inputs that get gradients, the work per mode, and the providers, an ordered ``name -> builder`` map.
A builder takes that provider's own copy of the inputs and returns the callable to time, or a
``Bound`` when the provider differentiates other tensors than the case's (varlen attention on packed
tokens), compares other tensors (the real tokens of a padded batch) or needs its own output gradients.
A builder that cannot run here raises ``ProviderUnavailable`` (not installed, needs CUDA) or
``ProviderUnsupported`` (an SDPA backend with no kernel for the case): a row with the reason, and the
run goes on. The outputs of the first provider of ``Case.reference`` that runs are the yardstick of
every row's ``rel_err``; ``Case.baseline`` names the provider every row's ``vs_baseline`` divides by.
"""
import dataclasses
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import _backend

RMS_EPS = 1e-6
LN_EPS = 1e-5


class ProviderUnavailable(RuntimeError):
    """A peer that cannot run here (not installed, needs a CUDA device): a row's error, not a failure."""
    status = "unavailable"


class ProviderUnsupported(ProviderUnavailable):
    """A peer that runs here but has no kernel for this case (an SDPA backend refusing a mask)."""
    status = "unsupported"


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


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _shape(t):
    return "(" + ",".join(str(n) for n in t.shape) + ")"


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
    deberta_seqlens: tuple = (512, 2048, 8192)               # B = tokens // S (8192: B = 2)
    deberta_quick_seqlens: tuple = (512, 2048)               # with --quick
    deberta_ref_max_seqlen: int = 2048  # the float32 eager yardstick (S x S fp32 scores): up to this S


SMOKE_SIZES = Sizes(tokens=48, hidden=200, rope_batch=2, rope_heads=4, rope_kv_heads=2, rope_head_dim=32,
                    attn_heads=2, attn_head_dim=16, attn_seqlens=(16, 48), attn_quick_seqlens=(16, 48),
                    attn_padded_quick_seqlens=(48,),
                    attn_math_max_seqlen=48, lora_in=72, lora_out=80, lora_rank=4, lora_alpha=8,
                    deberta_heads=2, deberta_head_dim=16, deberta_buckets=8, deberta_max_rel=16,
                    deberta_seqlens=(16, 48), deberta_quick_seqlens=(16, 48), deberta_ref_max_seqlen=48)


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
    kind = "memory"

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

        builders = {"torch-eager": lambda t: (lambda: self.torch_fn(**t))}
        builders.update(fusedlm_providers(lambda backend, t: (lambda: self.fusedlm_call(backend, **t))))
        for name, fn in self.extra_torch.items():
            builders[name] = (lambda f: lambda t: (lambda: f(**t)))(fn)
        torch_fn = self.torch_fn
        builders["torch-compile"] = lambda t: (lambda c: lambda: c(**t))(run.compiled(torch_fn))
        if self.liger is not None:
            builders["liger"] = _liger_builder(self.liger)
        return [Case(op=self.name, kind="memory", label=self.name, make=make, describe=self.describe,
                     grad=self.grad, work=work, providers=builders, reference=("torch-eager",))]


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
MEMORY_PROVIDERS = ["torch-eager", "fusedlm-triton", "fusedlm-cuda", "torch-native", "torch-compile", "liger"]


def _liger_builder(build):
    def builder(t):
        try:
            import liger_kernel  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "not available", reason kept
            raise ProviderUnavailable(f"liger_kernel is not importable ({type(e).__name__}: {e})") from None
        return build(t)
    return builder


# --------------------------------------------------------------------------------------------------
# Compute-bound ops: attention and LoRA.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ComputeOp:
    name: str
    family: str                     # what --ops and the thin scripts select by: attention / lora
    fusedlm_attrs: tuple            # the public functions used; the op is skipped if one is missing
    make_cases: Callable            # run -> [Case]
    work_doc: dict                  # mode -> the FLOP formula, in words
    kind = "compute"

    def cases(self, run):
        return self.make_cases(run)


def _randn(gen, device, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def _device_generator(run, salt):
    return torch.Generator(device=run.device).manual_seed(run.seed * 1_000_003 + salt)


def _sdpa_builder(run, backend, causal, mask_key=None):
    """F.scaled_dot_product_attention restricted to one SDPA backend (torch.nn.attention.sdpa_kernel)."""
    def build(t):
        if run.device.type != "cuda" and backend != "MATH":
            raise ProviderUnavailable(f"SDPA's {backend} backend needs a CUDA device")
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError as e:
            raise ProviderUnavailable(f"torch.nn.attention.sdpa_kernel is missing ({e})") from None
        which = [getattr(SDPBackend, backend)]
        q, k, v, mask = t["q"], t["k"], t["v"], t[mask_key] if mask_key else None

        def fn():
            with sdpa_kernel(which):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        _probe_sdpa(fn, backend)
        return fn
    return build


def _probe_sdpa(fn, backend):
    """Run once; "No available kernel" (the backend refuses this case) -> ProviderUnsupported, with the
    reasons torch gives as warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except RuntimeError as e:
            if not any(m in str(e).lower() for m in ("no available kernel", "no viable backend")):
                raise
            why = "; ".join(dict.fromkeys(str(w.message).strip().replace("\n", " ") for w in caught))
            raise ProviderUnsupported(f"SDPA's {backend} backend has no kernel for this case"
                                      + (f": {why}" if why else "")) from None


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex_builder(run, causal, padded):
    """FlexAttention (torch.nn.attention.flex_attention) under torch.compile(dynamic=False): one static
    compile per shape. Causal and key padding as block masks made once, outside the timing."""
    def build(t):
        if run.device.type != "cuda":
            raise ProviderUnavailable("FlexAttention is benchmarked on a CUDA device only (its compiled "
                                      "Triton kernels)")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise ProviderUnavailable(f"torch.nn.attention.flex_attention is missing ({e})") from None
        _raise_recompile_limit()  # a static compile per (shape, mask): more than dynamo's default 8
        q, k, v = t["q"], t["k"], t["v"]
        B, _, S, _ = q.shape
        if padded:
            lens = t["lens"]

            def padding_mod(b, h, q_idx, kv_idx):
                return kv_idx < lens[b]
            block_mask = create_block_mask(padding_mod, B, None, S, S, device=q.device)
        elif causal:
            block_mask = create_block_mask(_causal_mod, None, None, S, S, device=q.device)
        else:
            block_mask = None
        flex = run.compiled(flex_attention, dynamic=False)
        return lambda: flex(q, k, v, block_mask=block_mask)
    return build


def _raise_recompile_limit(limit=64):
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


def _padded(build):
    """A dense provider on a padded batch (builder -> builder)."""
    return lambda t: _padded_bound(t, build(t))


def _padded_bound(t, fn):
    """Compare the real tokens only (rows of out, dq, dk, dv), and differentiate with the case's output
    gradient, zero at the padded queries (no loss reads them)."""
    kpm = t["kpm"]
    return Bound(fn, [t["q"], t["k"], t["v"]],
                 canon=lambda xs: [x.transpose(1, 2)[kpm] for x in xs],
                 cotangents=lambda outs: [torch.empty_like(outs[0]).copy_(t["dout"].transpose(1, 2))])


def _varlen_bind(backend, t):
    """fusedlm.varlen_attention on the real tokens, packed once outside the timing (fusedlm.unpad_input),
    as a model that stays unpadded from the embedding on would call it."""
    kpm = t["kpm"]
    packed = [fusedlm.unpad_input(t[n].detach().transpose(1, 2), kpm) for n in ("q", "k", "v")]
    q, k, v = (p[0].detach().requires_grad_() for p in packed)
    _, _, cu, max_len = packed[0]
    return Bound(lambda: fusedlm.varlen_attention(q, k, v, cu, cu, max_len, max_len, backend=backend),
                 [q, k, v], cotangents=lambda outs: [t["dout"][kpm]])


def padded_lengths(B, S, seed):
    """Real tokens per sequence, in pairs S/2 + d, S/2 - d with d uniform in [0, S/4] (S/2 for an odd
    last one): random lengths, exactly half the keys real in all."""
    gen = torch.Generator().manual_seed(seed + S)
    d = torch.randint(0, S // 4 + 1, (B // 2,), generator=gen).tolist()
    lens = [n for x in d for n in (S // 2 + x, S // 2 - x)] + ([S // 2] if B % 2 else [])
    return [max(1, n) for n in lens]


ATTN_FLOPS_DOC = {
    "fwd": "4 B H S^2 E (QK^T and PV, 2 S^2 E each per head), half of it causal",
    "bwd": "2.5 x fwd (QK^T recomputed, dV, dP, dQ, dK)",
    "fwd+bwd": "3.5 x fwd",
}
ATTN_PADDED_FLOPS_DOC = {
    "fwd": "4 H E sum_b len_b^2: real query x real key pairs only (padded queries earn no credit)",
    "bwd": "2.5 x fwd",
    "fwd+bwd": "3.5 x fwd",
}
_BWD_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_cases(run, padded=False):
    """bf16 (B, H, S, E) attention at B * S = tokens, for each S in run.seqlens: causal and not (dense),
    or non-causal with half the keys real per sequence (padded, S in run.padded_seqlens)."""
    sz = run.sizes
    H, E = sz.attn_heads, sz.attn_head_dim
    cases = []
    for S in (run.padded_seqlens if padded else run.seqlens):
        B = max(1, sz.tokens // S)
        lens = padded_lengths(B, S, run.seed) if padded else None
        for causal in ((False,) if padded else (False, True)):
            pairs = sum(n * n for n in lens) if padded else B * S * S * (0.5 if causal else 1.0)
            fwd_flops = 4 * H * E * pairs
            doc = ATTN_PADDED_FLOPS_DOC if padded else ATTN_FLOPS_DOC
            label = f"S={S} B={B}" + (" causal" if causal else "") + (f" real={sum(lens)}/{B * S}" if padded else "")
            params = {"batch": B, "heads": H, "seqlen": S, "head_dim": E, "causal": causal}
            if padded:
                params["real_tokens"] = sum(lens)
            cases.append(Case(
                op="attention_padded" if padded else "attention", kind="compute", label=label,
                make=_attention_make(run, B, S, H, E, lens),
                describe=lambda t, c=causal: (f"q,k,v{_shape(t['q'])} (B,H,S,E) in (B,S,H,E) storage"
                                              + (", causal" if c else "")
                                              + (", key_padding_mask (B,S), right padding" if "kpm" in t else "")),
                grad=("q", "k", "v"),
                work=lambda t, mode, provider, f=fwd_flops, d=doc: (int(f * _BWD_FACTOR[mode]), d[mode]),
                providers=_attention_providers(run, S, causal, padded),
                reference=("sdpa-efficient", "sdpa-cudnn", "sdpa-math") if padded else
                          ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"),
                params=params))
    return cases


def _attention_make(run, B, S, H, E, lens):
    def make():
        gen = _device_generator(run, S)

        def heads():  # the layout a Hugging Face attention layer produces: (B, S, H, E) viewed (B, H, S, E)
            return _randn(gen, run.device, run.dtype, B, S, H, E).transpose(1, 2)
        t = {"q": heads(), "k": heads(), "v": heads()}
        if lens is not None:
            t["lens"] = torch.tensor(lens, device=run.device, dtype=torch.int32)
            t["kpm"] = torch.arange(S, device=run.device)[None, :] < t["lens"][:, None]   # (B, S), True = real
            t["attn_mask"] = t["kpm"][:, None, None, :]                                    # SDPA's (B, 1, 1, S)
            t["dout"] = _randn(gen, run.device, run.dtype, B, S, H, E) * t["kpm"][:, :, None, None]
        return t
    return make


def _attention_providers(run, S, causal, padded):
    """Run order: the yardstick candidates first (rel_err is measured against the first that runs)."""
    small = S <= run.sizes.attn_math_max_seqlen
    if not padded:
        def bind(backend, t):
            q, k, v = t["q"], t["k"], t["v"]
            return lambda: fusedlm.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
        p = {"sdpa-flash": _sdpa_builder(run, "FLASH_ATTENTION", causal)}
        if small:
            p["sdpa-math"] = _sdpa_builder(run, "MATH", causal)
        p.update(fusedlm_providers(bind))
        p["sdpa-cudnn"] = _sdpa_builder(run, "CUDNN_ATTENTION", causal)
        p["sdpa-efficient"] = _sdpa_builder(run, "EFFICIENT_ATTENTION", causal)
        p["flex"] = _flex_builder(run, causal, padded=False)
        return p

    def bind(backend, t):
        q, k, v, kpm = t["q"], t["k"], t["v"], t["kpm"]
        return _padded_bound(t, lambda: fusedlm.scaled_dot_product_attention(
            q, k, v, key_padding_mask=kpm, backend=backend))
    p = {"sdpa-efficient": _padded(_sdpa_builder(run, "EFFICIENT_ATTENTION", False, "attn_mask"))}
    if small:
        p["sdpa-math"] = _padded(_sdpa_builder(run, "MATH", False, "attn_mask"))
    p.update(fusedlm_providers(bind))
    p.update(fusedlm_providers(_varlen_bind, suffix="-varlen"))
    p["sdpa-cudnn"] = _padded(_sdpa_builder(run, "CUDNN_ATTENTION", False, "attn_mask"))
    p["sdpa-flash"] = _padded(_sdpa_builder(run, "FLASH_ATTENTION", False, "attn_mask"))
    p["flex"] = _padded(_flex_builder(run, False, padded=True))
    return p


def lora_torch(x, weight, lora_a, lora_b, scaling):
    """PEFT's lora.Linear forward without dropout: base(x) + lora_B(lora_A(x)) * scaling."""
    return F.linear(x, weight) + F.linear(F.linear(x, lora_a), lora_b) * scaling


def _peft_builder(run, scaling):
    """PEFT's own lora.Linear (get_peft_model on a one-Linear module), using our tensors as its weights."""
    def build(t):
        try:
            import torch.nn as nn
            from peft import LoraConfig, get_peft_model
        except Exception as e:  # noqa: BLE001
            raise ProviderUnavailable(f"peft is not importable ({type(e).__name__}: {e})") from None
        r, n_out, n_in = t["lora_a"].shape[0], t["weight"].shape[0], t["weight"].shape[1]

        class OneLinear(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(n_in, n_out, bias=False, device=t["x"].device, dtype=t["x"].dtype)

            def forward(self, x):
                return self.proj(x)

        model = get_peft_model(OneLinear(), LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=0.0,
                                                       target_modules=["proj"]))
        layer = model.base_model.model.proj
        if abs(layer.scaling["default"] - scaling) > 1e-6:
            raise RuntimeError(f"PEFT's scaling is {layer.scaling['default']}, expected {scaling}")
        _bind(layer.base_layer, weight=t["weight"])
        _bind(layer.lora_A["default"], weight=t["lora_a"])
        _bind(layer.lora_B["default"], weight=t["lora_b"])
        x = t["x"]
        return lambda: layer(x)
    return build


LORA_FLOPS_DOC = {
    "fwd": "2MNK + 2Mr(K + N)  (x W^T, then (x A^T) B^T)",
    "bwd": "2MNK + 4Mr(K + N)  (dx = dy W + (dy B) A; dA, dB; W frozen: no dW)",
    "fwd+bwd": "4MNK + 6Mr(K + N)",
}
LORA_BASE_FLOPS_DOC = {"fwd": "2MNK", "bwd": "2MNK (dx only)", "fwd+bwd": "4MNK"}
LORA_TARGET = 1.15  # fusedlm's goal: fwd+bwd within 1.15x of the frozen base linear's time


def lora_cases(run):
    """bf16 lora.Linear, M = tokens, K -> N, rank r, frozen base weight, no bias, no dropout; gradients
    for x, lora_a, lora_b. The plain base linear (dx only) is the baseline."""
    sz = run.sizes
    M, K, N, r = sz.tokens, sz.lora_in, sz.lora_out, sz.lora_rank
    scaling = sz.lora_alpha / r

    def make():
        gen = _device_generator(run, 7)
        return {"x": _randn(gen, run.device, run.dtype, M, K),
                "weight": _randn(gen, run.device, run.dtype, N, K, scale=K ** -0.5),
                "lora_a": _randn(gen, run.device, run.dtype, r, K, scale=K ** -0.5),
                "lora_b": _randn(gen, run.device, run.dtype, N, r, scale=r ** -0.5)}

    flops = {"fwd": 2 * M * N * K + 2 * M * r * (K + N), "bwd": 2 * M * N * K + 4 * M * r * (K + N),
             "fwd+bwd": 4 * M * N * K + 6 * M * r * (K + N)}
    base_flops = {"fwd": 2 * M * N * K, "bwd": 2 * M * N * K, "fwd+bwd": 4 * M * N * K}

    def work(t, mode, provider):
        if provider == "base-linear":
            return base_flops[mode], LORA_BASE_FLOPS_DOC[mode]
        return flops[mode], LORA_FLOPS_DOC[mode]

    def bind(backend, t):
        x, w, a, b = t["x"], t["weight"], t["lora_a"], t["lora_b"]
        return lambda: fusedlm.lora_linear(x, w, None, a, b, scaling, backend=backend)

    providers = {
        # The reference line: the frozen base projection alone, fwd + dx.
        "base-linear": lambda t: Bound(lambda: F.linear(t["x"], t["weight"]), [t["x"]], compare=False),
        "peft": _peft_builder(run, scaling),
        **fusedlm_providers(bind),
        "torch-compile": lambda t: (lambda c: lambda: c(t["x"], t["weight"], t["lora_a"], t["lora_b"], scaling))(
            run.compiled(lora_torch)),
    }
    return [Case(op="lora_linear", kind="compute", label=f"{M}x{K}->{N} r={r}", make=make,
                 describe=lambda t: (f"x{_shape(t['x'])} W{_shape(t['weight'])} frozen, A{_shape(t['lora_a'])} "
                                     f"B{_shape(t['lora_b'])}, scaling {scaling:g}, no bias, no dropout"),
                 grad=("x", "lora_a", "lora_b"), work=work, providers=providers,
                 reference=("peft", "torch-compile"), baseline="base-linear",
                 params={"tokens": M, "in_features": K, "out_features": N, "rank": r, "scaling": scaling,
                         "target_vs_baseline": LORA_TARGET})]


# --------------------------------------------------------------------------------------------------
# DeBERTa disentangled attention: fusedlm against transformers' DisentangledSelfAttention and FlashDeBERTa.
# Every provider is the whole self-attention module: q/k/v projections of the hidden states, the
# (shared) key/query projections of rel_embeddings into pos_key/pos_query, the attention; the output
# projection (DebertaV2SelfOutput) is not included. Same weights (frozen), gradients for hidden states
# and rel_embeddings.
# --------------------------------------------------------------------------------------------------

class ProviderOOM(ProviderUnavailable):
    """A peer that runs out of device memory on this case: a row with status "oom", not a crash."""
    status = "oom"


DEBERTA_SCOPE = ("attention module: q/k/v projections + pos projections of rel_embeddings (share_att_key) + "
                 "disentangled attention; output projection excluded; weights frozen")
DEBERTA_FLOPS_DOC = {
    "fwd": "core + proj: core = B H (4 S^2 D + 8 S span D) (QK^T, PV, Q pos_key^T, K pos_query^T); "
           "proj = 6 B S C^2 + 8 span C^2 (q, k, v of hidden; k, q of rel_embeddings), C = H D",
    "bwd": "2.5 core + proj (frozen weights: d hidden, d rel_embeddings only)",
    "fwd+bwd": "3.5 core + 2 proj",
}
DEBERTA_TIME_TARGET = 0.25     # fwd+bwd time <= 1/4 of hf-eager's at S = 2048 (>= 4x faster)
DEBERTA_MEM_TARGET = 0.25      # attention peak memory <= 1/4 of hf-eager's at S = 2048
DEBERTA_FLASH_TARGET = 1 / 1.5  # fwd+bwd >= 1.5x FlashDeBERTa at S = 2048
DEBERTA_TARGET_S = 2048


def _deberta_config(sz):
    from transformers import DebertaV2Config

    return DebertaV2Config(
        hidden_size=sz.deberta_heads * sz.deberta_head_dim, num_attention_heads=sz.deberta_heads,
        intermediate_size=4 * sz.deberta_heads * sz.deberta_head_dim, relative_attention=True,
        pos_att_type=["c2p", "p2c"], position_buckets=sz.deberta_buckets,
        max_relative_positions=sz.deberta_max_rel, share_att_key=True, norm_rel_ebd="layer_norm",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _oom_guard(fn, leaves):
    """Run fn and its backward once (as the harness's first call does): out of memory -> ProviderOOM."""
    try:
        out = fn()
        torch.autograd.grad([out], leaves, [torch.ones_like(out)])
        del out
    except torch.OutOfMemoryError as e:
        raise ProviderOOM(f"out of memory ({str(e).splitlines()[0][:200]})") from None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _hf_module(cls, t, sz, dtype):
    """transformers' (or FlashDeBERTa's) self-attention module, eval mode, using the case's weights."""
    mod = cls(_deberta_config(sz)).eval().to(device=t["hidden"].device, dtype=dtype)
    for name in ("query", "key", "value"):
        lin = getattr(mod, f"{name}_proj")
        _bind(lin, weight=t[f"w{name[0]}"].to(dtype), bias=t[f"b{name[0]}"].to(dtype))
    return mod


def _hf_builder(sz, float32=False, flash=False):
    def build(t):
        if flash:
            if t["hidden"].device.type != "cuda":
                raise ProviderUnavailable("FlashDeBERTa's Triton kernels are benchmarked on a CUDA device only")
            try:
                from flashdeberta.model import FlashDisentangledSelfAttention as cls
            except Exception as e:  # noqa: BLE001
                raise ProviderUnavailable(f"flashdeberta is not installed or not importable "
                                          f"({type(e).__name__}: {e}); pip install flashdeberta") from None
        else:
            try:
                from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention as cls
            except Exception as e:  # noqa: BLE001
                raise ProviderUnavailable(f"transformers' deberta_v2 is not importable "
                                          f"({type(e).__name__}: {e})") from None
        h, rel = t["hidden"], t["rel"]
        B, S, _ = h.shape
        if float32 and S > sz.deberta_ref_max_seqlen:
            raise ProviderUnsupported(f"the float32 yardstick runs up to S = {sz.deberta_ref_max_seqlen} only")
        dtype = torch.float32 if float32 else h.dtype
        mod = _hf_module(cls, t, sz, dtype)
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=h.device)   # no padding

        def fn():
            hh, rr = (h.float(), rel.float()) if float32 else (h, rel)
            return mod(hh, mask, output_attentions=False, rel_embeddings=rr)[0]
        _oom_guard(fn, [h, rel])
        return Bound(fn, [h, rel])
    return build


def _deberta_fusedlm_bind(sz):
    def bind(backend, t):
        h, rel = t["hidden"], t["rel"]
        B, S, C = h.shape
        H, D = sz.deberta_heads, sz.deberta_head_dim

        def heads(w, b):  # (B, S, C) -> (B, H, S, D), a view of (B, S, H, D) storage
            return F.linear(h, w, b).view(B, S, H, D).transpose(1, 2)

        def pos(w, b):    # (2 span, C) -> (H, 2 span, D)
            return F.linear(rel, w, b).view(-1, H, D).transpose(0, 1).contiguous()

        def fn():
            out = fusedlm.deberta_attention(
                heads(t["wq"], t["bq"]), heads(t["wk"], t["bk"]), heads(t["wv"], t["bv"]),
                pos_key=pos(t["wk"], t["bk"]), pos_query=pos(t["wq"], t["bq"]),
                position_buckets=sz.deberta_buckets, max_relative_positions=sz.deberta_max_rel, backend=backend)
            return out.transpose(1, 2).reshape(B, S, C)
        return Bound(fn, [h, rel])
    return bind


def deberta_cases(run):
    """bf16 DeBERTa-v2/v3 self-attention (deberta-v3-base: H = 12, D = 64, 256 buckets, max relative
    positions 512, c2p + p2c, share_att_key) at B * S = tokens for each S; no padding."""
    sz = run.sizes
    H, D, span = sz.deberta_heads, sz.deberta_head_dim, sz.deberta_buckets
    C = H * D
    default_attn = sz.attn_quick_seqlens if run.quick else sz.attn_seqlens
    seqlens = (sz.deberta_quick_seqlens if run.quick else sz.deberta_seqlens) \
        if tuple(run.seqlens) == tuple(default_attn) else run.seqlens   # --seqlens given: those
    cases = []
    for S in seqlens:
        B = max(1, sz.tokens // S)
        core = B * H * (4 * S * S * D + 8 * S * span * D)
        proj = 6 * B * S * C * C + 8 * span * C * C
        flops = {"fwd": core + proj, "bwd": int(2.5 * core) + proj, "fwd+bwd": int(3.5 * core) + 2 * proj}

        def make(B=B, S=S):
            gen = _device_generator(run, 11 + S)
            t = {"hidden": _randn(gen, run.device, run.dtype, B, S, C),
                 "rel": _randn(gen, run.device, run.dtype, 2 * span, C)}
            for n in "qkv":
                t[f"w{n}"] = _randn(gen, run.device, run.dtype, C, C, scale=C ** -0.5)
                t[f"b{n}"] = _randn(gen, run.device, run.dtype, C, scale=0.02)
            return t

        providers = {"hf-eager-fp32": _hf_builder(sz, float32=True), "hf-eager": _hf_builder(sz)}
        providers.update(fusedlm_providers(_deberta_fusedlm_bind(sz)))
        providers["flashdeberta"] = _hf_builder(sz, flash=True)
        params = {"batch": B, "heads": H, "seqlen": S, "head_dim": D, "position_buckets": span,
                  "max_relative_positions": sz.deberta_max_rel, "scope": DEBERTA_SCOPE}
        if S == DEBERTA_TARGET_S:
            params["target_vs_baseline"] = DEBERTA_TIME_TARGET
        cases.append(Case(
            op="deberta_attention", kind="compute", label=f"S={S} B={B}", make=make,
            describe=lambda t: (f"hidden{_shape(t['hidden'])} rel_embeddings{_shape(t['rel'])}, "
                                f"pos_key/pos_query ({H},{2 * span},{D}), no padding; " + DEBERTA_SCOPE),
            grad=("hidden", "rel"),
            work=lambda t, mode, provider, f=flops: (f[mode], DEBERTA_FLOPS_DOC[mode]),
            providers=providers, reference=("hf-eager-fp32", "hf-eager"), baseline="hf-eager",
            params=params))
    return cases


def deberta_report(rows):
    """Markdown: per (case, mode), each provider's time and peak memory over hf-eager's, and the issue's
    targets at S = 2048 (fwd+bwd >= 4x hf-eager and >= 1.5x FlashDeBERTa, peak memory <= 1/4 of
    hf-eager's) and S = 8192 running. '' when there are no deberta rows."""
    rs = [r for r in rows if r["op"] == "deberta_attention"]
    if not rs:
        return ""

    def status(r):
        if r is None:
            return "—"
        if r["median_ms"] is not None:
            return "ok"
        err = (r["error"] or "").lower()
        return "OOM" if r["status"] == "oom" or "out of memory" in err else r["status"]

    cell = {(r["case"], r["mode"], r["provider"]): r for r in rs}
    providers = [p for p in dict.fromkeys(r["provider"] for r in rs) if p not in ("hf-eager", "hf-eager-fp32")]
    lines = ["**deberta_attention vs hf-eager** (" + DEBERTA_SCOPE + "): speedup = hf-eager ms / ms; "
             "mem = peak MiB (x of hf-eager's)", "",
             "| case | mode | hf-eager ms | hf-eager peak MiB | " + " | ".join(
                 f"{p} speedup | {p} mem" for p in providers) + " |",
             "|" + "---|" * (4 + 2 * len(providers))]
    verdicts = []
    for case, mode in dict.fromkeys((r["case"], r["mode"]) for r in rs):
        hf = cell.get((case, mode, "hf-eager"))
        hf_ok = hf is not None and hf["median_ms"] is not None
        cells = [case, mode, f"{hf['median_ms']:.3f}" if hf_ok else status(hf),
                 _mib(hf["peak_mem_bytes"]) if hf_ok else status(hf)]
        for p in providers:
            r = cell.get((case, mode, p))
            if r is None or r["median_ms"] is None:
                cells += [status(r), "—"]
                continue
            cells.append(f"{hf['median_ms'] / r['median_ms']:.2f}x" if hf_ok else f"{r['median_ms']:.3f} ms")
            mem = _mib(r["peak_mem_bytes"])
            if hf_ok and r["peak_mem_bytes"] and hf["peak_mem_bytes"]:
                mem += f" ({r['peak_mem_bytes'] / hf['peak_mem_bytes']:.2f}x)"
            cells.append(mem)
        lines.append("| " + " | ".join(cells) + " |")
        ours = cell.get((case, mode, "fusedlm-triton"))
        if mode != "fwd+bwd" or ours is None:
            continue
        S = ours["params"]["seqlen"]
        if S == DEBERTA_TARGET_S and ours["median_ms"] and hf_ok:
            speed = hf["median_ms"] / ours["median_ms"]
            verdicts.append(f"S={S} fwd+bwd: fusedlm-triton {speed:.2f}x hf-eager (target >= "
                            f"{1 / DEBERTA_TIME_TARGET:.0f}x: {'met' if speed >= 1 / DEBERTA_TIME_TARGET else 'NOT met'})")
            if ours["peak_mem_bytes"] and hf["peak_mem_bytes"]:
                m = ours["peak_mem_bytes"] / hf["peak_mem_bytes"]
                verdicts.append(f"S={S} fwd+bwd: fusedlm-triton peak memory {m:.3f}x hf-eager's (target <= "
                                f"{DEBERTA_MEM_TARGET}: {'met' if m <= DEBERTA_MEM_TARGET else 'NOT met'})")
            fd = cell.get((case, mode, "flashdeberta"))
            if fd is not None and fd["median_ms"]:
                x = fd["median_ms"] / ours["median_ms"]
                verdicts.append(f"S={S} fwd+bwd: fusedlm-triton {x:.2f}x FlashDeBERTa (target >= 1.5x: "
                                f"{'met' if x >= 1 / DEBERTA_FLASH_TARGET else 'NOT met'})")
            else:
                verdicts.append(f"S={S}: FlashDeBERTa not measured ({status(fd)}"
                                + (f": {fd['error']}" if fd is not None and fd["error"] else "") + ")")
        if S == 8192:
            verdicts.append(f"S=8192 fwd+bwd: fusedlm-triton {status(ours)}, hf-eager {status(hf)}")
    return "\n".join(lines + ([""] + verdicts if verdicts else []))


def _mib(n):
    return "—" if n is None else f"{n / 2**20:.0f}"


COMPUTE_OPS = [
    ComputeOp("attention", "attention", ("scaled_dot_product_attention",),
              lambda run: attention_cases(run, padded=False), ATTN_FLOPS_DOC),
    ComputeOp("attention_padded", "attention", ("scaled_dot_product_attention", "varlen_attention", "unpad_input"),
              lambda run: attention_cases(run, padded=True), ATTN_PADDED_FLOPS_DOC),
    ComputeOp("lora_linear", "lora", ("lora_linear",), lora_cases, LORA_FLOPS_DOC),
    ComputeOp("deberta_attention", "deberta", ("deberta_attention",), deberta_cases, DEBERTA_FLOPS_DOC),
]

ALL_OPS = [*OPS, *COMPUTE_OPS]
OP_BY_NAME = {op.name: op for op in ALL_OPS}
# Families, plus "memory" and "compute" for every op of a kind.
FAMILIES = sorted({op.family for op in ALL_OPS} | {"memory", "compute"})


def select_ops(spec):
    """'all', or a comma list of op names, families, "memory", "compute" -> ops in ALL_OPS order."""
    if spec in (None, "", "all"):
        return list(ALL_OPS)
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    unknown = wanted - set(OP_BY_NAME) - set(FAMILIES)
    if unknown:
        raise ValueError(f"--ops: unknown {sorted(unknown)}; expected op names {list(OP_BY_NAME)} "
                         f"or families {FAMILIES}")
    return [op for op in ALL_OPS if op.name in wanted or op.family in wanted or op.kind in wanted]
