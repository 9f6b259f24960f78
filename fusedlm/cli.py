"""The ``fusedlm`` command: verify, info, bench (also ``python -m fusedlm``)."""
import argparse
import json
import sys


def _header(interpreted):
    import torch

    import fusedlm
    from fusedlm import _backend

    lines = [f"fusedlm {fusedlm.__version__}  torch {torch.__version__}  triton {_triton_version()}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"device: {p.name} (sm_{p.major}{p.minor}), CUDA {torch.version.cuda}")
    else:
        lines.append("device: CPU only (no CUDA device)")
    if interpreted:
        lines.append("Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1): correctness only, slow")
    for b in _backend.BACKENDS:
        why = _backend.why_unavailable(b)
        state = "available" if why is None else "unavailable: " + why
        if b == "cuda" and why is None:
            where = "CUDA tensors" if torch.cuda.is_available() else ""
            if _backend.env_flag("FUSEDLM_CUDA_CPU"):
                where += (" and " if where else "") + "CPU tensors through the SIMT harness (FUSEDLM_CUDA_CPU=1)"
            verified = sorted(_backend.cuda_verified_ops())
            state += f" for {where}; auto uses it for {', '.join(verified) if verified else 'no op yet'} " \
                "(GPU-verified, fusedlm/cuda_verified.json)"
        lines.append(f"backend {b:6s}: {state}")
    return "\n".join(lines)


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def cmd_info(args):
    import torch

    from fusedlm import _backend

    print(_header(_backend.triton_interpret()))
    print(f"default backend: {_backend.get_backend()}  (FUSEDLM_BACKEND, set_backend)")
    print(f"available backends, best first: {_backend.available_backends()}")
    print(f"python {sys.version.split()[0]}  cuda build of torch: {torch.version.cuda or 'no'}")
    from fusedlm._toolkit import find_cuda_home

    home, how = find_cuda_home()
    print(f"CUDA toolkit: {home} (found by {how})" if home else f"CUDA toolkit: none ({how})")
    return 0


def cmd_verify(args):
    import torch

    from fusedlm import _backend, verify

    gpu = torch.cuda.is_available()
    if args.backend and "cuda" in args.backend and not gpu and not _backend.env_flag("FUSEDLM_CUDA_CPU"):
        import os

        os.environ["FUSEDLM_CUDA_CPU"] = "1"  # asked for by name: run its kernels through the CPU harness
    interpreted = _backend.triton_interpret()
    if not gpu and not interpreted:
        interpreted = _backend.enable_interpreter()
        from fusedlm import _register_triton_ops

        _register_triton_ops()
    print(_header(interpreted))
    if not gpu and _backend.why_unavailable("cuda") is None:
        print("cuda kernels run on CPU through the SIMT harness (FUSEDLM_CUDA_CPU=1): correctness only, slow")
    backends = args.backend or _backend.available_backends()
    device = "cuda" if gpu else "cpu"

    def dtypes(backend):  # bfloat16 on CPU only through the harness (Triton's interpreter gets it wrong)
        return [torch.float32, torch.float16] + ([torch.bfloat16] if gpu or backend == "cuda" else [])

    print()
    fmt = "{:<46} {:<7} {:<9} {:<24} {:>11} {:>8}  {:<8} {}"
    print(fmt.format("op", "backend", "dtype", "shape", "max rel err", "bound", "worst", "pass"))

    def log(r):
        print(fmt.format(r["op"], r["backend"], r["dtype"], r["shape"], f"{r['max_rel_err']:.2e}",
                         f"{r['bound']:.0e}", r["worst"], "ok" if r["ok"] else "FAIL"), flush=True)
        if "error" in r:
            print(f"    {r['error']}", flush=True)

    rows = verify.run(backends, dtypes, device, gpu=gpu, ops=args.ops, log=log)
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "interpreted": interpreted, "rows": rows}, f, indent=1)
    return 1 if failed or not rows else 0


def cmd_bench(args, rest):
    from fusedlm import bench

    return bench.main(rest)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fusedlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every op and backend here against the float64 reference")
    v.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    v.add_argument("--backend", action="append", choices=["cuda", "triton", "torch"],
                   help="only these backends (repeatable; default: all available)")
    v.add_argument("--ops", nargs="+", metavar="OP", help="only ops whose name starts with one of these")
    sub.add_parser("info", help="torch/triton versions, device, extension, backends")
    sub.add_parser("bench", help="throughput benchmarks (needs a CUDA device); --help for options",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return cmd_verify(args) if args.command == "verify" else cmd_info(args)


if __name__ == "__main__":
    sys.exit(main())
