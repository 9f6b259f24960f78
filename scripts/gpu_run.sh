#!/usr/bin/env bash
# The one script a GPU session runs, from the repository root, in one call:
#
#   env        nvidia-smi, versions of python, torch, triton, CUDA, nvcc, transformers, peft, einops
#   wheels     the peers' wheels carried in .whl/ (liger-kernel, flashdeberta, disentangled-flash: fetched
#              here by scripts/fetch_wheels.sh; the GPU machine has no network) into /tmp/site, put on
#              PYTHONPATH, then each peer imported once  (skipped with a note when .whl/ holds none)
#   install    CUDA_HOME from fusedlm/_toolkit.py (where nvcc really runs from) unless set, then
#              pip install --no-build-isolation --no-deps -e .  (builds fusedlm._C where nvcc is found;
#              if that build fails, installs again without it so the Triton paths still get tested)
#   info       python -m fusedlm info
#   verify     python -m fusedlm verify --json $OUT/verify.json
#   tests      python -m pytest -x -q tests
#   memory     python -m fusedlm.bench --ops norm,swiglu,rope --quick   (rms_norm, layer_norm, swiglu, rope)
#   decode     python -m fusedlm.bench --ops kv_cache --quick    (kv_cache_attention's decode step beside SDPA's
#              backends and FlexAttention, contiguous and paged caches)
#   attention  python -m fusedlm.bench --ops attention --quick   (every provider but FlexAttention)
#   lora       python -m fusedlm.bench --ops lora --quick
#   deberta    python benchmarks/bench_deberta.py --quick --seqlens 128,512,2048,8192 --modes fwd,fwd+bwd
#              (fusedlm's DeBERTa attention vs transformers' eager DisentangledSelfAttention, FlashDeBERTa
#              and DisentangledFlash: dense, then padded batches with the packed -varlen providers; time,
#              peak memory, speedups over eager and issue 8's targets at the end of its summary)
#   flex       python -m fusedlm.bench --ops attention --quick --providers sdpa-flash,sdpa-efficient,fusedlm-triton,flex
#              (last, on what is left of the budget: FlexAttention compiles per shape, tens of seconds)
#   then a status table per step and the benchmark summary tables, last.
#   Opt-in steps (only when GPU_RUN_STEPS names them: they do not fit the default 9 minutes beside the others):
#   loss       python benchmarks/bench_cross_entropy.py --quick --modes fwd+bwd --seqlens 32000,256000
#              (fused linear + cross-entropy beside F.cross_entropy eager / compiled, Liger, Cut Cross-Entropy)
#   trainstep  python benchmarks/bench_train_step.py --quick    (Llama-1B step: hf-sdpa, hf-liger, fusedlm)
#   generate   python benchmarks/bench_generate.py --quick      (Llama-1B tokens/s against transformers' generate)
#   cpstep     python benchmarks/bench_cp_step.py: one context-parallel ring step's compute on this GPU (the
#              ring's own step functions, forward and backward with its recompute, for the block shapes of
#              fusedlm.distributed.plan's overlap table: c x 2c and 2c x 2c causal, H 32, Hkv 8, E 128, bf16,
#              2k..128k tokens a rank), rows in $OUT/bench/cp_ring_step_<gpu>.json, then
#              python -m fusedlm.distributed.plan --step-times <those rows> > $OUT/bench/context_parallel_plan_measured.md
#   e.g. a second call: GPU_RUN_STEPS=install,loss,trainstep,generate bash scripts/gpu_run.sh
#                       GPU_RUN_STEPS=install,cpstep bash scripts/gpu_run.sh   (about 1-2 minutes)
#
# The benchmark results go to $OUT/bench/ (memory_bound_*, attention_*, lora_*, deberta_*, attention_flex_*: .json,
# .md, _summary.md, .png) and are copied to benchmarks/results/.
#
# No network is used. Every step logs to $OUT/<step>.log (OUT defaults to ./gpu_out) and runs under a
# time cap drawn from one overall budget (GPU_RUN_BUDGET_S, default 510 s; a step's kill grace is 10 s),
# so the whole run ends within 9 minutes. Each benchmark step has a reserve (GPU_RUN_MEMORY_S 90,
# GPU_RUN_DECODE_S 60, GPU_RUN_ATTENTION_S 120, GPU_RUN_LORA_S 45, GPU_RUN_DEBERTA_S 120): the tests are capped so that the reserves of all five stay, and each benchmark
# step so that those of the later ones stay; time a step leaves unused goes to the next. Inside a
# benchmark step the harness starts no new measurement after --budget-s (its cap less a margin), so a
# step cut short still writes the rows it measured. A failing step does not stop the later ones.
# Exit status 0 if every step passed, else 1.
#
# Knobs:  GPU_RUN_STEPS=install,attention  only these steps, plus env and wheels (default all; e.g. a
#                                          second call for the benchmarks; install is needed on a fresh machine)
#         GPU_RUN_QUICK=0                  full benchmark sizes (S = 1024..16384, longer timing loops)
#         GPU_RUN_AUTOTUNE=1               --autotune for the attention benches (FUSEDLM_AUTOTUNE=1)
#         GPU_RUN_DEBERTA_SEQLENS=512,2048 the DeBERTa lengths (default 128,512,2048,8192)
#
# Usage:  bash scripts/gpu_run.sh          OUT=/path bash scripts/gpu_run.sh
# As one device call, after `bash scripts/fetch_wheels.sh` here:
#         run(command="bash scripts/gpu_run.sh", carry=[".whl"], timeout_s=570)
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export REPO="$PWD"
export OUT="${OUT:-$REPO/gpu_out}"
rm -rf "$OUT/bench"   # this script's own output: no stale results from an earlier run get copied below
mkdir -p "$OUT/bench"
export PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"                       # parallel nvcc jobs for the extension build
BUDGET_S="${GPU_RUN_BUDGET_S:-510}"
MEMORY_S="${GPU_RUN_MEMORY_S:-90}"
DECODE_S="${GPU_RUN_DECODE_S:-60}"
ATTENTION_S="${GPU_RUN_ATTENTION_S:-120}"
LORA_S="${GPU_RUN_LORA_S:-45}"
DEBERTA_S="${GPU_RUN_DEBERTA_S:-120}"
export DEBERTA_SEQLENS="${GPU_RUN_DEBERTA_SEQLENS:-128,512,2048,8192}"
export STEPS="${GPU_RUN_STEPS:-all}"
QUICK=(); [[ ${GPU_RUN_QUICK:-1} == 1 ]] && QUICK=(--quick)
AUTOTUNE=(); [[ ${GPU_RUN_AUTOTUNE:-0} == 1 ]] && AUTOTUNE=(--autotune)
export BENCH_FLAGS="${QUICK[*]}" ATTN_FLAGS="${QUICK[*]} ${AUTOTUNE[*]}"
unset TRITON_INTERPRET FUSEDLM_BACKEND                  # the real GPU paths, the "auto" backend

