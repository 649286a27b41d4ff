#!/usr/bin/env bash
# GPU runbook: everything that needs a CUDA GPU, in one command, on a machine without network.
#
#   timeout 600 bench/gpu_check.sh            # H100/H200: about 5-8 minutes (budget: 480 s)
#   bench/gpu_check.sh --dry-run              # any machine: the plan, and which tools are missing
#
# Steps, each under its own time limit inside the overall budget (a later step keeps a reserve):
#   1. environment  device, driver, CUDA, torch and triton versions -> bench/results/<gpu>.json
#   2. native       in the background from the start (torch-free): the C++ tests with the CUDA
#                   kernels (CMake, -DKFAC_KERNELS_CUDA=ON, in build/gpu-check, or prebuilt), then
#                   cuda-tests (each test_*_cuda at full size) and sanitizer (each at --small
#                   sizes under compute-sanitizer memcheck, racecheck and synccheck, in parallel)
#   3. build        the extension with the CUDA kernels (pip, offline, no build isolation)
#   4. pytest-gpu   `pytest -m gpu` with TRITON_INTERPRET unset: Triton compiles for the GPU
#                   (pytest-xdist workers when it is installed)
#   5. bench        kfac-bench for every op (SINGD's included); its records and environment are
#                   merged into bench/results/<gpu>.json, its table and plot copied beside it
#   6. targets      bench/gpu_targets.py: the kernel issues' targets at the static model's shapes
#                   -> bench/results/<gpu>_targets.json
# Steps 5 and 6 time kernels, so they run alone, after the native checks have finished.
# After every step bench/results/<gpu>.json is rewritten (bench/gpu_check_summary.py), so a run
# cut short still leaves the steps done so far; logs go to build/gpu-check/logs/. What is skipped
# (a missing tool, no time left, an interruption) is recorded and printed at the end.
#
# Options: --dry-run, --budget SECONDS (480), --out DIR (bench/results), --jobs N (nproc),
#          --python PYTHON (python3, or $PYTHON), --prebuilt DIR (a build made elsewhere for this
#          torch, Python ABI and GPU: DIR/_C*.so and DIR/_C.build-stamp are used when their stamp
#          matches, else the extension is rebuilt; DIR/tests/test_*_cuda replace the CMake build
#          when they start here), --steps LIST (a comma list of cuda-tests, sanitizer, pytest-gpu,
#          bench, targets: only these; default all), --sanitize REGEX (only the sanitizer runs
#          whose name, e.g. racecheck-test_block_eigh_cuda, matches), --sanitizer-cap SECONDS (90).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
BUDGET=480
OUT="bench/results"
JOBS="$(nproc 2>/dev/null || echo 4)"
PREBUILT=""
STEPS="cuda-tests,sanitizer,pytest-gpu,bench,targets"
SANITIZE=""
CAP_SANITIZER_RUN_ARG=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --jobs) JOBS="$2"; shift ;;
    --python) PYTHON="$2"; shift ;;
    --prebuilt) PREBUILT="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    --sanitize) SANITIZE="$2"; shift ;;
    --sanitizer-cap) CAP_SANITIZER_RUN_ARG="$2"; shift ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
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
CAP_BUILD=240 CAP_PYTEST=300 CAP_CTEST=60 CAP_SANITIZER_RUN=90 CAP_BENCH=120 CAP_TARGETS=120
RESERVE_BEFORE_BENCH=150 SANITIZER_PARALLEL=8
CAP_SANITIZER_RUN="${CAP_SANITIZER_RUN_ARG:-$CAP_SANITIZER_RUN}"
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }

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
  echo "    2. native       in the background: cmake -S . -B $BUILD -DKFAC_KERNELS_CUDA=ON (or ${PREBUILT:-<--prebuilt>}/tests), then"
  echo "       cuda-tests   ${CAP_CTEST} per test  $BUILD/test_*_cuda (full size)"
  echo "       sanitizer    ${CAP_SANITIZER_RUN} per run, ${SANITIZER_PARALLEL} at a time  compute-sanitizer --tool {memcheck,racecheck,synccheck} $BUILD/test_*_cuda --small"
  echo "    3. build        ${CAP_BUILD}  KFAC_KERNELS_FORCE_CUDA=1 $PYTHON -m pip install --no-build-isolation --no-deps --no-index -e ."
  echo "    4. pytest-gpu   ${CAP_PYTEST}  env -u TRITON_INTERPRET $PYTHON -m pytest -q -m gpu tests"
  echo "    5. bench        ${CAP_BENCH}  ${BENCH:-kfac-bench} --device cuda --out $LOGS/bench"
  echo "    6. targets      ${CAP_TARGETS}  $PYTHON bench/gpu_targets.py --out $OUT/<gpu>_targets.json"
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
# not CC: that names the C compiler to every build tool (Triton builds its driver with it)
CAPABILITY="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
SUMMARY="$OUT/$("$PYTHON" "$SUMMARY_PY" slug "$GPU_NAME").json"
rm -f "$SUMMARY"
summary env --budget "$BUDGET"
echo "gpu_check on $GPU_NAME (compute capability $CAPABILITY), budget ${BUDGET} s, results in $SUMMARY"

