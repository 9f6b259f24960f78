"""fusedlm.distributed: context-parallel attention on W gloo processes on CPU against float64 attention over
the whole sequence (forward and dq, dk, dv of every rank's shard).

Process start-up (import torch and fusedlm) costs seconds on 2 cores, so all cases share two spawned groups:
4 processes (cases at W = 4 on the default group, W = 2 on the subgroups {0, 1} and {2, 3}, W = 1 on each
rank alone: also the path of a non-default group, whose ranks are translated to global ones) and 8 processes
for a few cheap cases. The case lists are here; tests/cp_workers.py runs them.
"""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import fusedlm
import fusedlm.distributed as fd
from fusedlm.distributed import _ring
from fusedlm.verify import BOUNDS

import cp_workers

# Tolerances: fusedlm.verify's per-dtype bounds on the norm-wise relative error, the same the single-process
# ops are held to. float64 (1e-12): the ring adds one merge (a few roundings) per step to what one attention
# does; seen ~5e-16. float32 (1e-5): each block's output and lse are float32 and the merge is in float32.
# float16 (4 units of roundoff): the blocks' outputs and gradients are rounded to float16 once each before
# their float32 merge / accumulation, so a few roundings, not one, but still within 4u; bfloat16 the same (4u).
# (Measured errors of every case are in the rows: seconds and errors per rank, printed on failure.)


def dense(name, group, strategy, layout, causal, H=4, Hkv=2, L=32, E=8, B=2, **kw):
    return dict(name=name, group=group, kind="dense", strategy=strategy, layout=layout, causal=causal, B=B, H=H,
                Hkv=Hkv, L=L, E=E, **kw)


def packed(name, group, causal, cu=(0, 16, 48, 56), H=4, Hkv=2, E=8, **kw):
    return dict(name=name, group=group, kind="varlen", causal=causal, cu=list(cu), max_seqlen=max(
        b - a for a, b in zip(cu[:-1], cu[1:])), H=H, Hkv=Hkv, E=E, **kw)


