"""benchmarks/bench_generate.py (fusedlm/bench/e2e_generate.py) on a tiny float32 model on the CPU
(--cpu-smoke): the same code path as the GPU run (both models built from one transformers config, every
provider's generate timed, the teacher-forced check, the rows and the summary), in seconds.
"""
import json

import pytest

pytest.importorskip("transformers")

from fusedlm.bench import e2e_generate as E  # noqa: E402
from fusedlm.bench.harness import ROW_KEYS  # noqa: E402


def _smoke(tmp_path, *args):
    rc = E.main(["--cpu-smoke", "--out", str(tmp_path), "--tag", "g", *args])
    rows = json.loads((tmp_path / "g_cpu-smoke.json").read_text())
    return rc, rows


def test_cpu_smoke_rows_tokens_and_summary(tmp_path):
    # --backend torch: the compiled provider traces decode_step with fullgraph (dynamo, eager backend)
    rc, rows = _smoke(tmp_path, "--backend", "torch")
    assert rc == 0
    by = {(r["params"]["batch"], r["provider"]): r for r in rows}
    assert set(by) == {(B, p) for B in (1, 2) for p in E.PROVIDERS}
    for (B, provider), r in by.items():
        assert set(ROW_KEYS) <= set(r) and r["op"] == "generate" and r["kind"] == "model"
        assert r["status"] == "ok", (provider, r["error"])
        assert r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 and r["bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(B * 4 / (r["median_ms"] * 1e-3))
        # float32: every provider's greedy tokens equal hf-static's, and are the reference's argmax
        assert r["agree_vs"] == "hf-static" and r["agree_tokens"] == 4, provider
        assert r["max_gap"] < 1e-3
        assert (r["compile_s"] is not None) == provider.endswith("-compiled")
    assert by[(1, E.BASELINE)]["vs_baseline"] == pytest.approx(1.0)
    summary = (tmp_path / "g_cpu-smoke_summary.md").read_text()
    assert "generate B=1 P=8 N=4" in summary and "Issue 18's target" in summary
    assert "hf-static-compiled" in summary and ("**met**" in summary or "**NOT met**" in summary)
    assert "CPU SMOKE TEST" in (tmp_path / "g_cpu-smoke.md").read_text()


def test_wrong_model_fails_its_row(tmp_path, monkeypatch):
    """fusedlm's model with one weight off picks tokens far from transformers' argmax: its row fails."""
    build = E.build_models

    def perturbed(*a, **kw):
        hf, ours = build(*a, **kw)
        ours.model.layers[0].mlp.down_proj.weight.data.mul_(-3.0)
        return hf, ours
    monkeypatch.setattr(E, "build_models", perturbed)
    rc, rows = _smoke(tmp_path, "--batch", "2", "--providers", "fusedlm,hf-static", "--backend", "torch")
    assert rc == 1
    ours = next(r for r in rows if r["provider"] == "fusedlm")
    assert ours["status"] == "failed" and "logit stds below the argmax" in ours["error"]
    assert next(r for r in rows if r["provider"] == "hf-static")["status"] == "ok"


def test_arguments():
    assert E.main(["--cpu-smoke", "--providers", "nope"]) == 2
    args = E.parse_args(["--quick"])
    assert (args.batch, args.new_tokens, args.prompt, args.reps) == ((1,), 64, 128, 2)
    args = E.parse_args([])
    assert (args.batch, args.new_tokens, args.providers) == ((1, 32), 128, E.PROVIDERS)
