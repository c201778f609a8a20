#!/usr/bin/env bash
# GPU check of megamor on one H100/H200 (benchmarks/gpu_check.py says what is checked).
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, with internet: wheels for the GPU machine
#   bash benchmarks/gpu_check.sh [driver args]    # on the GPU machine: install them, run the check
#   bash benchmarks/gpu_check.sh --cpu-smoke      # anywhere: the same driver on CPU, tiny shape
#
# The verdict is the last line, `gpu_check: PASS ...` or `gpu_check: FAIL ...`, within 8 minutes:
# the driver starts no run past its --deadline-s (420 s) and is stopped at MEGAMOR_GPU_CHECK_LIMIT
# seconds (470) if a run hangs.
#
# The GPU machine has Python 3.12 and a CUDA build of torch (with numpy, pyyaml, psutil,
# tokenizers, tqdm) but no megatron-core, no Transformer Engine and no internet. The packages it
# lacks travel as wheels in benchmarks/wheels/ (git-ignored, about 3 MB) and are installed with
# --no-deps into a private directory, leaving the machine's own torch alone. MLflow is not
# needed: the driver runs with tracking.enabled=false. Exit status: the driver's (non-zero on
# any failed check).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
WHEELS="$HERE/wheels"
# Exactly what megamor's training path imports beyond the GPU machine's own packages.
PACKAGES=("megatron-core==0.19.2" "webdataset==1.0.2" "braceexpand==0.1.7")
PYTHON="${PYTHON:-python3}"

fetch_wheels() {
    mkdir -p "$WHEELS"
    rm -f "$WHEELS"/*.whl
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${PACKAGES[@]}"
    ls -l "$WHEELS"
    du -sh "$WHEELS"
}

case "${1:-}" in
    --fetch-wheels)
        fetch_wheels
        exit 0
        ;;
    --cpu-smoke)
        shift
        cd "$ROOT"
        exec "$PYTHON" "$HERE/gpu_check.py" --cpu-smoke "$@"
        ;;
esac

LIMIT="${MEGAMOR_GPU_CHECK_LIMIT:-470}"
verdict_within_limit() {  # the driver, stopped at $LIMIT s with a verdict line of its own
    local rc=0
    timeout --kill-after=10 "$LIMIT" "$PYTHON" "$HERE/gpu_check.py" "$@" || rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "gpu_check: FAIL: no verdict within $LIMIT s (stopped; see the runs above)"
        return 1
    fi
    return "$rc"
}

cd "$ROOT"
if ! "$PYTHON" -c "import megatron.core, webdataset, braceexpand" 2>/dev/null; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_check: FAIL: megatron-core / webdataset are not installed and $WHEELS has no wheels;" \
             "run 'bash benchmarks/gpu_check.sh --fetch-wheels' on a machine with internet" >&2
        exit 2
    fi
    SITE="${GPU_CHECK_SITE:-/tmp/megamor-site}"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch, megatron.core; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, '| megatron-core', megatron.core.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
verdict_within_limit "$@"
