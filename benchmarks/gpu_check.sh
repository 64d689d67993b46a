#!/usr/bin/env bash
# GPU check (issue 16, item 4), in one go on a machine with a CUDA device, from anywhere in the repository:
#   1. the environment: nvidia-smi, and what torch sees (version, CUDA, cuDNN, device) and which mq plugins load;
#   2. the tests marked gpu:  pytest -m gpu tests/gpu -q;
#   3. benchmarks/qat_step.py --device cuda, then again with --compile (torch.compile rows);
#   4. benchmarks/calibration_throughput.py --device cuda (images/s).
# Everything printed is also written to RESULTS_DIR/gpu_check.md, and each benchmark writes its own table there too.
# Each step has a time limit (9 minutes in all at worst, a few minutes normally). Exit status: the tests'
# (non-zero when a test fails), or 3 when no Python here has a torch that sees a CUDA device.
#
# Usage: bash benchmarks/gpu_check.sh [RESULTS_DIR]      (default: benchmarks/results)
# Python: $MQ_PYTHON if set, else the first of .venv/bin/python, python3, python whose torch sees a CUDA device.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
RESULTS_DIR=${1:-benchmarks/results}
mkdir -p "$RESULTS_DIR" || exit 2
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)

CUDA_PROBE='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'

pick_python() {
    local candidate
    for candidate in ${MQ_PYTHON:-} .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && timeout 120 "$candidate" -c "$CUDA_PROBE" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# step LIMIT NAME COMMAND...: run COMMAND with a time limit, print its exit status and duration, return the status.
step() {
    local limit=$1 name=$2 start=$SECONDS rc
    shift 2
    echo
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=15 "$limit" "$@"
    rc=$?
    local note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (timed out)"; fi
    echo "=== $name: exit $rc after $((SECONDS - start)) s$note"
    return "$rc"
}

main() {
    echo "# GPU check"
    echo
    echo '```text'
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'), host: $(hostname), commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 30 nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    local py
    if ! py=$(pick_python); then
        echo "No Python here has a torch that sees a CUDA device (tried: ${MQ_PYTHON:-} .venv/bin/python python3"
        echo "python). The project's .venv may hold a CPU-only torch; set MQ_PYTHON to a Python with a CUDA torch and"
        echo "the project installed (pip install -e . -e plugins/mq_algos)."
        echo '```'
        return 3
    fi
    echo "python: $py"
    timeout 120 "$py" - <<'EOF'
import platform

import torch

import mq_core as mq

print(f"Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, mq-core {mq.__version__}")
for index in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(index)
    print(f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
          f"{props.major}.{props.minor}")
print("PTQ methods:", ", ".join(mq.list_ptq_methods()))
print("fake quantizers:", ", ".join(mq.list_fake_quantizers()))
EOF

    local tests_rc=0 failed=()
    step 180 "tests marked gpu" "$py" -m pytest -m gpu tests/gpu -q -p no:cacheprovider || tests_rc=$?
    step 90 "QAT step on CUDA" "$py" benchmarks/qat_step.py --device cuda \
        --out "$RESULTS_DIR/qat_step_cuda.md" || failed+=("qat_step")
    step 180 "QAT step on CUDA with torch.compile" "$py" benchmarks/qat_step.py --device cuda --compile \
        --steps 5 --repeats 2 --out "$RESULTS_DIR/qat_step_cuda_compile.md" || failed+=("qat_step --compile")
    step 90 "calibration throughput on CUDA" "$py" benchmarks/calibration_throughput.py --device cuda \
        --out "$RESULTS_DIR/calibration_throughput_cuda.md" || failed+=("calibration_throughput")

    echo
    echo "tests: exit $tests_rc; benchmarks that failed or timed out: ${failed[*]:-none}"
    echo '```'
    return "$tests_rc"
}

main 2>&1 | tee "$RESULTS_DIR/gpu_check.md"
exit "${PIPESTATUS[0]}"
