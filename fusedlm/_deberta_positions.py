"""DeBERTa's relative positions: Hugging Face's log buckets, the index table the kernels read, and the bucket
runs that bound a tile's kind. Plain torch and Python, below fusedlm/ops: the reference (fusedlm.reference),
the op (fusedlm.ops.deberta, which re-exports these names), the models and the launchers all read them here.

Buckets. make_log_bucket_position is Hugging Face's function, operation for operation and in the same
float32 arithmetic (tests/test_deberta.py checks it equals transformers' for every distance up to well past
8192), so that the index equals the reference code's bit for bit: a ceil of a value a hair off an integer
could go the other way in another implementation. transformers is not imported here. The table is always
built on the CPU: the buckets are those of Hugging Face's function run on the CPU. It is an opaque op
(fusedlm::deberta_relative_index) so that torch.compile never re-derives the buckets with another logarithm.
"""
import functools

import torch

def make_log_bucket_position(relative_pos, bucket_size: int, max_position: int):
    """Hugging Face's make_log_bucket_position (transformers.models.deberta_v2), same ops, same float32
    math: distances below bucket_size // 2 in magnitude stay as they are, longer ones get log buckets
    up to bucket_size - 1 at max_position - 1 (and past it beyond; the caller clamps)."""
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    abs_pos = torch.where((relative_pos < mid) & (relative_pos > -mid),
                          torch.tensor(mid - 1).type_as(relative_pos), torch.abs(relative_pos))
    ratio = torch.tensor((max_position - 1) / mid, dtype=torch.float32)
    log_pos = torch.ceil(torch.log(abs_pos.to(torch.float32) / mid) / torch.log(ratio) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign)


def attention_span(position_buckets: int, max_relative_positions: int) -> int:
    """span: pos_key / pos_query have 2 * span rows."""
    return position_buckets if position_buckets > 0 else max_relative_positions


@functools.lru_cache(maxsize=32)
def _index_table(half: int, position_buckets: int, max_relative_positions: int, device: torch.device) -> torch.Tensor:
    """The int32 table over d = -(half-1)..(half-1), built on the CPU once per (half, params, device) and
    kept on ``device``: later calls copy nothing from the host (no sync, CUDA-graph capturable)."""
    span = attention_span(position_buckets, max_relative_positions)
    d = torch.arange(-(half - 1), half, dtype=torch.long)
    if position_buckets > 0:
        d = make_log_bucket_position(d, position_buckets, max_relative_positions).to(torch.long)
    return torch.clamp(d + span, 0, 2 * span - 1).to(torch.int32).to(device)


@torch.library.custom_op("fusedlm::deberta_relative_index", mutates_args=())
def relative_index_table(seq_len: int, position_buckets: int, max_relative_positions: int,
                         device: torch.device) -> torch.Tensor:
    """int32 (2 seq_len - 1,): entry d + seq_len - 1 is idx(d) = clamp(bucket(d) + span, 0, 2 span - 1),
    for query i and key j at distance d = i - j. A slice of a table cached on ``device`` for the next power
    of two of seq_len, copied on the device (an op returns a new tensor: the cache must not be handed out)."""
    half = max(64, 1 << max(seq_len - 1, 0).bit_length())
    table = _index_table(half, position_buckets, max_relative_positions, torch.device(device))
    return table[half - seq_len:half + seq_len - 1].clone() if seq_len > 0 else table[:0].clone()


@relative_index_table.register_fake
def _(seq_len, position_buckets, max_relative_positions, device):
    return torch.empty(max(2 * seq_len - 1, 0), dtype=torch.int32, device=device)


NEVER = 1 << 29  # a distance no sequence reaches: that run is empty


def relative_band(position_buckets: int, max_relative_positions: int) -> tuple:
    """(D_LO, D_HI, IDX_LO, IDX_HI) for the kernels (fusedlm/kernels/deberta.py): every distance d <= D_LO has
    idx 0 (= IDX_LO) and every d >= D_HI has idx 2 span - 1 (= IDX_HI); -NEVER / NEVER where idx never gets
    there. From the parameters alone, in plain Python arithmetic (torch.compile folds it to constants, for any
    sequence length). The bounds are safe rather than tight: a few distances of margin over a float64 solve of
    Hugging Face's float32 formula (tests/test_deberta.py checks them against the table); distances between
    the runs go through the band, which reads the table itself."""
    span = attention_span(position_buckets, max_relative_positions)
    if position_buckets <= 0:  # idx = clamp(d + span): 0 from d = -span, 2 span - 1 from d = span - 1
        return -span, span - 1, 0, 2 * span - 1
    mid = position_buckets // 2

    def reach(target):
        """A distance from which on |bucket(d)| >= target, or None if it never gets there. For |d| > mid,
        |bucket| = ceil(log(|d| / mid) / log((max - 1) / mid) * (mid - 1)) + mid."""
        if target <= mid:
            return target  # |bucket(d)| = |d| up to mid
        if mid <= 1:
            return None  # the log term is 0: |bucket| stays mid
        # ceil(x (mid - 1)) >= target - mid once x (mid - 1) > target - mid - 1
        x = (target - mid - 1) / (mid - 1)
        d = int(mid * ((max_relative_positions - 1) / mid) ** x)
        return d + 4 + (d >> 12)  # float32's rounding of |d| and of the log grows with |d|: a relative margin

    hi, lo = reach(span - 1), reach(span)  # idx 2 span - 1: bucket >= span - 1; idx 0: bucket <= -span
    # past NEVER no sequence reaches: clamped there (the kernels' int32 block arithmetic stays in range)
    lo = NEVER if lo is None else min(lo, NEVER)
    hi = NEVER if hi is None else min(hi, NEVER)
    return -lo, hi, 0, 2 * span - 1


def relative_index(seq_len, position_buckets, max_relative_positions, device):
    """(S, S) int64 matrix idx(i, j) (the reference's; the kernels read the 1-D table)."""
    table = relative_index_table(seq_len, position_buckets, max_relative_positions, device)
    pos = torch.arange(seq_len, device=device)
    return table[(pos[:, None] - pos[None, :]) + seq_len - 1].long()
