#!/usr/bin/env bash
# The test command: everything CI runs, in three pytest sessions.
#   1. the CPU suite: the NumPy reference, the Numba CPU kernels, nn, notebooks
#      (the chapters run in quick mode, MINIMASK_QUICK=1);
#   2. the CUDA kernels in the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1 must
#      be set before Numba is imported, hence a separate process), tiny sizes;
#   3. on a machine with a real GPU, the same CUDA cases on the GPU.
# Extra arguments go to every pytest run (e.g. -x, -k roi).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
status=0

echo "== 1/2: CPU suite (numpy + cpu backends, notebooks in quick mode) =="
MINIMASK_QUICK=1 "$PY" -m pytest -m "not cuda" "$@" || status=1

echo "== 2/2: CUDA kernels in the Numba CUDA simulator =="
NUMBA_ENABLE_CUDASIM=1 "$PY" -m pytest -m cuda -p no:cacheprovider "$@"
rc=$?
# exit code 5 means no test was collected; that is a failure here, since the
# simulator run must exercise the kernels.
[ $rc -ne 0 ] && status=1

if "$PY" -c "from numba import cuda; import sys; sys.exit(0 if cuda.is_available() else 1)" 2>/dev/null; then
  echo "== GPU found: CUDA kernels on the real device =="
  "$PY" -m pytest -m cuda "$@" || status=1
fi
exit $status
