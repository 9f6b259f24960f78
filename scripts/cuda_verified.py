"""Write the cuda backend's GPU-verified op list after a GPU run (scripts/gpu_run.sh calls it).

"auto" prefers the cuda backend for an op only when the op is in fusedlm/cuda_verified.json. An op goes
in when both hold on the GPU:
  1. tests/test_cuda.py ran there (at least one test not skipped) and none of its tests failed;
  2. on every memory-bound benchmark case of the op where both ran, the fusedlm-cuda provider was at least
     as fast (median ms) as fusedlm-triton on the same shape, dtype and mode, and at least one such pair
     exists.
Copy the written file over fusedlm/cuda_verified.json and commit it with the benchmark results.

    python scripts/cuda_verified.py --junit OUT/pytest.xml --rows OUT/bench/*.json --out OUT/cuda_verified.json
"""
import argparse
import json
import sys
import xml.etree.ElementTree as ET

# benchmark case names (fusedlm/bench/ops_*.py) -> the public op the cuda backend serves
BENCH_TO_OP = (("rms_norm", "rms_norm"), ("layer_norm", "layer_norm"), ("swiglu", "swiglu"),
               ("rope", "apply_rotary_pos_emb"))


def cuda_tests_passed(junit_path):
    """(ran, failed) counts of tests/test_cuda.py cases in a pytest junit XML file."""
    ran = failed = 0
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        module = case.get("classname", "")
        if not (module.endswith("test_cuda") or ".test_cuda." in module):  # not test_cuda_nvcc.py
            continue
        if case.find("skipped") is not None:
            continue
        ran += 1
        failed += case.find("failure") is not None or case.find("error") is not None
    return ran, failed


def public_op(bench_op):
    return next((op for prefix, op in BENCH_TO_OP if bench_op.startswith(prefix)), None)


def faster_ops(rows):
    """The public ops whose every (shape, dtype, mode) pair has cuda <= triton, with at least one pair."""
    times = {}
    for r in rows:
        if r.get("kind") != "memory" or r.get("status") != "ok" or not r.get("median_ms"):
            continue
        if r.get("provider") not in ("fusedlm-cuda", "fusedlm-triton"):
            continue
        key = (public_op(r["op"]), r["op"], str(r["shape"]), r["dtype"], r["mode"])
        times.setdefault(key, {})[r["provider"]] = r["median_ms"]
    verdict = {}
    for (op, *_), t in times.items():
        if op is None or len(t) < 2:
            continue
        verdict[op] = verdict.get(op, True) and t["fusedlm-cuda"] <= t["fusedlm-triton"]
    return sorted(op for op, ok in verdict.items() if ok)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--junit", required=True, help="pytest --junitxml file of the GPU test run")
    p.add_argument("--rows", nargs="+", required=True, help="benchmark JSON row files (fusedlm.bench --out)")
    p.add_argument("--out", required=True, help="where to write {\"ops\": [...]}")
    a = p.parse_args(argv)
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
    reason = (f"tests/test_cuda.py: {ran} ran, {failed} failed" if not ran or failed else
              f"tests/test_cuda.py passed ({ran}); cuda at least as fast as triton on every case: {ops or 'none'}")
    with open(a.out, "w") as f:
        json.dump({"ops": ops, "why": reason}, f, indent=1)
        f.write("\n")
    print(f"cuda GPU-verified ops: {ops} ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
