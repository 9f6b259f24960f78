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


def test_kv_cache_decode_rows_check_every_layout_and_cuda_peers_get_rows(tmp_path):
    """A decode step (one query row, GQA) on a contiguous and a paged cache: fusedlm's rows agree with
    SDPA's math backend (float32 here), count the cache's bytes, are forward only; the CUDA-only peers
    (SDPA's flash / cuDNN / memory-efficient backends, FlexAttention) give a row with the reason."""
    ours = ["fusedlm-torch", "fusedlm-torch-paged"] + (
        ["fusedlm-triton", "fusedlm-triton-paged"] if _interpreted() else [])
    peers = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex"]
    rc, rows = _smoke(tmp_path, "--ops", "kv_cache_decode", "--seqlens", "40")
    assert rc == 0
    assert {r["mode"] for r in rows} == {"fwd"}            # inference: no bwd rows though memory ops default to them
    assert {r["case"] for r in rows} == {"B=1 T=40", "B=3 T=40"}
    by = {(r["case"], r["provider"]): r for r in rows}
    H, Hkv, E = 4, 2, 16  # SMOKE_SIZES, float32
    for B in (1, 3):
        case = f"B={B} T=40"
        for p in ours:
            r = by[(case, p)]
            assert r["status"] == "ok" and r["rel_err_vs"] == "sdpa-math" and r["rel_err"] < 1e-5, r
            assert r["bytes"] == (B * 40 * Hkv * 2 * E + 2 * B * H * E) * 4
        for p in peers:
            assert by[(case, p)]["status"] == "unavailable" and by[(case, p)]["error"]
        assert by[(case, "fusedlm-torch-paged")]["params"]["block_size"] == 16   # 40 tokens: 3 blocks, the last partial
    summary = (tmp_path / "t_cpu-smoke_summary.md").read_text()
    assert "kv_cache_decode" in summary and "paged / contiguous" in summary
    rc, rows = _smoke(tmp_path, "--ops", "kv_cache_decode", "--seqlens", "16", "--modes", "bwd")
    assert rc == 0 and rows == []


def test_kv_cache_decode_wrong_output_fails_the_run(tmp_path, monkeypatch):
    """fusedlm.kv_cache_attention 10% off SDPA is flagged on both layouts and the exit status says so."""
    right = fusedlm.kv_cache_attention
    monkeypatch.setattr(fusedlm, "kv_cache_attention", lambda *a, **kw: right(*a, **kw) * 1.1)
    rc, rows = _smoke(tmp_path, "--ops", "kv_cache_decode", "--seqlens", "16",
                      "--providers", "sdpa-math,fusedlm-torch,fusedlm-torch-paged")
    assert rc == 1
    for p in ("fusedlm-torch", "fusedlm-torch-paged"):
        assert all(r["rel_err"] == pytest.approx(0.1, rel=1e-3) for r in rows if r["provider"] == p)


@pytest.mark.parametrize("gpu_gb", [80, 141])
def test_kv_cache_decode_cases_at_gpu_sizes_leave_out_caches_over_the_cap(monkeypatch, gpu_gb):
    """B in {1, 8, 64} x T in {1k ... 128k}, bf16: on an H100 (80 GB) every (B, T) but B = 64 x 128k (32 GiB of
    K + V a layout, three copies do not fit), on an H200 (141 GB) all; SDPA's math backend and the torch
    reference only on caches up to 256 MiB. No tensor is made."""
    import types

    from fusedlm.bench import ops_kv_cache
    from fusedlm.bench.cases import Sizes

    monkeypatch.setattr(ops_kv_cache, "device_memory", lambda device: gpu_gb * 10**9)
    run = types.SimpleNamespace(sizes=Sizes(), quick=False, seqlens_given=False, dtype=torch.bfloat16,
                                device=torch.device("cuda"), seed=0)
    cases = ops_kv_cache.kv_cache_cases(run)
    got = {(c.params["batch"], c.params["cache_len"]) for c in cases}
    want = {(B, T) for B in (1, 8, 64) for T in (1024, 4096, 16384, 32768, 131072)}
    assert got == (want - {(64, 131072)} if gpu_gb == 80 else want)
    for c in cases:
        assert c.modes == ("fwd",) and c.grad == ()
        assert c.params["cache_bytes"] == 2 * c.params["batch"] * c.params["cache_len"] * 8 * 128 * 2
        assert ("sdpa-math" in c.providers) == (c.params["cache_bytes"] <= 256 << 20)
        assert {"sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex", "fusedlm-triton",
                "fusedlm-triton-paged"} <= set(c.providers)


