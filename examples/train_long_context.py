"""Train the reference Llama on sequences split across GPUs (context parallelism) with FSDP2.

    torchrun --standalone --nproc_per_node 2 examples/train_long_context.py --cp 2            # cp = 2
    torchrun --standalone --nproc_per_node 4 examples/train_long_context.py --cp 2            # dp = 2 x cp = 2
    torchrun --standalone --nproc_per_node 4 examples/train_long_context.py --cp 2 --check --dtype float64

The processes form a DeviceMesh (dp, cp). The cp ranks of one dp replica share a batch: each holds the zigzag
shard of every sequence (fusedlm.distributed.shard_lm_batch: labels shifted before sharding, global rotary
positions) and the model's attention is fusedlm.distributed.context_parallel_varlen_attention over the cp group;
the loss is the replica's mean over all its tokens (fusedlm.distributed.training.global_mean). FSDP2
(``fully_shard``) on the 2-D mesh: parameters sharded over cp and replicated over dp (HSDP); each rank's
gradient is its tokens' share, so the reduction must sum over cp and average over dp: a gradient divide factor
of dp. gloo on CPU, nccl on GPUs. On gloo FSDP2 is told to reduce with plain sums and divide after
(``set_force_sum_reduction_for_comms``): a divide factor other than its reduce-scatter group's size makes it
reduce float32 / bfloat16 gradients with ReduceOp.PREMUL_SUM (NCCL only) and gloo refuses that (and AVG).

The ring runs on a process group of its own (``dist.new_group`` over each cp row of the mesh): with NCCL a
separate communicator, so the ring's transfers do not queue behind FSDP2's reduce-scatters on the mesh's cp
communicator (one NCCL communicator runs its collectives one after another).

--check also trains, in every process, the same model without any parallelism on the full batches of all dp
replicas (the mean of their losses) and compares, step by step, the losses and every parameter's gradient
(``p.grad.full_tensor()`` against the reference's: a gradient scaled by a constant factor shows here even where
AdamW would hide it in the weights), and every parameter at the end; the exit status is non-zero when they
differ by more than the dtype allows.
"""
import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

import fusedlm
from fusedlm.distributed import shard_lm_batch
from fusedlm.models import LlamaConfig, LlamaForCausalLM

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # relative; float32: W-way sums in another order


def batches(args, step, replica, device):
    """(ids, labels) (B, S) of one dp replica at one step: a learnable pattern (token t+1 = perm[token t]) with
    10% noise, the same on every process (seeded by step and replica)."""
    gen = torch.Generator().manual_seed(args.seed * 100003 + step * 101 + replica)
    perm = torch.randperm(args.vocab, generator=torch.Generator().manual_seed(args.seed))
    ids = torch.empty(args.batch, args.seqlen, dtype=torch.long)
    ids[:, 0] = torch.randint(0, args.vocab, (args.batch,), generator=gen)
    for t in range(1, args.seqlen):
        noise = torch.rand(args.batch, generator=gen) < 0.1
        ids[:, t] = torch.where(noise, torch.randint(0, args.vocab, (args.batch,), generator=gen), perm[ids[:, t - 1]])
    return ids.to(device), ids.to(device)


