"""Every csrc/*.cu compiles with nvcc for sm_80 and sm_90a, with no register spills and 16-byte loads.

ptxas reports (-Xptxas -v) registers, stack and spills per kernel; every kernel the launchers
instantiate (all dtypes, vector widths and register-held variants) must show 0 bytes of spill stores
and loads, and every kernel of the vectorized width must load its rows with 16-byte vector loads
(ld.global.v4 in the PTX, LDG.E.128 in the SASS). The tensor-core primitives' test kernel (tc_selftest.cu)
must hold its fragments in registers (no stack frame) and contain every instruction form simt.h emits:
mma.sync m16n8k16 for its dtype, ldmatrix x1/x2/x4 with and without .trans, cp.async with its
commit and wait. Skipped, saying so, where nvcc is absent. The
compiler output is cached under ~/.cache/fusedlm/nvcc (or $FUSEDLM_CACHE_DIR), keyed by the sources,
the flags and the nvcc version, so only a changed kernel is compiled again (about a minute on 2 cores).
"""
import concurrent.futures
import hashlib
import os
import pathlib
import re
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
ARCHS = ("sm_80", "sm_90a")
FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-cubin", "-Xptxas", "-v", "-keep"]
SOURCES = sorted(p.name for p in CSRC.glob("*.cu"))
# Kernels per .cu file: 3 dtypes x 2 vector widths x variants (norm: 6 forward (5 for the scalar width),
# 5 ds, 1 column-sum; swiglu: forward, backward; rope: 1).
# tc_selftest (the tensor-core primitives' test kernel): one per 16-bit dtype.
# attention: per 16-bit dtype and head-dim bucket (32, 64, 128, 256) a forward, a dQ and a dK/dV kernel (at
# 256 the dK/dV pass is two kernels, dV and dK), and per dtype the backward's delta (a row sum).
# lora: per 16-bit dtype the forward's operand layout and dx's (W and the low-rank Q read transposed).
# deberta: per 16-bit dtype and head-dim bucket (32, 64) a forward, dQ, dK/dV and band kernel; one fold.
EXPECTED = {"norm.cu": 3 * (6 + 5 + 2 * 5 + 2 * 1), "swiglu.cu": 3 * 2 * 2, "rope.cu": 3 * 2, "tc_selftest.cu": 2,
            "attention.cu": 2 * 4, "attention_backward.cu": 2 * (4 + 5 + 1), "lora.cu": 2 * 2,
            "deberta.cu": 2 * 2, "deberta_backward.cu": 2 * 2 * 3 + 1}
TENSOR_CORE = ("tc_selftest.cu", "attention.cu", "attention_backward.cu", "lora.cu", "deberta.cu",
               "deberta_backward.cu")
VECTORIZED = [s for s in SOURCES if s not in TENSOR_CORE]
VEC16 = {"f": 4, "6__half": 8, "13__nv_bfloat16": 8}  # mangled dtype -> elements in 16 bytes


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        candidate = pathlib.Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    return nvcc


def _compile(nvcc, source, arch, cache):
    """(ptxas log, ptx text) for one source and arch, from the cache or a fresh nvcc run."""
    log_path, ptx_path = cache / f"{source}.{arch}.log", cache / f"{source}.{arch}.ptx"
    if not (log_path.exists() and ptx_path.exists()):
        work = cache / f"work_{source}_{arch}"
        work.mkdir(parents=True, exist_ok=True)
        cmd = [nvcc, *FLAGS, f"-arch={arch}", "-keep-dir", str(work), "-o", str(work / "out.cubin"),
               str(CSRC / source)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}"
        ptx = "".join(p.read_text() for p in sorted(work.glob("*.ptx")))
        ptx_path.write_text(ptx)
        log_path.write_text(done.stdout + done.stderr)  # written last: marks the entry complete
        shutil.rmtree(work, ignore_errors=True)
    return log_path.read_text(), ptx_path.read_text()


