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


def _check_place(world, rank, layout):
    for name, value in (("world", world), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
    if world < 1:
        raise ValueError(f"world: expected at least 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world = {world}, got {rank}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")


def check_length(name, length, world, layout="zigzag", what="a length"):
    """Raise ValueError (naming ``name``) unless ``length`` tokens cut evenly into the layout's pieces: W equal
    shards ("contiguous"), 2W equal chunks ("zigzag", W > 1). Nothing is ever dropped silently."""
    pieces = 1 if world == 1 else (2 * world if layout == "zigzag" else world)
    if length % pieces:
        why = (f"2W = {pieces} (layout='zigzag' cuts it into 2W chunks)" if layout == "zigzag"
               else f"W = {pieces} (layout='contiguous' cuts it into W shards)")
        raise ValueError(f"{name}: expected {what} divisible by {why}, got {length}")


def shard_positions(length, world, rank, layout="zigzag", device=None):
    """int64 (length // world,): the global positions rank ``rank`` of ``world`` holds, in its local order.
    ``length`` must be divisible by 2W (zigzag) or W (contiguous): ValueError otherwise."""
    _check_place(world, rank, layout)
    check_length("length", length, world, layout)
    n = length // world
    if layout == "contiguous" or world == 1:
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    c = length // (2 * world)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c, device=device)])


def _varlen_lengths(cu_seqlens, world):
    """The global offsets as a list, every sequence length checked divisible by 2W."""
    cu = cu_seqlens.tolist()
    if world > 1:
        lengths = [end - start for start, end in zip(cu[:-1], cu[1:])]
        if any(n % (2 * world) for n in lengths):
            raise ValueError(f"cu_seqlens: expected every sequence length divisible by 2W = {2 * world} (each "
                             f"sequence is cut into 2W chunks), got lengths {lengths}")
    return cu


def varlen_shard_indices(cu_seqlens, world, rank):
    """int64 (total // world,): the packed tokens rank ``rank`` holds (indices into the global packed axis),
    chunks r and 2W-1-r of each sequence, sequence after sequence. Lengths must be divisible by 2W (ValueError)."""
    _check_place(world, rank, "zigzag")
    cu = _varlen_lengths(cu_seqlens, world)
    parts = []
    for start, end in zip(cu[:-1], cu[1:]):
        parts.append(start + shard_positions(end - start, world, rank, "zigzag", cu_seqlens.device))
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=cu_seqlens.device)
    return torch.cat(parts)


def varlen_shard_positions(cu_seqlens, world, rank):
    """int64 (total // world,): the position within its own sequence of every token rank ``rank`` holds."""
    _check_place(world, rank, "zigzag")
    cu = _varlen_lengths(cu_seqlens, world)
    parts = [shard_positions(end - start, world, rank, "zigzag", cu_seqlens.device)
             for start, end in zip(cu[:-1], cu[1:])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=cu_seqlens.device)


def shard(x, dim, world, rank, layout="zigzag"):
    """The part of a full tensor ``x`` (the sequence along ``dim``) that rank ``rank`` holds. The length along
    ``dim`` must be divisible by 2W (zigzag) or W (contiguous): ValueError otherwise, never a token dropped."""
    _check_place(world, rank, layout)
    check_length("x", x.shape[dim], world, layout, f"a length along dim {dim}")
    return x.index_select(dim, shard_positions(x.shape[dim], world, rank, layout, x.device))


def shard_varlen(x, cu_seqlens, world, rank):
    """The part of packed ``x`` (total, ...) that rank ``rank`` holds (local offsets: cu_seqlens // world).
    Every sequence length must be divisible by 2W and cu_seqlens must end at x's length: ValueError otherwise."""
    if int(cu_seqlens[-1]) != x.shape[0]:
        raise ValueError(f"cu_seqlens: expected offsets ending at x's length {x.shape[0]}, got {int(cu_seqlens[-1])}")
    return x.index_select(0, varlen_shard_indices(cu_seqlens, world, rank).to(x.device))
