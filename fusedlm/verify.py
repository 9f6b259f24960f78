"""Checking an op against its float64 reference: the harness behind ``fusedlm verify`` and the tests.

An op passes a case when, for its outputs and for the gradient of every differentiable input, the
norm-wise relative error ||got - want|| / ||want|| against a float64 computation on the *same*
(already rounded) inputs is within BOUNDS[dtype].

Why these bounds. Every op here computes in float32 and rounds its result once to the output dtype, so
the error is dominated by that one rounding: about u / sqrt(3) norm-wise for unit roundoff u
(float16 u = 2^-11 = 4.9e-4, bfloat16 u = 2^-8 = 3.9e-3). Gradients that sum over rows (dweight) or
heads (dcos) are also accumulated in float32 and rounded once. The bound is 4u: several times what a
correct kernel shows, far below what a wrong index, a missed term or a half-precision accumulation
gives (those land at 1e-2 to 1). For float32 the floor is float32 accumulation over rows up to 65536
wide (log2(N) * 2^-24 ~ 1e-6), bound 1e-5.
"""
import torch

BOUNDS = {
    torch.float32: 1e-5,
    torch.float16: 4 * 2.0**-11,
    torch.bfloat16: 4 * 2.0**-8,
    torch.float64: 1e-12,
}