def cases_4():
    cases = []
    for group in ("world", "pair"):  # W = 4 and W = 2
        for strategy in ("ring", "ulysses"):
            for layout in ("zigzag", "contiguous"):
                for causal in (False, True):
                    # Hkv = 2: GQA; under Ulysses at W = 4 the K/V heads are repeated (2 does not divide by 4)
                    cases.append(dense(f"{group}-{strategy}-{layout}-causal{int(causal)}", group, strategy, layout,
                                       causal))
        cases += [
            dense(f"{group}-ring-zigzag-mha-Ev16", group, "ring", "zigzag", True, Hkv=4, Ev=16),
            dense(f"{group}-ring-contiguous-mqa", group, "ring", "contiguous", True, Hkv=1, B=1),
            dense(f"{group}-ulysses-zigzag-Ev16", group, "ulysses", "zigzag", True, Ev=16, B=1),
            packed(f"{group}-varlen-causal", group, True),
            packed(f"{group}-varlen", group, False, Hkv=1),
        ]
    cases += [
        dense("single-ring-zigzag", "single", "ring", "zigzag", True),
        dense("single-ulysses", "single", "ulysses", "contiguous", True, L=7),  # W = 1: any length
        packed("single-varlen", "single", True, cu=(0, 5, 12)),
        # a scale that is not 1/sqrt(E); inputs in non-contiguous memory (B, n, H, E) transposed
        dense("world-ring-zigzag-scale", "world", "ring", "zigzag", True, scale=0.3),
        dense("pair-ulysses-contiguous-scale-transposed", "pair", "ulysses", "contiguous", True, scale=0.3,
              transposed=True),
        dense("world-ring-contiguous-transposed", "world", "ring", "contiguous", False, transposed=True),
        packed("pair-varlen-scale-transposed", "pair", True, scale=1.7, transposed=True),
        dense("world-ring-zigzag-float32", "world", "ring", "zigzag", True, dtype="float32"),
        # bfloat16 on the torch backend (the Triton interpreter's bf16 dot is wrong: GPU only there)
        dense("world-ring-zigzag-bfloat16", "world", "ring", "zigzag", True, dtype="bfloat16"),
        packed("pair-varlen-bfloat16", "pair", True, dtype="bfloat16"),
        dense("world-ring-zigzag-float16", "world", "ring", "zigzag", True, dtype="float16"),
        packed("world-varlen-float16", "world", True, dtype="float16"),
        # the Triton kernels under the interpreter (float32: its bf16 dot is wrong; head dims from 16)
        dense("pair-ring-zigzag-triton", "pair", "ring", "zigzag", True, B=1, H=2, Hkv=1, L=16, E=16,
              dtype="float32", backend="triton"),
        packed("pair-varlen-triton", "pair", True, cu=(0, 8, 16), H=2, Hkv=1, E=16, dtype="float32",
               backend="triton"),
        dense("pair-ulysses-triton", "pair", "ulysses", "zigzag", True, B=1, H=2, Hkv=1, L=16, E=16,
              dtype="float32", backend="triton"),
        # bytes really sent, for plan.py's dry run to match
        dict(name="traffic-ring", group="world", kind="traffic", strategy="ring", B=1, H=4, Hkv=2, L=32, E=8),
        dict(name="traffic-ulysses", group="world", kind="traffic", strategy="ulysses", B=1, H=4, Hkv=2, L=32, E=8),
        # failures leave the group usable (bad backend / dtype refused up front, injected block failures)
        dict(dense("recover", "world", "ring", "zigzag", True, B=1), kind="recover"),
        # bad inputs that need the group size to be seen
        dict(name="error-zigzag-odd", group="world", kind="error:dense", strategy="ring", layout="zigzag", H=4,
             Hkv=2, n=3),
        dict(name="error-ulysses-heads", group="world", kind="error:dense", strategy="ulysses",
             layout="contiguous", H=6, Hkv=2, n=4),
        dict(name="error-varlen-lengths", group="world", kind="error:varlen", H=4, Hkv=2, cu=[0, 12]),
        dict(name="error-not-a-member", group="other_pair", kind="error:dense", strategy="ring", layout="zigzag",
             H=4, Hkv=2, n=4),
    ]
    return [dict(c, seed=i) for i, c in enumerate(cases)]


def cases_8():
    cases = [
        dense("world-ring-zigzag", "world", "ring", "zigzag", True, B=1),
        dense("world-ring-contiguous", "world", "ring", "contiguous", True, B=1),
        dense("world-ulysses-zigzag", "world", "ulysses", "zigzag", True, B=1, H=8, Hkv=2),
        dense("world-ring-zigzag-noncausal", "world", "ring", "zigzag", False, B=1),
        dense("world-ulysses-contiguous", "world", "ulysses", "contiguous", True, B=1, H=8, Hkv=2),
        packed("world-varlen", "world", True, cu=(0, 16, 48)),
    ]
    return [dict(c, seed=i) for i, c in enumerate(cases)]


def _run(world, cases, tmp_path):
    env = {k: os.environ[k] for k in ("TRITON_INTERPRET",) if k in os.environ}
    env["OMP_NUM_THREADS"] = "1"
    mp.spawn(cp_workers.worker, args=(world, str(tmp_path / "store"), cases, str(tmp_path), env), nprocs=world)
    rows = []
    for r in range(world):
        rows += json.loads((tmp_path / f"rank{r}.json").read_text())
    return rows