def test_linear_cross_entropy_rows_check_against_eager_and_cuda_peers_get_rows(tmp_path):
    """The loss op on tiny float32 CPU tensors (N = 64, D = 32, V = 100; then 6 targets ignored): fusedlm's
    rows agree with the eager logits path, count 2 / 8 N' V D FLOPs, have fwd and fwd+bwd only; Liger and
    Cut Cross-Entropy (CUDA only) give a row with the reason."""
    ours = ["fusedlm-torch"] + (["fusedlm-triton"] if _interpreted() else [])
    peers = ["liger", "cce"]
    rc, rows = _smoke(tmp_path, "--ops", "loss", "--providers", ",".join(["torch-eager"] + ours + peers))
    assert rc == 0
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    by = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    for case, counted in (("V=100", 64), ("V=100 ignored=6", 58)):
        for mode, factor in (("fwd", 2), ("fwd+bwd", 8)):
            for p in ["torch-eager"] + ours:
                r = by[(case, mode, p)]
                assert r["status"] == "ok" and r["rel_err_vs"] == "torch-eager" and r["rel_err"] < 1e-5, r
                assert r["flops"] == factor * counted * 100 * 32 and r["params"]["ignored"] == 64 - counted
            for p in peers:
                assert by[(case, mode, p)]["status"] == "unavailable" and by[(case, mode, p)]["error"]
    assert "fusedlm / cce peak" in (tmp_path / "t_cpu-smoke_summary.md").read_text()


def test_linear_cross_entropy_wrong_output_fails_the_run(tmp_path, monkeypatch):
    """fusedlm.linear_cross_entropy 10% off the eager loss is flagged and the exit status says so."""
    right = fusedlm.linear_cross_entropy
    monkeypatch.setattr(fusedlm, "linear_cross_entropy", lambda *a, **kw: right(*a, **kw) * 1.1)
    rc, rows = _smoke(tmp_path, "--ops", "loss", "--providers", "torch-eager,fusedlm-torch", "--modes", "fwd")
    assert rc == 1
    ours = [r for r in rows if r["provider"] == "fusedlm-torch"]
    assert ours and all(r["rel_err"] == pytest.approx(0.1, rel=1e-3) for r in ours)


def test_linear_cross_entropy_peak_bytes_counted_on_meta():
    """The meta-tensor count: the fused path holds the gradients and bounded chunks, the logits path the
    (N, V) float32 logits twice (the saved log-softmax and its gradient)."""
    from fusedlm.bench.memory import MiB, lce_peak_bytes, logits_ce_peak_bytes

    N, V, D = 16384, 32000, 4096
    grads = (N + V) * D * 2
    assert grads <= lce_peak_bytes(N, V, D) <= grads + 64 * MiB
    assert logits_ce_peak_bytes(N, V, D) >= 2 * N * V * 4


def test_train_step_smoke_rows_for_every_provider(tmp_path):
    """benchmarks/bench_train_step.py --cpu-smoke: a tiny Llama in float32, fusedlm on its torch backend;
    hf-sdpa and both fusedlm providers measured with the same first loss, Liger unavailable on CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    previous = fusedlm.get_backend()
    try:
        rc = mod.main(["--cpu-smoke", "--out", str(tmp_path), "--backend", "torch"])
    finally:
        fusedlm.set_backend(None if previous == "auto" else previous)
    rows = {r["provider"]: r for r in json.loads((tmp_path / "train_step_cpu-smoke.json").read_text())}
    assert rc == 0 and set(rows) == {"hf-sdpa", "hf-liger", "fusedlm-patched", "fusedlm-model"}
    for p in ("hf-sdpa", "fusedlm-patched", "fusedlm-model"):
        r = rows[p]
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["tokens"] == 64, r
        assert r["loss_rel_diff"] <= 1e-4 and r["loss_vs"] == "hf-sdpa"
    assert rows["hf-liger"]["status"] == "unavailable" and rows["hf-liger"]["error"]
