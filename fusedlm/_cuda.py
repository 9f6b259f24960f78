"""The "cuda" backend: fusedlm's C++ kernels (csrc/) as torch ops, with their fake kernels and autograd.

The ops ``fusedlm_C::{norm_fwd, norm_bwd, swiglu_fwd, swiglu_bwd, rope}`` are defined by the binding
layer (csrc/bindings.cpp) with ``TORCH_LIBRARY``, beside the test-only ``fusedlm_C::tc_selftest`` (the
tensor-core primitives of csrc/simt.h on fixed tiles; tests/test_cuda_tensor_cores.py; no fake, no autograd).
Two builds provide them:

* ``fusedlm._C``, built by setup.py where a CUDA toolkit and a CUDA torch exist: the kernels for CUDA
  tensors, and the CPU harness for CPU tensors;
* the CPU harness alone, compiled on first use with ``torch.utils.cpp_extension.load`` when the
  environment sets ``FUSEDLM_CUDA_CPU=1`` (cached under ``~/.cache/fusedlm/cpu_harness/<source hash>``,
  or ``$FUSEDLM_CACHE_DIR``). The harness runs the kernels' own source on the host, thread by thread
  (csrc/simt.h), so the tests check the CUDA code on a machine without a GPU.

The backend serves CUDA tensors where ``fusedlm._C`` is built and a device exists, and CPU tensors only
when ``FUSEDLM_CUDA_CPU=1`` (a test and verification mode: slow). Which public ops it serves is
``OPS``; "auto" picks it only for the ops listed in fusedlm/cuda_verified.json (written by the GPU run).
"""
import functools
import hashlib
import os
import pathlib
import sys

import torch

OPS = ("rms_norm", "layer_norm", "swiglu", "apply_rotary_pos_emb", "scaled_dot_product_attention",
       "varlen_attention", "lora_linear", "deberta_attention", "deberta_varlen_attention")


def _find_csrc():
    """The CUDA C++ sources: fusedlm/csrc in an installed package (wheel, ``pip install .``), the
    checkout's csrc/ in an editable install or a source tree."""
    here = pathlib.Path(__file__).resolve().parent
    for path in (here / "csrc", here.parent / "csrc"):
        if (path / "cpu_harness.cpp").exists():
            return path
    return here / "csrc"


CSRC = _find_csrc()
_loaded = {}  # "why": None once the ops are registered, else the reason they are not