STEP_NAMES=() STEP_STATUS=() STEP_SECS=() STEP_NOTE=()

# run_step NAME CAP_S FUNCTION: runs the exported shell function FUNCTION under `timeout`, capped at
# min(CAP_S, what is left of the budget), with its output shown and tee'd to $OUT/NAME.log; records
# pass / FAIL(rc) / TIMEOUT / SKIPPED. The function sees its cap as $STEP_CAP.
run_step() {
  local name=$1 cap=$2 fn=$3
  # Not selected by GPU_RUN_STEPS: no row at all (env and wheels always run: cheap, and needed; the opt-in
  # steps only when named).
  local optin=" loss trainstep generate cpstep "
  [[ ($STEPS == all && $optin != *" $name "*) || $name == env || $name == wheels || ",$STEPS," == *",$name,"* ]] \
    || return 0
  local left=$(( BUDGET_S - SECONDS - 5 ))
  (( cap > left )) && cap=$left
  local t0=$SECONDS rc status
  if (( cap < 15 )); then
    echo "== $name: skipped, the time budget is spent" | tee "$OUT/$name.log"
    status="SKIPPED"
  else
    echo
    echo "== $name (cap ${cap}s, $(date -u +%H:%M:%S))"
    STEP_CAP=$cap timeout -k 10 "$cap" bash -c "$fn" 2>&1 | tee "$OUT/$name.log"
    rc=$?   # with pipefail: the step's status (tee does not fail)
    case $rc in
      0) status="pass" ;;
      124|137) status="TIMEOUT(${cap}s)" ;;
      *) status="FAIL(rc=$rc)" ;;
    esac
  fi
  STEP_NAMES+=("$name") STEP_STATUS+=("$status") STEP_SECS+=($(( SECONDS - t0 )))
  STEP_NOTE+=("$(tail -n 1 "$OUT/$name.log" 2>/dev/null | cut -c1-90)")
}

