"""linear_cross_entropy: the language-model loss from the hidden states and the LM head, without the (N, V)
logits: validation, dispatch, the Triton ops and both backends' chunked backward.

The math and the kernels are in fusedlm/kernels/cross_entropy.py. Forward: the Triton kernel keeps a few
values per token (nothing of size N x V); the torch backend computes the logits of a bounded slice of tokens
at a time. Backward (both, _backward): dz of a chunk of tokens x vocabulary entries is recomputed (the
Triton tile kernel, or torch ops) and fed to matmuls: dh of a token chunk summed in float32 over the
vocabulary chunks, db in float32, dW of a vocabulary chunk summed in float32 over the token chunks (for a
16-bit W in a second, vocabulary-major pass that recomputes dz: 4 products' worth of work instead of 3, for
a dW within 1.3x torch's own bf16 error instead of ~3x). Fixed order, no atomics: deterministic. Extra
memory: the chunk buffers, under CHUNK_BYTES, whatever N and V.

The backward reads the number of tokens that count back to the host once (to skip the ignored ones): it is
an opaque op for torch.compile (no graph break in the forward; not capturable in a CUDA graph).
"""
from typing import Optional

import torch

from .. import _backend, _validate, reference

CHUNK_BYTES = 32 * 2**20  # the backward's chunk buffers (and the torch forward's logits slice), at most


def _order(target, ignore_index):
    """(perm int64 (N,): the tokens that count first, in order; n_valid int64 scalar), made on the device."""
    valid = target != ignore_index
    return torch.argsort((~valid).to(torch.uint8), stable=True), valid.sum()