# ---- 2. native checks in the background: C++ CUDA tests, then under compute-sanitizer -----------
# They need neither torch nor the extension, so they run while the extension builds and pytest
# runs. Each run leaves NAME.rc / NAME.took / NAME.log in $NATIVE; the results are recorded in
# the result file by this shell once the job is joined (one writer).
NATIVE="$LOGS/native"
mkdir -p "$NATIVE"
TESTS_DIR=""
if [[ -n "$PREBUILT" && -d "$PREBUILT/tests" ]]; then
  probe="$(ls "$PREBUILT"/tests/test_*_cuda 2>/dev/null | head -n 1)"
  if [[ -n "$probe" ]] && timeout 60 "$probe" --small > "$LOGS/prebuilt-probe.log" 2>&1; then
    TESTS_DIR="$PREBUILT/tests"
    echo "--- using the prebuilt C++ CUDA tests in $TESTS_DIR"
  else
    echo "--- the prebuilt C++ CUDA tests do not run here ($LOGS/prebuilt-probe.log): CMake builds them"
  fi
fi

native_run() {  # native_run NAME CAP CMD...: one timed run, its status left in $NATIVE
  local name="$1" cap="$2" t0=$SECONDS
  shift 2
  timeout --signal=TERM --kill-after=10 "$cap" "$@" > "$NATIVE/$name.log" 2>&1
  echo $? > "$NATIVE/$name.rc"
  echo $(( SECONDS - t0 )) > "$NATIVE/$name.took"
}
export -f native_run
export NATIVE

native_checks() {
  local dir="$TESTS_DIR" t0=$SECONDS
  if [[ -z "$dir" ]]; then
    if ! command -v cmake >/dev/null 2>&1; then
      echo "cmake not found" > "$NATIVE/SKIPPED"
      return
    fi
    native_run cmake-build 400 bash -c "cmake -S . -B '$BUILD' -DCMAKE_BUILD_TYPE=Release \
      -DKFAC_KERNELS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES='${CAPABILITY/./}' && cmake --build '$BUILD' -j '$JOBS'"
    if [[ "$(cat "$NATIVE/cmake-build.rc")" != 0 ]]; then
      echo "the CMake build failed (see $NATIVE/cmake-build.log)" > "$NATIVE/SKIPPED"
      return
    fi
    dir="$BUILD"
  fi
  if has_step cuda-tests; then
    for exe in "$dir"/test_*_cuda; do
      [[ -x "$exe" ]] && native_run "cuda-tests-$(basename "$exe")" "$CAP_CTEST" "$exe"
    done
  fi
  has_step sanitizer || return
  if [[ -z "$SANITIZER" ]]; then
    echo "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda, nvcc's folder)" \
      > "$NATIVE/SKIPPED-sanitizer"
    return
  fi
  for tool in memcheck racecheck synccheck; do
    for exe in "$dir"/test_*_cuda; do
      [[ -x "$exe" && "$tool-$(basename "$exe")" =~ ${SANITIZE:-.} ]] &&
        printf '%s\0' "sanitizer-$tool-$(basename "$exe")" "$CAP_SANITIZER_RUN" \
        "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 "$exe" --small
    done
  done | xargs -0 -n 11 -P "$SANITIZER_PARALLEL" bash -c 'native_run "$@"' native_run
}