def _check(rows, cases):
    by_name = {c["name"]: c for c in cases}
    bad = []
    for row in rows:
        case = by_name[row["case"]]
        if "exception" in row:
            bad.append((row["case"], row["rank"], row["exception"]))
        elif case["kind"].startswith("error") or case["kind"] == "traffic":
            continue
        else:
            bound = BOUNDS[getattr(torch, case.get("dtype", "float64"))]
            errs = {k: row[k] for k in ("out", "dq", "dk", "dv")}
            if not all(e <= bound for e in errs.values()):  # (a nan fails too)
                bad.append((row["case"], row["rank"], errs, bound))
    assert not bad, "\n".join(map(str, bad))


@pytest.fixture(scope="module")
def rows_4(tmp_path_factory):
    cases = cases_4()
    return cases, _run(4, cases, tmp_path_factory.mktemp("cp4"))


def test_four_ranks_match_float64_attention(rows_4):
    cases, rows = rows_4
    assert len(rows) == 4 * len(cases)
    assert {r["world"] for r in rows if r["case"].startswith("pair")} == {2}
    assert {r["world"] for r in rows if r["case"].startswith("single")} == {1}
    _check(rows, cases)


def test_errors_that_need_the_group(rows_4):
    _, rows = rows_4
    got = {r["case"]: r for r in rows if r["case"].startswith("error") and r["rank"] == 0}
    assert got["error-zigzag-odd"]["raised"] == "ValueError"
    assert "q: expected a shard length divisible by 2" in got["error-zigzag-odd"]["message"]
    assert "got 3" in got["error-zigzag-odd"]["message"]
    assert got["error-ulysses-heads"]["raised"] == "ValueError"
    assert "divisible by the group size 4" in got["error-ulysses-heads"]["message"]
    assert got["error-varlen-lengths"]["raised"] == "ValueError"
    assert "cu_seqlens: expected every sequence length divisible by 2W = 8" in got["error-varlen-lengths"]["message"]
    assert got["error-not-a-member"]["raised"] == "ValueError"
    assert "group: expected a process group this rank belongs to" in got["error-not-a-member"]["message"]


def test_a_failed_call_leaves_the_group_usable(rows_4):
    _, rows = rows_4
    got = [r for r in rows if r["case"] == "recover"]
    assert len(got) == 4
    for r in got:  # every rank raised, each the same error, and the valid call after them was exact (_check)
        assert "backend: expected one of" in r["bad_backend"] and "got 'bogus'" in r["bad_backend"], r
        assert "cannot serve this call" in r["bad_dtype"] and "got torch.float64" in r["bad_dtype"], r
        assert r["fwd"] == "injected block failure" and "injected block failure" in r["bwd"], r


def test_plan_counts_the_bytes_a_real_run_sends(rows_4):
    """fusedlm.distributed.plan's dry run on meta tensors (bytes recorded by its DryTransport) counts what a real
    gloo run handed to torch.distributed (captured around dist.batch_isend_irecv / all_to_all_single in the
    workers, independent of fusedlm's bookkeeping), rank by rank; and what was sent was received."""
    from fusedlm.distributed import plan

    _, rows = rows_4
    for strategy in ("ring", "ulysses"):
        real = [r for r in rows if r["case"] == f"traffic-{strategy}"]
        assert len(real) == 4
        for phase in ("fwd", "bwd"):
            assert sum(r[f"sent_{phase}"] for r in real) == sum(r[f"received_{phase}"] for r in real) > 0
        for r in real:
            dry = plan.count(4, 32, 4, 8, Hkv=2, dtype=torch.float16, strategy=strategy, rank=r["rank"])
            assert (r["sent_fwd"], r["sent_bwd"]) == (dry["sent_fwd"], dry["sent_bwd"])
    ring = plan.count(4, 32, 4, 8, Hkv=2, dtype=torch.float16)
    kv = 2 * (1 * 2 * 8 * 8) * 2  # k and v of one rank: B Hkv n E float16 elements each
    assert ring["sent_fwd"] == 3 * kv and ring["sent_bwd"] == 3 * kv + 4 * 2 * kv  # dK/dV go in float32, W hops


