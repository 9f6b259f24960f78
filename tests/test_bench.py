"""The benchmark harness on tiny CPU tensors (--cpu-smoke): what a GPU run relies on before it has a GPU.

Each run here is small (one S, few providers); the harness is the same code path as on the GPU.
"""
import json

import pytest
import torch

import fusedlm
from fusedlm import cli
from fusedlm.bench import main
from fusedlm.bench.harness import ROW_KEYS


def _interpreted():
    """Whether fusedlm-triton can serve the smoke run's CPU tensors (Triton's interpreter is on)."""
    return fusedlm._backend.triton_interpret()


def _smoke(tmp_path, *args):
    rc = main(["--cpu-smoke", "--out", str(tmp_path), "--tag", "t", *args])
    rows = json.loads((tmp_path / "t_cpu-smoke.json").read_text())
    return rc, [r for r in rows if r["kind"] != "ceiling"]


def test_bench_refuses_without_gpu_and_bad_arguments(capsys):
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--ops", "swiglu"]) == 2
        assert "no CUDA device here" in capsys.readouterr().err
    assert main(["--cpu-smoke", "--ops", "no_such_op"]) == 2
    assert "--ops: unknown ['no_such_op']" in capsys.readouterr().err


def test_memory_op_rows_count_bytes_and_check_against_eager(tmp_path):
    providers = ["torch-eager"] + (["fusedlm-triton"] if _interpreted() else [])
    rc, rows = _smoke(tmp_path, "--ops", "swiglu", "--providers", ",".join(providers))
    assert rc == 0
    assert {(r["mode"], r["provider"]) for r in rows} == {(m, p) for m in ("fwd", "bwd") for p in providers}
    assert all(set(ROW_KEYS) <= set(r) for r in rows)
    M, N = 48, 200  # SMOKE_SIZES: tokens x hidden, float32: fwd reads gate, up and writes h
    fwd = next(r for r in rows if r["mode"] == "fwd")
    assert fwd["bytes"] == 3 * M * N * 4 and fwd["gbps"] == pytest.approx(fwd["bytes"] / (fwd["median_ms"] * 1e6))
    ours = [r for r in rows if r["provider"] == "fusedlm-triton"]
    assert all(r["status"] == "ok" and r["rel_err_vs"] == "torch-eager" and r["rel_err"] < 1e-5 for r in ours)
    for suffix in (".md", "_summary.md"):
        assert "swiglu" in (tmp_path / f"t_cpu-smoke{suffix}").read_text()


def _varlen_by_sequence(scale=1.0):
    """deberta_varlen_attention as the contract defines it, one sequence at a time on the torch backend."""
    def varlen(q, k, v, pos_key, pos_query, cu_seqlens, max_seqlen, *, position_buckets=256,
               max_relative_positions=512, backend=None):
        outs = []
        for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            one = [x[s:e].transpose(0, 1)[None] for x in (q, k, v)]
            out = fusedlm.deberta_attention(*one, pos_key, pos_query, position_buckets=position_buckets,
                                            max_relative_positions=max_relative_positions, backend="torch")
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs) * scale
    return varlen


def test_deberta_padded_and_packed_rows_match_eager_and_missing_peers_get_rows(tmp_path, monkeypatch):
    """On a padded batch, the padded and the packed (varlen) providers are held to transformers' float32
    module on the real tokens (outputs, d hidden, d rel_embeddings); peers not installed, or CUDA-only,
    give a row with the reason instead of stopping the run."""
    monkeypatch.setattr(fusedlm, "deberta_varlen_attention", _varlen_by_sequence(), raising=False)
    peers = ["flashdeberta", "flashdeberta-varlen", "disentangled-flash", "disentangled-flash-varlen"]
    ours = ["fusedlm-triton-varlen"] + (["fusedlm-triton"] if _interpreted() else [])
    rc, rows = _smoke(tmp_path, "--ops", "deberta_attention_padded", "--seqlens", "16", "--modes", "fwd+bwd",
                      "--providers", ",".join(["hf-eager-fp32"] + ours + peers))
    assert rc == 0
    by = {r["provider"]: r for r in rows}   # fwd+bwd rows: the gradients are compared, and the outputs
    for p in ours:
        assert by[p]["status"] == "ok" and by[p]["rel_err_vs"] == "hf-eager-fp32" and by[p]["rel_err"] < 1e-5, by[p]
    for p in peers:  # on CPU tensors: CUDA only, or not installed
        assert by[p]["status"] == "unavailable" and by[p]["error"]
    assert by["fusedlm-triton-varlen"]["params"]["real_tokens"] == 24   # S = 16, B = 3, half the tokens real
    assert "deberta_attention_padded vs hf-eager" in (tmp_path / "t_cpu-smoke_summary.md").read_text()


def test_deberta_wrong_packed_output_fails_the_run(tmp_path, monkeypatch):
    """A fusedlm provider 10% off its reference is flagged and the run's exit status says so."""
    monkeypatch.setattr(fusedlm, "deberta_varlen_attention", _varlen_by_sequence(scale=1.1), raising=False)
    rc, rows = _smoke(tmp_path, "--ops", "deberta_attention_padded", "--seqlens", "16", "--modes", "fwd",
                      "--providers", "hf-eager-fp32,fusedlm-triton-varlen")
    assert rc == 1
    assert next(r for r in rows if r["provider"] == "fusedlm-triton-varlen")["rel_err"] == pytest.approx(0.1, rel=1e-3)


def test_deberta_varlen_missing_from_the_build_is_a_skipped_row(tmp_path, monkeypatch):
    monkeypatch.delattr(fusedlm, "deberta_varlen_attention", raising=False)
    rc, rows = _smoke(tmp_path, "--ops", "deberta_attention_padded", "--seqlens", "16", "--modes", "fwd",
                      "--providers", "hf-eager-fp32,fusedlm-triton-varlen")
    row = next(r for r in rows if r["provider"] == "fusedlm-triton-varlen")
    assert rc == 0 and row["error"]
    if fusedlm._backend.why_unavailable("triton") is None:  # else "unavailable" first, for Triton itself
        assert row["status"] == "skipped" and "deberta_varlen_attention" in row["error"]
