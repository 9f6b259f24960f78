"""unpad_input / pad_input: values on hand-built masks, round trips, gradients, bad input.

Plain torch ops (no backend): the expected values are written out by hand or built with a Python loop
over the mask, not with the functions under test.
"""
import pytest
import torch

from fusedlm.ops.padding import pad_input, unpad_input

# Right padding, an all-padding row, left padding, holes, a full row.
MASK = torch.tensor([
    [1, 1, 1, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 1, 1, 1],
    [1, 0, 1, 0, 1],
    [1, 1, 1, 1, 1],
], dtype=torch.bool)


def loop_unpad(hidden, mask):
    """The packed tokens, their flat positions and per-sequence counts, by a Python loop."""
    rows, flat, counts = [], [], []
    B, S = mask.shape
    for b in range(B):
        n = 0
        for s in range(S):
            if mask[b, s]:
                rows.append(hidden[b, s])
                flat.append(b * S + s)
                n += 1
        counts.append(n)
    packed = torch.stack(rows) if rows else hidden.new_zeros((0, *hidden.shape[2:]))
    return packed, flat, counts


def test_hand_built_mask_values(device):
    hidden = torch.randn(5, 5, 3, 4, device=device)
    unpad, indices, cu, max_seqlen = unpad_input(hidden, MASK.to(device))
    assert indices.dtype == torch.int64 and indices.device == hidden.device
    assert indices.tolist() == [0, 1, 2, 12, 13, 14, 15, 17, 19, 20, 21, 22, 23, 24]
    assert cu.dtype == torch.int32 and cu.device == hidden.device
    assert cu.tolist() == [0, 3, 3, 6, 9, 14]
    assert max_seqlen == 5 and type(max_seqlen) is int
    assert unpad.shape == (14, 3, 4) and unpad.dtype == hidden.dtype
    want, flat, counts = loop_unpad(hidden, MASK.to(device))
    assert flat == indices.tolist()
    assert torch.equal(unpad, want)


@pytest.mark.parametrize("lengths,expected_max", [([3, 1, 2], 3), ([0, 0], 0), ([4], 4), ([0, 2, 0], 2)])
def test_max_seqlen_and_cu_seqlens_from_lengths(device, lengths, expected_max):
    S = 4
    mask = torch.tensor([[s < n for s in range(S)] for n in lengths], dtype=torch.bool, device=device)
    _, indices, cu, max_seqlen = unpad_input(torch.randn(len(lengths), S, device=device), mask)
    assert max_seqlen == expected_max
    running = [0]
    for n in lengths:
        running.append(running[-1] + n)
    assert cu.tolist() == running
    assert indices.numel() == sum(lengths)


def test_round_trip_puts_zeros_where_padded(device):
    hidden = torch.randn(5, 5, 7, device=device) + 3  # no zero values: a zero out there is padding
    mask = MASK.to(device)
    unpad, indices, _, _ = unpad_input(hidden, mask)
    back = pad_input(unpad, indices, 5, 5)
    assert back.shape == hidden.shape and back.dtype == hidden.dtype
    assert torch.equal(back[mask], hidden[mask])
    assert torch.equal(back[~mask], torch.zeros_like(hidden[~mask]))


def test_pack_round_trip_is_identity(device):
    """pad then unpad gives back the packed tokens exactly, for a random mask."""
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(4, 9, generator=gen) > 0.4).to(device)
    total = int(mask.sum())
    _, indices, _, _ = unpad_input(torch.zeros(4, 9, device=device), mask)
    packed = torch.randn(total, 2, 3, device=device)
    padded = pad_input(packed, indices, 4, 9)
    again, indices2, _, _ = unpad_input(padded, mask)
    assert torch.equal(again, packed) and torch.equal(indices2, indices)


def test_integer_ids(device):
    """Unpadding input_ids, the common case: integer hidden, no gradient, exact values."""
    ids = torch.arange(25, device=device).view(5, 5) + 100
    unpad, indices, cu, _ = unpad_input(ids, MASK.to(device))
    assert unpad.dtype == torch.int64
    assert unpad.tolist() == [100 + i for i in indices.tolist()]
    back = pad_input(unpad, indices, 5, 5)
    assert torch.equal(back, torch.where(MASK.to(device), ids, 0))


def test_all_padding_batch(device):
    hidden = torch.randn(3, 4, 8, device=device, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool, device=device)
    unpad, indices, cu, max_seqlen = unpad_input(hidden, mask)
    assert unpad.shape == (0, 8) and indices.shape == (0,)
    assert cu.tolist() == [0, 0, 0, 0] and max_seqlen == 0
    back = pad_input(unpad, indices, 3, 4)
    assert torch.equal(back, torch.zeros(3, 4, 8, device=device))
    back.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_empty_batch(device):
    hidden = torch.randn(0, 6, 2, device=device)
    unpad, indices, cu, max_seqlen = unpad_input(hidden, torch.zeros(0, 6, dtype=torch.bool, device=device))
    assert unpad.shape == (0, 2) and cu.tolist() == [0] and max_seqlen == 0
    assert pad_input(unpad, indices, 0, 6).shape == (0, 6, 2)


