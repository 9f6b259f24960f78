"""What context-parallel attention costs a rank, counted from the implementation: the ring and Ulysses run on
meta tensors (any size, no memory, no arithmetic) with a transport that moves nothing and records every tensor
handed to send / all-to-all and every block attention's matmul flops, while a TorchDispatchMode measures the
peak of the bytes the context-parallel layer holds (every tensor it allocates: buffers, accumulators, merge and
backward temporaries, each block's output and gradients; the attention kernels' own workspace excluded)
(fusedlm.distributed._comm). Nothing here is a formula typed in beside the code: change the ring and the
figures change with it.

    python -m fusedlm.distributed.plan            # the README's tables (markdown)
    python -m fusedlm.distributed.plan --step-times cp_ring_step_<gpu>.json   # compute per step measured

``count(...)`` gives one configuration's figures; ``overlap_table`` / ``memory_table`` the README's tables.
Compute time per ring step: the counted flops over an *assumed* attention rate (ASSUMED_TFLOPS, a bf16
flash-attention kernel on an H100 at long blocks), unless ``--step-times`` gives the rows of
benchmarks/bench_cp_step.py (scripts/gpu_run.sh's cpstep step: the ring's own step functions timed on one GPU);
then every row with a measured time uses it (the faster of the step's two block shapes, c x 2c and 2c x 2c
causal: the step least able to hide its transfer) and says so. What the table leaves out (per-step latency, NCCL
taking SMs, achieved vs peak link bandwidth, the slowest hop of a multi-node ring) is listed in the README.
"""
import argparse
import json

import torch

from . import _dense
from ._comm import DryTransport, live_bytes, recording

ASSUMED_TFLOPS = 400.0  # sustained bf16 attention rate of one H100 assumed for the compute time (not measured)
LINKS = {"NVLink (450 GB/s)": 450e9, "InfiniBand (50 GB/s)": 50e9}  # one direction, per GPU


def count(W, L, H, E, *, Hkv=None, Ev=None, B=1, dtype=torch.bfloat16, causal=True, layout="zigzag",
          strategy="ring", rank=0):
    """Per-rank figures of one attention layer (forward and backward) at world size W over L tokens.

    Returns a dict: sent_fwd / sent_bwd (bytes this rank sends), kv_step (bytes of one ring step's K/V message),
    dkv_step (one backward step's dK/dV message), steps (ring steps with a transfer), shard (bytes of this rank's
    q, k, v, and out), saved (bytes the layer allocated in its forward and still holds when it returns, measured:
    its output and what it keeps for the backward; Ulysses' gathered heads included), peak_fwd / peak_bwd (the
    most bytes alive at once among the tensors the layer allocates during its forward / backward, measured:
    communication buffers, accumulators, temporaries, the blocks' outputs and gradients, its own output and
    gradients; not the attention kernels' workspace nor the inputs), flops_step_fwd / flops_step_bwd (the largest one-step block attention's matmul flops on this
    rank; Ulysses: its one attention).
    """
    Hkv, Ev = Hkv or H, Ev or E
    n = L // W
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(B, H, n, E, **meta, requires_grad=True)
    k = torch.empty(B, Hkv, n, E, **meta, requires_grad=True)
    v = torch.empty(B, Hkv, n, Ev, **meta, requires_grad=True)
    transport = DryTransport(W, rank)
    with recording() as fwd, live_bytes() as mem_fwd:
        out = _dense(q, k, v, transport, causal, E ** -0.5, layout, strategy, "torch")
    saved = mem_fwd.live  # what the layer allocated and still holds once its forward returned (out included)
    dout = torch.empty_like(out)
    with recording() as bwd, live_bytes() as mem_bwd:
        out.backward(dout)
    step = lambda rec, what: max([b for w, b in rec.sends if w == what], default=0)
    # (Ulysses notes its one attention's backward flops when its forward runs)
    flops = lambda phase: max([f for p, f in fwd.blocks + bwd.blocks if p == phase], default=0.0)
    return dict(sent_fwd=fwd.sent(), sent_bwd=bwd.sent(), kv_step=step(fwd, "kv"), dkv_step=step(bwd, "dkv"),
                steps=sum(1 for w, _ in fwd.sends if w == "kv"),
                shard=sum(t.nbytes for t in (q, k, v, out)), saved=saved, peak_fwd=mem_fwd.peak,
                peak_bwd=mem_bwd.peak, flops_step_fwd=flops("fwd"), flops_step_bwd=flops("bwd"))


def _mib(b):
    return f"{b / 2**20:,.0f}" if b >= 2**20 * 10 else f"{b / 2**20:,.1f}"


def _us(seconds):
    return f"{seconds * 1e6:,.0f}"


def memory_table(H=32, Hkv=8, E=128, dtype=torch.bfloat16, Ls=(32768, 131072, 1048576), Ws=(1, 2, 4, 8, 16)):
    """Markdown: per-rank bytes of one causal attention layer, ring (zigzag) and Ulysses."""
    rows = ["| L | W | strategy | shard q, k, v, out MiB | held after fwd MiB | CP layer peak fwd / bwd MiB "
            "| sent fwd / bwd MiB |", "|---:|---:|---|---:|---:|---:|---:|"]
    for L in Ls:
        for W in Ws:
            for strategy in ("ring", "ulysses") if W > 1 else ("ring",):
                c = count(W, L, H, E, Hkv=Hkv, dtype=dtype, strategy=strategy)
                saved = _mib(c["saved"]) if W > 1 else "(the backend's)"
                peak = f"{_mib(c['peak_fwd'])} / {_mib(c['peak_bwd'])}" if W > 1 else "(the backend's)"
                rows.append(f"| {L:,} | {W} | {strategy if W > 1 else '(plain attention)'} | {_mib(c['shard'])} | "
                            f"{saved} | {peak} | "
                            f"{_mib(c['sent_fwd'])} / {_mib(c['sent_bwd'])} |")
    return "\n".join(rows)


