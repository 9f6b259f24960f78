"""The reference Llama trained on a sequence sharded over a context-parallel group, on gloo processes on CPU:
the loss and every parameter's gradient (summed over the group) equal to the same model run on the whole batch
in one process (float64), and examples/train_long_context.py under torchrun with FSDP2 (2 processes: cp = 2;
4 processes: dp = 2 x cp = 2 on a 2-D DeviceMesh) matching its run without parallelism step by step.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch.multiprocessing as mp

import cp_workers

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOUND = 1e-10  # float64: the sharded run sums the same terms in another order (seen ~1e-15)
PLAIN_LOSS_BOUND = 1e-6  # use_kernels=False computes the loss from float32 logits (as transformers' does):
#                          a float32 sum over a rank's tokens, not one float32 mean (seen 1e-7)


def llama_cases():
    cases = [
        dict(name="world-rows-kernels", group="world", use_kernels=True, B=2, S=32),
        dict(name="world-packed-kernels", group="world", use_kernels=True, B=1, S=64, cu=[0, 16, 48, 64]),
        dict(name="world-rows-plain", group="world", use_kernels=False, B=2, S=32),
        dict(name="pair-rows-kernels", group="pair", use_kernels=True, B=2, S=16),
        dict(name="pair-packed-plain", group="pair", use_kernels=False, B=1, S=24, cu=[0, 8, 24]),
        dict(name="single-rows-kernels", group="single", use_kernels=True, B=2, S=10),
    ]
    cases = [dict(c, kind="llama", seed=i) for i, c in enumerate(cases)]
    return cases + [dict(name="lm-batch-errors", group="world", kind="lm_batch_errors", seed=len(cases))]


def test_sharded_llama_loss_and_gradients_equal_one_process(tmp_path):
    cases = llama_cases()
    env = {"OMP_NUM_THREADS": "1", "FUSEDLM_BACKEND": "torch"}  # float64: the torch backend
    mp.spawn(cp_workers.worker, args=(4, str(tmp_path / "store"), cases, str(tmp_path), env), nprocs=4)
    rows = [row for r in range(4) for row in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert len(rows) == 4 * len(cases)
    plain = {c["name"] for c in cases if c["kind"] == "llama" and not c["use_kernels"]}
    errors = [r for r in rows if r["case"] == "lm-batch-errors"]
    rows = [r for r in rows if r["case"] != "lm-batch-errors"]
    bad = [r for r in rows + errors if "exception" in r]
    bad += [r for r in rows if "exception" not in r and not (
        r["loss"] <= (PLAIN_LOSS_BOUND if r["case"] in plain else BOUND) and r["grads"] <= BOUND)]
    assert not bad, "\n".join(map(str, bad))
    assert {r["world"] for r in rows if r["case"].startswith("world")} == {4}
    for r in errors:  # shard_lm_batch never drops tokens silently
        assert "input_ids: expected a sequence length S divisible by 2W = 8" in r["rows"] and "got 30" in r["rows"], r
        assert "cu_seqlens: expected every sequence length divisible by 2W = 8" in r["packed"], r
        assert "cu_seqlens: expected offsets from 0 to the packed row's 32 tokens" in r["short"], r


def _run_with_kill(cmd, env, timeout):
    """subprocess.run in a session of its own: on timeout the whole process group goes (torchrun's workers
    too, not torchrun alone)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


# float32 on gloo: FSDP2 must reduce with SUM (set_force_sum_reduction_for_comms), gloo has no PREMUL_SUM
@pytest.mark.parametrize("nproc,cp,dtype", [(2, 2, "float32"), (4, 2, "float64")])
def test_example_train_long_context_matches_the_run_without_parallelism(nproc, cp, dtype):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # the torch backend
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "examples" / "train_long_context.py"), "--cp", str(cp), "--steps", "3", "--check",
           "--dtype", dtype, "--backend", "torch", "--seqlen", "32"]
    rc, out, err = _run_with_kill(cmd, env, timeout=300)
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "MISMATCH" not in out and out.count("; gradients ") == 3, out  # every step's gradients compared
    assert "(bound 1e-" in out and out.rstrip().splitlines()[-2].endswith(": ok"), out
    assert f"dp {nproc // cp} x cp {cp}" in out, out


def test_model_rejects_what_context_parallelism_cannot_do():
    import torch

    from fusedlm.models import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    ids = torch.randint(0, 16, (1, 8))
    group = object()  # (rejected before the group is used)
    with pytest.raises(ValueError, match=r"labels: with cp_group expected shift_labels"):
        model(ids, labels=ids, cp_group=group)
    with pytest.raises(ValueError, match=r"attention_mask: expected None with cp_group"):
        model(ids, attention_mask=torch.ones(1, 8), cp_group=group)
    with pytest.raises(ValueError, match=r"labels / shift_labels: expected at most one of them, got both"):
        model(ids, labels=ids, shift_labels=ids)
    # a zigzag shard's positions without its group: refused, not run as a whole sequence
    with pytest.raises(ValueError, match=r"position_ids: expected positions that go up by 1 or restart at 0 .*got 1 "
                                         r"then 6 at index 2; a context-parallel shard"):
        model(ids, position_ids=torch.tensor([[0, 1, 6, 7, 2, 3, 4, 5]]))
    model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))  # packed, restarting at 0: fine