step_env() {
  local rc=0
  nvidia-smi || rc=1
  echo
  "$PY" - <<'EOF' || rc=1
import importlib.metadata as md, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB")
for name in ("triton", "transformers", "peft", "einops", "numpy", "pytest", "setuptools", "ninja", "matplotlib"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc not found"; fi
  echo "nproc $(nproc)"
  return $rc
}

step_wheels() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
  # Import each peer once: a wheel that does not fit this torch/triton/transformers shows here, by name.
  PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import importlib, importlib.metadata as md
for dist, module in (("liger-kernel", "liger_kernel.transformers.rms_norm"), ("flashdeberta", "flashdeberta.model"),
                     ("disentangled-flash", "disentangled_flash")):
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        print(f"{dist}: no wheel carried (scripts/fetch_wheels.sh)")
        continue
    try:
        importlib.import_module(module)
        print(f"{dist} {version}: imports")
    except Exception as e:  # noqa: BLE001 - the benchmark rows will say the same
        print(f"{dist} {version}: import of {module} FAILED: {type(e).__name__}: {e}")
EOF
}

step_install() {
  local pip=("$PY" -m pip install --no-index --no-build-isolation --no-deps -e .)
  # The toolkit, stated: torch's own guess takes the folder above the first nvcc on the PATH, which is
  # wrong for a wrapper script (CUDA_HOME=/usr/local, no cuda_runtime_api.h there). fusedlm/_toolkit.py
  # asks nvcc where it runs from; setup.py prints what it used.
  if [[ -z ${CUDA_HOME:-} ]] && CUDA_HOME=$("$PY" fusedlm/_toolkit.py); then
    export CUDA_HOME
  fi
  echo "CUDA_HOME=${CUDA_HOME:-<none found>}"
  # The first attempt leaves 45 s of the cap for the fallback (`timeout 0` would mean no limit).
  if timeout $(( STEP_CAP > 60 ? STEP_CAP - 45 : 15 )) "${pip[@]}"; then
    return 0
  fi
  echo "install failed (the CUDA extension build?); installing without it so the Triton paths still run"
  FUSEDLM_SKIP_CUDA_BUILD=1 "${pip[@]}"
  return 1   # still a failure: the extension did not build
}

step_info() {
  "$PY" -m fusedlm info
}

step_verify() {
  "$PY" -m fusedlm verify --json "$OUT/verify.json"
}

step_tests() {
  "$PY" -m pytest -x -q tests -p no:cacheprovider --junitxml="$OUT/pytest.xml"
}

