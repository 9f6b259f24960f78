#!/usr/bin/env bash
# Download the benchmark peers' wheels into .whl/ (ignored by git), for a GPU machine without network:
# scripts/gpu_run.sh installs every .whl/*.whl into /tmp/site there (--no-deps) and puts it on PYTHONPATH.
#
#   liger-kernel        Liger-Kernel's norms, SwiGLU, RoPE and fused linear cross-entropy (needs torch, triton: in the GPU image)
#   flashdeberta        FlashDeBERTa's DeBERTa attention           (needs torch, triton, transformers, einops: in the image)
#   disentangled-flash  DisentangledFlash's DeBERTa attention      (needs torch: in the image)
#   cut-cross-entropy   Apple's Cut Cross-Entropy linear_cross_entropy (needs torch, triton: in the image; 22 KB)
#
# All four are pure-Python wheels (py3-none-any); the platform flags only matter for a binary one.
# Versions are pinned so that a rerun measures the same peers; PEER_WHEELS overrides the list.
# Then carry the folder with the device call: run(command="bash scripts/gpu_run.sh", carry=[".whl"], ...).
#
# Usage:  bash scripts/fetch_wheels.sh        (run where pip has network; uses python3 -m pip download)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
read -r -a wheels <<< "${PEER_WHEELS:-liger-kernel==0.8.5 flashdeberta==0.0.8 disentangled-flash==1.1.1 cut-cross-entropy==25.1.1}"
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wheels[@]}"
ls -l .whl
