#!/usr/bin/env bash
# GPU runbook: everything that needs a CUDA GPU, in one command, on a machine without network.
#
#   timeout 600 bench/gpu_check.sh            # H100: about 8 minutes (the default budget: 480 s)
#   bench/gpu_check.sh --dry-run              # any machine: the plan, and which tools are missing
#
# Steps, each under its own time limit inside the overall budget (a later step keeps a reserve):
#   1. environment  device, driver, CUDA, torch and triton versions -> bench/results/<gpu>.json
#   2. build        the extension with the CUDA kernels (pip, offline, no build isolation); the
#                   C++ tests (CMake, -DKFAC_KERNELS_CUDA=ON) build alongside in build/gpu-check
#   3. pytest-gpu   `pytest -m gpu` with TRITON_INTERPRET unset: Triton compiles for the GPU
#   4. cuda-tests   the C++ CUDA tests at full size (ctest -L cuda)
#   5. sanitizer    every C++ CUDA test (--small sizes) under compute-sanitizer memcheck,
#                   racecheck and synccheck
#   6. bench        kfac-bench for every op (SINGD's included); its records and environment are
#                   merged into bench/results/<gpu>.json, its table and plot copied beside it
# After every step bench/results/<gpu>.json is rewritten (bench/gpu_check_summary.py), so a run
# cut short still leaves the steps done so far; logs go to build/gpu-check/logs/. What is skipped
# (a missing tool, no time left, an interruption) is recorded and printed at the end.
#
# Options: --dry-run, --budget SECONDS (480), --out DIR (bench/results), --jobs N (nproc),
#          --python PYTHON (python3, or $PYTHON).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
BUDGET=480
OUT="bench/results"
JOBS="$(nproc 2>/dev/null || echo 4)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --jobs) JOBS="$2"; shift ;;
    --python) PYTHON="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

BUILD="build/gpu-check"
LOGS="$BUILD/logs"
SUMMARY_PY="bench/gpu_check_summary.py"
START=$SECONDS
SKIPPED=()
SUMMARY=""
CHILD=""
CURRENT=""
# time caps (seconds) and the reserve each step leaves for the ones after it
CAP_BUILD=240 CAP_PYTEST=150 CAP_CTEST=60 CAP_SANITIZER_RUN=40 CAP_BENCH=150
RESERVE_BEFORE_BENCH=90

remaining() { echo $((BUDGET - (SECONDS - START))); }

summary() {  # summary SUBCOMMAND ARGS...: update the result file (when there is one)
  [[ -n "$SUMMARY" ]] && "$PYTHON" "$SUMMARY_PY" "$1" "$SUMMARY" "${@:2}"
}

skip() {  # skip NAME REASON
  SKIPPED+=("$1: $2")
  echo "--- skipped $1: $2"
  summary skip "$1" "$2"
}

# run_step NAME CAP RESERVE CMD...: CMD under a timeout of min(CAP, time left - RESERVE), output
# to $LOGS/NAME.log; records the step. Returns CMD's status (2 when skipped for lack of time).
run_step() {
  local name="$1" cap="$2" reserve="$3"
  shift 3
  local left=$(( $(remaining) - reserve ))
  if (( left < 10 )); then
    skip "$name" "no time left in the ${BUDGET} s budget"
    return 2
  fi
  local limit=$(( cap < left ? cap : left ))
  local log="$LOGS/$name.log"
  echo "==> [$(( SECONDS - START )) s] $name (limit ${limit} s): $*"
  local t0=$SECONDS
  CURRENT="$name"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$log" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  local rc=$?
  CHILD=""
  CURRENT=""
  local took=$(( SECONDS - t0 )) status
  case $rc in
    0) status="passed" ;;
    124|137) status="timed out" ;;
    *) status="failed" ;;
  esac
  local detail="${STEP_DETAIL:-}"
  if [[ $rc -ne 0 ]]; then detail="$detail$(tail -n 15 "$log")"; fi
  summary step "$name" "$status" "$took" "$log" "$detail"
  echo "<== $name: $status in ${took} s (exit $rc), log $log"
  [[ $rc -ne 0 ]] && tail -n 5 "$log" | sed 's/^/    /'
  return $rc
}

