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
            rounded values) or any other value (passed to both as is).
    grad:   names of the inputs whose gradients are compared (through random output cotangents).
    Returns a list of (quantity, relative error) for every output and every gradient.
    """
    low, high = {}, {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
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
    """One verify row: ``make(gen)`` builds float64 inputs, ``run(backend)`` the op under test."""

    def __init__(self, op, shape, make, run, ref, grad):
        self.op, self.shape, self.make, self.run, self.ref, self.grad = op, shape, make, run, ref, grad


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
    return out


def run(backends, dtypes, device, gpu=False, ops=None, log=print):
    """Run the grid; returns a list of row dicts (op, backend, dtype, shape, max_rel_err, worst, bound, ok)."""
    rows = []
    for case in cases(gpu):
        if ops and not any(case.op.startswith(o) for o in ops):
            continue
        for backend in backends:
            for dtype in dtypes:
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