def load_step_times(path, H, Hkv, E, dtype="bfloat16"):
    """{(tokens a rank, "fwd" / "bwd"): seconds} from bench_cp_step.py's JSON rows of this H, Hkv, E, dtype: the
    faster of the two block shapes at each n (see the module docstring)."""
    rows = json.loads(open(path).read())
    times = {}
    for r in rows:
        if r.get("op") != "cp_ring_step" or r.get("error") or (r["H"], r["Hkv"], r["E"], r["dtype"]) != (
                H, Hkv, E, str(dtype).replace("torch.", "")):
            continue
        key = (r["tokens_per_rank"], r["mode"])
        times[key] = min(times.get(key, float("inf")), r["median_ms"] / 1e3)
    return times


def overlap_table(H=32, Hkv=8, E=128, dtype=torch.bfloat16, Ls=(32768, 131072, 1048576), Ws=(2, 4, 8, 16),
                  step_times=None):
    """Markdown: per ring step (zigzag, causal), the block's compute time against the K/V transfer (forward) and
    the K/V + dK/dV transfer (backward) on each link; "yes" where compute hides it. Compute: measured where
    ``step_times`` (load_step_times) has the rank's token count, else the counted flops at ASSUMED_TFLOPS."""
    rate = ASSUMED_TFLOPS * 1e12
    step_times = step_times or {}
    head = " | ".join(f"transfer {name} us" for name in LINKS)
    rows = [f"| L | W | tokens a rank | pass | compute a step us | compute from | {head} | hidden on NVLink / IB |",
            "|---:|---:|---:|---|---:|---|" + "---:|" * len(LINKS) + "---|"]
    for L in Ls:
        for W in Ws:
            c = count(W, L, H, E, Hkv=Hkv, dtype=dtype)
            for phase, flops, nbytes in (("fwd", c["flops_step_fwd"], c["kv_step"]),
                                         ("bwd", c["flops_step_bwd"], c["kv_step"] + c["dkv_step"])):
                measured = step_times.get((L // W, phase))
                t_comp = measured if measured is not None else flops / rate
                source = (f"measured ({flops / measured / 1e12:,.0f} TFLOP/s)" if measured is not None
                          else f"assumed {ASSUMED_TFLOPS:.0f} TFLOP/s")
                t_comm = [nbytes / bw for bw in LINKS.values()]
                hidden = " / ".join("yes" if t_comp >= t else "no" for t in t_comm)
                rows.append(f"| {L:,} | {W} | {L // W:,} | {phase} | {_us(t_comp)} | {source} | "
                            + " | ".join(_us(t) for t in t_comm) + f" | {hidden} |")
    return "\n".join(rows)


def threshold_table(E=128, dtype=torch.bfloat16, heads=((32, 8), (32, 32), (64, 8)), W=8):
    """Markdown: the fewest tokens a rank (a power of two) for which a ring step's compute hides its transfer,
    found by counting configurations of growing length."""
    rate = ASSUMED_TFLOPS * 1e12
    rows = ["| H | Hkv | " + " | ".join(f"{p} on {name}" for name in LINKS for p in ("fwd", "bwd")) + " |",
            "|---:|---:|" + "---:|" * (2 * len(LINKS))]
    for H, Hkv in heads:
        cells = []
        for bw in LINKS.values():
            for phase in ("fwd", "bwd"):
                n = 256
                while n <= 2**22:
                    c = count(W, n * W, H, E, Hkv=Hkv, dtype=dtype)
                    flops = c["flops_step_" + phase]
                    nbytes = c["kv_step"] + (c["dkv_step"] if phase == "bwd" else 0)
                    if flops / rate >= nbytes / bw:
                        break
                    n *= 2
                cells.append(f"{n:,}")
        rows.append(f"| {H} | {Hkv} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-rank memory, bytes sent and the overlap condition of "
                                            "context-parallel attention, counted from a dry run.")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--step-times", default=None, metavar="FILE",
                   help="benchmarks/bench_cp_step.py's JSON rows: measured compute per ring step where they have "
                        "the rank's token count")
    args = p.parse_args(argv)
    H, Hkv, E = args.heads, args.kv_heads, args.head_dim
    step_times = load_step_times(args.step_times, H, Hkv, E) if args.step_times else None
    print(f"Per rank, one causal attention layer, B = 1, H = {H}, Hkv = {Hkv}, E = {E}, bfloat16:\n")
    print(memory_table(H, Hkv, E))
    how = (f"measured ({args.step_times}) where the rows have the token count, else" if step_times else "at")
    print(f"\nRing (zigzag, causal) step: compute {how} an assumed {ASSUMED_TFLOPS:.0f} TFLOP/s against the "
          f"transfer:\n")
    print(overlap_table(H, Hkv, E, step_times=step_times))
    print("\nFewest tokens a rank for which each ring step hides its transfer (W = 8, E = 128, bfloat16):\n")
    print(threshold_table(E))


if __name__ == "__main__":
    main()
