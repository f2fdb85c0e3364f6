#!/usr/bin/env bash
# bench/gpu_suite.sh OUTDIR [COMMIT]
#
# Everything a GPU host can tell about gptext, in one call that fits a 10-minute slot:
#   build        the extension for this GPU (pip install -e ., else setup.py build_ext --inplace),
#                then a check that its CUDA kernels can run here
#   pytest_cuda  python3 -m pytest -q -m cuda (short tracebacks, every failure listed at the end)
#   ctest        the native kernel tests (CMake + CTest, sm_90)
#   tiles        build/native/test_kernels --bench: the WMMA GEMM's block tiles timed
#                against each other at 4096^3 and GPT-2's prefill shapes, and the attention
#                forward with 16 and 32 query rows a warp at causal T = 1024-8192 (tiles.txt)
#   bench        python3 -m bench --full --device cuda --models gpt2 --out OUTDIR
#   memcheck     compute-sanitizer --tool memcheck  over build/native/test_kernels --small
#   racecheck    compute-sanitizer --tool racecheck over build/native/test_kernels --small
#   ncu          Nsight Compute on the kernels furthest from their targets (ncu.txt): the
#                WMMA GEMM's 128x128 and 128x256 tiles at 4096^3 in bf16 (from
#                test_kernels --bench) and the attention forward and backward kernels at
#                T = 4096, D = 64 (bench.one); where ncu is missing or may not read the
#                GPU's counters, the step says so and the suite goes on
#   bench_oss    python3 -m bench --full --device cuda --ops none --models gpt-oss --out
#                OUTDIR/oss: the gpt-oss model section (2 of gpt-oss-20b's layers), after
#                the rest of the bench and the sanitizers, as it loads a 5.6 GB checkpoint
#   pytest_all   python3 -m pytest -q (the whole suite: about 100 s on an H100 host)
# Each step runs under `timeout` and the script goes on whatever it returns. The benchmark
# runs before the sanitizers and the whole test suite, so that the headline figures come
# back even when those run out of time; the steps before it never eat into the time kept
# for it.
#
# Writes at most 8 files into OUTDIR: gpu_suite.json (commit, date, device, versions, each
# step's status, seconds and log tail, the bench JSONs' paths), suite.log (every step's
# log), tiles.txt, ncu.txt, the bench's results.json, speedup.png and roofline.png, and
# oss/results.json.
#
# The commit is $2, else $GPTEXT_COMMIT, else git's HEAD (a copy of the repository
# without .git has none). Without a GPU (nvidia-smi or torch.cuda missing) the GPU steps
# are recorded as skipped and the bench step is a CPU smoke run of the pipeline
# (--quick --no-model --ops softmax --dtypes fp32), so the script can be tried anywhere.
#
# Environment: PYTHON (default python3); SUITE_BUDGET seconds for the whole call (default
# 570); SUITE_STEPS, a comma-separated subset of the steps above (e.g. split one long run
# into two calls: "build,pytest_cuda,ctest,memcheck,racecheck,pytest_all", then
# "build,bench", the second build being quick when the first's outputs are still there);
# SUITE_BENCH_ARGS to replace the bench's arguments (besides --out); TORCH_CUDA_ARCH_LIST
# (default 9.0). Exit status: 0 when no step failed or timed out, else 1.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [COMMIT]" >&2
  exit 2
fi
OUT=$1
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

export PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET:-570}
STEPS=${SUITE_STEPS:-build,pytest_cuda,ctest,tiles,bench,memcheck,racecheck,ncu,bench_oss,pytest_all}
COMMIT=${2:-${GPTEXT_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}}
export GPTEXT_COMMIT=$COMMIT
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

START=$(date +%s)
DEADLINE=$((START + BUDGET))
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
STATUS=$LOGS/steps.tsv
: > "$STATUS"
: > "$OUT/suite.log"

if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1 \
   && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1; then
  GPU=1
else
  GPU=0
fi

