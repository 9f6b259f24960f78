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


def _run(tmp_path, cases, rows=ROWS, arch="sm_90", base=None):
    rows_path = tmp_path / "memory_bound.json"
    rows_path.write_text(json.dumps(rows))
    out = tmp_path / "verified.json"
    base_path = tmp_path / "base.json"
    base_path.write_text(json.dumps(base if base is not None else {}))
    _script().main(["--junit", str(_junit(tmp_path / "pytest.xml", cases)), "--rows", str(rows_path),
                    str(tmp_path / "missing.json"), "--out", str(out), "--arch", arch, "--base", str(base_path)])
    written = json.loads(out.read_text())
    return written[arch]["ops"] if base is None else written


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


def _compute(op, provider, ms, mode="fwd"):
    return dict(_row(op, provider, ms, mode, shape=(8, 4096, 32, 128)), kind="compute")


def test_attention_rows_and_their_varlen_providers(tmp_path):
    """Attention benchmark rows (kind "compute") count too; the -varlen providers decide varlen_attention."""
    rows = [_compute("attention", "fusedlm-cuda", 1.0), _compute("attention", "fusedlm-triton", 1.1),
            _compute("attention", "fusedlm-cuda", 2.0, "bwd"), _compute("attention", "fusedlm-triton", 2.1, "bwd"),
            _compute("attention_padded", "fusedlm-cuda-varlen", 1.5), _compute("attention_padded",
                                                                               "fusedlm-triton-varlen", 1.4),
            _compute("attention", "sdpa-flash", 0.5)]
    cases = [("tests.test_cuda", ""), ("tests.test_cuda_attention.TestDeclined", "")]
    assert _run(tmp_path, cases, rows) == ["scaled_dot_product_attention"]  # varlen: cuda slower


def test_a_failed_cuda_attention_test_lists_nothing(tmp_path):
    cases = [("tests.test_cuda", ""), ("tests.test_cuda_attention", "<failure/>")]
    assert _run(tmp_path, cases) == []


def test_other_architectures_are_kept(tmp_path):
    base = {"sm_80": {"ops": ["rms_norm"], "why": "an A100 run"}, "sm_90": {"ops": ["swiglu"], "why": "old"}}
    written = _run(tmp_path, [("tests.test_cuda", "")], arch="sm_90", base=base)
    assert written["sm_80"] == base["sm_80"]
    assert written["sm_90"]["ops"] == ["apply_rotary_pos_emb", "rms_norm"]


def test_auto_reads_the_list_of_the_devices_architecture(monkeypatch):
    """fusedlm._backend.cuda_verified_ops(device): the entry of that GPU's sm_XY, nothing for CPU tensors."""
    import torch

    from fusedlm import _backend

    monkeypatch.setattr(_backend, "_CUDA_VERIFIED", {"sm_80": frozenset({"rms_norm"}),
                                                      "sm_90": frozenset({"swiglu"})})
    monkeypatch.setattr(_backend, "_ARCH", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capability = {0: (9, 0), 1: (8, 0), 2: (8, 9)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capability[i])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _backend.cuda_verified_ops(torch.device("cuda", 0)) == {"swiglu"}
    assert _backend.cuda_verified_ops(torch.device("cuda", 1)) == {"rms_norm"}
    assert _backend.cuda_verified_ops() == {"rms_norm"}  # the current device
    assert _backend.cuda_verified_ops(torch.device("cuda", 2)) == frozenset()  # never measured
    assert _backend.cuda_verified_ops(torch.device("cpu")) == frozenset()
