#!/usr/bin/env bash
# Every GPU measurement of the project in one run (< 8 minutes on one H200), each with its own time limit.
#
#   bash bench/gpu_suite.sh            # on a GPU machine: the real measurements, results in $OUT or ./gpu_suite_out
#   bash bench/gpu_suite.sh --cpu      # anywhere: the same commands on tiny settings, to check the script runs
#
# Each step prints its own table; the log of each is kept in the output folder. A step that fails or runs past
# its limit is reported and the suite goes on.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT_DIR=${OUT:-gpu_suite_out}
mkdir -p "$OUT_DIR"
CPU=0
[ "${1:-}" = "--cpu" ] && CPU=1

if [ $CPU = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: torch sees no GPU; rerun with --cpu for the smoke version" >&2
    exit 2
fi
{ date -u +"date: %Y-%m-%dT%H:%M:%SZ"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "gpu: none (--cpu smoke run)"; "$PY" -c "import torch; print('torch', torch.__version__)"; } | tee "$OUT_DIR/machine.txt"

FAILED=0
step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2; shift 2
    echo; echo "== $name (limit ${limit} s): $*"
    if timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1; then
        grep -v -i "warning\|torchvision\|^\[torch.onnx\]" "$OUT_DIR/$name.log" | tail -n 25
    else
        echo "!! $name failed or ran past ${limit} s (exit $?); log: $OUT_DIR/$name.log"; tail -n 15 "$OUT_DIR/$name.log"
        FAILED=1
    fi
}

if [ $CPU = 1 ]; then
    # Smoke: mert-tiny, a few seconds of audio, one repeat.
    step extract_latency 300 "$PY" bench/extract_speed.py --preset mert-tiny --seconds 4 --repeats 1 --threads 1 \
        --modes hf,torch,bf16 --workdir "$OUT_DIR/work"
    step extract_throughput 300 "$PY" bench/extract_speed.py --preset mert-tiny --seconds 4 --clips 4 --repeats 1 \
        --threads 1 --modes torch,bf16 --workdir "$OUT_DIR/work"
else
    # Issue #13: MERT-v1-95M extraction, one 30 s clip side by side (HubertModel fp32, ours fp32, bf16) ...
    step extract_latency 150 "$PY" bench/extract_speed.py --device cuda --seconds 30 --repeats 5 \
        --modes hf,torch,bf16 --workdir "$OUT_DIR/work"
    # ... and throughput: 64 x 30 s of audio through mert-extract's batching (600 s of audio per call);
    # target >= 5,000x real time in bf16 on one H200.
    step extract_throughput 240 "$PY" bench/extract_speed.py --device cuda --seconds 30 --clips 64 --repeats 3 \
        --modes torch,bf16 --workdir "$OUT_DIR/work"
fi

echo
[ $FAILED = 0 ] && echo "gpu_suite: all steps ran; logs in $OUT_DIR" || echo "gpu_suite: some steps failed; logs in $OUT_DIR"
exit $FAILED
