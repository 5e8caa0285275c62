"""Cross-entropy forward+backward on CPU: fusedops against PyTorch eager and the copy floor.

    python bench/cross_entropy.py [--shapes 32x27 4096x1024] [--threads 2]

Prints one markdown row per shape: median times and the speed-up over eager, all from the same run.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import fusedops


def median_ms(fn, min_run_time):
    fn()  # warm up (and build the extension on first use)
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def fwd_bwd(loss_fn, logits, target):
    def step():
        logits.grad = None
        loss_fn(logits, target).backward()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["32x27", "4096x1024"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, forward+backward, median ms\n")
    print("| N x V | eager | fusedops | copy floor | speed-up vs eager | fusedops / floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes:
        N, V = map(int, shape.split("x"))
        logits = torch.randn(N, V, requires_grad=True)
        target = torch.randint(0, V, (N,))
        eager = median_ms(fwd_bwd(F.cross_entropy, logits, target), args.min_run_time)
        fused = median_ms(fwd_bwd(fusedops.cross_entropy, logits, target), args.min_run_time)
        out, src = torch.empty_like(logits), logits.detach()
        floor = median_ms(lambda: out.copy_(src), args.min_run_time)  # read and write N*V once
        print(f"| {N}x{V} | {eager:.3f} | {fused:.3f} | {floor:.3f} | {eager / fused:.2f}x | {fused / floor:.2f}x |")


if __name__ == "__main__":
    main()
