#!/usr/bin/env bash
# The GPU table in one step, on a machine with a CUDA device (see bench/run.py):
#   bash bench/gpu.sh [options for bench/run.py, e.g. --quick or --op ce]
# Installs nothing: it needs what the README's test command installs, with a CUDA build of torch.
# 1. tests/test_cuda.py (the Triton kernels natively on CUDA tensors: against PyTorch, gradgradcheck,
#    opcheck, compile, CUDA graph capture), its log in bench/results/cuda/pytest.log; the rest of the
#    suite runs the Triton kernels on CPU tensors through the interpreter, on a machine without a GPU;
# 2. the fidelity table of the Triton kernels on CUDA, bench/results/cuda/fidelity.md;
# 3. the benchmark with --device cuda, bench/results/cuda/*.{md,csv,png}.
# Steps 2 and 3 run even if tests fail (their numbers help find why); the exit status is then the tests'.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # the Triton kernels compiled for the GPU, not interpreted

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA device: torch.cuda.is_available() is False (torch $(python -c \
'import torch; print(torch.__version__)' 2>/dev/null)). On CPU run: python -m pytest -q; python bench/run.py" >&2
    exit 1
fi

out=bench/results/cuda
mkdir -p "$out"
echo "== python -m pytest -q -p no:cacheprovider tests/test_cuda.py (log: $out/pytest.log)"
python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/pytest.log"
tests=$?
echo "== python bench/fidelity.py --backend triton --device cuda > $out/fidelity.md"
python bench/fidelity.py --backend triton --device cuda > "$out/fidelity.md" || exit
echo "== python bench/run.py --device cuda --out $out $*"
python bench/run.py --device cuda --out "$out" "$@" || exit
if [ "$tests" -ne 0 ]; then
    echo "bench/gpu.sh: the test suite failed on CUDA (exit $tests): see $out/pytest.log" >&2
fi
exit "$tests"