def rel_err(got, want):
    """||got - want|| / ||want|| in float64 (the absolute norm where want is all zeros); NaN -> inf."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise ValueError(f"shape mismatch: got {tuple(got.shape)}, want {tuple(want.shape)}")
    if got.numel() == 0:
        return 0.0
    diff = (got - want).norm().item()
    if diff != diff:
        return float("inf")
    scale = want.norm().item()
    return diff / scale if scale > 0 else diff


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_case(fn, ref, inputs, *, dtype, device, grad=(), seed=0):
    """Run ``fn`` in ``dtype`` on ``device`` and ``ref`` in float64 on the same values; compare.

    inputs: name -> float64 tensor (cast to ``dtype`` for fn; the float64 reference receives the
            rounded values), another tensor (bool masks, int offsets: moved to ``device`` for fn, as is
            for the reference) or any other value (passed to both as is).
    grad:   names of the inputs whose gradients are compared (through random output cotangents).
    Returns a list of (quantity, relative error) for every output and every gradient.
    """
    low, high = {}, {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            low[name], high[name] = value.to(device), value
        elif isinstance(value, torch.Tensor):
            lo = value.to(device=device, dtype=dtype)
            low[name] = lo.detach().requires_grad_(name in grad)
            high[name] = lo.detach().double().cpu().requires_grad_(name in grad)
        else:
            low[name] = high[name] = value
    outs = _as_tuple(fn(**low))
    refs = _as_tuple(ref(**high))
    if len(outs) != len(refs):
        raise AssertionError(f"fn returned {len(outs)} outputs, the reference {len(refs)}")
    rows = [(f"out{i}" if len(outs) > 1 else "out", rel_err(o, r)) for i, (o, r) in enumerate(zip(outs, refs))]
    if grad:
        gen = torch.Generator().manual_seed(seed + 1)
        cots = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in refs]
        low_cots = [c.to(device=device, dtype=o.dtype) for c, o in zip(cots, outs)]
        high_cots = [c.to(o.dtype).double() for c, o in zip(cots, outs)]  # the same rounded values
        names = list(grad)
        got = torch.autograd.grad(outs, [low[n] for n in names], low_cots, allow_unused=True)
        want = torch.autograd.grad(refs, [high[n] for n in names], high_cots, allow_unused=True)
        for n, g, w in zip(names, got, want):
            if w is None:
                w = torch.zeros_like(high[n])
            if g is None:
                g = torch.zeros_like(low[n])
            rows.append((f"d{n}", rel_err(g, w)))
    return rows


# ---------------------------------------------------------------------------------------------------
# The grid that ``fusedlm verify`` runs: every op x backend x dtype x shape, outputs and gradients,
# against fusedlm.reference evaluated in float64 (the yardstick). Later ops add a Case list here.


class Case:
    """One verify row: ``make(gen)`` builds float64 inputs, ``run(backend)`` the op under test.
    cuda_dtypes: the dtypes the cuda backend serves for this case (None: every dtype; the attention kernels
    are tensor-core float16 / bfloat16 ones and decline an attn_mask, by contract)."""

    def __init__(self, op, shape, make, run, ref, grad, cuda_dtypes=None):
        self.op, self.shape, self.make, self.run, self.ref, self.grad = op, shape, make, run, ref, grad
        self.cuda_dtypes = cuda_dtypes


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def cases(gpu=False):
    """The verify grid. Odd sizes on purpose; the GPU adds a realistic size."""
    import fusedlm
    from fusedlm import reference as R

    out = []
    hidden = [(3, 1), (4, 123), (2, 771), (1, 4100), (1, 65536)] + ([(4096, 4096)] if gpu else [])
    for rows, n in hidden:
        eps_rms = 1.0 if n == 1 else 1e-6  # one feature: see tests/test_norm.py on conditioning
        out.append(Case(
            "rms_norm", (rows, n),
            lambda g, rows=rows, n=n: dict(x=_randn(g, rows, n), weight=_randn(g, n)),
            lambda b, e=eps_rms: lambda x, weight: fusedlm.rms_norm(x, weight, e, backend=b),
            lambda x, weight, e=eps_rms: R.rms_norm_ref(x, weight, e),
            ("x", "weight")))
        if n > 1:
            out.append(Case(
                "layer_norm", (rows, n),
                lambda g, rows=rows, n=n: dict(x=_randn(g, rows, n), weight=_randn(g, n), bias=_randn(g, n)),
                lambda b: lambda x, weight, bias: fusedlm.layer_norm(x, weight, bias, backend=b),
                lambda x, weight, bias: R.layer_norm_ref(x, weight, bias),
                ("x", "weight", "bias")))
    for shape in [(2, 3, 130), (5, 771)] + ([(4096, 4096)] if gpu else []):
        out.append(Case(
            "rms_norm+residual,offset=1", shape,
            lambda g, s=shape: dict(x=_randn(g, *s), residual=_randn(g, *s), weight=_randn(g, s[-1])),
            lambda b: lambda x, residual, weight: fusedlm.rms_norm(x, weight, offset=1.0, residual=residual,
                                                                    backend=b),
            lambda x, residual, weight: R.rms_norm_ref(x, weight, 1e-6, 1.0, residual),
            ("x", "residual", "weight")))
        out.append(Case(
            "layer_norm+residual", shape,
            lambda g, s=shape: dict(x=_randn(g, *s), residual=_randn(g, *s), weight=_randn(g, s[-1]),
                                    bias=_randn(g, s[-1])),
            lambda b: lambda x, residual, weight, bias: fusedlm.layer_norm(x, weight, bias, residual=residual,
                                                                            backend=b),
            lambda x, residual, weight, bias: R.layer_norm_ref(x, weight, bias, 1e-5, residual),
            ("x", "residual", "weight", "bias")))
    for shape in [(3, 1), (4, 123), (2, 5, 771)] + ([(4096, 11008)] if gpu else []):
        out.append(Case(
            "swiglu", shape,
            lambda g, s=shape: dict(gate=_randn(g, *s) * 2, up=_randn(g, *s)),
            lambda b: lambda gate, up: fusedlm.swiglu(gate, up, backend=b),
            R.swiglu_ref, ("gate", "up")))
    if hasattr(fusedlm, "apply_rotary_pos_emb"):
        # (B, H, Hkv, S, D, R, interleaved, unsqueeze_dim, cos batched)
        rope = [(1, 4, 4, 67, 80, 32, False, 1, False), (2, 4, 2, 5, 64, 64, True, 1, True),
                (2, 3, 1, 9, 40, 40, False, 2, True)]
        if gpu:
            rope.append((2, 32, 8, 2048, 128, 128, False, 1, True))
        for B, H, Hkv, S, D, Rot, inter, udim, batched in rope:
            def make(g, B=B, H=H, Hkv=Hkv, S=S, D=D, Rot=Rot, udim=udim, batched=batched):
                qs, ks = ((B, H, S, D), (B, Hkv, S, D)) if udim == 1 else ((B, S, H, D), (B, S, Hkv, D))
                angle = _randn(g, *((B, S, Rot) if batched else (S, Rot)))
                return dict(q=_randn(g, *qs), k=_randn(g, *ks), cos=angle.cos(), sin=angle.sin())

            out.append(Case(
                f"apply_rotary_pos_emb{'(interleaved)' if inter else ''}", (B, H, Hkv, S, D, Rot),
                make,
                lambda b, inter=inter, udim=udim: lambda q, k, cos, sin: fusedlm.apply_rotary_pos_emb(
                    q, k, cos, sin, unsqueeze_dim=udim, interleaved=inter, backend=b),
                lambda q, k, cos, sin, inter=inter, udim=udim: R.rope_ref(q, k, cos, sin, udim, inter),
                ("q", "k")))
    if hasattr(fusedlm, "lora_linear"):
        from fusedlm.ops.lora import lora_linear_ref
        # (tokens, in, out, r, bias, base trainable): odd sizes, one token, ranks 1 to 256
        lora = [(1, 40, 96, 1, True, False), (67, 130, 96, 16, False, False), (18, 771, 123, 64, True, True),
                (5, 96, 40, 256, True, False)]
        if gpu:
            lora.append((4096, 4096, 4096, 16, False, False))
        for M, K, N, r, bias, train_base in lora:
            def make_lora(g, M=M, K=K, N=N, r=r, bias=bias):
                d = dict(x=_randn(g, M, K), weight=_randn(g, N, K) / K**0.5, lora_a=_randn(g, r, K) / K**0.5,
                         lora_b=_randn(g, N, r))
                if bias:
                    d["bias"] = _randn(g, N)
                return d

            out.append(Case(
                "lora_linear", (M, K, N, r), make_lora,
                lambda b: lambda x, weight, lora_a, lora_b, bias=None: fusedlm.lora_linear(
                    x, weight, bias, lora_a, lora_b, 0.5, backend=b),
                lambda x, weight, lora_a, lora_b, bias=None: lora_linear_ref(x, weight, bias, lora_a, lora_b, 0.5),
                ("x", "lora_a", "lora_b") + (("weight",) + (("bias",) if bias else ()) if train_base else ()),
                cuda_dtypes=_TENSOR_CORE))  # the cuda kernel: tensor-core dtypes
    out += _attention_cases(gpu)
    out += _deberta_cases(gpu)
    out += _model_cases(gpu)
    return out


_TENSOR_CORE = (torch.float16, torch.bfloat16)


def _attention_cases(gpu):
    import fusedlm
    from fusedlm import reference as R

    out = []
    # (B, H, Hkv, L, S, E, Ev, causal, masks): odd lengths and head dims, GQA, L != S both ways
    dense = [(2, 4, 4, 67, 67, 40, 40, False, ""), (1, 4, 2, 129, 67, 80, 80, True, ""),
             (2, 2, 2, 33, 70, 64, 48, False, "kpm"), (1, 2, 2, 20, 50, 96, 96, True, "bool+kpm"),
             (2, 2, 1, 24, 40, 32, 32, False, "float"), (1, 1, 1, 17, 17, 256, 256, True, "")]
    if gpu:
        dense.append((2, 16, 16, 1024, 1024, 128, 128, True, ""))
        dense.append((2, 16, 4, 1024, 2048, 128, 128, False, "kpm"))
    for B, H, Hkv, L, S, E, Ev, causal, masks in dense:
        def make(g, B=B, H=H, Hkv=Hkv, L=L, S=S, E=E, Ev=Ev, masks=masks):
            d = dict(query=_randn(g, B, H, L, E), key=_randn(g, B, Hkv, S, E), value=_randn(g, B, Hkv, S, Ev))
            if "kpm" in masks:  # real lengths from S down to a batch row with a single real key
                lengths = torch.linspace(S, 1, B).long()
                d["key_padding_mask"] = torch.arange(S)[None, :] < lengths[:, None]
            if "bool" in masks:
                d["attn_mask"] = torch.rand(L, S, generator=g) > 0.3
            if "float" in masks:
                d["attn_mask"] = _randn(g, B, 1, L, S)
            return d

        def run_fn(b, causal=causal, gqa=H != Hkv):
            return lambda query, key, value, attn_mask=None, key_padding_mask=None: \
                fusedlm.scaled_dot_product_attention(query, key, value, attn_mask, is_causal=causal, enable_gqa=gqa,
                                                     key_padding_mask=key_padding_mask, backend=b)

        def ref(query, key, value, attn_mask=None, key_padding_mask=None, causal=causal, gqa=H != Hkv):
            return R.sdpa_ref(query, key, value, attn_mask, 0.0, causal, None, gqa, key_padding_mask)

        label = "scaled_dot_product_attention" + (f"({'causal,' if causal else ''}{masks})".replace(",)", ")")
                                                  if causal or masks else "")
        out.append(Case(label, (B, H, Hkv, L, S, E, Ev), make, run_fn, ref, ("query", "key", "value"),
                        cuda_dtypes=() if ("bool" in masks or "float" in masks) else _TENSOR_CORE))
    for lq, lk, H, Hkv, E, causal in [((5, 40, 0, 17), (9, 33, 4, 17), 4, 2, 48, True),
                                      ((30, 1, 64), (30, 1, 64), 2, 2, 64, False)]:
        def make_varlen(g, lq=lq, lk=lk, H=H, Hkv=Hkv, E=E):
            cu = [torch.tensor([0] + list(torch.tensor(n).cumsum(0)), dtype=torch.int32) for n in (lq, lk)]
            return dict(q=_randn(g, sum(lq), H, E), k=_randn(g, sum(lk), Hkv, E), v=_randn(g, sum(lk), Hkv, E),
                        cu_seqlens_q=cu[0], cu_seqlens_k=cu[1])

        def run_varlen(b, lq=lq, lk=lk, causal=causal):
            return lambda q, k, v, cu_seqlens_q, cu_seqlens_k: fusedlm.varlen_attention(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max(lq), max(lk), causal=causal, backend=b)

        def ref_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, lq=lq, lk=lk, causal=causal):
            return R.varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max(lq), max(lk), causal)

        out.append(Case("varlen_attention" + ("(causal)" if causal else ""), (len(lq), sum(lq), sum(lk), H, Hkv, E),
                        make_varlen, run_varlen, ref_varlen, ("q", "k", "v"), cuda_dtypes=_TENSOR_CORE))
    out += _window_cases(gpu)
    out += _kv_cache_cases(gpu)
    out += _cross_entropy_cases(gpu)
    return out


def _cross_entropy_cases(gpu):
    """linear_cross_entropy: an odd vocabulary with ignored tokens and a bias, smoothing + softcap + z-loss
    summed, per-token losses; loss and the gradients of hidden, weight and bias."""
    import fusedlm
    from fusedlm import reference as R

    out = []
    grid = [(67, 40, 301, "mean", {}), (50, 64, 1000, "sum", dict(label_smoothing=0.1, softcap=15.0, z_loss=1e-3)),
            (33, 24, 77, "none", {})]
    if gpu:
        grid.append((4096, 2048, 32000, "mean", {}))
    for N, D, V, reduction, kw in grid:
        def make(g, N=N, D=D, V=V):
            target = torch.randint(0, V, (N,), generator=g)
            target[::4] = -100
            return dict(hidden=_randn(g, N, D), weight=_randn(g, V, D) * 0.2, bias=_randn(g, V), target=target)

        def run_fn(b, reduction=reduction, kw=kw):
            return lambda hidden, weight, bias, target: fusedlm.linear_cross_entropy(
                hidden, weight, target, bias, reduction=reduction, backend=b, **kw)

        def ref(hidden, weight, bias, target, reduction=reduction, kw=kw):
            return R.linear_cross_entropy_ref(hidden, weight, target, bias, reduction=reduction, **kw)

        label = "linear_cross_entropy" + (f"({','.join(kw)})" if kw else "") + f"[{reduction}]"
        out.append(Case(label, (N, D, V), make, run_fn, ref, ("hidden", "weight", "bias")))
    return out


def _kv_cache_cases(gpu):
    """kv_cache_attention: a decode step appending with rotary (contiguous, GQA, an empty sequence), speculative
    rows over a paged cache (block 16), a sliding window; the output, lse and the written cache compared."""
    import fusedlm
    from fusedlm import reference as R

    out = []
    # (B, Lq, H, Hkv, E, capacity, lengths, paged block size, window)
    grid = [(3, 1, 8, 2, 64, 80, (70, 0, 13), None, None), (2, 4, 4, 4, 40, 96, (50, 9), 16, None),
            (2, 3, 4, 1, 32, 64, (40, 5), None, (15, 0))]
    if gpu:
        grid.append((8, 1, 32, 8, 128, 4096, tuple(range(4000, 4096, 12)), 16, None))
    for B, Lq, H, Hkv, E, cap, lengths, bs, window in grid:
        def make(g, B=B, Lq=Lq, H=H, Hkv=Hkv, E=E, cap=cap, lengths=lengths, bs=bs):
            pool = (B * cap // bs, bs) if bs else (B, cap)
            d = dict(q=_randn(g, B, Lq, H, E), k_cache=_randn(g, *pool, Hkv, E), v_cache=_randn(g, *pool, Hkv, E),
                     k=_randn(g, B, Lq, Hkv, E), v=_randn(g, B, Lq, Hkv, E), cos=_randn(g, cap, E), sin=_randn(g, cap, E),
                     cache_seqlens=torch.tensor(lengths, dtype=torch.int32))
            if bs:
                d["block_table"] = torch.randperm(B * cap // bs, generator=g).view(B, cap // bs).int()
            return d

        def run_fn(b, window=window):
            def fn(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens, block_table=None):
                o, lse = fusedlm.kv_cache_attention(q, k_cache, v_cache, cache_seqlens, k=k, v=v, cos=cos, sin=sin,
                                                    block_table=block_table, window_size=window, return_lse=True,
                                                    backend=b)
                return o, lse, k_cache, v_cache
            return fn

        def ref(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens, block_table=None, window=window):
            o, lse = R.kv_cache_ref(q, k_cache, v_cache, cache_seqlens, k, v, cos, sin, False, block_table,
                                    window_size=window, return_lse=True)
            return o, lse, k_cache, v_cache

        label = "kv_cache_attention" + ("(paged)" if bs else "") + (f"(window={window[0]})" if window else "")
        out.append(Case(label, (B, Lq, H, Hkv, E, cap), make, run_fn, ref, ()))
    return out


def _window_cases(gpu):
    """Local attention (window_size): a Mistral-style sliding window (causal), a two-sided band with L != S,
    and a packed batch aligned bottom-right."""
    import fusedlm
    from fusedlm import reference as R

    out = []
    # (B, H, Hkv, L, S, E, causal, window)
    dense = [(1, 4, 2, 97, 97, 64, True, (31, 0)), (1, 2, 2, 70, 110, 40, False, (10, 25))]
    if gpu:
        dense.append((2, 16, 4, 2048, 2048, 128, True, (511, 0)))
    for B, H, Hkv, L, S, E, causal, window in dense:
        def make(g, B=B, H=H, Hkv=Hkv, L=L, S=S, E=E):
            return dict(query=_randn(g, B, H, L, E), key=_randn(g, B, Hkv, S, E), value=_randn(g, B, Hkv, S, E))

        def run_fn(b, causal=causal, window=window, gqa=H != Hkv):
            return lambda query, key, value: fusedlm.scaled_dot_product_attention(
                query, key, value, is_causal=causal, enable_gqa=gqa, window_size=window, backend=b)

        def ref(query, key, value, causal=causal, window=window, gqa=H != Hkv):
            return R.sdpa_ref(query, key, value, None, 0.0, causal, None, gqa, window_size=window)

        label = f"scaled_dot_product_attention({'causal,' if causal else ''}window={window[0]},{window[1]})"
        out.append(Case(label, (B, H, Hkv, L, S, E, E), make, run_fn, ref, ("query", "key", "value"),
                        cuda_dtypes=_TENSOR_CORE))
    lq, lk, H, Hkv, E, window = (40, 3, 70), (70, 9, 40), 4, 2, 48, (20, 0)

    def make_varlen(g):
        cu = [torch.tensor([0] + list(torch.tensor(n).cumsum(0)), dtype=torch.int32) for n in (lq, lk)]
        return dict(q=_randn(g, sum(lq), H, E), k=_randn(g, sum(lk), Hkv, E), v=_randn(g, sum(lk), Hkv, E),
                    cu_seqlens_q=cu[0], cu_seqlens_k=cu[1])

    def run_varlen(b):
        return lambda q, k, v, cu_seqlens_q, cu_seqlens_k: fusedlm.varlen_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max(lq), max(lk), causal=True, window_size=window, backend=b)

    def ref_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k):
        return R.varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max(lq), max(lk), True, window_size=window)

    out.append(Case(f"varlen_attention(causal,window={window[0]},{window[1]})", (len(lq), sum(lq), sum(lk), H, Hkv, E),
                    make_varlen, run_varlen, ref_varlen, ("q", "k", "v"), cuda_dtypes=_TENSOR_CORE))
    return out


def run(backends, dtypes, device, gpu=False, ops=None, log=print):
    """Run the grid; returns a list of row dicts (op, backend, dtype, shape, max_rel_err, worst, bound, ok).

    dtypes: a list, or a function backend -> list. The cuda backend runs only the ops it implements
    (fusedlm._cuda.OPS); every other backend runs every op.
    """
    from fusedlm._cuda import OPS as CUDA_OPS

    rows = []
    for case in cases(gpu):
        if ops and not any(case.op.startswith(o) for o in ops):
            continue
        for backend in backends:
            if backend == "cuda" and not any(case.op.startswith(o) for o in CUDA_OPS):
                continue
            for dtype in (dtypes(backend) if callable(dtypes) else dtypes):
                if backend == "cuda" and case.cuda_dtypes is not None and dtype not in case.cuda_dtypes:
                    continue  # a case the cuda kernels decline by contract (ValueError): not a row
                gen = torch.Generator().manual_seed(1234)
                try:
                    errs = check_case(case.run(backend), case.ref, case.make(gen), dtype=dtype, device=device,
                                      grad=case.grad)
                    worst, err = max(errs, key=lambda qe: qe[1])
                    failure = None
                except Exception as e:  # a crash is a failed row, reported, not an abort of the run
                    worst, err, failure = "error", float("inf"), f"{type(e).__name__}: {e}"
                bound = BOUNDS[dtype]
                row = dict(op=case.op, backend=backend, dtype=str(dtype).replace("torch.", ""),
                           shape="x".join(map(str, case.shape)), max_rel_err=err, worst=worst, bound=bound,
                           ok=bool(err <= bound))
                if failure:
                    row["error"] = failure
                rows.append(row)
                log(row)
    return rows


def _deberta_cases(gpu):
    from fusedlm import reference as R
    from fusedlm.ops.deberta import deberta_attention, deberta_varlen_attention

    out = []
    # (B, H, S, D, position_buckets, max_relative_positions, terms, padded)
    deberta = [(2, 2, 67, 64, 256, 512, "c2p,p2c", True), (1, 1, 300, 16, 256, 512, "c2p,p2c", True),
               (2, 2, 67, 40, 16, 40, "c2p", False), (2, 2, 67, 40, 16, 40, "p2c", True),
               (2, 2, 67, 32, -1, 20, "c2p,p2c", False), (2, 1, 1, 16, 256, 512, "c2p,p2c", False)]
    if gpu:
        deberta.append((4, 12, 2048, 64, 256, 512, "c2p,p2c", True))
    for B, H, S, D, pb, mr, terms, padded in deberta:
        span = pb if pb > 0 else mr

        def make_deb(g, B=B, H=H, S=S, D=D, span=span, terms=terms, padded=padded):
            d = dict(query=_randn(g, B, H, S, D), key=_randn(g, B, H, S, D), value=_randn(g, B, H, S, D))
            if "c2p" in terms:
                d["pos_key"] = _randn(g, H, 2 * span, D)
            if "p2c" in terms:
                d["pos_query"] = _randn(g, H, 2 * span, D)
            if padded:  # real lengths from S down to a batch row with a single real key
                d["key_padding_mask"] = torch.arange(S)[None, :] < torch.linspace(S, 1, B).long()[:, None]
            return d

        def run_deb(b, pb=pb, mr=mr):
            return lambda query, key, value, pos_key=None, pos_query=None, key_padding_mask=None: deberta_attention(
                query, key, value, pos_key, pos_query, key_padding_mask=key_padding_mask, position_buckets=pb,
                max_relative_positions=mr, backend=b)

        def ref_deb(query, key, value, pos_key=None, pos_query=None, key_padding_mask=None, pb=pb, mr=mr):
            return R.deberta_ref(query, key, value, pos_key, pos_query, key_padding_mask, pb, mr)

        grads = ("query", "key", "value") + (("pos_key",) if "c2p" in terms else ()) + \
            (("pos_query",) if "p2c" in terms else ())
        label = f"deberta_attention({terms},{'buckets' if pb > 0 else 'distance'}{',kpm' if padded else ''})"
        out.append(Case(label, (B, H, S, D, pb, mr), make_deb, run_deb, ref_deb, grads,
                        cuda_dtypes=_TENSOR_CORE if D <= 64 else ()))  # the cuda kernels: D <= 64
    # packed: (lengths, H, D, position_buckets, max_relative_positions); out, lse and every gradient
    packed = [((45, 1, 0, 17), 2, 40, 16, 40), ((67, 30), 2, 64, 256, 512)]
    if gpu:
        packed.append(((2048, 1000, 17, 512, 1), 12, 64, 256, 512))
    for lengths, H, D, pb, mr in packed:
        span = pb if pb > 0 else mr

        def make_packed(g, lengths=lengths, H=H, D=D, span=span):
            n = sum(lengths)
            return dict(q=_randn(g, n, H, D), k=_randn(g, n, H, D), v=_randn(g, n, H, D),
                        pos_key=_randn(g, H, 2 * span, D), pos_query=_randn(g, H, 2 * span, D),
                        cu_seqlens=torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32))

        def run_packed(b, lengths=lengths, pb=pb, mr=mr):
            return lambda q, k, v, pos_key, pos_query, cu_seqlens: deberta_varlen_attention(
                q, k, v, pos_key, pos_query, cu_seqlens, max(lengths), position_buckets=pb,
                max_relative_positions=mr, return_lse=True, backend=b)

        def ref_packed(q, k, v, pos_key, pos_query, cu_seqlens, pb=pb, mr=mr):
            return R.deberta_varlen_ref(q, k, v, pos_key, pos_query, cu_seqlens, pb, mr, return_lse=True)

        out.append(Case("deberta_varlen_attention(c2p,p2c,lse)", (len(lengths), sum(lengths), H, D, pb, mr),
                        make_packed, run_packed, ref_packed, ("q", "k", "v", "pos_key", "pos_query"),
                        cuda_dtypes=_TENSOR_CORE if D <= 64 else ()))
    return out


def _model_cases(gpu):
    """The reference models (fusedlm.models): kernels vs the plain PyTorch model in float64."""
    from fusedlm.models.verify_cases import model_cases

    return model_cases(gpu, Case, _randn)
