"""What each spawned rank of tests/test_distributed.py runs (a module of its own so that torch.multiprocessing's
spawned children import it without the test module's fixtures).

Every rank builds the same full float64 inputs from the case's seed, computes the float64 oracle (torch's own
scaled_dot_product_attention over the whole sequence, a block-diagonal mask for packed sequences) and its
gradients, runs fusedlm.distributed on its shard, and reports the norm-wise relative error of its output and
of its dq, dk, dv against its shard of the oracle's.
"""
import json
import os
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dense_oracle(q, k, v, causal, scale=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def packed_oracle(q, k, v, cu, causal, scale=None):
    """q (T, H, E): attention within each packed sequence through a (T, T) block-diagonal mask."""
    T = q.shape[0]
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())
    allowed = seq[:, None] == seq[None, :]
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


def run_case(case, group):
    import fusedlm.distributed as fd

    W, r = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(case["seed"])
    dtype = getattr(torch, case.get("dtype", "float64"))
    H, Hkv, E, Ev = case["H"], case["Hkv"], case["E"], case.get("Ev", case["E"])
    causal, scale = case["causal"], case.get("scale")
    if case["kind"] == "dense":
        B, L = case["B"], case["L"]
        shapes = [(B, H, L, E), (B, Hkv, L, E), (B, Hkv, L, Ev), (B, H, L, Ev)]
    else:
        cu = torch.tensor(case["cu"], dtype=torch.int32)
        T = case["cu"][-1]
        shapes = [(T, H, E), (T, Hkv, E), (T, Hkv, Ev), (T, H, Ev)]
    # the inputs rounded to the case's dtype; the oracle in float64 on those rounded values
    q, k, v, dout = (torch.randn(s, dtype=torch.float64).to(dtype).double() for s in shapes)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    if case["kind"] == "dense":
        ref = dense_oracle(*full, causal, scale)
        layout = case["layout"]
        cut = lambda t: fd.shard(t, 2, W, r, layout)
    else:
        ref = packed_oracle(*full, cu, causal, scale)
        cut = lambda t: fd.shard_varlen(t, cu, W, r)
    ref.backward(dout)
    mine = [cut(t).to(dtype) for t in (q, k, v)]
    if case.get("transposed"):  # the same values in non-contiguous memory: heads outermost in memory
        mine = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in mine]
        assert not any(t.is_contiguous() for t in mine)
    mine = [t.requires_grad_() for t in mine]
    if case["kind"] == "dense":
        out = fd.context_parallel_attention(*mine, group=group, is_causal=causal, layout=layout, scale=scale,
                                            strategy=case["strategy"], backend=case.get("backend", "torch"))
    else:
        out = fd.context_parallel_varlen_attention(*mine, cu, case["max_seqlen"], group=group, causal=causal,
                                                   scale=scale, backend=case.get("backend", "torch"))
    assert out.dtype == dtype and out.shape == cut(ref).shape, (out.dtype, out.shape)
    out.backward(cut(dout).to(dtype))
    return {"out": rel(out, cut(ref)), "dq": rel(mine[0].grad, cut(full[0].grad)),
            "dk": rel(mine[1].grad, cut(full[1].grad)), "dv": rel(mine[2].grad, cut(full[2].grad))}


def run_error_case(case, group):
    """A bad input that only a group of W > 1 can detect: the message it raises."""
    import fusedlm.distributed as fd

    H, Hkv, E = case["H"], case["Hkv"], 8
    try:
        if case["kind"] == "dense":
            q, k = torch.randn(1, H, case["n"], E), torch.randn(1, Hkv, case["n"], E)
            v = k
            fd.context_parallel_attention(q, k, v, group=group, is_causal=True, layout=case["layout"],
                                          strategy=case["strategy"], backend="torch")
        else:
            cu = torch.tensor(case["cu"], dtype=torch.int32)
            n_local = case["cu"][-1] // dist.get_world_size(group)
            qv, kv = torch.randn(n_local, H, E), torch.randn(n_local, Hkv, E)
            fd.context_parallel_varlen_attention(qv, kv, kv, cu, max(case["cu"]), group=group, backend="torch")
    except (ValueError, TypeError) as e:
        return {"raised": type(e).__name__, "message": str(e)}
    return {"raised": None}