# bench_args TAG: the harness's --out/--tag/--budget-s for a benchmark step. It stops starting new
# measurements after --budget-s; the margin (a third of the cap, at most 60 s) covers the one running
# then: a cold torch.compile of a forward and backward takes tens of seconds.
bench_args() {
  local margin=$(( STEP_CAP / 3 < 60 ? STEP_CAP / 3 : 60 ))
  echo --out "$OUT/bench" --tag "$1" --budget-s $(( STEP_CAP - margin ))
}

step_memory() {
  "$PY" -m fusedlm.bench --ops norm,swiglu,rope $BENCH_FLAGS $(bench_args memory_bound)
}

step_decode() {
  "$PY" -m fusedlm.bench --ops kv_cache $BENCH_FLAGS $(bench_args kv_cache)
}

# The cuda backend's GPU-verified list for this GPU's sm_XY: its tests passed here and it was at least as fast as
# triton on every case of the op (memory-bound ops, attention, LoRA, DeBERTa).
step_cuda_list() {
  "$PY" scripts/cuda_verified.py --junit "$OUT/pytest.xml" --rows "$OUT"/bench/*.json --out "$OUT/cuda_verified.json"
}

step_attention() {
  # Every provider but FlexAttention (its compiles are the flex step's, after lora).
  "$PY" -m fusedlm.bench --ops attention $ATTN_FLAGS $(bench_args attention) \
    --providers sdpa-flash,sdpa-math,fusedlm-triton,fusedlm-cuda,fusedlm-triton-varlen,fusedlm-cuda-varlen,sdpa-cudnn,sdpa-efficient
}

step_lora() {
  "$PY" -m fusedlm.bench --ops lora $BENCH_FLAGS $(bench_args lora)
}

step_deberta() {
  # bf16 deberta-v3-base shapes: the dense op at every S first, then the padded/packed one (what the
  # --budget-s cut leaves out is marked skipped: GPU_RUN_STEPS=deberta in a second call runs it alone).
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/bench_deberta.py $BENCH_FLAGS \
    --seqlens "$DEBERTA_SEQLENS" --modes fwd,fwd+bwd $(bench_args deberta)
}

step_flex() {
  # FlexAttention next to the SDPA flash yardstick and fusedlm (the padded case: SDPA efficient).
  "$PY" -m fusedlm.bench --ops attention $ATTN_FLAGS $(bench_args attention_flex) \
    --providers sdpa-flash,sdpa-efficient,fusedlm-triton,flex
}

step_loss() {
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/bench_cross_entropy.py $BENCH_FLAGS --modes fwd+bwd \
    --seqlens 32000,256000 $(bench_args loss)
}

step_trainstep() {
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/bench_train_step.py --quick --out "$OUT/bench"
}

step_generate() {
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/bench_generate.py --quick \
    --budget-s $(( STEP_CAP - 60 > 30 ? STEP_CAP - 60 : 30 )) --out "$OUT/bench"
}

step_cpstep() {
  # (the plan's table from the measured rows: its dry run needs no GPU, seconds)
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/bench_cp_step.py --out "$OUT/bench" \
    --budget-s $(( STEP_CAP - 60 > 20 ? STEP_CAP - 60 : 20 )) || return 1
  local rows
  rows=$(ls "$OUT"/bench/cp_ring_step_*.json | grep -v cpu-smoke | head -n 1)
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m fusedlm.distributed.plan --step-times "$rows" \
    > "$OUT/bench/context_parallel_plan_measured.md" || return 1
  echo "overlap table with the measured step times: $OUT/bench/context_parallel_plan_measured.md"
}

export -f step_env step_wheels step_install step_info step_verify step_tests bench_args step_memory step_decode \
  step_loss step_trainstep step_generate step_cpstep \
  step_attention step_lora step_deberta step_flex

echo "fusedlm GPU run: repo $REPO, logs and results in $OUT, budget ${BUDGET_S}s"
run_step env 60 step_env
if compgen -G ".whl/*.whl" >/dev/null; then
  run_step wheels 90 step_wheels
  [[ ${STEP_STATUS[-1]} == pass ]] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== wheels: none in .whl/ (no peers: liger-kernel, flashdeberta, disentangled-flash); run" \
    "scripts/fetch_wheels.sh where there is network and carry .whl with the call" | tee "$OUT/wheels.log"
fi
run_step install 300 step_install
run_step info 60 step_info
run_step verify 150 step_verify
run_step tests $(( BUDGET_S - SECONDS - MEMORY_S - DECODE_S - ATTENTION_S - LORA_S - DEBERTA_S )) step_tests
run_step memory $(( BUDGET_S - SECONDS - DECODE_S - ATTENTION_S - LORA_S - DEBERTA_S )) step_memory
left=$(( BUDGET_S - SECONDS - ATTENTION_S - LORA_S - DEBERTA_S ))
run_step decode $(( left > 2 * DECODE_S ? 2 * DECODE_S : left )) step_decode
run_step attention $(( BUDGET_S - SECONDS - LORA_S - DEBERTA_S )) step_attention
left=$(( BUDGET_S - SECONDS - DEBERTA_S ))
run_step lora $(( left > 2 * LORA_S ? 2 * LORA_S : left )) step_lora
left=$(( BUDGET_S - SECONDS ))
run_step deberta $(( left > DEBERTA_S ? DEBERTA_S : left )) step_deberta
# (after the benchmarks whose fusedlm-cuda rows it compares: memory-bound ops, attention, LoRA, DeBERTa)
run_step cuda_list 20 step_cuda_list
run_step flex $(( BUDGET_S - SECONDS )) step_flex
run_step loss $(( BUDGET_S - SECONDS )) step_loss
run_step trainstep $(( BUDGET_S - SECONDS )) step_trainstep
run_step generate $(( BUDGET_S - SECONDS )) step_generate
left=$(( BUDGET_S - SECONDS ))
run_step cpstep $(( left > 180 ? 180 : left )) step_cpstep
# Keep the measured files in the tree too (also those of a run cut short: they are rewritten per op).
for f in "$OUT"/bench/*; do
  [[ -f $f && $f != *cpu-smoke* ]] && cp -f "$f" benchmarks/results/
done

# ---------------------------------------------------------------------------------- summary, last
failed=0
for st in "${STEP_STATUS[@]}"; do [[ $st == pass ]] || failed=1; done

print_summary() {
  echo
  echo "== summary: $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS}s in all, logs in $OUT"
  printf '%-10s %-16s %5s  %s\n' step status secs "last line of the log"
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-10s %-16s %5s  %s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_SECS[$i]}" "${STEP_NOTE[$i]}"
  done
  echo
  local f found=0 log
  for log in memory decode attention lora deberta flex; do   # the ceilings, as this run's first benchmark step measured them
    [[ " ${STEP_NAMES[*]} " == *" $log "* ]] || continue   # a log of an earlier call: stale
    if grep -q "^matmul:" "$OUT/$log.log" 2>/dev/null; then
      grep -h "^copy bandwidth\|^matmul:" "$OUT/$log.log"
      break
    fi
  done
  local tag
  for tag in memory_bound kv_cache attention lora deberta attention_flex loss linear_cross_entropy train_step generate; do
    for f in "$OUT/bench/${tag}_"*_summary.md; do
      [[ -f $f ]] || continue
      [[ $tag == attention && $f == */attention_flex_* ]] && continue
      (( found++ == 0 )) && echo "benchmarks: memory-bound median ms (% of copy bandwidth), compute-bound" \
        "median ms (TFLOP/s); every row in $OUT/bench/*.md"
      echo
      echo "-- $(basename "$f" _summary.md)"
      cat "$f"
    done
  done
  (( found > 0 )) || echo "benchmarks: no results"
}
print_summary 2>&1 | tee "$OUT/summary.txt"
exit "$failed"