def _chunks(D, V, hidden_bytes, work_bytes, N):
    """(NC, VC): token and vocabulary chunks whose buffers (dh float32, the gathered h, a product's output,
    dz; the torch backend's weight slice in its compute dtype) stay under CHUNK_BYTES."""
    vc = min(V, 4096 if work_bytes <= 2 else 1024)
    fixed = vc * D * work_bytes if work_bytes > hidden_bytes else 0  # a weight slice converted up (torch)
    per_token = D * (4 + hidden_bytes + work_bytes) + vc * work_bytes
    nc = max(16, min(N, max(CHUNK_BYTES - fixed, 0) // per_token) // 16 * 16)
    return nc, vc


def _backward(dz_fn, hidden, weight, bias, perm, n_valid, needs, work_dtype, skip_ignored):
    """The chunked backward (see the module docstring). dz_fn(r0, nc, v0, vc) -> dz (nc, vc) in work_dtype for
    the tokens perm[r0:r0 + nc] and the vocabulary entries [v0, v0 + vc).
    skip_ignored: read the number of tokens that count back to the host and stop there (else every chunk
    runs, the ignored tokens' dz being zeros). -> (dh, dw, db) in the inputs' dtypes (None where not needed).

    Pass 1, token-major: dh of a token chunk summed in float32 over the vocabulary chunks (one rounding), db
    in float32, and dW where W is float32 / float64 (summed in its own dtype over the token chunks). Pass 2,
    vocabulary-major, for a 16-bit W: dW of a vocabulary chunk summed in float32 over the token chunks, one
    rounding; it computes dz again (a second recompute of the logits), because a running 16-bit dW rounded
    once per token chunk was ~3x torch's own bf16 error at 20 chunks (and a float32 dW is 2 GiB at Llama-3's
    head)."""
    N, D = hidden.shape
    V = weight.shape[0]
    need_h, need_w, need_b = needs
    dh = torch.zeros_like(hidden) if need_h else None
    dw = torch.zeros_like(weight) if need_w else None
    db = torch.zeros(V, device=weight.device, dtype=torch.float32) if need_b else None
    n = int(n_valid) if skip_ignored and n_valid.device.type != "meta" else N  # (meta: memory counting)
    w_exact = need_w and dw.dtype in (torch.float32, torch.float64)  # dW summed in its own dtype in pass 1
    wb = torch.empty((), dtype=work_dtype).element_size()
    if need_h or need_b or w_exact:
        nc, vc = _chunks(D, V, hidden.element_size(), wb, N)
        for r0 in range(0, n, nc):
            rows = perm[r0:min(n, r0 + nc)]
            h = hidden.index_select(0, rows).to(work_dtype) if w_exact else None
            dh_c = torch.zeros(rows.shape[0], D, device=hidden.device, dtype=torch.float32) if need_h else None
            for v0 in range(0, V, vc):
                w = weight[v0:v0 + vc].to(work_dtype)
                dz = dz_fn(r0, rows.shape[0], v0, w.shape[0])
                if need_h:
                    dh_c.add_(dz @ w)  # (float32 += the product in work_dtype: no float32 copy of it)
                if w_exact:
                    dw[v0:v0 + vc].addmm_(dz.T.to(dw.dtype), h.to(dw.dtype))
                if need_b:
                    db[v0:v0 + vc] += dz.sum(0, dtype=torch.float32)
            if need_h:
                dh.index_copy_(0, rows, dh_c.to(dh.dtype))
    if need_w and not w_exact:
        vc = min(V, max(16, (CHUNK_BYTES * 3 // 4) // (D * (4 + wb)) // 16 * 16))  # float32 dW + the product
        nc = max(16, min(N, (CHUNK_BYTES // 4) // (D * wb + vc * wb)) // 16 * 16)  # h and dz
        for v0 in range(0, V, vc):
            acc = torch.zeros(min(vc, V - v0), D, device=weight.device, dtype=torch.float32)
            for r0 in range(0, n, nc):
                rows = perm[r0:min(n, r0 + nc)]
                dz = dz_fn(r0, rows.shape[0], v0, acc.shape[0])
                acc.add_(dz.T @ hidden.index_select(0, rows).to(work_dtype))
            dw[v0:v0 + acc.shape[0]] = acc.to(dw.dtype)
    return dh, dw, db.to(bias.dtype) if need_b else None


# ---------------------------------------------------------------------------------------------------
# The torch backend: the logits of a bounded slice of tokens at a time


def _torch_dz(hidden, weight, bias, target, perm, lse, g, ignore_index, softcap, smoothing, z_loss, ct):
    def dz_fn(r0, nc, v0, vc):
        rows = perm[r0:r0 + nc]
        z = hidden.index_select(0, rows).to(ct) @ weight[v0:v0 + vc].to(ct).T
        if bias is not None:
            z = z + bias[v0:v0 + vc].to(ct)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        l = lse.index_select(0, rows).to(ct)[:, None]
        p = torch.exp(z - l) * (1.0 + 2.0 * z_loss * l)
        t = target.index_select(0, rows)
        onehot = (torch.arange(v0, v0 + vc, device=z.device)[None, :] == t[:, None]).to(ct)
        dz = p - (1.0 - smoothing) * onehot - smoothing / weight.shape[0]
        if softcap is not None:
            dz = dz * (1.0 - (z / softcap).square())
        return dz * torch.where(t != ignore_index, g.index_select(0, rows), 0.0)[:, None]  # ignored: no gradient
    return dz_fn


class _TorchLCE(torch.autograd.Function):
    """The torch backend: per chunk of tokens, the logits of one vocabulary chunk at a time, merged through
    their log-sum-exp (never more than a chunk of logits, nor of the weight in the compute dtype)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, smoothing, softcap, z_loss):
        ct = reference._compute_dtype(hidden)
        (N, D), V = hidden.shape, weight.shape[0]
        rows_loss = torch.zeros(N, device=hidden.device, dtype=ct)
        lse = torch.zeros(N, device=hidden.device, dtype=ct)
        nc, vc = _chunks(D, V, hidden.element_size(), torch.empty((), dtype=ct).element_size(), N)
        for r0 in range(0, N, nc):
            h, t = hidden[r0:r0 + nc].to(ct), target[r0:r0 + nc]
            l_c = torch.full((h.shape[0],), float("-inf"), device=h.device, dtype=ct)
            z_t, z_sum = torch.zeros_like(l_c), torch.zeros_like(l_c)
            for v0 in range(0, V, vc):
                z = h @ weight[v0:v0 + vc].to(ct).T
                if bias is not None:
                    z = z + bias[v0:v0 + vc].to(ct)
                if softcap is not None:
                    z = softcap * torch.tanh(z / softcap)
                l_c = torch.logaddexp(l_c, torch.logsumexp(z, -1))
                here = (t >= v0) & (t < v0 + z.shape[1])
                z_t += torch.where(here, z.gather(1, (t - v0).clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
                if smoothing:
                    z_sum += z.sum(-1)
            loss = (1.0 - smoothing) * (l_c - z_t) + smoothing * (l_c - z_sum / V) + z_loss * l_c.square()
            rows_loss[r0:r0 + nc] = torch.where(t != ignore_index, loss, 0.0)
            lse[r0:r0 + nc] = l_c
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.args = (ignore_index, smoothing, softcap, z_loss)
        return rows_loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # (the formula uses the saved lse: not differentiable again)
    def backward(ctx, grad_rows):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        ignore_index, smoothing, softcap, z_loss = ctx.args
        ct = reference._compute_dtype(hidden)
        perm, n_valid = _order(target, ignore_index)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        dz_fn = _torch_dz(hidden, weight, bias, target, perm, lse, grad_rows.to(ct), ignore_index, softcap, smoothing,
                          z_loss, ct)
        # every chunk (no read back: the torch backend stays traceable by torch.compile)
        dh, dw, db = _backward(dz_fn, hidden, weight, bias, perm, n_valid, needs, ct, skip_ignored=False)
        return dh, dw, db, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# The Triton backend: two registered ops, the forward traceable (triton_op), the backward opaque


def triton_forward(launch, hidden, weight, bias, target, ignore_index, smoothing, softcap, z_loss):
    """The Triton forward (the registered op's body): -> (loss float32 (N,), lse float32 (N,))."""
    from fusedlm.kernels import attention as KA
    from fusedlm.kernels import cross_entropy as K

    perm, n_valid = _order(target, ignore_index)
    return K.lce_fwd(launch, hidden, weight, bias, target, perm, n_valid, softcap or None, smoothing, z_loss,
                     KA.precision(hidden))


def triton_backward(launch, grad_rows, hidden, weight, bias, target, lse, ignore_index, smoothing, softcap, z_loss,
                    needs):
    """The Triton backward (the registered op's body): -> (dh, dw, db), None where not needed."""
    from fusedlm.kernels import attention as KA
    from fusedlm.kernels import cross_entropy as K

    perm, n_valid = _order(target, ignore_index)

    def dz_fn(r0, nc, v0, vc):
        dz = torch.empty(nc, vc, device=hidden.device, dtype=hidden.dtype)
        K.lce_dz(launch, dz, hidden, weight, bias, target, perm, n_valid, lse, grad_rows, r0, v0, softcap or None,
                 smoothing, z_loss, KA.precision(hidden))
        return dz
    return _backward(dz_fn, hidden, weight, bias, perm, n_valid, needs, hidden.dtype, skip_ignored=True)


def _triton_ops():
    global _ops
    if _ops is not None:
        return _ops
    from .._triton import launch, register_op

    def lce_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                ignore_index: int, smoothing: float, softcap: float, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (N, D), weight (V, D), target (N,) -> (loss float32 (N,), lse float32 (N,)); softcap 0 = none."""
        return triton_forward(launch, hidden, weight, bias, target, ignore_index, smoothing, softcap, z_loss)

    def lce_bwd(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                target: torch.Tensor, lse: torch.Tensor, ignore_index: int, smoothing: float, softcap: float,
                z_loss: float, need_h: bool, need_w: bool, need_b: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dh, dw, db); an empty placeholder where not needed."""
        grads = triton_backward(launch, grad_rows, hidden, weight, bias, target, lse, ignore_index, smoothing, softcap,
                                z_loss, (need_h, need_w, need_b))
        return tuple(g if g is not None else hidden.new_empty(0) for g in grads)

    fwd = register_op("linear_cross_entropy_fwd", lce_fwd)
    bwd = torch.library.custom_op("fusedlm::linear_cross_entropy_bwd", lce_bwd, mutates_args=())

    @bwd.register_fake
    def _(grad_rows, hidden, weight, bias, target, lse, ignore_index, smoothing, softcap, z_loss, need_h, need_w,
          need_b):
        return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
                torch.empty_like(weight) if need_w else hidden.new_empty(0),
                torch.empty_like(bias) if need_b else hidden.new_empty(0))

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, target, *args = inputs
        ctx.save_for_backward(hidden, weight, bias, target, output[1])
        ctx.args = args
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_rows, grad_lse):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        if grad_rows is None:
            return None, None, None, None, None, None, None, None
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        dh, dw, db = bwd(grad_rows.float().contiguous(), hidden, weight, bias, target, lse, *ctx.args, *need)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None,
                None, None, None, None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    _ops = fwd
    return fwd


_ops = None


# ---------------------------------------------------------------------------------------------------
# The public function


def _check(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, softcap, z_loss):
    _validate.tensor("hidden", hidden, min_ndim=1)
    _validate.tensor("weight", weight, ndim=2)
    _validate.tensor("bias", bias, ndim=1, optional=True)
    D = hidden.shape[-1]
    V = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"weight: expected shape (V, {D}) (D = the last dim of hidden), got {tuple(weight.shape)}")
    if V == 0:
        raise ValueError("weight: expected at least one vocabulary row, got shape (0, D)")
    _validate.shape("bias", bias, (V,), "one entry a vocabulary row of weight")
    _validate.same_dtype(hidden=hidden, weight=weight, bias=bias)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected an int64 torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target: expected dtype torch.int64 (class indices), got {target.dtype}")
    _validate.shape("target", target, hidden.shape[:-1], "the shape of hidden without its last dim")
    device = _validate.same_device(hidden=hidden, weight=weight, target=target, bias=bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    smoothing = _validate.number("label_smoothing", label_smoothing)
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {smoothing}")
    if softcap is not None:
        softcap = _validate.number("softcap", softcap, positive=True)
    z_loss = _validate.number("z_loss", z_loss, non_negative=True)
    if device.type == "cpu" and not torch.compiler.is_compiling() and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        if bool(bad.any()):
            raise ValueError(f"target: expected class indices in [0, {V}) or ignore_index={ignore_index}, got "
                             f"{target[bad][:8].tolist()}")
    return smoothing, softcap, z_loss


def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, softcap=None, z_loss=0.0, backend=None):
    """The language-model loss of hidden states through the LM head, never holding the (N, V) logits.

    hidden (..., D); weight (V, D) (the LM head's); bias (V,) or None; target (...) int64 class indices.
    Equals, in float32: logits = hidden @ weight.T + bias; with ``softcap`` logits = softcap tanh(logits /
    softcap) (Gemma 2); per token F.cross_entropy(logits, target, label_smoothing=...) plus
    z_loss * logsumexp(logits)^2, 0 where target == ignore_index; reduction "mean" (over the tokens not
    ignored, NaN when none is, as torch), "sum" or "none" (float32, target's shape). Gradients for hidden,
    weight and bias. The Triton kernels keep a few values per token in the forward and bounded slices in the
    backward (module docstring); the torch backend computes the logits of a bounded slice of tokens at a time.
    A target outside [0, V) that is not ignore_index raises ValueError on CPU tensors.
    """
    smoothing, softcap, z_loss = _check(hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                                        softcap, z_loss)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    name = _backend.select("linear_cross_entropy", backend, hidden.device,
                           {"triton": _validate.kernel_dtype_reason(hidden, weight, bias)})
    if name == "torch":
        rows = _TorchLCE.apply(h, weight, bias, t, ignore_index, smoothing, softcap, z_loss)
    else:
        h = h if h.stride(-1) == 1 else h.contiguous()
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        # the kernels index targets and bias entries with unit strides (a strided or expanded view is copied)
        rows, _ = _triton_ops()(h, w, None if bias is None else bias.contiguous(), t.contiguous(), ignore_index,
                                smoothing, softcap or 0.0, z_loss)
    out = reference.reduce_loss(rows, t, ignore_index, reduction)
    return out.reshape(target.shape) if reduction == "none" else out