def test_eight_ranks_match_float64_attention(tmp_path):
    cases = cases_8()
    rows = _run(8, cases, tmp_path)
    assert len(rows) == 8 * len(cases)
    _check(rows, cases)


# ---------------------------------------------------------------------------------------------------
# In this process: no group needed


def test_merge_is_attention_over_the_union_and_keeps_empty_rows_zero():
    """The lse merge of two key sets equals attention over both; a row that sees no key in either stays 0 with
    lse -inf (no nan), and a row empty in one set takes the other's result unchanged."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 12, 8, dtype=torch.float64), \
        torch.randn(1, 2, 12, 8, dtype=torch.float64)
    mask = torch.rand(5, 12) < 0.6
    mask[0] = False            # row 0: no key at all
    mask[1, :6] = False        # row 1: keys in the second set only
    mask[1, 6:] = True
    full = fusedlm.reference.sdpa_ref(q, k, v, mask, return_lse=True)
    a = fusedlm.reference.sdpa_ref(q, k[:, :, :6], v[:, :, :6], mask[:, :6], return_lse=True)
    b = fusedlm.reference.sdpa_ref(q, k[:, :, 6:], v[:, :, 6:], mask[:, 6:], return_lse=True)
    out, lse = _ring.merge(a[0], a[1], b[0], b[1])
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.isneginf(lse[..., 0]).all() and (out[..., 0, :] == 0).all()
    torch.testing.assert_close(out, full[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lse, full[1], rtol=1e-13, atol=1e-13)
    assert torch.equal(out[..., 1, :], b[0][..., 1, :])


def test_zigzag_steps_do_equal_work_and_skip_what_the_mask_hides():
    """Causal scores each rank computes at each ring step (the plan the ring follows): zigzag gives every rank and
    every step the same count, the whole causal triangle is covered exactly once; contiguous skips later blocks."""
    W, n = 4, 8  # n tokens a rank
    for layout in ("zigzag", "contiguous"):
        pos = [fd.shard_positions(W * n, W, r, layout) for r in range(W)]
        seen = torch.zeros(W * n, W * n, dtype=torch.int64)
        work = torch.zeros(W, W, dtype=torch.int64)
        for r in range(W):
            for s in range(W):
                src = (r - s) % W
                plan = _ring.step_plan(r, src, True, layout)
                if plan is None:
                    continue
                qp, kp, causal = plan
                half = {None: slice(0, n), "first": slice(0, n // 2), "second": slice(n // 2, n)}
                qi, ki = pos[r][half[qp]], pos[src][half[kp]]
                block = qi[:, None] >= ki[None, :] if causal else torch.ones(len(qi), len(ki), dtype=torch.bool)
                # the plan may only compute scores the causal mask keeps, and never one twice
                assert (qi[:, None] >= ki[None, :])[block].all()
                seen[qi[:, None], ki[None, :]] += block.long()
                work[r, s] = block.sum() if causal else block.numel()
        assert torch.equal(seen, torch.ones(W * n, W * n, dtype=torch.int64).tril())
        if layout == "zigzag":
            assert (work[:, 1:] == n * n // 2).all()  # c x 2c per step off the diagonal
            assert len(set(work.sum(1).tolist())) == 1
        else:
            assert work.sum(1).tolist() == sorted(work.sum(1).tolist()) and work[0].sum() < work[-1].sum()


def test_shards_cover_the_sequence_once():
    for layout in fd.LAYOUTS:
        allpos = torch.cat([fd.shard_positions(48, 4, r, layout) for r in range(4)])
        assert torch.equal(allpos.sort().values, torch.arange(48))
    cu = torch.tensor([0, 16, 48, 56], dtype=torch.int32)
    idx = torch.cat([fd.varlen_shard_indices(cu, 4, r) for r in range(4)])
    assert torch.equal(idx.sort().values, torch.arange(56))
    assert fd.varlen_shard_indices(cu, 4, 1)[:4].tolist() == [2, 3, 12, 13]  # chunks 1 and 6 of 8, length 2


def test_bad_inputs_name_the_argument():
    q, k = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8)
    cpa = fd.context_parallel_attention
    with pytest.raises(ValueError, match=r"layout: expected one of 'zigzag', 'contiguous', got 'ring'"):
        cpa(q, k, k, layout="ring")
    with pytest.raises(ValueError, match=r"strategy: expected one of 'ring', 'ulysses', got 'flash'"):
        cpa(q, k, k, strategy="flash")
    with pytest.raises(ValueError, match=r"k: expected a number of heads dividing q's 4 \(GQA\), got 3"):
        cpa(q, torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"v: expected shape \(1, 2, 8, 8\) \(k.s up to the head dim\), got \(1, 2, 6, 8\)"):
        cpa(q, k, torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor, got 3-D"):
        cpa(q[0], k, k)
    with pytest.raises(TypeError, match=r"v: expected dtype torch.float32 \(the dtype of q\), got torch.float64"):
        cpa(q, k, k.double())
    with pytest.raises(TypeError, match=r"is_causal: expected a bool, got int"):
        cpa(q, k, k, is_causal=1)
    with pytest.raises(TypeError, match=r"group: expected a torch.distributed ProcessGroup or None, got str"):
        cpa(q, k, k, group="world")
    with pytest.raises(ValueError, match=r"group: expected an initialised torch.distributed process group"):
        cpa(q, k, k)
    qv = torch.randn(8, 4, 8)
    with pytest.raises(TypeError, match=r"cu_seqlens: expected dtype torch.int32, got torch.int64"):
        fd.context_parallel_varlen_attention(qv, qv, qv, torch.tensor([0, 8]), 8)
    with pytest.raises(TypeError, match=r"max_seqlen: expected a Python int, got float 8.0"):
        fd.context_parallel_varlen_attention(qv, qv, qv, torch.tensor([0, 8], dtype=torch.int32), 8.0)
    with pytest.raises(ValueError, match=r"max_seqlen: expected a Python int >= 0, got -1"):
        fd.context_parallel_varlen_attention(qv, qv, qv, torch.tensor([0, 8], dtype=torch.int32), -1)


def test_sharding_never_drops_tokens():
    """A length the layout cannot cut evenly raises ValueError naming the argument (it used to drop the tail)."""
    with pytest.raises(ValueError, match=r"length: expected a length divisible by 2W = 8 \(layout='zigzag'.*got 30"):
        fd.shard_positions(30, 4, 0)
    with pytest.raises(ValueError, match=r"length: expected a length divisible by W = 4 \(layout='contiguous'.*got 30"):
        fd.shard_positions(30, 4, 1, "contiguous")
    assert fd.shard_positions(28, 4, 3, "contiguous").tolist() == list(range(21, 28))  # % W is enough there
    assert fd.shard_positions(7, 1, 0).tolist() == list(range(7))                      # W = 1: any length
    with pytest.raises(ValueError, match=r"x: expected a length along dim 1 divisible by 2W = 4.*got 6"):
        fd.shard(torch.randn(2, 6, 3), 1, 2, 0)
    with pytest.raises(ValueError, match=r"rank: expected 0 <= rank < world = 2, got 2"):
        fd.shard_positions(8, 2, 2)
    with pytest.raises(TypeError, match=r"world: expected a Python int, got float"):
        fd.shard_positions(8, 2.0, 0)
    with pytest.raises(ValueError, match=r"layout: expected one of 'zigzag', 'contiguous', got 'ring'"):
        fd.shard_positions(8, 2, 0, "ring")
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)  # 12 is not divisible by 2W = 8
    for fn in (lambda: fd.varlen_shard_indices(cu, 4, 0), lambda: fd.varlen_shard_positions(cu, 4, 0),
               lambda: fd.shard_varlen(torch.randn(20, 2), cu, 4, 0)):
        with pytest.raises(ValueError, match=r"cu_seqlens: expected every sequence length divisible by 2W = 8.*"
                                             r"got lengths \[8, 12\]"):
            fn()
    with pytest.raises(ValueError, match=r"cu_seqlens: expected offsets ending at x's length 24, got 20"):
        fd.shard_varlen(torch.randn(24, 2), cu, 2, 0)


def test_live_bytes_counts_what_the_layer_holds_and_not_the_kernels_insides():
    from fusedlm.distributed._comm import kernel_call, live_bytes

    def kernel(x):
        scratch = torch.empty(1000, device="meta")  # 4000 bytes inside the "kernel": not counted
        return scratch[:10] * 2 + x                  # its 40-byte result: counted

    with live_bytes() as mem:
        a = torch.empty(100, device="meta")          # 400
        b = (a * 2).exp_()                           # 400 more (exp_ in place: nothing)
        del b                                        # back to 400
        view = a[:50].t()                            # a view: nothing
        out = kernel_call(kernel, torch.empty(10, device="meta"))  # the 40-byte argument and the 40-byte result
        del a                                        # its storage lives on through the view
    assert mem.peak == 400 + 400 and mem.live == 400 + 40  # a (alive through its view) and the result
    del view, out


def test_plan_memory_is_measured_and_falls_as_one_over_w():
    """The ring's peak per rank: the forward holds the float32 accumulators, two K/V buffers and one block's
    output; the backward adds dq and three dK/dV accumulators (float32) and one block's temporaries. At W = 2
    and 4 the same layer needs half as much at twice the ranks (to the row-sized temporaries)."""
    from fusedlm.distributed import plan

    H, Hkv, E, L = 4, 2, 16, 1024
    c2, c4 = (plan.count(W, L, H, E, Hkv=Hkv, dtype=torch.bfloat16) for W in (2, 4))
    n = L // 2
    out_f32, kv_bf16, block_out = H * n * E * 4, 2 * Hkv * n * E * 2, H * n * E * 2
    assert out_f32 + 2 * kv_bf16 + block_out <= c2["peak_fwd"] <= out_f32 + 2 * kv_bf16 + block_out + 4 * H * n * 8
    assert c2["peak_bwd"] >= out_f32 + 2 * kv_bf16 + 3 * kv_bf16 * 2 + 2 * block_out  # dq, kv x2, dkv x3, o, do_i
    for key in ("peak_fwd", "peak_bwd", "saved"):
        assert abs(c4[key] * 2 - c2[key]) <= 0.02 * c2[key], key


def test_plan_overlap_table_takes_measured_step_times(tmp_path):
    from fusedlm.distributed import plan

    rows = [dict(op="cp_ring_step", block=b, tokens_per_rank=1024, H=4, Hkv=2, E=16, dtype="bfloat16", mode=m,
                 median_ms=ms) for b, m, ms in (("c x 2c", "fwd", 2.0), ("2c x 2c causal", "fwd", 3.0),
                                                ("c x 2c", "bwd", 7.0), ("2c x 2c causal", "bwd", 6.0))]
    rows.append(dict(rows[0], H=32, median_ms=0.001))  # another shape: ignored
    (tmp_path / "steps.json").write_text(json.dumps(rows))
    times = plan.load_step_times(tmp_path / "steps.json", 4, 2, 16)
    assert times == {(1024, "fwd"): 2e-3, (1024, "bwd"): 6e-3}  # the faster block shape of each pass
    table = plan.overlap_table(4, 2, 16, Ls=(2048, 4096), Ws=(2,), step_times=times)
    assert "| 2,048 | 2 | 1,024 | fwd | 2,000 | measured (" in table
    assert "| 2,048 | 2 | 1,024 | bwd | 6,000 | measured (" in table
    assert "| 4,096 | 2 | 2,048 | fwd |" in table and "assumed 400 TFLOP/s" in table