def test_gradients_are_gather_and_scatter(device):
    hidden = torch.randn(5, 5, 3, device=device, requires_grad=True)
    mask = MASK.to(device)
    unpad, indices, _, _ = unpad_input(hidden, mask)
    g = torch.randn_like(unpad)
    (dh,) = torch.autograd.grad(unpad, hidden, g)
    want = torch.zeros_like(hidden)
    want[mask] = g
    assert torch.equal(dh, want)

    packed = torch.randn(unpad.shape, device=device, requires_grad=True)
    padded = pad_input(packed, indices, 5, 5)
    gp = torch.randn_like(padded)
    (dp,) = torch.autograd.grad(padded, packed, gp)
    assert torch.equal(dp, gp[mask])


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    mask = MASK
    hidden = torch.randn(5, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: unpad_input(h, mask)[0], (hidden,))
    assert torch.autograd.gradgradcheck(lambda h: unpad_input(h, mask)[0], (hidden,))
    _, indices, _, _ = unpad_input(hidden.detach(), mask)
    packed = torch.randn(indices.numel(), 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: pad_input(x, indices, 5, 5), (packed,))
    assert torch.autograd.gradgradcheck(lambda x: pad_input(x, indices, 5, 5), (packed,))


def test_backward_twice_deterministic(device):
    hidden = torch.randn(5, 5, 16, device=device, requires_grad=True)
    unpad, indices, _, _ = unpad_input(hidden, MASK.to(device))
    y = pad_input(unpad * 2, indices, 5, 5)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, hidden, g, retain_graph=True)[0]
    second = torch.autograd.grad(y, hidden, g)[0]
    assert torch.equal(first, second)
    assert torch.equal(first, 2 * g * MASK.to(device)[..., None])


def test_non_contiguous_hidden(device):
    base = torch.randn(5, 7, 5, device=device)
    hidden = base.transpose(0, 1)[:5]  # (5, 5, 5), not contiguous
    assert not hidden.is_contiguous()
    unpad, _, _, _ = unpad_input(hidden, MASK.to(device))
    assert torch.equal(unpad, hidden[MASK.to(device)])


def test_torch_compile_round_trip(device):
    """Data-dependent sizes: compiled with graph breaks allowed, the same values as eager."""
    def fn(h, m):
        u, idx, _, _ = unpad_input(h, m)
        return pad_input(u.sin(), idx, h.shape[0], h.shape[1])

    hidden = torch.randn(5, 5, 4, device=device)
    compiled = torch.compile(fn, backend="aot_eager")
    assert torch.equal(compiled(hidden, MASK.to(device)), fn(hidden, MASK.to(device)))


class TestBadInput:
    def test_mask_not_bool(self):
        with pytest.raises(TypeError, match="key_padding_mask: expected a bool tensor.*got torch.int64"):
            unpad_input(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int64))

    def test_mask_shape(self):
        with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(B, S\) = \(2, 3\).*got \(2, 4\)"):
            unpad_input(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))

    def test_mask_rank(self):
        with pytest.raises(ValueError, match=r"key_padding_mask: expected shape .*got \(2, 3, 1\)"):
            unpad_input(torch.randn(2, 3, 8), torch.ones(2, 3, 1, dtype=torch.bool))

    def test_hidden_rank(self):
        with pytest.raises(ValueError, match="hidden: expected at least 2 dimension"):
            unpad_input(torch.randn(3), torch.ones(1, 3, dtype=torch.bool))

    def test_hidden_not_a_tensor(self):
        with pytest.raises(TypeError, match="hidden: expected a torch.Tensor, got list"):
            unpad_input([[1.0]], torch.ones(1, 1, dtype=torch.bool))

    def test_mask_device(self):
        with pytest.raises(ValueError, match="key_padding_mask: expected a tensor on cpu"):
            unpad_input(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool, device="meta"))

    def test_indices_dtype(self):
        with pytest.raises(TypeError, match="indices: expected an int64 tensor, got torch.int32"):
            pad_input(torch.randn(3, 2), torch.arange(3, dtype=torch.int32), 1, 3)

    def test_indices_rank(self):
        with pytest.raises(ValueError, match="indices: expected a 1-D tensor"):
            pad_input(torch.randn(3, 2), torch.arange(3).view(3, 1), 1, 3)

    def test_indices_count(self):
        with pytest.raises(ValueError, match="indices: expected 3 entries.*got 2"):
            pad_input(torch.randn(3, 2), torch.arange(2), 1, 3)

    @pytest.mark.parametrize("bad", [[0, 1, 6], [-1, 0, 1]])
    def test_indices_out_of_range(self, bad):
        with pytest.raises(ValueError, match=r"indices: expected positions in \[0, batch \* seqlen\) = \[0, 6\)"):
            pad_input(torch.randn(3, 2), torch.tensor(bad), 2, 3)

    def test_batch_not_int(self):
        with pytest.raises(TypeError, match="batch: expected a Python int, got float"):
            pad_input(torch.randn(3, 2), torch.arange(3), 1.0, 3)

    def test_seqlen_negative(self):
        with pytest.raises(ValueError, match="seqlen: expected an int >= 0, got -3"):
            pad_input(torch.randn(0, 2), torch.arange(0), 1, -3)

    def test_hidden_unpad_scalar(self):
        with pytest.raises(ValueError, match="hidden_unpad: expected at least 1 dimension"):
            pad_input(torch.tensor(1.0), torch.arange(1), 1, 1)