def harness_enabled():
    """True when FUSEDLM_CUDA_CPU=1: the cuda backend also serves CPU tensors, through the harness."""
    return os.environ.get("FUSEDLM_CUDA_CPU", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def has_cuda_build():
    try:
        import fusedlm._C  # noqa: F401  (registers the ops, CUDA and CPU)
    except ImportError:
        return False
    return True


def harness_sources():
    """The binding layer and the harness's translation units (cpu_harness*.cpp: the .cu files as C++)."""
    return [CSRC / "bindings.cpp"] + sorted(CSRC.glob("cpu_harness*.cpp"))


def harness_build_dir():
    """Where the harness is built: keyed by the hash of every file in csrc/ and the torch version."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(CSRC.glob("*")):
        if path.suffix in (".cu", ".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    root = os.environ.get("FUSEDLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusedlm")
    return os.path.join(root, "cpu_harness", digest.hexdigest()[:16])


def build_harness(verbose=False):
    """Compile (or reuse) the CPU harness and load it; registers the fusedlm_C ops for CPU tensors."""
    from torch.utils import cpp_extension

    build_dir = harness_build_dir()
    os.makedirs(build_dir, exist_ok=True)
    if not os.path.exists(os.path.join(build_dir, "fusedlm_cpu_harness.so")):
        print(f"fusedlm: compiling the CUDA kernels' CPU harness into {build_dir} (once; about a minute)",
              file=sys.stderr, flush=True)
    cpp_extension.load(
        name="fusedlm_cpu_harness", sources=[str(s) for s in harness_sources()], build_directory=build_dir,
        extra_cflags=["-O2"], extra_include_paths=[str(CSRC)], is_python_module=False,
        verbose=verbose)


def why_unavailable():
    """None when the fusedlm_C ops are registered here (loading or building them), else why not."""
    if _loaded.get("why", "") is None:
        return None
    why = None
    if has_cuda_build():
        pass
    elif harness_enabled():
        if not (CSRC / "cpu_harness.cpp").exists():
            why = (f"FUSEDLM_CUDA_CPU=1 but the kernel sources are not at {CSRC} (this install of fusedlm "
                       f"lacks its csrc/ data files: reinstall it)")
        else:
            try:
                build_harness()
            except Exception as e:  # noqa: BLE001 - a failed build is a reason, shown by `fusedlm info`
                why = f"FUSEDLM_CUDA_CPU=1 but the CPU harness failed to build: {type(e).__name__}: {e}"
    else:
        why = ("the CUDA extension fusedlm._C is not built (set FUSEDLM_CUDA_CPU=1 to run its kernels on CPU "
               "through the SIMT harness)")
    if why is None:
        _register_python_parts()
    _loaded["why"] = why
    return why


def why_not_device(device):
    """Why the loaded ops cannot take tensors on ``device`` here, or None."""
    if device.type == "cpu":
        return None if harness_enabled() else "CPU tensors run the cuda kernels only with FUSEDLM_CUDA_CPU=1"
    if device.type == "cuda":
        if not has_cuda_build():
            return "only the CPU harness is built (fusedlm._C needs the CUDA build)"
        return None if torch.cuda.is_available() else "no CUDA device"
    return f"the tensors are on {device}"


# ---------------------------------------------------------------------------------------------------
# Fake kernels (shapes for torch.compile / meta tensors) and autograd, registered once the ops exist.

def _register_python_parts():
    if _loaded.get("registered"):
        return
    lib = "fusedlm_C::"

    @torch.library.register_fake(lib + "norm_fwd")
    def _(x, residual, weight, bias, eps, offset, is_rms):
        rows = x.numel() // x.shape[-1]
        s = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
        return (x.new_empty(x.shape), s, x.new_empty(0 if is_rms else rows, dtype=torch.float32),
                x.new_empty(rows, dtype=torch.float32))

    @torch.library.register_fake(lib + "norm_bwd")
    def _(dy, s, weight, dsum, mean, rstd, offset, is_rms, need_dw, need_db):
        n = s.shape[-1]
        return (s.new_empty(s.shape), s.new_empty(n if need_dw else 0, dtype=torch.float32),
                s.new_empty(n if need_db else 0, dtype=torch.float32))

    @torch.library.register_fake(lib + "swiglu_fwd")
    def _(gate, up):
        return gate.new_empty(gate.shape)

    @torch.library.register_fake(lib + "swiglu_bwd")
    def _(dy, gate, up):
        return gate.new_empty(gate.shape), gate.new_empty(gate.shape)

    @torch.library.register_fake(lib + "rope")
    def _(q, k, cos, sin, interleaved, transposed, backward):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    @torch.library.register_fake(lib + "attention_fwd")
    def _(q, k, v, key_padding_mask, cu_q, cu_k, max_q, max_k, scale, causal, bottom_right, dropout_p, seed,
          window_left, window_right):
        ev = v.shape[-1]
        if cu_q is not None:  # packed (total, H, E)
            return q.new_empty((q.shape[0], q.shape[1], ev)), q.new_empty(q.shape[:2], dtype=torch.float32)
        B, H, L, _ = q.shape
        out = (q.new_empty((B, L, H, ev)).transpose(1, 2) if q.stride(1) < q.stride(2)  # as the binding
               else q.new_empty((B, H, L, ev)))
        return out, q.new_empty((B, H, L), dtype=torch.float32)

    @torch.library.register_fake(lib + "attention_bwd")
    def _(dout, dlse, q, k, v, out, lse, *args):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake(lib + "deberta_fwd")
    def _(q, k, v, pos_key, pos_query, kpm, cu, rel_idx, max_seqlen, scale, dropout_p, seed):
        stats = q.shape[:2] if cu is not None else q.shape[:3]
        return q.new_empty(q.shape), q.new_empty(stats, dtype=torch.float32)

    @torch.library.register_fake(lib + "deberta_bwd")
    def _(dout, dlse, q, k, v, pos_key, pos_query, out, lse, kpm, cu, rel_idx, max_seqlen, scale, dropout_p, seed,
          d_first, d_last, band_lo, band_n, grad_pk, grad_pq):
        heads, dim = q.shape[1], q.shape[-1]
        pos = pos_key if pos_key is not None else pos_query
        rows = pos.shape[1] if pos is not None else 0
        batch = cu.shape[0] - 1 if cu is not None else q.shape[0]
        f32 = dict(dtype=torch.float32)
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
                q.new_empty((2, batch * heads, (max_seqlen + 63) // 64, 2, dim), **f32),
                q.new_empty((heads if grad_pk else 0, rows, dim), **f32),
                q.new_empty((heads if grad_pq else 0, rows, dim), **f32))

    @torch.library.register_fake(lib + "lora_gemm")
    def _(x, w, p, q, bias, keep, scaling, transposed):
        return x.new_empty((x.shape[0], w.shape[1] if transposed else w.shape[0]))

    torch.library.register_autograd(lib + "attention_fwd", _attention_backward, setup_context=_attention_setup)
    torch.library.register_autograd(lib + "norm_fwd", _norm_backward, setup_context=_norm_setup)
    torch.library.register_autograd(lib + "swiglu_fwd", _swiglu_backward, setup_context=_swiglu_setup)
    from ._autograd import rope_autograd

    rope_backward, rope_setup = rope_autograd(torch.ops.fusedlm_C.rope)
    torch.library.register_autograd(lib + "rope", rope_backward, setup_context=rope_setup)
    _loaded["registered"] = True


def _norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, offset, is_rms = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.offset, ctx.is_rms, ctx.has_residual = offset, is_rms, residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.set_materialize_grads(False)


def _norm_backward(ctx, dy, dsum, _dmean, _drstd):
    """ds (the gradient of x and of residual), dweight, dbias; see csrc/norm.cu for the math."""
    s, weight, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[2]
    need_db = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
    if dy is None:  # only the returned sum is used downstream
        ds, dw, db = dsum, None, None
    else:
        dsum = dsum if ctx.has_residual else None
        ds, dw, db = torch.ops.fusedlm_C.norm_bwd(dy, s, weight, dsum, mean, rstd, ctx.offset, ctx.is_rms,
                                                  need_dw, need_db)
        dw = dw.to(weight.dtype) if need_dw else None
        db = db.to(ctx.bias_dtype) if need_db else None
    return ds, ds if ctx.has_residual else None, dw, db, None, None, None


def _attention_setup(ctx, inputs, output):
    q, k, v, kpm, cu_q, cu_k, max_q, max_k, scale, causal, bottom_right, dropout_p, seed, wl, wr = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, scale, causal, bottom_right, dropout_p, seed, wl, wr)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, dout, dlse):
    """dq, dk, dv (csrc/attention.cu: a dK/dV pass per key block, a dQ pass per query block; the lse's
    gradient folds into delta). Not differentiable again (as the triton backend)."""
    q, k, v, out, lse, kpm, cu_q, cu_k, seed = ctx.saved_tensors
    if dout is None and dlse is None:
        return (None,) * 15
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    max_q, max_k, scale, causal, bottom_right, dropout_p, _, wl, wr = ctx.args
    dq, dk, dv = torch.ops.fusedlm_C.attention_bwd(dout, dlse, q, k, v, out, lse, kpm, cu_q, cu_k, max_q, max_k,
                                                   scale, causal, bottom_right, dropout_p, seed, wl, wr)
    return (dq, dk, dv) + (None,) * 12


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return torch.ops.fusedlm_C.swiglu_bwd(dy, gate, up)


# ---------------------------------------------------------------------------------------------------
# What the public ops call once the "cuda" backend is selected (validation has happened already).

def norm(x, weight, bias, residual, eps, offset, is_rms):
    y, s, _, _ = torch.ops.fusedlm_C.norm_fwd(x, residual, weight, bias, eps, offset, is_rms)
    return y if residual is None else (y, s)


def swiglu(gate, up):
    return torch.ops.fusedlm_C.swiglu_fwd(gate, up)


def rope(q, k, cos, sin, interleaved, transposed):
    return torch.ops.fusedlm_C.rope(q, k, cos, sin, interleaved, transposed, False)


def register_op(name, fn):
    """``fn`` as the op fusedlm::<name>_cuda, its fake kernel ``fn`` itself (it calls fusedlm_C ops, which have
    theirs): the Python layer the cuda backend shares with the triton one (ops/lora.py, ops/deberta.py)."""
    op = torch.library.custom_op(f"fusedlm::{name}_cuda", fn, mutates_args=())
    op.register_fake(fn)
    return op


def _pad8(t, *dims):
    """t with zeros appended along ``dims`` up to multiples of 8 (the tensor-core kernels read 16-byte chunks
    of 16-bit elements); t itself when they already are."""
    widths = [0] * (2 * t.dim())
    for d in dims:
        widths[2 * (t.dim() - 1 - d % t.dim()) + 1] = -t.shape[d] % 8
    return torch.nn.functional.pad(t, widths) if any(widths) else t


def lora_fwd(x, weight, bias, xa, lora_b, scaling):
    """y = x W^T + scaling * xa B^T + bias (csrc/lora.cu): x (M, K), weight (N, K), xa (M, r), lora_b (N, r).
    K and N that are not multiples of 8 are padded with zeros (which add nothing) and y sliced back."""
    n = weight.shape[0]
    y = torch.ops.fusedlm_C.lora_gemm(_pad8(x, 1), _pad8(weight, 0, 1), xa, _pad8(lora_b, 0),
                                      None if bias is None else _pad8(bias, 0), None, scaling, False)
    return y if y.shape[1] == n else y[:, :n]


def lora_dx(dy, weight, dyb, lora_a, keep, scaling):
    """dx = dy W + scaling * (dyb A) [* keep]: dy (M, N), weight (N, K), dyb (M, r), lora_a (r, K) -> (M, K)."""
    k = weight.shape[1]
    dx = torch.ops.fusedlm_C.lora_gemm(_pad8(dy, 1), _pad8(weight, 0, 1), dyb, _pad8(lora_a, 1), None,
                                       None if keep is None else _pad8(keep, 1), scaling, True)
    return dx if dx.shape[1] == k else dx[:, :k]


def deberta_fwd(q, k, v, pos_key, pos_query, kpm, cu, rel_idx, max_seqlen, scale, dropout_p, seed, band):
    """(out, lse) of DeBERTa's attention (csrc/deberta.cu), dense or packed; head dims padded to a multiple of 8."""
    d = q.shape[-1]
    pad = [None if t is None else _pad8(t, -1) for t in (q, k, v, pos_key, pos_query)]
    out, lse = torch.ops.fusedlm_C.deberta_fwd(*pad, kpm, cu, rel_idx, max_seqlen, scale, dropout_p, seed)
    return (out if out.shape[-1] == d else out[..., :d]), lse


def deberta_bwd(do, dlse, q, k, v, pos_key, pos_query, out, lse, kpm, cu, rel_idx, max_seqlen, scale, dropout_p, seed,
                grad_pos_key, grad_pos_query, band):
    """(dq, dk, dv, dpos_key, dpos_query) (an empty tensor for a position gradient not asked for). The kernels
    give the band distances' share of dpos (already folded by bucket) and, per 64-row block, the share of the
    two runs of constant bucket (band = relative_band: d <= d_first has bucket row 0, d >= d_last row
    2 span - 1): sum over the block's rows of (dS summed over the run) q (dpos_key) or k (dpos_query)."""
    d, S = q.shape[-1], max_seqlen
    d_first, d_last = band[0], band[1]
    lo, hi = max(d_first + 1, -(S - 1)), min(d_last - 1, S - 1)
    pad = [None if t is None else _pad8(t, -1) for t in (do, q, k, v, pos_key, pos_query, out)]
    dq, dk, dv, runs, dpk, dpq = torch.ops.fusedlm_C.deberta_bwd(
        pad[0], dlse, *pad[1:6], pad[6], lse, kpm, cu, rel_idx, max_seqlen, scale, dropout_p, seed, d_first, d_last,
        lo, max(hi - lo + 1, 0), grad_pos_key, grad_pos_query)
    dq, dk, dv = (g if g.shape[-1] == d else g[..., :d] for g in (dq, dk, dv))

    def with_runs(dpos, parts, x):
        """dpos (H, 2 span, D) + the runs' share (parts (B H, tiles, 2, D), summed over batch and tiles in a
        fixed order), times s, in x's dtype."""
        heads = dpos.shape[0]
        runs = parts.view(-1, heads, parts.shape[1], 2, parts.shape[-1]).sum((0, 2))[..., :d]  # (H, 2, D)
        dpos = dpos[..., :d].clone()
        dpos[:, band[2]] += runs[:, 0]  # (the runs' bucket rows: 0 and 2 span - 1)
        dpos[:, band[3]] += runs[:, 1]
        return (dpos * scale).to(x.dtype)

    dpk = with_runs(dpk, runs[0], q) if grad_pos_key else q.new_empty(0)  # (two tensors: outputs of
    dpq = with_runs(dpq, runs[1], k) if grad_pos_query else q.new_empty(0)  # an op may not alias)
    return dq, dk, dv, dpk, dpq


def attention(q, k, v, key_padding_mask, cu_q, cu_k, max_q, max_k, scale, causal, bottom_right, dropout_p, seed,
              window):
    """(out, lse): dense (B, H, L, E) or packed (total, H, E) attention (csrc/attention.cu). Head dims that are
    not multiples of 8 are padded with zero features (q . k and the scale unchanged; out sliced back)."""
    left, right = window or (-1, -1)
    ev = v.shape[-1]
    out, lse = torch.ops.fusedlm_C.attention_fwd(_pad8(q, -1), _pad8(k, -1), _pad8(v, -1), key_padding_mask, cu_q,
                                                 cu_k, max_q, max_k, scale, causal, bottom_right, dropout_p, seed,
                                                 left, right)
    return (out if out.shape[-1] == ev else out[..., :ev]), lse