@pytest.fixture(scope="module")
def compiled():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or CUDA_HOME): the CUDA sources are not compiled on this machine")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256((version + " ".join(FLAGS)).encode())
    for path in sorted(CSRC.glob("*")):
        if path.suffix in (".cu", ".h"):
            key.update(path.name.encode() + path.read_bytes())
    root = os.environ.get("FUSEDLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusedlm")
    cache = pathlib.Path(root) / "nvcc" / key.hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    jobs = [(s, a) for s in SOURCES for a in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda job: _compile(nvcc, *job, cache), jobs))
    return dict(zip(jobs, results))


def parse_ptxas(log):
    """kernel (mangled) -> dict(registers, stack, spill_stores, spill_loads) from a -Xptxas -v log."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
    return {k: v for k, v in kernels.items() if "simt_kernel" in k}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_compiles_without_spills(compiled, source, arch):
    kernels = parse_ptxas(compiled[(source, arch)][0])
    assert len(kernels) == EXPECTED[source], sorted(kernels)
    spilled = {k: v for k, v in kernels.items() if v.get("spill_stores") or v.get("spill_loads")}
    assert not spilled, f"{source} on {arch}: kernels that spill: {spilled}"
    assert all("registers" in v for v in kernels.values())


@pytest.mark.parametrize("source", VECTORIZED)
def test_vectorized_kernels_use_16_byte_loads(compiled, source):
    ptx = compiled[(source, "sm_90a")][1]
    entries = re.split(r"\.entry\s+", ptx)[1:]
    checked = 0
    for entry in entries:
        name = entry.split("(", 1)[0]
        m = re.search(r"(NormFwd|NormBwdRows|NormBwdCols|Swiglu|Rope)I(f|6__half|13__nv_bfloat16)Li(\d+)E", name)
        assert m, name
        body = entry.split("\n}", 1)[0]
        if int(m.group(3)) == VEC16[m.group(2)]:
            assert re.search(r"ld\.global(\.nc)?\.v4\.", body), f"{name}: no 16-byte load"
            checked += 1
        else:
            assert int(m.group(3)) == 1, name
    assert checked == {"norm.cu": 3 * 12}.get(source, EXPECTED[source] // 2)


LDMATRIX_FORMS = [f"ldmatrix.sync.aligned.m8n8.x{x}{t}.shared.b16" for x in (1, 2, 4) for t in ("", ".trans")]
CP_ASYNC_16 = r"cp\.async\.cg\.shared\.global \[%r\d+\], \[%rd\d+\], 16, %r\d+;"  # a 16-byte global -> shared copy
LOAD_16BIT = r"ld\.global(\.nc)?(\.\w+)*\.(u16|b16|f16|s16|bf16)\b"  # a scalar 16-bit global load


def _tensor_core_kernels(compiled, source, arch):
    """[(name, PTX body, its mma.sync form)] of every kernel ``source`` compiles to for ``arch``, after checking
    that none has a stack frame (fragments in local memory) and that there are as many as EXPECTED says."""
    log, ptx = compiled[(source, arch)]
    for name, props in parse_ptxas(log).items():
        assert props["stack"] == 0, f"{name} on {arch}: a stack frame ({props})"
    entries = re.split(r"\.entry\s+", ptx)[1:]
    assert len(entries) == EXPECTED[source]
    out = []
    for entry in entries:
        name, body = entry.split("(", 1)[0], entry.split("\n}", 1)[0]
        ab = "bf16" if "nv_bfloat16" in name else "f16"
        out.append((name, body, f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_core_primitives_compile_to_the_instructions(compiled, arch):
    for name, body, mma in _tensor_core_kernels(compiled, "tc_selftest.cu", arch):
        assert mma in body, name
        missing = [f for f in LDMATRIX_FORMS if f not in body]
        assert not missing, f"{name}: no {missing}"
        assert re.search(CP_ASYNC_16, body), name
        assert "cp.async.commit_group" in body and "cp.async.wait_group 0" in body, name


def _attention_mmas_per_tile(name):
    """mma.sync instructions one trip of the kernel's tile loop holds (its loops over fragments unrolled):
    forward S = Q K^T and O += P V; dQ S, dP = dO V^T and dQ += dS K; dK/dV S^T, then dP^T and dK += dS^T Q
    (dK), dV += P^T dO (dV). Each product of (a x b) by (b x c) over 16 x 8 x 16 tiles is a b c / 2048."""
    m = re.search(r"(AttnFwd|AttnBwdQ|AttnBwdKv)I\w+?Li(\d+)ELi(\d+)E(?:Li(\d+)E)?", name)
    assert m, name
    kind, d, n = m.group(1), int(m.group(2)), int(m.group(3))
    tile = 16 * 4 * d * n // 2048  # one (64 rows x d) by (d x n) product, over the block's 4 warps / 4
    if kind == "AttnFwd":
        return 2 * tile // 4
    if kind == "AttnBwdQ":
        return 3 * tile // 4
    what = int(m.group(4))
    return (1 + 2 * bool(what & 2) + bool(what & 1)) * tile // 4


@pytest.mark.parametrize("source", ["attention.cu", "attention_backward.cu"])
@pytest.mark.parametrize("arch", ARCHS)
def test_attention_kernels_run_on_tensor_cores(compiled, arch, source):
    """Every attention kernel: fragments in registers (no stack), its tile loop on mma.sync with ldmatrix
    (.trans for the B operands stored (k, n)), q / k / v / dO read from global memory only by 16-byte
    cp.async copies (commit, wait for all but the newest group: the double buffer), no 16-bit scalar load."""
    for name, body, mma in _tensor_core_kernels(compiled, source, arch):
        if "AttnDelta" in name:  # the row sum dO . O: no tile, no tensor core
            continue
        mmas = body.count(mma)
        assert mmas >= _attention_mmas_per_tile(name), f"{name}: {mmas} mma.sync"
        for form in ("ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"):
            assert form in body, f"{name}: no {form}"
        assert re.search(CP_ASYNC_16, body), name
        assert "cp.async.commit_group" in body and "cp.async.wait_group 1" in body, name
        assert not re.search(LOAD_16BIT, body), f"{name}: a 16-bit load"
        _assert_pair_stores(name, body)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_kernel_runs_on_tensor_cores(compiled, arch):
    """The LoRA GEMM: no stack, a K-tile trip of 2 k-steps x 8 n-tiles = 16 mma.sync plus the rank step's 8,
    B fragments by ldmatrix.x4 (.trans where W and Q are read as stored, dx's layout), operands read only by
    16-byte cp.async."""
    for name, body, mma in _tensor_core_kernels(compiled, "lora.cu", arch):
        assert body.count(mma) >= 16 + 8, name
        trans = re.search(r"LoraGemmI\w+?Lb([01])E", name).group(1) == "1"
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in body, name  # the A operands
        assert ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in body) == trans, name
        assert re.search(CP_ASYNC_16, body), name
        assert "cp.async.wait_group 1" in body, name
        assert not re.search(LOAD_16BIT, body), f"{name}: a 16-bit load"
        _assert_pair_stores(name, body)


def _assert_pair_stores(name, body):
    """Results leave as two 16-bit values a 32-bit store (store_pair), never byte by byte (a memcpy into a
    T* compiles to four st.global.u8 on the device: it once did, in every output store)."""
    assert re.search(r"st\.global\.(b32|u32)", body), f"{name}: no 32-bit global store"
    assert not re.search(r"st\.global\.(u8|b8|s8)", body), f"{name}: byte stores"


@pytest.mark.parametrize("source", ["deberta.cu", "deberta_backward.cu"])
@pytest.mark.parametrize("arch", ARCHS)
def test_deberta_kernels_run_on_tensor_cores(compiled, arch, source):
    """The DeBERTa kernels: no stack; every tile kernel on mma.sync with ldmatrix x4 and x4.trans, q / k / v /
    dO / the position rows read only by 16-byte cp.async, results stored as 32-bit pairs (the band kernel
    writes its float32 sums, the fold is a plain column sum)."""
    for name, body, mma in _tensor_core_kernels(compiled, source, arch):
        if "DebFold" in name:
            continue
        assert mma in body, name
        for form in ("ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"):
            assert form in body or ("DebFwd" in name and "trans" not in form), f"{name}: no {form}"
        assert re.search(CP_ASYNC_16, body), name
        assert not re.search(LOAD_16BIT, body), f"{name}: a 16-bit load"
        if "DebBand" not in name:
            _assert_pair_stores(name, body)
