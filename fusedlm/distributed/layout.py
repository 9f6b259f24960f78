"""Which tokens of a sequence each rank holds, for the layouts of fusedlm.distributed.

"contiguous": rank r of W holds positions [r L/W, (r+1) L/W).
"zigzag":     the sequence cut into 2W chunks of c = L / (2W); rank r holds chunk r followed by chunk 2W-1-r.
              Under a causal mask the work a query chunk does grows with its position, so pairing an early
              chunk with its mirror gives every rank the same work.
Packed sequences (varlen) are always zigzag, sequence by sequence: rank r holds, for each sequence in order,
its chunks r and 2W-1-r (every length divisible by 2W), so the rank's local offsets are cu_seqlens / W.

These helpers shard full tensors the way the attention expects (inputs, labels, positions) and are what the
tests and fusedlm.models use; they do not communicate.
"""
import torch

LAYOUTS = ("zigzag", "contiguous")


def shard_positions(length, world, rank, layout="zigzag", device=None):
    """int64 (length // world,): the global positions rank ``rank`` of ``world`` holds, in its local order."""
    n = length // world
    if layout == "contiguous" or world == 1:
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    c = length // (2 * world)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c, device=device)])


def varlen_shard_indices(cu_seqlens, world, rank):
    """int64 (total // world,): the packed tokens rank ``rank`` holds (indices into the global packed axis),
    chunks r and 2W-1-r of each sequence, sequence after sequence. Lengths must be divisible by 2W."""
    cu = cu_seqlens.tolist()
    parts = []
    for start, end in zip(cu[:-1], cu[1:]):
        parts.append(start + shard_positions(end - start, world, rank, "zigzag", cu_seqlens.device))
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=cu_seqlens.device)
    return torch.cat(parts)


def varlen_shard_positions(cu_seqlens, world, rank):
    """int64 (total // world,): the position within its own sequence of every token rank ``rank`` holds."""
    cu = cu_seqlens.tolist()
    parts = [shard_positions(end - start, world, rank, "zigzag", cu_seqlens.device)
             for start, end in zip(cu[:-1], cu[1:])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=cu_seqlens.device)


def shard(x, dim, world, rank, layout="zigzag"):
    """The part of a full tensor ``x`` (the sequence along ``dim``) that rank ``rank`` holds."""
    return x.index_select(dim, shard_positions(x.shape[dim], world, rank, layout, x.device))


def shard_varlen(x, cu_seqlens, world, rank):
    """The part of packed ``x`` (total, ...) that rank ``rank`` holds (local offsets: cu_seqlens // world)."""
    return x.index_select(0, varlen_shard_indices(cu_seqlens, world, rank).to(x.device))
