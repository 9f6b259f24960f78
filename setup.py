"""fusedlm's build.

A plain Python install everywhere (the Triton kernels in fusedlm/kernels/ need no build step). The CUDA C++
extension ``fusedlm._C`` (sources in csrc/) is built only where it can be: a CUDA build of torch is
importable in the build environment and a CUDA toolkit is found. pyproject.toml keeps torch out of the
isolated build environment on purpose, so the extension is built with

    FUSEDLM_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e .

The extension holds the kernels of csrc/*.cu for CUDA tensors and, compiled from the same source by the
host compiler (csrc/cpu_harness.cpp), the CPU harness that runs them on CPU tensors. Without it the
harness alone is compiled on first use when FUSEDLM_CUDA_CPU=1 (fusedlm/_cuda.py); no install flag.

Environment:
    FUSEDLM_SKIP_CUDA_BUILD=1   never build the extension
    FUSEDLM_FORCE_CUDA_BUILD=1  build it or fail loudly (instead of silently skipping)
    TORCH_CUDA_ARCH_LIST        target architectures (default "8.0;9.0": Ampere and Hopper)
    MAX_JOBS                    parallel compile jobs (read by torch's ninja build)
"""
import glob
import os
import runpy

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def cuda_extension():
    """Return ([ext_modules], cmdclass) for fusedlm._C, or ([], {}) with the reason printed."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if _flag("FUSEDLM_SKIP_CUDA_BUILD"):
        return [], {}, "FUSEDLM_SKIP_CUDA_BUILD is set"
    if not any(s.endswith(".cpp") for s in sources):
        return [], {}, "csrc/ holds no binding layer (.cpp)"
    try:
        import torch
    except ImportError:
        return [], {}, "torch is not importable in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is not a CUDA build"
    # fusedlm/_toolkit.py, run as a file (the package itself is not importable before it is built)
    home, how = runpy.run_path(os.path.join(HERE, "fusedlm", "_toolkit.py"))["find_cuda_home"]()
    if home is None:
        return [], {}, how
    print(f"fusedlm: CUDA toolkit {home} (found by {how})")
    os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cpp_extension.CUDA_HOME = home  # its own guess was made at import, possibly from a wrapper's folder
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        name="fusedlm._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # FUSEDLM_WITH_CUDA: the binding layer registers the CUDA kernels too; FUSEDLM_PY_MODULE: it
        # defines PyInit__C, so `import fusedlm._C` loads the library and its TORCH_LIBRARY registrations.
        define_macros=[("FUSEDLM_WITH_CUDA", None), ("FUSEDLM_PY_MODULE", None)],
        extra_compile_args={
            "cxx": ["-O3"],
            # No --use_fast_math: rsqrtf and expf keep their accuracy (the kernels are held to float64).
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas", "-v",
                     "--threads", "2"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


ext_modules, cmdclass, why_not = cuda_extension()
if why_not is not None:
    if _flag("FUSEDLM_FORCE_CUDA_BUILD"):
        raise RuntimeError(f"FUSEDLM_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {why_not}")
    print(f"fusedlm: building without the CUDA extension ({why_not})")

setup(
    name="fusedlm",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for transformer models, bound to PyTorch autograd",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The Triton kernels live in fusedlm/kernels/: a top-level `kernels` folder in the checkout would be
    # imported as Hugging Face's kernels package (which transformers probes for) whenever the checkout's
    # root is on sys.path (python -m pytest, python -c from the root).
    # csrc/ (the CUDA C++ sources) ships inside the package as fusedlm/csrc, data only: FUSEDLM_CUDA_CPU=1
    # compiles the CPU harness from it on first use, from a wheel or `pip install .` as from the checkout.
    packages=find_packages(include=["fusedlm", "fusedlm.*"]) + ["fusedlm.csrc"],
    package_dir={"fusedlm": "fusedlm", "fusedlm.csrc": "csrc"},
    package_data={"fusedlm": ["cuda_verified.json"], "fusedlm.csrc": ["*.cu", "*.cpp", "*.h", "README.md"]},
    install_requires=[
        # Install torch first (README): an open-ended torch requirement met by nothing pulls a
        # CUDA build of torch with gigabytes of dependencies.
        # The supported range: torch 2.11-2.13 (2.13 on CPU in .ci/run, 2.11 in the GPU image's runs), triton
        # 3.6 to the newest and transformers 5.17 to the newest (the optional Hugging Face integration), both
        # ends of these two tested by .ci/run.
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "pybind11",
        "ninja",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "transformers>=5.17", "peft"],
        "hf": ["transformers>=5.17", "peft"],
    },
    entry_points={"console_scripts": ["fusedlm = fusedlm.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
