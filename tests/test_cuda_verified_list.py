"""scripts/cuda_verified.py: which ops the GPU run lets "auto" send to the cuda backend. Checked on
hand-made junit files and benchmark rows (the GPU run feeds it real ones)."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cuda_verified.py"


def _script():
    spec = importlib.util.spec_from_file_location("cuda_verified", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _junit(path, cases):
    body = "".join(f'<testcase classname="{cls}" name="t{i}">{inner}</testcase>' for i, (cls, inner) in enumerate(cases))
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def _row(op, provider, ms, mode="fwd", shape=(16384, 4096)):
    return dict(kind="memory", op=op, shape=list(shape), dtype="bfloat16", mode=mode, provider=provider,
                median_ms=ms, status="ok")


ROWS = [
    _row("rms_norm", "fusedlm-cuda", 1.0), _row("rms_norm", "fusedlm-triton", 1.1),
    _row("rms_norm", "fusedlm-cuda", 2.0, "bwd"), _row("rms_norm", "fusedlm-triton", 2.0, "bwd"),
    _row("rms_norm_residual", "fusedlm-cuda", 1.0), _row("rms_norm_residual", "fusedlm-triton", 1.2),
    _row("layer_norm", "fusedlm-cuda", 1.0), _row("layer_norm", "fusedlm-triton", 1.2),
    _row("layer_norm", "fusedlm-cuda", 3.0, "bwd"), _row("layer_norm", "fusedlm-triton", 2.5, "bwd"),  # slower
    _row("swiglu", "fusedlm-cuda", 1.0), _row("swiglu", "torch-eager", 0.5),  # no triton row: no pair
    _row("rope", "fusedlm-cuda", 0.9), _row("rope", "fusedlm-triton", 1.0),
]


def _run(tmp_path, cases, rows=ROWS):
    rows_path = tmp_path / "memory_bound.json"
    rows_path.write_text(json.dumps(rows))
    out = tmp_path / "verified.json"
    _script().main(["--junit", str(_junit(tmp_path / "pytest.xml", cases)), "--rows", str(rows_path),
                    str(tmp_path / "missing.json"), "--out", str(out)])
    return json.loads(out.read_text())["ops"]


def test_ops_faster_on_every_case_are_listed(tmp_path):
    cases = [("tests.test_cuda", ""), ("tests.test_cuda", "<skipped/>"), ("tests.test_cuda_nvcc", "<failure/>")]
    # layer_norm loses its backward; swiglu has no triton row to compare with; nvcc's failure is not counted
    assert _run(tmp_path, cases) == ["apply_rotary_pos_emb", "rms_norm"]


@pytest.mark.parametrize("cases", [
    [("tests.test_cuda", ""), ("tests.test_cuda", "<failure/>")],
    [("tests.test_cuda", "<error/>")],
    [("tests.test_cuda", "<skipped/>")],          # nothing ran on the GPU
    [("tests.test_norm", "")],                      # the cuda tests never ran (a run stopped by -x)
])
def test_nothing_listed_unless_the_cuda_tests_ran_and_passed(tmp_path, cases):
    assert _run(tmp_path, cases) == []
