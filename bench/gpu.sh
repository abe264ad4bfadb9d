#!/usr/bin/env bash
# Every GPU figure of bench/RESULTS.md in one run (under 8 minutes on one H200), and the tests
# that need CUDA. Each benchmark's output goes to $OUT/<name>.txt, the summary to $OUT/summary.txt.
#
#     OUT=/tmp/gpu bench/gpu.sh
#
# vtab needs pydantic, which a bare PyTorch image may lack: where `import pydantic` fails and a
# folder .whl/ holds its wheels, they are installed from there (no network needed). To fill it
# where pip can reach an index (Python 3.12 on x86_64 Linux here; change to match the machine):
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl pydantic pydantic-core annotated-types typing-inspection
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the figures}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target /tmp/vtab-site .whl/*.whl || exit 2
        export PYTHONPATH=/tmp/vtab-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "pydantic is missing and .whl/ holds no wheels: see the top of $0" >&2
        exit 2
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"

summary="$OUT/summary.txt"
: > "$summary"
# name, seconds allowed, command: the last line of each output is its ratio (or test summary).
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$summary"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local code=$?
    echo "   exit $code; $(tail -n 1 "$OUT/$name.txt")" | tee -a "$summary"
}

workers=$(( $(nproc) - 2 ))
run tests_gpu 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
run extraction 210 "$PYTHON" bench/extraction.py --device cuda --images 8192 --batch 512 \
    --workers "$workers" --compile
run batched_sweep 90 "$PYTHON" bench/batched_sweep.py --devices 0,0
run feature_store 40 "$PYTHON" bench/feature_store.py
