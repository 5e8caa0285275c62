#!/usr/bin/env bash
# The GPU table in one step, on a machine with a CUDA device (see bench/run.py):
#   bash bench/gpu.sh [--data PATH] [options for bench/run.py, e.g. --quick]
# Installs nothing: it needs what the README's test command installs, with a CUDA build of torch.
# Parts, each run whatever the others gave, and each one's status in a summary at the end:
# 1. tests/test_cuda.py (the Triton kernels natively on CUDA tensors: against float64 and PyTorch,
#    gradgradcheck, opcheck, compile, CUDA graph capture, two devices), log in bench/results/cuda/pytest.log;
# 2. the fidelity table of the Triton kernels on CUDA, bench/results/cuda/fidelity.md;
# 3. the benchmark with --device cuda, one operator at a time, bench/results/cuda/*.{md,csv,png}. The makemore
#    step needs names.txt: found as `python -m fusedops train` finds it (the working directory, the
#    repository's link to ../shared/names.txt, the user cache), else downloaded; offline, give it with
#    --data PATH. Without it that one part fails, and the others still run.
# The exit status is 0 only when every part passed. PYTHON (default: python) is the interpreter used.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # the Triton kernels compiled for the GPU, not interpreted
python=${PYTHON:-python}

if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA device: torch.cuda.is_available() is False (torch $("$python" -c \
'import torch; print(torch.__version__)' 2>/dev/null)). On CPU run: python -m pytest -q; python bench/run.py" >&2
    exit 1
fi

out=bench/results/cuda
mkdir -p "$out"
parts=()
statuses=()

part() {  # part NAME COMMAND...: runs it, records its exit status
    local name=$1
    shift
    echo "== $name: $*"
    "$@"
    local status=$?
    parts+=("$name")
    statuses+=("$status")
}

tests() {
    # (not the rest of the suite, which runs on CPU: tests/test_cuda.py runs it for the README's test command)
    "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not under_the_interpreter" 2>&1 |
        tee "$out/pytest.log"
    return "${PIPESTATUS[0]}"
}

fidelity() {
    "$python" bench/fidelity.py --backend triton --device cuda > "$out/fidelity.md"
}

part "tests (tests/test_cuda.py)" tests
part "fidelity ($out/fidelity.md)" fidelity
if [[ " $* " == *" --op "* ]]; then  # the operators asked for, in one part
    part "benchmark" "$python" bench/run.py --device cuda --out "$out" "$@"
else
    for op in ce bn bn2d lce train resnet; do
        part "benchmark $op" "$python" bench/run.py --device cuda --out "$out" --op "$op" "$@"
    done
fi

echo "== summary"
failed=0
for i in "${!parts[@]}"; do
    if [ "${statuses[$i]}" -eq 0 ]; then
        echo "ok      ${parts[$i]}"
    else
        echo "FAILED  ${parts[$i]} (exit ${statuses[$i]})"
        failed=1
    fi
done
exit "$failed"