record_native() {  # record the background runs in the result file, in order
  local f name rc status
  for f in "$NATIVE"/*.rc; do
    [[ -e "$f" ]] || continue
    name="$(basename "$f" .rc)"
    rc="$(cat "$f")"
    case $rc in
      0) status="passed" ;;
      77) status="skipped (no CUDA device visible)" ;;
      124|137) status="timed out" ;;
      *) status="failed" ;;
    esac
    local detail=""
    [[ $rc -ne 0 ]] && detail="$(tail -n 15 "$NATIVE/$name.log")"
    summary step "$name" "$status" "$(cat "$NATIVE/$name.took")" "$NATIVE/$name.log" "$detail"
    echo "<== $name: $status in $(cat "$NATIVE/$name.took") s (exit $rc)"
    [[ $rc -ne 0 ]] && tail -n 5 "$NATIVE/$name.log" | sed 's/^/    /'
  done
  [[ -f "$NATIVE/SKIPPED" ]] && skip "cuda-tests, sanitizer" "$(cat "$NATIVE/SKIPPED")"
  [[ -f "$NATIVE/SKIPPED-sanitizer" ]] && skip sanitizer "$(cat "$NATIVE/SKIPPED-sanitizer")"
  return 0
}

NATIVE_PID=""
if has_step cuda-tests || has_step sanitizer; then
  echo "==> [$(( SECONDS - START )) s] native (background): cuda-tests and sanitizer"
  native_checks > "$LOGS/native.log" 2>&1 &
  NATIVE_PID=$!
fi

# ---- 3. build: the extension ---------------------------------------------------------------------
if [[ -n "$PREBUILT" ]]; then
  for f in "$PREBUILT"/_C*.so "$PREBUILT"/_C.build-stamp; do
    [[ -f "$f" ]] && cp "$f" kfac_kernels/
  done
fi
BUILD_CMD="'$PYTHON' -m pip install --no-build-isolation --no-deps --no-index -e . && '$PYTHON' -c \
  'from kfac_kernels import _backend; m = _backend.native_module(); \
  assert m is not None and m.built_with_cuda(), \"no CUDA kernels in kfac_kernels._C\"; \
  print(\"kfac_kernels._C with CUDA\")'"
run_step build "$CAP_BUILD" "$RESERVE_BEFORE_BENCH" env KFAC_KERNELS_FORCE_CUDA=1 MAX_JOBS="$JOBS" \
  TORCH_CUDA_ARCH_LIST="$CAPABILITY" bash -c "$BUILD_CMD"
BUILD_OK=$?
if [[ $BUILD_OK -ne 0 && -n "$PREBUILT" ]]; then
  echo "--- the prebuilt extension did not load: rebuilt here"
  run_step build-again "$CAP_BUILD" "$RESERVE_BEFORE_BENCH" env KFAC_KERNELS_FORCE_CUDA=1 \
    KFAC_KERNELS_REBUILD=1 MAX_JOBS="$JOBS" TORCH_CUDA_ARCH_LIST="$CAPABILITY" bash -c "$BUILD_CMD"
  BUILD_OK=$?
fi

# ---- 4. pytest -m gpu, Triton on the GPU --------------------------------------------------------
if [[ $BUILD_OK -ne 0 ]]; then
  echo "--- the extension did not build: pytest-gpu runs the eager and Triton backends only"
fi
XDIST=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
has_step pytest-gpu && STEP_DETAIL="" run_step pytest-gpu "$CAP_PYTEST" "$RESERVE_BEFORE_BENCH" env -u TRITON_INTERPRET \
  "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider "${XDIST[@]}" \
  --junitxml="$LOGS/pytest-gpu.xml" tests
has_step pytest-gpu && [[ -f "$LOGS/pytest-gpu.xml" ]] && echo "    pytest-gpu: $("$PYTHON" "$SUMMARY_PY" junit "$LOGS/pytest-gpu.xml")"

# ---- join the native checks (the timing steps below want the GPU to themselves) -----------------
if [[ -n "$NATIVE_PID" ]]; then
  while kill -0 "$NATIVE_PID" 2>/dev/null && (( $(remaining) > RESERVE_BEFORE_BENCH )); do
    sleep 2
  done
  if kill -0 "$NATIVE_PID" 2>/dev/null; then
    pkill -TERM -P "$NATIVE_PID" 2>/dev/null
    kill -TERM "$NATIVE_PID" 2>/dev/null
    skip "the rest of cuda-tests, sanitizer" "no time left in the ${BUDGET} s budget"
  fi
  wait "$NATIVE_PID" 2>/dev/null
  record_native
fi

# ---- 5. kfac-bench, every op ----------------------------------------------------------------------
SLUG="$(basename "$SUMMARY" .json)"
if ! has_step bench; then
  :
elif [[ -z "$BENCH" ]]; then
  skip bench "kfac-bench not found (console script or module)"
else
  # shellcheck disable=SC2086  # BENCH may be "python -m module"
  run_step bench "$CAP_BENCH" 60 $BENCH --device cuda --repeats 3 --out "$LOGS/bench"
  if [[ -f "$LOGS/bench/$SLUG.json" ]]; then
    summary bench "$LOGS/bench/$SLUG.json"
    for ext in md png; do
      [[ -f "$LOGS/bench/$SLUG.$ext" ]] && cp "$LOGS/bench/$SLUG.$ext" "$OUT/$SLUG.$ext"
    done
  fi
fi

# ---- 6. the targets at the static model's shapes ------------------------------------------------
has_step targets && run_step targets "$CAP_TARGETS" 0 env -u TRITON_INTERPRET "$PYTHON" bench/gpu_targets.py \
  --device cuda --out "$OUT/${SLUG}_targets.json"

summary done
finish
