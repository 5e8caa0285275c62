"""The benchmark suite: fusedops against PyTorch eager, torch.compile of the same eager code, the
chunked reference and the copy floor (forward, backward, forward+backward; median, spread, peak
memory); cross-entropy plain and with its options (class weights, probability targets, z-loss with
soft-capping) against the eager code each replaces, up to 128k-class vocabularies, against its targets;
BatchNorm2d at ResNet shapes alone and fused with ReLU and the residual add, against its targets; linear
cross-entropy (the LM head's F.linear + F.cross_entropy, fused so that the logits never exist whole) against
eager, torch.compile and cut-cross-entropy, with its memory and time against the vocabulary; the makemore
training step; a ResNet-18 training step with torch's and fusedops' batch norm.
What runs is declared in bench/cases.py; how it is timed, in bench/harness.py.

    python bench/run.py [--op ce bn bn2d lce train resnet] [--quick] [--out DIR] [--device cpu|cuda]
                        [--threads N] [--min-run-time S] [--data PATH|URL]

Writes {cross_entropy,batch_norm,batch_norm2d,linear_cross_entropy,train,resnet}.{md,csv,png} to bench/results/ (CPU),
bench/results/cuda/ (CUDA), or a quick/ folder inside with --quick. Runs from any directory.

On a machine with a GPU, one command runs the test suite on CUDA (the Triton kernels natively) and then
this benchmark with --device cuda, writing the results, pytest's log and the fidelity table to
bench/results/cuda/; it installs nothing, and fails at once when there is no CUDA device:

    bash bench/gpu.sh [options for bench/run.py, e.g. --quick]
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's fusedops and bench, from any working directory

import torch  # noqa: E402

from bench import harness  # noqa: E402
from fusedops.makemore.data import DataError  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--op", nargs="+", choices=harness.OPS, default=list(harness.OPS))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes, fp32, forward+backward, nothing compiled (no torch.compile, no "
        "cut-cross-entropy): about a minute",
    )
    parser.add_argument(
        "--out", default=None, help="(default: bench/results, bench/results/cuda on CUDA; quick/ inside with --quick)"
    )
    parser.add_argument("--device", default=None, help="(default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="(default: %(default)s)")
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds per measurement (default: 0.5, 0.05 with --quick; resnet: 3, 0.2)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="names for --op train: a path or an http(s) URL (default: names.txt here, at "
        "the repository's root or in the cache, else downloaded)",
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is not None and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False)")
    torch.set_num_threads(args.threads)
    try:
        harness.run(
            args.op,
            out_dir=args.out,
            quick=args.quick,
            device=args.device,
            min_run_time=args.min_run_time,
            data_path=args.data,
        )
    except DataError as e:
        print(f"python bench/run.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