# record NAME STATUS SECONDS NOTE
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STATUS"
  printf '== %s: %s (%s s) %s\n' "$1" "$2" "$3" "$4" | tee -a "$OUT/suite.log"
}

selected() {
  case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

# run_step NAME CAP RESERVE COMMAND: runs the bash COMMAND for at most CAP seconds, and
# never into the last RESERVE seconds of the budget (kept for the steps after it).
run_step() {
  local name=$1 cap=$2 reserve=$3 command=$4
  if ! selected "$name"; then
    record "$name" skipped 0 "not in SUITE_STEPS"
    return 0
  fi
  local left=$((DEADLINE - $(date +%s) - reserve))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    record "$name" skipped 0 "no time left in the ${BUDGET} s budget"
    return 0
  fi
  local log=$LOGS/$name.log begin rc=0 status=pass
  begin=$(date +%s)
  echo "== $name (at most $limit s): $command" | tee -a "$OUT/suite.log"
  timeout --kill-after=10 "$limit" bash -c "$command" > "$log" 2>&1 || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=timeout
  elif [ "$rc" -ne 0 ]; then
    status=fail
  fi
  tail -n 400 "$log" >> "$OUT/suite.log"
  record "$name" "$status" "$(($(date +%s) - begin))" "exit $rc"
}

gpu_step() {
  if [ "$GPU" -eq 1 ]; then
    run_step "$@"
  else
    record "$1" skipped 0 "no GPU on this host"
  fi
}

sanitizer() {
  command -v compute-sanitizer 2> /dev/null \
    || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -n 1 \
    || true
}

sanitize_step() {
  local name=$1 tool=$2 tool_path
  tool_path=$(sanitizer)
  if [ "$GPU" -eq 0 ]; then
    record "$name" skipped 0 "no GPU on this host"
  elif [ -z "$tool_path" ]; then
    record "$name" unavailable 0 "compute-sanitizer not on PATH or under /usr/local/cuda*/bin"
  elif [ ! -x build/native/test_kernels ]; then
    record "$name" skipped 0 "build/native/test_kernels was not built (see the ctest step)"
  else
    run_step "$name" 90 0 "'$tool_path' --tool $tool --error-exitcode 1 build/native/test_kernels --small"
  fi
}

gpu_step build 240 300 '
  export GPTEXT_CUDA=1
  "$PY" -m pip install --no-build-isolation --no-deps -e . || {
    echo "pip install -e . failed: falling back to setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace
  }
  "$PY" -c "import json, sys, gptext
print(json.dumps(gptext.build_info(), indent=1))
sys.exit(0 if gptext.kernels_available(\"cuda\") else 1)"'
gpu_step pytest_cuda 120 270 '"$PY" -m pytest -q -m cuda --tb=short -rfE'
gpu_step ctest 150 260 '
  cmake -S . -B build/native -DCMAKE_CUDA_ARCHITECTURES=90 \
    && cmake --build build/native -j \
    && ctest --test-dir build/native --output-on-failure'
if [ -x build/native/test_kernels ] || ! selected tiles; then
  gpu_step tiles 90 250 "build/native/test_kernels --bench | tee '$OUT/tiles.txt'"
else
  record tiles skipped 0 "build/native/test_kernels was not built (see the ctest step)"
fi
if [ "$GPU" -eq 1 ]; then
  BENCH_ARGS=${SUITE_BENCH_ARGS:---full --device cuda --compile-budget 120 --models gpt2}
else
  BENCH_ARGS=${SUITE_BENCH_ARGS:---quick --device cpu --no-model --ops softmax --dtypes fp32}
fi
run_step bench 270 0 "\"\$PY\" -m bench $BENCH_ARGS --out '$OUT'"
sanitize_step memcheck memcheck
sanitize_step racecheck racecheck
# Nsight Compute: where the time of the GEMM and attention kernels goes (each unit's
# throughput against its peak, memory traffic, stall reasons, occupancy). One kernel launch
# each; the GEMM's warm-up launch is skipped.
ncu_tool() {
  command -v ncu 2> /dev/null || ls /usr/local/cuda*/bin/ncu 2> /dev/null | head -n 1 || true
}
ncu_profiles() {
  set -eo pipefail
  local sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis
                  --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats)
  {
    for tile in "128, 128," "128, 256,"; do
      "$NCU" "${sections[@]}" --kernel-name-base demangled --launch-skip 1 --launch-count 1 \
        -k "regex:gemm_wmma_kernel<__nv_bfloat16.*TileConfig<$tile" build/native/test_kernels --bench
    done
    "$NCU" "${sections[@]}" --launch-count 1 -k attention_fwd_kernel \
      "$PY" -m bench.one attention "1x16/16x4096x4096x64 causal" bf16 --calls 1
    for kernel in attention_dkdv_kernel attention_dq_kernel; do
      "$NCU" "${sections[@]}" --launch-count 1 -k "$kernel" \
        "$PY" -m bench.one attention_bwd "1x16/16x4096x4096x64 causal" bf16 --calls 1
    done
  } 2>&1 | tee "$OUT/ncu.txt"
}
export -f ncu_profiles
export NCU OUT
NCU=$(ncu_tool)
if [ "$GPU" -eq 0 ]; then
  record ncu skipped 0 "no GPU on this host"
elif [ -z "$NCU" ]; then
  record ncu unavailable 0 "ncu not on PATH or under /usr/local/cuda*/bin"
elif [ ! -x build/native/test_kernels ]; then
  record ncu skipped 0 "build/native/test_kernels was not built (see the ctest step)"
else
  run_step ncu 120 200 ncu_profiles
fi
gpu_step bench_oss 150 90 "\"\$PY\" -m bench --full --device cuda --ops none --models gpt-oss --out '$OUT/oss'"
gpu_step pytest_all 180 0 '"$PY" -m pytest -q --tb=short -rfE'

# The summary is written with the standard library only, so that it is there even when
# torch is broken.
GPU="$GPU" OUT="$OUT" STATUS="$STATUS" LOGS="$LOGS" START="$START" python3 - << 'EOF'
import datetime, json, os, subprocess
from pathlib import Path

def run(*command):
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None

out, logs = Path(os.environ["OUT"]), Path(os.environ["LOGS"])
gpu = run("nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader")
name, driver = ([part.strip() for part in gpu.splitlines()[0].split(",", 1)] if gpu else [None, None])
torch = run(os.environ["PY"], "-c", "import torch; print(torch.__version__); print(torch.version.cuda)")
torch_version, torch_cuda = (torch.splitlines() + [None, None])[:2] if torch else (None, None)
steps = []
for line in Path(os.environ["STATUS"]).read_text().splitlines():
    step, status, seconds, note = line.split("\t")
    log = logs / f"{step}.log"
    tail = log.read_text(errors="replace")[-2500:] if log.exists() else ""
    steps.append({"step": step, "status": status, "seconds": int(seconds), "note": note, "log_tail": tail})
bench, oss = out / "results.json", out / "oss" / "results.json"
summary = {
    "commit": os.environ["GPTEXT_COMMIT"],
    "date": datetime.datetime.fromtimestamp(int(os.environ["START"]), datetime.timezone.utc)
            .strftime("%Y-%m-%dT%H:%M:%SZ"),
    "device": {"gpu": os.environ["GPU"] == "1", "name": name, "driver": driver},
    "torch": torch_version, "cuda": torch_cuda,
    "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    "steps": steps,
    "bench_json": str(bench) if bench.exists() else None,
    "bench_oss_json": str(oss) if oss.exists() else None,
    "log": str(out / "suite.log"),
}
(out / "gpu_suite.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"wrote {out / 'gpu_suite.json'}")
for s in steps:
    print(f"  {s['step']:<12} {s['status']:<11} {s['seconds']:>4} s  {s['note']}")
EOF

if cut -f2 "$STATUS" | grep -qE '^(fail|timeout)$'; then
  exit 1
fi
