"""The tensor-core primitives of csrc/simt.h (mma.m16n8k16, ldmatrix, cp.async) through the test-only
kernel csrc/tc_selftest.cu (op ``fusedlm_C::tc_selftest``).

Without a GPU the kernel runs on CPU through the SIMT harness (FUSEDLM_CUDA_CPU=1, set for this module),
whose host implementation of each instruction gathers the 32 lanes' registers: these tests pin that
emulation to

* a float64 matmul of the rounded inputs: D = A B + C (two k-steps of 16, two n-tiles of 8), and
  E = round(D) B[:16] (D's accumulators repacked as an A fragment, the P V step of attention), in float16
  and bfloat16, for every ldmatrix form the kernels use for B (x1, x2, x4; B^T as stored, or B with .trans);
* the PTX ISA's lane-to-element maps ("Matrix Fragments for mma.m16n8k16 with floating point type" and
  ldmatrix), written out again below independently of the C++: each lane's registers, as the kernel dumps
  them, must hold exactly the elements the maps name;
* cp.async: zero-filled rows (src-size 0), and a missing ``cp.async.wait_group`` shows as NaN on the host.

On a GPU machine with fusedlm._C built the same cases run the real instructions on CUDA tensors, so the
maps and results are then checked against the hardware. The nvcc side (the instructions are in the PTX,
no local memory) is tests/test_cuda_nvcc.py.

Tolerance. Products of two float16 / bfloat16 values are exact in float32; the order and internal
rounding of the sum inside one mma are not specified by NVIDIA (measured: products aligned to the largest
exponent and truncated, Fasi et al. 2021). The harness forms each mma's sum in double and rounds once to
float32, so on CPU the result must equal that exactly (per k-step: D1 = fl32(A0 B0 + C), D = fl32(A1 B1 +
D1)); on any device |D - ref| <= 2^-16 (|A| |B| + |C|) elementwise, a bound the hardware's truncating
adds (17 terms, ~2^-23 each relative to the largest) meets with room.
"""
import pytest
import torch

from helpers import cuda_harness  # noqa: F401  (module fixture: FUSEDLM_CUDA_CPU=1)

DTYPES = [torch.float16, torch.bfloat16]




@pytest.fixture
def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def selftest(a, b, c, m_valid=32, ldm_x=4, b_trans=False, wait=True, misalign=False):
    return torch.ops.fusedlm_C.tc_selftest(a, b, c, m_valid, ldm_x, b_trans, wait, misalign)


