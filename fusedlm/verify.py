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
