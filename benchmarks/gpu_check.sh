#!/usr/bin/env bash
# The device check: everything minimask can learn on a machine with an NVIDIA
# GPU, in one command and at most 8 minutes, without a network.
#
#   bash benchmarks/gpu_check.sh              # all stages
#   bash benchmarks/gpu_check.sh --dry-run    # print the plan, run nothing
#   bash benchmarks/gpu_check.sh --only tests,steps
#
# Stages (each under its own time limit, in seconds; a stage that fails or
# runs out of time is recorded and the next one still runs):
#   setup   install the wheels in .whl/ (if any) into a private directory -
#           numba-cuda 0.30 needs numpy < 2.5, see ../shared/device/README.md;
#           nothing is downloaded                                      (40)
#   env     nvidia-smi, python, numpy, numba, numba-cuda, torch versions (20)
#   tests   pytest -m cuda on the real GPU (every layer's kernels, the glue,
#           the training step of tests/test_device_step.py)            (180)
#   layers  benchmarks/bench_layers.py --cuda: each layer against torch /
#           torchvision CUDA where they are installed                   (90)
#   steps   benchmarks/bench_gpu_step.py: training steps of the tiny preset at
#           128 and 256 px (batch 4) and resnet50 at 512 px (batch 2),
#           bytes crossing per step (90 s), and torchvision's RetinaNet as
#           a yardstick where installed (50 s)                         (150)
# Worst case 480 s. Output: $OUT (or benchmarks/results/gpu_check/ when OUT
# is unset) gets gpu_check.log (everything printed), gpu_check.json (each
# stage's status and seconds), pytest.xml, layers_full.json, gpu_step.json.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STAGES="setup env tests layers steps"
declare -A LIMIT=([setup]=40 [env]=20 [tests]=180 [layers]=90 [steps]=150)
DRY=0
STAGES=$ALL_STAGES
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only)
      [ $# -ge 2 ] || { echo "gpu_check.sh: --only needs a comma-separated list of stages ($ALL_STAGES)" >&2; exit 2; }
      STAGES=${2//,/ }; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --dry-run, --only STAGES, --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in $STAGES; do
  case " $ALL_STAGES " in
    *" $s "*) ;;
    *) echo "gpu_check.sh: unknown stage '$s' (stages: $ALL_STAGES)" >&2; exit 2 ;;
  esac
done

OUTDIR=${OUT:-benchmarks/results/gpu_check}
PY=${PYTHON:-python3}
LOG="$OUTDIR/gpu_check.log"
SUMMARY="$OUTDIR/gpu_check.json"
SITE=${MINIMASK_SITE:-/tmp/minimask-site}

command_for() {
  case "$1" in
    setup)  echo "if ls .whl/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target $SITE .whl/*.whl; else echo 'no .whl/: using the installed packages'; fi" ;;
    env)    echo "(nvidia-smi || echo 'nvidia-smi: not found'); $PY -c 'import sys, numpy, numba; print(sys.version); print(\"numpy\", numpy.__version__, \"numba\", numba.__version__); from numba import cuda; print(\"cuda available:\", cuda.is_available()); cuda.detect()'; $PY -c 'import torch, torchvision; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"cuda\", torch.cuda.is_available())' || echo 'torch / torchvision: not installed'" ;;
    tests)  echo "$PY -m pytest -q -m cuda -p no:cacheprovider --junitxml=$OUTDIR/pytest.xml tests/" ;;
    layers) echo "$PY benchmarks/bench_layers.py --cuda --no-numpy --repeats 3 --out $OUTDIR --figures $OUTDIR" ;;
    steps)  echo "$PY benchmarks/bench_gpu_step.py --backend cuda --torch --steps 3 --timeout 90 --torch-timeout 50 --out $OUTDIR/gpu_step.json" ;;
  esac
}

if [ $DRY -eq 1 ]; then
  echo "gpu_check.sh plan (dry run): output in $OUTDIR"
  total=0
  for s in $STAGES; do
    echo "stage $s (limit ${LIMIT[$s]} s): $(command_for "$s")"
    total=$((total + LIMIT[$s]))
  done
  echo "worst case: $total s"
  exit 0
fi

mkdir -p "$OUTDIR"
: > "$LOG"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MINIMASK_QUICK=1
echo "{" > "$SUMMARY.tmp"
first=1
status=0
for s in $STAGES; do
  cmd=$(command_for "$s")
  echo "== $s (limit ${LIMIT[$s]} s): $cmd" | tee -a "$LOG"
  t0=$(date +%s)
  timeout -k 10 "${LIMIT[$s]}" bash -c "$cmd" >> "$LOG" 2>&1
  rc=$?
  t1=$(date +%s)
  case $rc in
    0) result=ok ;;
    124|137) result=timeout; status=1 ;;
    *) result=failed; status=1 ;;
  esac
  echo "== $s: $result (rc $rc) in $((t1 - t0)) s" | tee -a "$LOG"
  [ $first -eq 1 ] || echo "," >> "$SUMMARY.tmp"
  first=0
  printf '  "%s": {"result": "%s", "rc": %d, "seconds": %d, "limit": %d}' \
    "$s" "$result" "$rc" $((t1 - t0)) "${LIMIT[$s]}" >> "$SUMMARY.tmp"
done
printf '\n}\n' >> "$SUMMARY.tmp"
mv "$SUMMARY.tmp" "$SUMMARY"
echo "wrote $SUMMARY and $LOG"
exit $status
