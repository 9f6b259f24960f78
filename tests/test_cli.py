"""The command line, the verify harness itself, and the README's examples."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedlm
from fusedlm.verify import BOUNDS, check_case, rel_err

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fusedlm", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=str(ROOT / "tests"))


def test_verify_runs_every_op_and_writes_json(tmp_path):
    """The main job: without TRITON_INTERPRET in the environment it turns the interpreter on itself."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = _run("verify", "--json", str(tmp_path / "v.json"), env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "CPU interpreter" in out.stdout
    rows = json.loads((tmp_path / "v.json").read_text())["rows"]
    ops = {r["op"].split("(")[0].split("+")[0] for r in rows}
    assert {"rms_norm", "layer_norm", "swiglu", "apply_rotary_pos_emb", "scaled_dot_product_attention",
            "varlen_attention", "lora_linear", "deberta_attention"} <= ops
    assert {r["backend"] for r in rows} >= {"torch", "triton"}
    assert {r["dtype"] for r in rows} >= {"float32", "float16"}
    assert all(r["ok"] and r["max_rel_err"] <= r["bound"] for r in rows)
    assert re.search(r"^\d+ passed, 0 failed$", out.stdout, re.M)


def test_verify_exit_status_is_nonzero_on_a_failure(tmp_path):
    """A sabotaged op (swiglu's silu dropped) must fail verify: the check can fail."""
    code = (
        "import sys, fusedlm\n"
        "fusedlm.swiglu = lambda gate, up, backend=None: gate * up\n"
        "from fusedlm.cli import main\n"
        "sys.exit(main(['verify', '--backend', 'torch', '--ops', 'swiglu']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL" in out.stdout


def test_info():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert f"torch {torch.__version__}" in out.stdout
    assert "backend cuda" in out.stdout and "available backends" in out.stdout


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("fusedlm")
    assert exe is not None
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "verify" in out.stdout and "bench" in out.stdout


def test_rel_err_and_check_case_catch_wrong_answers():
    want = torch.randn(100, dtype=torch.float64)
    assert rel_err(want, want) == 0.0
    assert rel_err(want * (1 + 1e-2), want) == pytest.approx(1e-2)
    assert rel_err(torch.full_like(want, float("nan")), want) == float("inf")
    inputs = dict(x=torch.randn(4, 16, dtype=torch.float64))
    right = check_case(lambda x: x * 2, lambda x: x * 2, inputs, dtype=torch.float16, device="cpu", grad=["x"])
    assert all(e <= BOUNDS[torch.float16] for _, e in right)
    wrong_grad = check_case(lambda x: x * 2 + (x * 0.01).detach(), lambda x: x * 2.01, inputs,
                            dtype=torch.float32, device="cpu", grad=["x"])
    assert dict(wrong_grad)["dx"] > BOUNDS[torch.float32]


def _readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("index", range(len(_readme_python_blocks())))
def test_readme_examples_run(index):
    fusedlm.set_backend(None)
    exec(compile(_readme_python_blocks()[index], f"README block {index}", "exec"), {})


def test_readme_quickstart_holds_two_commands_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```[a-z]*\n(.*?)```", text, re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "fusedlm verify" in lines[0] and "pytest" in lines[1]
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