finish() {
  echo
  echo "==> gpu_check finished in $(( SECONDS - START )) s; results: ${SUMMARY:-none}"
  if [[ ${#SKIPPED[@]} -gt 0 ]]; then
    echo "skipped:"
    for s in "${SKIPPED[@]}"; do echo "    $s"; done
  else
    echo "skipped: nothing"
  fi
}

on_signal() {  # the outer timeout (or ^C): keep what is done, say what was not
  [[ -n "$CHILD" ]] && kill -TERM "$CHILD" 2>/dev/null
  [[ -n "$CURRENT" ]] && summary step "$CURRENT" "interrupted" "0" "$LOGS/$CURRENT.log" ""
  skip "the rest" "interrupted (signal) during ${CURRENT:-a pause between steps}"
  finish
  exit 124
}
trap on_signal TERM INT

find_tool() {  # find_tool NAME: path of a CUDA tool (PATH, CUDA_HOME, nvcc's folder)
  local name="$1" dir
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
  for dir in "${CUDA_HOME:-}" /usr/local/cuda; do
    [[ -n "$dir" && -x "$dir/bin/$name" ]] && { echo "$dir/bin/$name"; return 0; }
  done
  if command -v nvcc >/dev/null 2>&1; then
    dir="$(dirname "$(readlink -f "$(command -v nvcc)")")"
    [[ -x "$dir/$name" ]] && { echo "$dir/$name"; return 0; }
  fi
  return 1
}

bench_cmd() {  # how to start kfac-bench: the console script beside PYTHON, on PATH, or a module
  local dir
  dir="$(dirname "$(command -v "$PYTHON" 2>/dev/null || echo "$PYTHON")")"
  if [[ -x "$dir/kfac-bench" ]]; then echo "$dir/kfac-bench"; return 0; fi
  if command -v kfac-bench >/dev/null 2>&1; then command -v kfac-bench; return 0; fi
  for mod in kfac_kernels.apps.bench kfac_kernels.bench; do
    if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" \
        2>/dev/null; then
      echo "$PYTHON -m $mod"
      return 0
    fi
  done
  return 1
}

SANITIZER="$(find_tool compute-sanitizer || true)"
BENCH="$(bench_cmd || true)"

# ---- dry run: the plan and the tools ------------------------------------------------------------
if [[ $DRY_RUN -eq 1 ]]; then
  echo "gpu_check dry run in $ROOT (budget ${BUDGET} s, ${JOBS} jobs)"
  missing=0
  check() {  # check NAME STEPS WHAT
    if [[ -n "$3" ]]; then
      echo "    ok       $1: $3"
    else
      echo "    MISSING  $1: $2 would be skipped"
      missing=$((missing + 1))
    fi
  }
  echo "tools:"
  check python "everything" "$(command -v "$PYTHON" 2>/dev/null)"
  TORCH="$("$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available:", torch.cuda.is_available())' 2>/dev/null)"
  check torch "everything" "$TORCH"
  check pytest "pytest-gpu" "$("$PYTHON" -c 'import pytest; print(pytest.__version__)' 2>/dev/null)"
  check nvidia-smi "the driver version" "$(command -v nvidia-smi 2>/dev/null)"
  check nvcc "build (CUDA kernels)" "$(command -v nvcc 2>/dev/null)"
  check cmake "cuda-tests, sanitizer" "$(command -v cmake 2>/dev/null)"
  check compute-sanitizer "sanitizer" "$SANITIZER"
  check kfac-bench "bench" "$BENCH"
  check summary "the result file" "$("$PYTHON" "$SUMMARY_PY" slug 'NVIDIA H100 80GB HBM3' 2>/dev/null)"
  echo "plan (limits in seconds; each step also stops when the budget runs out):"
  echo "    1. environment  -> $OUT/<gpu>.json"
  echo "    2. build        ${CAP_BUILD}  KFAC_KERNELS_FORCE_CUDA=1 $PYTHON -m pip install --no-build-isolation --no-deps --no-index -e ."
  echo "                         cmake -S . -B $BUILD -DKFAC_KERNELS_CUDA=ON (alongside)"
  echo "    3. pytest-gpu   ${CAP_PYTEST}  env -u TRITON_INTERPRET $PYTHON -m pytest -q -m gpu tests"
  echo "    4. cuda-tests   ${CAP_CTEST}   ctest --test-dir $BUILD -L cuda"
  echo "    5. sanitizer    ${CAP_SANITIZER_RUN} per run  compute-sanitizer --tool {memcheck,racecheck,synccheck} $BUILD/test_*_cuda --small"
  echo "    6. bench        ${CAP_BENCH}  ${BENCH:-kfac-bench} --device cuda --out $LOGS/bench"
  echo "dry run: $missing tool(s) missing on this machine"
  exit 0
fi

# ---- 1. environment -----------------------------------------------------------------------------
mkdir -p "$LOGS" "$OUT"
GPU_NAME="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)"
if [[ -z "$GPU_NAME" ]]; then
  echo "gpu_check: torch sees no CUDA device (or $PYTHON has no torch): nothing to check here." >&2
  echo "           bench/gpu_check.sh --dry-run lists what this machine lacks." >&2
  exit 1
fi
CC="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
SUMMARY="$OUT/$("$PYTHON" "$SUMMARY_PY" slug "$GPU_NAME").json"
rm -f "$SUMMARY"
summary env --budget "$BUDGET"
echo "gpu_check on $GPU_NAME (compute capability $CC), budget ${BUDGET} s, results in $SUMMARY"

# ---- 2. build: the extension, and the C++ tests alongside ---------------------------------------
CMAKE_PID=""
if command -v cmake >/dev/null 2>&1; then
  (cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DKFAC_KERNELS_CUDA=ON \
     -DCMAKE_CUDA_ARCHITECTURES="${CC/./}" && cmake --build "$BUILD" -j "$JOBS") \
    > "$LOGS/cmake-build.log" 2>&1 &
  CMAKE_PID=$!
else
  skip "cuda-tests, sanitizer" "cmake not found"
fi
run_step build "$CAP_BUILD" "$RESERVE_BEFORE_BENCH" env KFAC_KERNELS_FORCE_CUDA=1 MAX_JOBS="$JOBS" \
  TORCH_CUDA_ARCH_LIST="$CC" bash -c "'$PYTHON' -m pip install --no-build-isolation --no-deps \
    --no-index -e . && '$PYTHON' -c 'from kfac_kernels import _backend; m = _backend.native_module(); \
    assert m is not None and m.built_with_cuda(), \"no CUDA kernels in kfac_kernels._C\"; \
    print(\"kfac_kernels._C with CUDA\")'"
BUILD_OK=$?

# ---- 3. pytest -m gpu, Triton on the GPU --------------------------------------------------------
if [[ $BUILD_OK -ne 0 ]]; then
  echo "--- the extension did not build: pytest-gpu runs the eager and Triton backends only"
fi
STEP_DETAIL="" run_step pytest-gpu "$CAP_PYTEST" "$RESERVE_BEFORE_BENCH" env -u TRITON_INTERPRET \
  "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$LOGS/pytest-gpu.xml" tests
[[ -f "$LOGS/pytest-gpu.xml" ]] && echo "    pytest-gpu: $("$PYTHON" "$SUMMARY_PY" junit "$LOGS/pytest-gpu.xml")"

# ---- 4./5. C++ CUDA tests, then under compute-sanitizer -----------------------------------------
CMAKE_OK=1
if [[ -n "$CMAKE_PID" ]]; then
  while kill -0 "$CMAKE_PID" 2>/dev/null && (( $(remaining) > RESERVE_BEFORE_BENCH + 30 )); do
    sleep 2
  done
  if kill -0 "$CMAKE_PID" 2>/dev/null; then
    kill "$CMAKE_PID" 2>/dev/null
    skip "cuda-tests, sanitizer" "the CMake build did not finish in time"
  elif wait "$CMAKE_PID"; then
    CMAKE_OK=0
  else
    skip "cuda-tests, sanitizer" "the CMake build failed (see $LOGS/cmake-build.log)"
  fi
fi
if [[ $CMAKE_OK -eq 0 ]]; then
  run_step cuda-tests "$CAP_CTEST" "$RESERVE_BEFORE_BENCH" \
    ctest --test-dir "$BUILD" -L cuda --output-on-failure
  if [[ -z "$SANITIZER" ]]; then
    skip sanitizer "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda, nvcc's folder)"
  else
    for tool in memcheck racecheck synccheck; do
      for exe in "$BUILD"/test_*_cuda; do
        [[ -x "$exe" ]] || continue
        run_step "sanitizer-$tool-$(basename "$exe")" "$CAP_SANITIZER_RUN" "$RESERVE_BEFORE_BENCH" \
          "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 "$exe" --small
      done
    done
  fi
fi

# ---- 6. kfac-bench, every op ----------------------------------------------------------------------
if [[ -z "$BENCH" ]]; then
  skip bench "kfac-bench not found (console script or module)"
else
  SLUG="$(basename "$SUMMARY" .json)"
  # shellcheck disable=SC2086  # BENCH may be "python -m module"
  run_step bench "$CAP_BENCH" 0 $BENCH --device cuda --repeats 3 --out "$LOGS/bench"
  if [[ -f "$LOGS/bench/$SLUG.json" ]]; then
    summary bench "$LOGS/bench/$SLUG.json"
    for ext in md png; do
      [[ -f "$LOGS/bench/$SLUG.$ext" ]] && cp "$LOGS/bench/$SLUG.$ext" "$OUT/$SLUG.$ext"
    done
  fi
fi

summary done
finish