def inputs(dtype, dev, b_trans, seed, m_valid=32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(32, 32, generator=g).to(dtype)
    bmat = torch.randn(32, 16, generator=g).to(dtype)  # B (k, n)
    c = torch.randn(32, 16, generator=g)
    a_eff = a.clone()
    a_eff[m_valid:] = 0  # rows cp.async zero-fills
    b_arg = bmat if b_trans else bmat.t().contiguous()
    return a.to(dev), b_arg.to(dev), c.to(dev), a_eff, bmat, c


# ---- The PTX ISA maps, stated independently of csrc/simt.h (g = lane >> 2, t = lane % 4).

def a_elem(lane, i):  # A (16 x 16), element i of 8: 4 registers x 2 halves (low half first)
    g, t = lane >> 2, lane % 4
    return g + (8 if i in (2, 3, 6, 7) else 0), 2 * t + (i & 1) + (8 if i >= 4 else 0)


def b_elem(lane, i):  # B (16 x 8), element i of 4: (k, n)
    g, t = lane >> 2, lane % 4
    return 2 * t + (i & 1) + (8 if i >= 2 else 0), g


def c_elem(lane, i):  # C / D (16 x 8), element i of 4
    g, t = lane >> 2, lane % 4
    return g + (8 if i >= 2 else 0), 2 * t + (i & 1)


def test_maps_cover_each_tile_once():
    for elem, n, shape in ((a_elem, 8, (16, 16)), (b_elem, 4, (16, 8)), (c_elem, 4, (16, 8))):
        cells = sorted(elem(lane, i) for lane in range(32) for i in range(n))
        assert cells == sorted((r, q) for r in range(shape[0]) for q in range(shape[1]))


def halves(regs):
    """int32 registers (..., n) -> their 16-bit halves (..., 2 n) as int64 bit patterns, low half first."""
    r = regs.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([r & 0xFFFF, r >> 16], dim=-1).flatten(-2)


def bits(x):
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def expected_d(a_eff, bmat, c):
    """The harness's D: each mma's sum in double, rounded once to float32, k-step by k-step."""
    d = c.clone()
    for kk in range(2):
        ks = slice(16 * kk, 16 * kk + 16)
        d = (a_eff[:, ks].double() @ bmat[ks].double() + d.double()).float()
    return d


@pytest.mark.parametrize("ldm_x", [1, 2, 4])
@pytest.mark.parametrize("b_trans", [False, True], ids=["bT_stored", "b_stored_trans"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_against_float64(dtype, b_trans, ldm_x, dev):
    for seed, m_valid in ((0, 32), (1, 32), (2, 27)):
        a, b, c, a_eff, bmat, c_cpu = inputs(dtype, dev, b_trans, seed, m_valid)
        d, e, _, _ = selftest(a, b, c, m_valid, ldm_x, b_trans)
        d, e = d.cpu(), e.cpu()
        assert d.isfinite().all() and e.isfinite().all()
        ref = a_eff.double() @ bmat.double() + c_cpu.double()
        bound = 2.0**-16 * (a_eff.double().abs() @ bmat.double().abs() + c_cpu.double().abs())
        assert ((d.double() - ref).abs() <= bound).all(), (d.double() - ref).abs().max()
        # E = round(D) B[:16]: one mma from zero.
        p = d.to(dtype).double()
        ref_e = p[:, :16] @ bmat[:16].double()
        bound_e = 2.0**-16 * (p[:, :16].abs() @ bmat[:16].double().abs())
        assert ((e.double() - ref_e).abs() <= bound_e).all()
        if dev == "cpu":  # the harness's own arithmetic, exactly
            torch.testing.assert_close(d, expected_d(a_eff, bmat, c_cpu), rtol=0, atol=0)
            torch.testing.assert_close(e, ref_e.float(), rtol=0, atol=0)
        assert (d[m_valid:] == c_cpu[m_valid:]).all()  # zero-filled rows of A add exact zeros


@pytest.mark.parametrize("ldm_x", [1, 2, 4])
@pytest.mark.parametrize("b_trans", [False, True], ids=["bT_stored", "b_stored_trans"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fragments_follow_the_ptx_maps(dtype, b_trans, ldm_x, dev):
    """Each thread's registers after ldmatrix (A, B), after the mma (accumulators) and after pack2 (P)."""
    m_valid = 29
    a, b, c, a_eff, bmat, _ = inputs(dtype, dev, b_trans, 7, m_valid)
    d, _, frags, acc = selftest(a, b, c, m_valid, ldm_x, b_trans)
    d, frags, acc = d.cpu(), halves(frags.cpu()), acc.cpu()
    a_bits, b_bits, p_bits = bits(a_eff), bits(bmat), bits(d.to(dtype))
    for tid in range(64):
        lane, row0 = tid % 32, 16 * (tid // 32)
        for kk in range(2):
            for i in range(8):  # A registers of k-step kk: frags[tid, 4 kk + i // 2], half i % 2
                r, q = a_elem(lane, i)
                assert frags[tid, 8 * kk + i] == a_bits[row0 + r, 16 * kk + q], (tid, kk, i)
            for nt in range(2):  # B registers of k-step kk, n-tile nt: frags[tid, 8 + 4 kk + 2 nt + i // 2]
                for i in range(4):
                    k, n = b_elem(lane, i)
                    got = frags[tid, 16 + 8 * kk + 4 * nt + i]
                    assert got == b_bits[16 * kk + k, 8 * nt + n], (tid, kk, nt, i)
        for i in range(8):  # P = round(D) as an A fragment: columns 0..15 of D's two n-tiles
            r, q = a_elem(lane, i)
            assert frags[tid, 32 + i] == p_bits[row0 + r, q], (tid, i)
        for nt in range(2):
            for i in range(4):
                r, q = c_elem(lane, i)
                assert acc[tid, 4 * nt + i] == d[row0 + r, 8 * nt + q], (tid, nt, i)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_missing_cp_async_wait_reads_poison(dtype, dev):
    """The harness lands a cp.async in shared memory only at the wait that retires it; without the wait
    the tiles read as the NaN poison. (On a GPU that is a race, not checked here.)"""
    if dev != "cpu":
        pytest.skip("a missing wait is a race on the device")
    a, b, c, *_ = inputs(dtype, dev, False, 3)
    d, _, _, _ = selftest(a, b, c, wait=False)
    assert d.isnan().all()


def test_misaligned_ldmatrix_is_an_error(dev):
    """A row address off 16 bytes faults on the device; the harness raises instead of reading it."""
    if dev != "cpu":
        pytest.skip("a misaligned ldmatrix faults on the device")
    a, b, c, *_ = inputs(torch.float16, dev, False, 4)
    with pytest.raises(RuntimeError, match="ldmatrix row address is not 16-byte aligned"):
        selftest(a, b, c, misalign=True)