def build(args, dtype, device):
    torch.manual_seed(args.seed)  # the same initial weights everywhere
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seqlen, use_kernels=not args.plain)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cp", type=int, default=None, help="context-parallel size (default: every process)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=64, help="tokens a sequence (divisible by 2 cp)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--backend", default=None, help="fusedlm backend (default: the process default)")
    p.add_argument("--plain", action="store_true", help="use_kernels=False (plain PyTorch ops; the attention's "
                                                        "blocks on the torch backend)")
    p.add_argument("--check", action="store_true", help="compare with a run without parallelism")
    args = p.parse_args(argv)

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    if args.backend:
        fusedlm.set_backend(args.backend)
    dtype = getattr(torch, args.dtype)
    cp = args.cp or world
    if world % cp:
        raise ValueError(f"--cp: expected a divisor of the {world} processes, got {cp}")
    dp = world // cp
    mesh = init_device_mesh(device.type, (dp, cp), mesh_dim_names=("dp", "cp"))
    replica = mesh.get_local_rank("dp")
    # the ring's own group: every process creates every cp row's group (new_group is collective), keeps its own
    rows = [dist.new_group(mesh.mesh[d].tolist()) for d in range(dp)]
    cp_group = rows[replica]

    model = build(args, dtype, device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)  # 2-D mesh: HSDP, replicated over dp, sharded over cp
    fully_shard(model, mesh=mesh)
    gloo = dist.get_backend() == "gloo"
    for m in model.modules():  # sum over cp (each rank holds its tokens' share), mean over dp
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(float(dp))
            if gloo:  # plain SUM reductions, then the division (gloo has no PREMUL_SUM / AVG)
                if not hasattr(m, "set_force_sum_reduction_for_comms"):
                    raise RuntimeError("this torch's FSDP2 has no set_force_sum_reduction_for_comms: on gloo use "
                                       "--dtype float64 (reduced with SUM and a division)")
                m.set_force_sum_reduction_for_comms(True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if args.check:
        ref = build(args, dtype, device)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=args.lr, weight_decay=0.0)

    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    worst = {"loss": 0.0, "grad": 0.0, "weight": 0.0}
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids, labels = batches(args, step, replica, device)
        batch = shard_lm_batch(ids, labels, group=cp_group)
        loss = model(**batch, cp_group=cp_group).loss  # this replica's mean, the same on its cp ranks
        opt.zero_grad(set_to_none=True)
        loss.backward()
        logged = loss.detach().clone()
        dist.all_reduce(logged)
        logged /= world  # (every cp rank of a replica holds the replica's loss)
        line = f"step {step}: loss {logged.item():.6f}"
        if args.check:
            ref_loss = sum(ref(*batches(args, step, d, device)[:1], labels=batches(args, step, d, device)[1]).loss
                           for d in range(dp)) / dp
            ref_opt.zero_grad(set_to_none=True)
            ref_loss.backward()
            diff = abs(logged.item() - ref_loss.item()) / abs(ref_loss.item())
            worst["loss"] = max(worst["loss"], diff)
            ref_grads = dict(ref.named_parameters())
            grad = max(rel(p.grad.full_tensor(), ref_grads[n].grad) for n, p in model.named_parameters())
            worst["grad"] = max(worst["grad"], grad)
            line += (f", without parallelism {ref_loss.item():.6f} (relative difference {diff:.1e}; gradients "
                     f"{grad:.1e})")
            ref_opt.step()
        opt.step()
        if rank == 0:
            print(line, flush=True)
    seconds = time.perf_counter() - t0
    ok = True
    if args.check:
        params = {n: p.full_tensor() for n, p in model.named_parameters()}
        worst["weight"] = max(rel(params[n], p_ref) for n, p_ref in ref.named_parameters())
        ok = max(worst.values()) <= TOLERANCE[dtype]
        if rank == 0:
            print(f"against the run without parallelism, worst relative difference of the losses "
                  f"{worst['loss']:.1e}, of every step's gradients {worst['grad']:.1e}, of the final weights "
                  f"{worst['weight']:.1e} (bound {TOLERANCE[dtype]:.0e}): {'ok' if ok else 'MISMATCH'}", flush=True)
    if rank == 0:
        print(f"dp {dp} x cp {cp} on {world} processes ({device.type}), {args.steps} steps of {args.batch} x "
              f"{args.seqlen} tokens per replica in {seconds:.1f} s", flush=True)
    # every process reaches the teardown, with the sharded models freed, before any leaves it (as in
    # examples/train_tiny.py: without, two-process gloo runs there aborted at exit 4 times in 12)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
