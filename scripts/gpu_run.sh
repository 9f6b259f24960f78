#!/usr/bin/env bash
# The one script a GPU session runs, from the repository root, in one call:
#
#   env      nvidia-smi, versions of python, torch, triton, CUDA, nvcc, transformers, peft, liger-kernel
#   wheels   carried wheels in .whl/ (liger-kernel, ...) into /tmp/site, put on PYTHONPATH  (if any)
#   install  pip install --no-build-isolation --no-deps -e .  (builds fusedlm._C where nvcc is found;
#            if that build fails, installs again without it so the Triton paths still get tested)
#   info     python -m fusedlm info
#   verify   python -m fusedlm verify --json $OUT/verify.json
#   tests    python -m pytest -x -q tests
#   bench    python -m fusedlm.bench -> $OUT/bench/, copied to benchmarks/results/
#   then a status table per step and the benchmark summary table, last.
#
# No network is used. Every step logs to $OUT/<step>.log (OUT defaults to ./gpu_out) and runs under a
# time cap drawn from one overall budget (GPU_RUN_BUDGET_S, default 480 s), so the whole run ends well
# within 9 minutes; the tests are capped so that GPU_RUN_BENCH_RESERVE_S (default 210 s) stays for the
# benchmarks. A failing step does not stop the later ones. Exit status 0 if every step passed, else 1.
#
# Usage:  bash scripts/gpu_run.sh          OUT=/path bash scripts/gpu_run.sh
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export REPO="$PWD"
export OUT="${OUT:-$REPO/gpu_out}"
rm -rf "$OUT/bench"   # this script's own output: no stale results from an earlier run get copied below
mkdir -p "$OUT/bench"
export PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"                       # parallel nvcc jobs for the extension build
BUDGET_S="${GPU_RUN_BUDGET_S:-480}"
BENCH_RESERVE_S="${GPU_RUN_BENCH_RESERVE_S:-210}"
unset TRITON_INTERPRET FUSEDLM_BACKEND                  # the real GPU paths, the "auto" backend

STEP_NAMES=() STEP_STATUS=() STEP_SECS=() STEP_NOTE=()

# run_step NAME CAP_S FUNCTION: runs the exported shell function FUNCTION under `timeout`, capped at
# min(CAP_S, what is left of the budget), with its output shown and tee'd to $OUT/NAME.log; records
# pass / FAIL(rc) / TIMEOUT / SKIPPED. The function sees its cap as $STEP_CAP.
run_step() {
  local name=$1 cap=$2 fn=$3
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
for name in ("triton", "transformers", "peft", "liger-kernel", "numpy", "pytest", "setuptools", "ninja"):
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
    && ls /tmp/site
}

step_install() {
  local pip=("$PY" -m pip install --no-index --no-build-isolation --no-deps -e .)
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

step_bench() {
  # The harness stops starting new measurements after --budget-s; the margin (a third of the cap, at
  # most 60 s) covers the one running then: a cold torch.compile of a forward and backward takes
  # tens of seconds.
  local margin=$(( STEP_CAP / 3 < 60 ? STEP_CAP / 3 : 60 ))
  "$PY" -m fusedlm.bench --out "$OUT/bench" --budget-s $(( STEP_CAP - margin ))
}

export -f step_env step_wheels step_install step_info step_verify step_tests step_bench

echo "fusedlm GPU run: repo $REPO, logs and results in $OUT, budget ${BUDGET_S}s"
run_step env 60 step_env
if compgen -G ".whl/*.whl" >/dev/null; then
  run_step wheels 90 step_wheels
  [[ ${STEP_STATUS[-1]} == pass ]] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
run_step install 300 step_install
run_step info 60 step_info
run_step verify 150 step_verify
run_step tests $(( BUDGET_S - SECONDS - BENCH_RESERVE_S )) step_tests
run_step bench $(( BUDGET_S - SECONDS )) step_bench
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
  printf '%-8s %-16s %5s  %s\n' step status secs "last line of the log"
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-8s %-16s %5s  %s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_SECS[$i]}" "${STEP_NOTE[$i]}"
  done
  echo
  local summaries=("$OUT"/bench/*_summary.md)
  if [[ -f ${summaries[0]} ]]; then
    echo "benchmarks: median ms (% of copy bandwidth); every row in $OUT/bench/*.md"
    grep -h "^copy bandwidth" "$OUT/bench.log" 2>/dev/null
    cat "${summaries[@]}"
  else
    echo "benchmarks: no results"
  fi
}
print_summary 2>&1 | tee "$OUT/summary.txt"
exit "$failed"
