"""Write the cuda backend's GPU-verified op list after a GPU run (scripts/gpu_run.sh calls it).

"auto" prefers the cuda backend for an op on a GPU architecture only when fusedlm/cuda_verified.json lists
the op for that architecture ({"sm_90": {"ops": [...], "why": ...}, "sm_80": ...}: sm_80 and sm_90 can
differ, on Hopper the Triton kernels have wgmma). An op goes in for the GPU the run was on when both hold:
  1. the cuda backend's tests (tests/test_cuda.py, test_cuda_{attention,lora,deberta}.py) ran there (at least one
     not skipped) and none failed;
  2. on every benchmark case of the op where both ran (memory-bound ops, attention, LoRA, DeBERTa), the fusedlm-cuda
     provider was at least as fast (median ms) as fusedlm-triton on the same shape, dtype and mode (the
     -varlen providers likewise, for varlen_attention), and at least one such pair exists.
The other architectures' entries of --base are kept. Copy the written file over fusedlm/cuda_verified.json
and commit it with the benchmark results.

    python scripts/cuda_verified.py --junit OUT/pytest.xml --rows OUT/bench/*.json --out OUT/cuda_verified.json \
        [--arch sm_90] [--base fusedlm/cuda_verified.json]
"""
import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

# benchmark case names (fusedlm/bench/ops_*.py) -> the public op the cuda backend serves
BENCH_TO_OP = (("rms_norm", "rms_norm"), ("layer_norm", "layer_norm"), ("swiglu", "swiglu"),
               ("rope", "apply_rotary_pos_emb"), ("attention", "scaled_dot_product_attention"),
               ("lora", "lora_linear"), ("deberta", "deberta_attention"))
# the modules whose tests run the cuda kernels (not test_cuda_nvcc: no kernel runs there)
CUDA_TEST_MODULE = re.compile(r"(^|\.)test_cuda(_attention|_lora|_deberta)?$")


def cuda_tests_passed(junit_path):
    """(ran, failed) counts of the cuda backend's test cases in a pytest junit XML file."""
    ran = failed = 0
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        module = case.get("classname", "")
        parts = module.split(".")
        # classname: "tests.test_cuda" for a function, "tests.test_cuda_attention.TestDeclined" in a class
        if not any(CUDA_TEST_MODULE.search(".".join(parts[:i + 1])) for i in range(len(parts))):
            continue
        if case.find("skipped") is not None:
            continue
        ran += 1
        failed += case.find("failure") is not None or case.find("error") is not None
    return ran, failed


def public_op(bench_op, suffix=""):
    if suffix == "-varlen":
        return {"attention": "varlen_attention", "deberta": "deberta_varlen_attention"}.get(bench_op.split("_")[0])
    return next((op for prefix, op in BENCH_TO_OP if bench_op.startswith(prefix)), None)


def faster_ops(rows):
    """The public ops whose every (shape, dtype, mode) pair has cuda <= triton, with at least one pair."""
    times = {}
    for r in rows:
        if r.get("kind") not in ("memory", "compute") or r.get("status") != "ok" or not r.get("median_ms"):
            continue
        m = re.fullmatch(r"fusedlm-(cuda|triton)(.*)", r.get("provider", ""))
        if m is None:
            continue
        key = (public_op(r["op"], m.group(2)), r["op"], m.group(2), str(r["shape"]), r["dtype"], r["mode"])
        times.setdefault(key, {})[m.group(1)] = r["median_ms"]
    verdict = {}
    for (op, *_), t in times.items():
        if op is None or len(t) < 2:
            continue
        verdict[op] = verdict.get(op, True) and t["cuda"] <= t["triton"]
    return sorted(op for op, ok in verdict.items() if ok)


def device_arch():
    """sm_XY of this machine's GPU, or None."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}"
    except Exception:  # noqa: BLE001 - no torch / no driver: --arch must say
        pass
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--junit", required=True, help="pytest --junitxml file of the GPU test run")
    p.add_argument("--rows", nargs="+", required=True, help="benchmark JSON row files (fusedlm.bench --out)")
    p.add_argument("--out", required=True, help="where to write {arch: {\"ops\": [...]}, ...}")
    p.add_argument("--arch", default=None, help="the GPU architecture of the run (default: this machine's)")
    p.add_argument("--base", default=os.path.join(os.path.dirname(__file__), "..", "fusedlm", "cuda_verified.json"),
                   help="the current list, whose other architectures are kept")
    a = p.parse_args(argv)
    arch = a.arch or device_arch()
    if arch is None:
        p.error("no GPU here to take the architecture from: pass --arch sm_XY")
    ran, failed = cuda_tests_passed(a.junit)
    rows = []
    for path in a.rows:  # a step cut short may have left none, or a file that is not a row list
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        rows += [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []
    ops = faster_ops(rows) if ran and not failed else []
    reason = (f"the cuda tests: {ran} ran, {failed} failed" if not ran or failed else
              f"the cuda tests passed ({ran}); cuda at least as fast as triton on every case: {ops or 'none'}")
    try:
        with open(a.base) as f:
            merged = {k: v for k, v in json.load(f).items() if re.fullmatch(r"sm_\d+a?", k)}
    except (OSError, ValueError, AttributeError):
        merged = {}
    merged[arch] = {"ops": ops, "why": reason}
    with open(a.out, "w") as f:
        json.dump(merged, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"cuda GPU-verified ops on {arch}: {ops} ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
