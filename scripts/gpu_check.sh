#!/usr/bin/env bash
# Every GPU check of eegfast in one run on a CUDA machine: builds the CUDA extension, runs the
# GPU tests (`pytest -m gpu`) and the GPU benchmarks, and leaves logs and result tables in $OUT.
#
#   OUT=/some/dir scripts/gpu_check.sh [STAGE ...]     # from the repository root
#
# Stages (default: all, in this order): qk-tests build-wait cuda-tests cuda-bench qk-bench
# pretrain head-loss pretrain-large; qk-bench-base (LaBraM-Base's shape only) is not in the
# default list.
# The extension is built in a copy of the tree (/tmp/eegfast-ext) in the background, so the
# Triton stages run meanwhile without it; it is copied into eegfast/ when done (`build-wait`).
# Each stage has its own time limit (seconds in STAGE_LIMIT_<name>, defaults below): a stuck
# stage costs its limit, not the other stages' results. summary.txt lists each stage's exit
# status and time; results.tar.gz holds the tables (Markdown, CSV, JSON, PNG), the attention's
# autotuning timings per config (gpu_qk_norm_attention_tuning.json) and, per benchmark,
# *_kernels.md: where eegfast's time goes, kernel by kernel (torch.profiler).
#
# Times seen on an H200 machine (16 cores, 2026-12-04): build 350 s at -O3 (now -O1, ~1 min;
# niced, beside the first stages), qk-tests 140 s, cuda-tests 90 s (before its kernel-image
# probe, VQ overflow and pinned-batch tests), cuda-bench 60 s (before
# its torch.compile MoE rows: their compilation may add ~1 min; its limit is 210 s), qk-bench
# > 160 s, pretrain 185 s for the two reference rows (the compiled one ~150 s of it) with the
# eegfast rows failing early: expect ~400 s for all five rows (three compiled; the rows the
# issue compares, reference-eager, eegfast, reference-compile, run first, ~220 s). qk-bench
# autotunes every kernel for each shape, dtype and loop variant on first use (16
# configurations a shape and variant, plus one for each tail launch; the `eegfast-triton` rows
# also time the three launch choices per case, which the pinned variant rows then reuse
# compiled; the tests pin the choices): if the lease is short, `qk-bench-base` times the shape
# the targets name first. Two calls, each within the 10-minute command limit: `qk-bench-base
# qk-tests build-wait cuda-tests` (~6-8 minutes), then at once, while the machine is still
# warm, `pretrain cuda-bench head-loss` (~8 minutes; cuda-bench times the VQ ops and the MoE
# GEMMs; head-loss: the pretraining head's chunked loss against the kept logits, ~30 s). Both
# together take more than a 15-minute lease holds with the machine's start: set
# GPU_CHECK_BUDGET on each call to what is left, and cut the long stages so that the later ones
# run: `STAGE_LIMIT_qk_bench_base=180 GPU_CHECK_BUDGET=420 ... qk-bench-base qk-tests build-wait
# cuda-tests`, then `STAGE_LIMIT_pretrain=240 GPU_CHECK_BUDGET=<left-60> ... pretrain cuda-bench
# head-loss` (pretrain's three compared rows come first, ~220 s). If the first call's
# summary.txt lacks "extension copied", add build-wait to the second.
#
# The whole script keeps within GPU_CHECK_BUDGET seconds (default 570: a lent machine's
# command is killed at 600 s, with whatever is not yet in $OUT): each stage's limit is cut to
# what is left of it, a stage with under 30 s left is skipped, and results.tar.gz is written
# after every stage. The benchmarks rewrite their tables after every row, so a stage stopped
# at its limit keeps the rows it finished. It stops at once (exit 2) on an unknown stage name
# or when torch sees no CUDA device; its exit status is 1 when a stage failed, was skipped
# or timed out.
set -u
OUT=${OUT:-$PWD/gpu-check}
PY=${PY:-python3}
[[ $PY == */* ]] && PY=$(realpath -s "$PY") # the build runs in another folder
RESULTS=${GPU_CHECK_RESULTS:-/tmp/eegfast-gpu-results}
EXT=/tmp/eegfast-ext
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-570}
SUMMARY=$OUT/summary.txt
FAILED=0

note() { echo "[+$(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }
# seconds of the budget left, less 15 for the kill grace and the last tar
left() { echo $((BUDGET - ($(date +%s) - START) - 15)); }

# stage NAME DEFAULT_LIMIT LOG COMMAND...: runs COMMAND under its limit (cut to the budget
# left), logs into $OUT/LOG.
stage() {
  local name=$1 limit_var="STAGE_LIMIT_${1//-/_}" log=$OUT/$3
  local limit=${!limit_var:-$2} budget_left status
  budget_left=$(left)
  shift 3
  if [ "$budget_left" -lt 30 ]; then
    note "skip $name: ${budget_left}s of GPU_CHECK_BUDGET=${BUDGET}s left"
    FAILED=1
    return
  fi
  [ "$limit" -gt "$budget_left" ] && limit=$budget_left
  note "start $name (limit ${limit}s)"
  echo "===== $name: $*" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  status=$?
  [ $status -eq 0 ] || FAILED=1
  [ $status -eq 124 ] || [ $status -eq 137 ] && note "$name stopped at its ${limit}s limit"
  note "end $name: exit $status"
}

start_build() {
  rm -rf "$EXT" && mkdir -p "$EXT"
  cp -r setup.py pyproject.toml README.md csrc eegfast "$EXT"/
  find "$EXT" -name '*.so' -delete
  (
    # -O1 for the C++ sources: nothing here times the CPU kernels, and the attention kernel's
    # file alone took 350 s at -O3 on the H200 machine (the whole CUDA build waited for it).
    # nice: the benchmarks run beside it, and a Python thread that waits for a core would
    # show up in the launch-bound timings (the attention's 0.1 ms target).
    cd "$EXT" && EEGFAST_CUDA=1 EEGFAST_CPU_OPT=${EEGFAST_CPU_OPT:-1} MAX_JOBS=${MAX_JOBS:-14} \
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
      timeout ${BUILD_LIMIT:-420} nice -n 19 "$PY" setup.py build_ext --inplace
    echo "build exit $?"
  ) >"$OUT/build.log" 2>&1 &
  BUILD_PID=$!
  note "build started in $EXT (pid $BUILD_PID)"
}

wait_build() {
  note "waiting for the build"
  while kill -0 "$BUILD_PID" 2>/dev/null && [ "$(left)" -gt 30 ]; do sleep 2; done
  if kill -0 "$BUILD_PID" 2>/dev/null; then
    note "build still running with $(left)s of GPU_CHECK_BUDGET left: not waiting for it"
    FAILED=1
    return
  fi
  wait "$BUILD_PID"
  note "$(tail -1 "$OUT/build.log")"
  local so
  so=$(ls "$EXT"/eegfast/_C*.so 2>/dev/null | head -1)
  if [ -n "$so" ]; then
    cp "$so" eegfast/ && note "extension copied: $(basename "$so")"
  else
    note "no extension built: the CUDA stages run without it"
  fi
  "$PY" -c "from eegfast.ops import available_backends as a; [print(k, v) for k, v in a().items()]" 2>&1 | tee -a "$SUMMARY"
}

# results.tar.gz: the tables so far, replaced whole (a tar stopped half-way, by the machine's
# kill at its command limit, say, leaves the previous stage's archive, not a truncated one).
save_results() {
  local part=$OUT/results.tar.gz.part
  if tar -czf "$part" -C "$RESULTS" . 2>/dev/null; then
    mv -f "$part" "$OUT/results.tar.gz"
  else
    rm -f "$part"
  fi
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -m gpu -o addopts=-ra)
# pytest-xdist, where installed, compiles the Triton kernels of several tests at once.
workers() { "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"; }
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(qk-tests build-wait cuda-tests cuda-bench qk-bench pretrain head-loss pretrain-large)
KNOWN=" qk-tests build-wait cuda-tests cuda-bench qk-bench qk-bench-base pretrain head-loss pretrain-large "
for s in "${stages[@]}"; do
  if [[ $KNOWN != *" $s "* ]]; then
    note "unknown stage '$s' (stages:$KNOWN): nothing run"
    exit 2
  fi
done

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
  nproc
} >>"$SUMMARY" 2>&1
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" >>"$SUMMARY" 2>&1; then
  note "$PY's torch sees no CUDA device: nothing run"
  exit 2
fi

BUILD_PID=
[[ " ${stages[*]} " == *" build-wait "* ]] && start_build
for s in "${stages[@]}"; do
  case $s in
  qk-tests) stage qk-tests 200 tests.log "${PYTEST[@]}" $(workers 8) tests/ops/test_qk_norm_attention_triton.py ;;
  pretrain) stage pretrain 400 bench.log "$PY" -m benchmarks.bench_pretrain --gpu --size base --out "$RESULTS" ;;
  build-wait) wait_build ;;
  cuda-tests) stage cuda-tests 150 tests.log env EEGFAST_REQUIRE_EXT=1 "${PYTEST[@]}" $(workers 4) tests/ops/test_vq.py tests/ops/test_vq_ema.py tests/ops/test_moe.py tests/ops/test_cuda_arch_readiness.py tests/ops/test_cuda_review_s30.py tests/nn tests/models/test_pretrain.py tests/train/test_engine.py tests/train/test_batch_path_audit.py tests/data/test_dataset.py ;;
  cuda-bench) stage cuda-bench 210 bench.log "$PY" -m benchmarks.gpu --ops vq moe --out "$RESULTS" ;;
  qk-bench) stage qk-bench 300 bench.log "$PY" -m benchmarks.gpu_qk_norm_attention --out "$RESULTS" ;;
  qk-bench-base) stage qk-bench-base 300 bench.log "$PY" -m benchmarks.gpu_qk_norm_attention --shapes base --out "$RESULTS" ;;
  head-loss) stage head-loss 90 bench.log "$PY" -m benchmarks.bench_losses --gpu --out "$RESULTS" ;;
  pretrain-large) stage pretrain-large 240 bench.log "$PY" -m benchmarks.bench_pretrain --gpu --size large --out "$RESULTS" ;;
  esac
  save_results
done
note "done$([ $FAILED -eq 0 ] || echo ': a stage failed, was skipped or timed out')"
exit $FAILED
