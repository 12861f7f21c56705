#!/usr/bin/env bash
# Everything GPU in ONE lease (at most 8 minutes on the H200, the build included), in phases of
# falling value, each time-boxed and writing into OUTDIR as it goes (a later failure or the
# lease's end never loses an earlier result):
#   1 device   nvidia-smi, torch, python, date                       15 s
#   2 build    a venv of its own (--system-site-packages), then        90 s
#              pip install --no-build-isolation -e . into it (sm_90a,
#              no emulator) + build_info.json
#   3 doctor   python -m dlmkern.doctor --json OUTDIR/doctor.json      50 s
#   4 tests    pytest -q -m cuda tests                                 60 s
#   5 bench_*  each bench --quick --device cuda: block_attention 50,  255 s together
#              masked_logprobs 35, policy_value_loss 20, sampler 45, rl_step 35,
#              decode_attention 15, logprobs_from_logits 15,
#              plan_gpu 40 (one real TraceRL step, TraDo-4B shape, beside
#              dlmkern plan's expectation, bench/results/plan_expected_gpu.json)
#   6 summary  summary.txt / summary.json (phases, key numbers)        10 s
# Time boxes add up to 480 s; a phase's box is also cut to what is left of the 480 s.
#
# The build never installs into the image's Python environment: it makes a venv of its own
# (GPU_CHECK_VENV, default build/gpu-check-venv) with --system-site-packages, plus a .pth that adds
# the image interpreter's own site-packages (python3 there is itself a venv, /opt/torch/.venv, whose
# packages --system-site-packages alone would not see), and every later phase runs its python. It
# stops at once, saying so, when the interpreter has no Python.h (nothing could compile).
# The build box comes from a measured build of these sources (bench/BUILD-TIMES.md): DLMKERN_CUDA=ON,
# sm_90a, no emulator, 14 translation units, 160 CPU-s in all, the slowest 17 CPU-s, configure 8 s;
# on 16 idle cores about 30 s, on 2 idle cores about 95 s: 90 s is 3x the 16-core estimate.
#
# OUTDIR gets: summary.txt summary.json phases.tsv results.jsonl build_info.json doctor.json
# logs.tar.gz (refreshed after every phase), and each phase's log in LOGDIR (default: a fresh
# temporary folder, so OUTDIR holds only those few files: the device tool brings back at most 8
# files from its $OUT; set GPU_CHECK_LOGS to keep the loose logs somewhere).
#
# --dry-run: the same plumbing on a CPU, ~2 minutes (240 s at most; CI runs it): the venv made and
# used, but no rebuild (the interpreter's installed build, seen through the venv; build_info
# recorded), doctor --device cpu, a small named test subset, every bench --tiny --device cpu.
# Exit status: non-zero when any phase failed, timed out or was cut.
#
# Usage: bash bench/gpu_check.sh [--dry-run] OUTDIR   (replaces OUTDIR's previous run; PYTHON=...
# picks the interpreter the venv is made from, else .venv/bin/python when there, else python3)
set -uo pipefail
DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
OUT=${1:?usage: bash bench/gpu_check.sh [--dry-run] OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d -t gpu_check_logs.XXXXXX)}
mkdir -p "$LOGS" && LOGS=$(cd "$LOGS" && pwd)
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$PWD/.venv/bin/python
else PY=python3; fi
VENV=${GPU_CHECK_VENV:-build/gpu-check-venv}
mkdir -p "$(dirname "$VENV")" && VENV=$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")
export PY VENV OUT DRY PYTHONUNBUFFERED=1 DLMKERN_BENCH_RESULTS="$OUT/results.jsonl"
# OUTDIR holds one run: the previous run's files there are replaced.
rm -f "$OUT"/{phases.tsv,results.jsonl,build_info.json,doctor.json,summary.txt,summary.json} \
  "$OUT/logs.tar.gz" "$LOGS"/*.log
: > "$OUT/phases.tsv"

if (( DRY )); then
  # ~75-130 s on an idle-ish 2-core machine (the doctor ~50 s of it); 240 s is the hard bound,
  # headroom for a loaded CI machine.
  TOTAL=240 DOCTOR_ARGS="--device cpu" SIZE=--tiny
  BOX_DEVICE=10 BOX_BUILD=30 BOX_DOCTOR=100 BOX_TESTS=30 BOX_SUMMARY=10
  BENCHES=(block_attention:40 masked_logprobs:40 policy_value_loss:40 sampler:40 rl_step:40
           decode_attention:40 logprobs_from_logits:40 rewards:40 plan_gpu:40)  # ~5-15 s each; the 180 s bound it all
else
  TOTAL=480 DOCTOR_ARGS="" SIZE=--quick
  BOX_DEVICE=15 BOX_BUILD=90 BOX_DOCTOR=50 BOX_TESTS=60 BOX_SUMMARY=10
  BENCHES=(block_attention:50 masked_logprobs:35 policy_value_loss:20 sampler:45 rl_step:35
           decode_attention:15 logprobs_from_logits:15 plan_gpu:40)
fi
START=$(date +%s)
DEADLINE=$((START + TOTAL))
FAILED=0

# phase NAME BOX COMMAND...: runs COMMAND under `timeout`, its box cut to what is left before the
# summary's reserve; logs to LOGS/NAME.log; appends "name status rc seconds box" to phases.tsv.
phase() {
  local name=$1 box=$2 status rc t0 secs left
  shift 2
  left=$((DEADLINE - BOX_SUMMARY - $(date +%s)))
  (( box > left )) && box=$left
  if (( box < 5 )); then
    record "$name" cut - 0 "$box"
    return 1
  fi
  echo "== $name (box ${box}s) $(date -u +%H:%M:%S)"
  t0=$(date +%s%N)
  timeout -k 5 "$box" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  secs=$(( ($(date +%s%N) - t0) / 1000000 ))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=fail ;;
  esac
  [[ $status == ok ]] || tail -n 25 "$LOGS/$name.log"
  record "$name" "$status" "$rc" "$(printf '%d.%03d' $((secs / 1000)) $((secs % 1000)))" "$box"
  [[ $status == ok ]]
}

# record NAME STATUS RC SECONDS BOX: one line of phases.tsv (and the logs' tarball refreshed).
record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT/phases.tsv"
  echo "-- $1: $2 (rc $3, $4 s of $5 s)"
  case $2 in ok|missing|skipped) ;; *) FAILED=1 ;; esac
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
}

device_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu \
    --format=csv || echo "nvidia-smi: not available"
  "$PY" -c "import platform, sys, torch
print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, 'sm', f'{p.major}{p.minor}', 'SMs', p.multi_processor_count,
          'memory GiB', round(p.total_memory / 2**30, 1))
print('machine', platform.machine(), 'cores', __import__('os').cpu_count())"
  echo "git $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +dirty)"
  date -u +%Y-%m-%dT%H:%M:%SZ
}

# make_venv: stops with a clear message when $PY has no Python headers; else makes VENV from $PY
# (no pip of its own: the interpreter's pip, seen through the venv, installs into the venv).
make_venv() {
  "$PY" - <<'EOF' || return 1
import os, sys, sysconfig
h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
if not os.path.isfile(h):
    sys.exit(f"build: {h} is missing: {sys.executable} has no Python headers, so no extension "
             "can be built for it (install its -dev package, or set PYTHON= to one that has them)")
print("python headers:", h)
EOF
  "$PY" -m venv --clear --system-site-packages --without-pip "$VENV" || {
    echo "build: $PY -m venv $VENV failed"; return 1; }
  # $PY may itself be a venv (the GPU image's python3 is): its own site-packages (and their .pth
  # files) are added after ours, so torch & co. come from the image unchanged; the base
  # interpreter's come from --system-site-packages.
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') &&
    "$PY" -c "import site, sys
for p in site.getsitepackages():
    if sys.prefix != sys.base_prefix and p.startswith(sys.prefix + '/'):
        print(f'import site; site.addsitedir({p!r})')" \
      > "$site/_gpu_check_base.pth" || { echo "build: cannot link $PY's packages"; return 1; }
  "$VENV/bin/python" -c "import sys, torch; print('venv', sys.prefix, 'torch', torch.__version__)" &&
    "$VENV/bin/python" -m pip --version || {
      echo "build: torch or pip is not importable in $VENV"; return 1; }
}

build() {
  make_venv || return 1
  if (( DRY )); then
    echo "dry run: no rebuild, the installed build is used (seen through the venv)"
  else
    export DLMKERN_CUDA=ON DLMKERN_CUDA_ARCHS=${DLMKERN_CUDA_ARCHS:-90a} DLMKERN_CUDA_EMU=OFF
    export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
    "$VENV/bin/python" -m pip install --no-build-isolation --no-deps -e . || return 1
  fi
  "$VENV/bin/python" - <<'EOF'
import json, os, sys
import dlmkern
info = dlmkern.build_info()
json.dump(info, open(os.path.join(os.environ["OUT"], "build_info.json"), "w"), indent=1)
print(json.dumps(info, indent=1))
print("dlmkern from", os.path.dirname(dlmkern.__file__), "python", sys.executable)
if os.environ["DRY"] == "0" and not (info["cuda_available"] and info["cuda_kernels_registered"]):
    sys.exit("build: CUDA kernels are not registered or no GPU is visible")
EOF
}

doctor() {
  # shellcheck disable=SC2086  # DOCTOR_ARGS is a word list
  "$PY" -m dlmkern.doctor --json "$OUT/doctor.json" $DOCTOR_ARGS
}

tests() {
  if (( DRY )); then  # -m cuda skips everything on a CPU: prove the phase with a fast subset
    "$PY" -m pytest -q -rfs tests/test_bench_schema.py
  else  # keep going past a module that cannot import here (e.g. a missing optional package)
    "$PY" -m pytest -q -rfs -m cuda --continue-on-collection-errors tests
  fi
}

bench() {
  local dev=cuda
  (( DRY )) && dev=cpu
  "$PY" "bench/bench_$1.py" "$SIZE" --device "$dev"
}
export -f device_info make_venv build doctor tests bench
export SIZE DOCTOR_ARGS

echo "gpu_check: $([[ $DRY == 1 ]] && echo dry run || echo GPU run), ${TOTAL} s budget," \
     "python $PY (venv $VENV), out $OUT"
phase device "$BOX_DEVICE" bash -c device_info && cat "$LOGS/device.log"
if phase build "$BOX_BUILD" bash -c build; then
  PY=$VENV/bin/python  # every later phase runs the venv's python
  if (( DRY )) && ! "$PY" -c "import dlmkern.doctor" 2>/dev/null; then
    echo "dlmkern.doctor cannot be imported yet" > "$LOGS/doctor.log"
    record doctor missing - 0 0
  else
    phase doctor "$BOX_DOCTOR" bash -c doctor
  fi
  phase tests "$BOX_TESTS" bash -c tests
  for entry in "${BENCHES[@]}"; do
    phase "bench_${entry%%:*}" "${entry##*:}" bash -c "bench ${entry%%:*}"
  done
else
  for name in doctor tests "${BENCHES[@]%%:*}"; do
    [[ $name == doctor || $name == tests ]] || name=bench_$name
    record "$name" skipped - 0 0
  done
  FAILED=1
fi
elapsed=$(( $(date +%s) - START ))
timeout -k 2 "$BOX_SUMMARY" "$PY" bench/summary.py "$OUT" "$LOGS" --wall "$elapsed" \
  --mode "$([[ $DRY == 1 ]] && echo dry-run || echo gpu)" || { echo "summary failed"; FAILED=1; }
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
echo "gpu_check: ${elapsed} s, $([[ $FAILED == 0 ]] && echo all phases passed || echo SOME PHASES FAILED)"
exit "$FAILED"