def run_traffic_case(case, group):
    """The bytes this rank really handed to torch.distributed (dist.batch_isend_irecv's isend tensors; of
    dist.all_to_all_single's input, all but the chunk that stays here), captured by wrapping those two
    functions, not from fusedlm's own bookkeeping: plan.py's dry run must match them."""
    import fusedlm.distributed as fd

    B, H, Hkv, n, E = case["B"], case["H"], case["Hkv"], case["L"] // dist.get_world_size(group), case["E"]
    q = torch.randn(B, H, n, E, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(B, Hkv, n, E, dtype=torch.float16, requires_grad=True) for _ in range(2))
    sent, received = [0], [0]
    p2p, a2a = dist.batch_isend_irecv, dist.all_to_all_single

    def batch_isend_irecv(ops):
        for op in ops:
            (sent if op.op is dist.isend else received)[0] += op.tensor.nbytes
        return p2p(ops)

    def all_to_all_single(output, input, *args, **kwargs):
        W = dist.get_world_size(kwargs.get("group"))
        sent[0] += input.nbytes - input.nbytes // W  # equal splits: the own chunk does not leave
        received[0] += output.nbytes - output.nbytes // W
        return a2a(output, input, *args, **kwargs)

    dist.batch_isend_irecv, dist.all_to_all_single = batch_isend_irecv, all_to_all_single
    try:
        out = fd.context_parallel_attention(q, k, v, group=group, is_causal=True, strategy=case["strategy"],
                                            backend="torch")
        fwd = (sent[0], received[0])
        out.backward(torch.randn_like(out))
    finally:
        dist.batch_isend_irecv, dist.all_to_all_single = p2p, a2a
    return {"sent_fwd": fwd[0], "sent_bwd": sent[0] - fwd[0], "received_fwd": fwd[1],
            "received_bwd": received[0] - fwd[1]}


def run_recover_case(case, group):
    """Failures must leave the group usable: a backend that cannot serve raises on every rank before anything is
    sent; a block that raises after a transfer was posted (injected at the second ring step, forward and then
    backward, on every rank) re-raises once the posted transfers are done; then a valid call on the same group
    gives the right result (a transfer left pending would hand it the failed call's message, or hang)."""
    import fusedlm.distributed as fd
    from fusedlm.distributed import _ring

    W, r = dist.get_world_size(group), dist.get_rank(group)
    q = torch.randn(1, 4, 8, 8, requires_grad=True)
    res = {}
    try:
        fd.context_parallel_attention(q, q, q, group=group, is_causal=True, backend="bogus")
        res["bad_backend"] = None
    except ValueError as e:
        res["bad_backend"] = str(e)
    try:  # float64 on the triton backend: refused by its dtype reason, before the first transfer
        fd.context_parallel_attention(q.double(), q.double(), q.double(), group=group, backend="triton")
        res["bad_dtype"] = None
    except ValueError as e:
        res["bad_dtype"] = str(e)
    attend = _ring.DenseBlocks.attend
    calls = []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:  # the second block: a transfer is posted and not yet waited on
            raise RuntimeError("injected block failure")
        return attend(self, *args)

    _ring.DenseBlocks.attend = failing
    try:
        for phase in ("fwd", "bwd"):
            calls.clear()
            try:
                if phase == "fwd":
                    fd.context_parallel_attention(q, q, q, group=group, is_causal=False, backend="torch")
                else:
                    _ring.DenseBlocks.attend = attend
                    out = fd.context_parallel_attention(q, q, q, group=group, is_causal=False, backend="torch")
                    _ring.DenseBlocks.attend = failing
                    out.sum().backward()
                res[phase] = None
            except RuntimeError as e:
                res[phase] = str(e)
    finally:
        _ring.DenseBlocks.attend = attend
    res.update(run_case(dict(case, kind="dense"), group))
    return res


def worker(rank, world, store, cases, outdir, backend_env):
    """Entry of each spawned rank: every case on the group it names ("world", "pair": ranks {0,1} / {2,3},
    "single": each rank alone); one JSON list of results per rank. A collective that waits more than 60 s
    raises (gloo's default is 30 minutes); after the first exception the rank runs no further case (its peers
    may be inside another collective by now) and reports the remaining ones as not run."""
    os.environ.update(backend_env)
    torch.set_num_threads(1)  # W processes share 2 cores: more threads each only spin against each other
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    groups = {"world": None}
    if world >= 4:  # every rank creates every group (new_group is collective), then uses its own
        pairs = [dist.new_group([i, i + 1]) for i in range(0, world, 2)]
        groups["pair"] = pairs[rank // 2]
        groups["other_pair"] = pairs[(rank // 2 + 1) % len(pairs)]  # NON_GROUP_MEMBER here: for error cases
    singles = [dist.new_group([i]) for i in range(world)]
    groups["single"] = singles[rank]
    runners = {"traffic": run_traffic_case, "llama": run_llama_case, "recover": run_recover_case,
               "lm_batch_errors": run_lm_batch_errors}
    results, failed = [], None
    for case in cases:
        group = groups[case["group"]]
        t0 = time.perf_counter()
        if failed is not None:
            res = {"exception": f"not run: this rank stopped after the exception in {failed}"}
        else:
            try:
                if case["kind"].startswith("error"):
                    res = run_error_case(dict(case, kind=case["kind"].split(":")[1]), group)
                else:
                    res = runners.get(case["kind"], run_case)(case, group)
            except Exception:  # noqa: BLE001 - reported to the test with its traceback
                res = {"exception": traceback.format_exc()}
                failed = case["name"]
        world_of = dist.get_world_size(group) if case["group"] != "other_pair" else None
        results.append(dict(case=case["name"], world=world_of, rank=rank,
                            seconds=time.perf_counter() - t0, **res))
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# The reference Llama trained on a sharded sequence (tests/test_context_parallel_llama.py)


def run_llama_case(case, group):
    """Loss and every parameter's gradient of one step with the sequence sharded over ``group`` (gradients summed
    over the group), against the same model on the whole batch in this process; float64."""
    import fusedlm.distributed as fd
    from fusedlm.models import LlamaConfig, LlamaForCausalLM

    group = group if group is not None else dist.group.WORLD  # (the model's cp_group=None means no parallelism)
    torch.manual_seed(case["seed"])
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_kernels=case["use_kernels"])
    model = LlamaForCausalLM(config).double()
    ids = torch.randint(0, 64, (case["B"], case["S"]))
    labels = ids.clone()
    labels[ids % 7 == 0] = -100  # some ignored targets: the global count must be right
    cu = torch.tensor(case["cu"], dtype=torch.int32) if case.get("cu") else None
    ref_labels = labels.clone()
    if cu is not None:  # no prediction across a packed boundary (what shard_lm_batch does)
        ref_labels[0, cu[1:-1].long()] = -100
    ref = model(ids, labels=ref_labels, cu_seqlens=cu).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    batch = fd.shard_lm_batch(ids, labels, group=group, cu_seqlens=cu)
    loss = model(**batch, cp_group=group).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    errs = {"loss": abs(loss.item() - ref.item()) / abs(ref.item())}
    worst = 0.0
    for g, r in zip(grads, ref_grads):
        g = g.clone()
        dist.all_reduce(g, group=group)  # each rank holds its tokens' share
        worst = max(worst, rel(g, r))
    errs["grads"] = worst
    return errs


def run_lm_batch_errors(case, group):
    """shard_lm_batch on lengths the zigzag layout cannot cut: the ValueError messages."""
    import fusedlm.distributed as fd

    got = {}
    tries = {"rows": (torch.zeros(2, 30, dtype=torch.long), None),
             "packed": (torch.zeros(1, 32, dtype=torch.long), torch.tensor([0, 12, 32], dtype=torch.int32)),
             "short": (torch.zeros(1, 32, dtype=torch.long), torch.tensor([0, 16], dtype=torch.int32))}
    for name, (ids, cu) in tries.items():
        try:
            fd.shard_lm_batch(ids, ids, group=group, cu_seqlens=cu)
            got[name] = "no error"
        except ValueError as e:
            got[name] = str(e)
    return got
