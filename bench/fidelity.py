"""Numerical fidelity: the largest relative error of fusedops and of PyTorch eager against a float64
computation of the same inputs.

    python bench/fidelity.py [--backend cpp|triton] [--device cpu|cuda]

prints the table (markdown). The relative error of one sample's values (cross-entropy) or one
channel's (batch norm) is max|actual - exact| / max|exact|; a row of the table gives the largest over
samples or channels. --backend triton on CPU runs the Triton kernels in Triton's interpreter.
"""

import argparse
import os
import sys
from functools import partial

if __name__ == "__main__":  # this checkout's fusedops, from any working directory
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusedops  # noqa: E402
from fusedops._checks import BACKENDS  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CE_QUANTITIES = ("loss", "dlogits")
BN_QUANTITIES = ("out", "dx", "dgamma", "dbeta")
LCE_QUANTITIES = ("loss", "dinput", "dweight")


def relative_error(actual, exact, dim=None):
    """max|actual - exact| / max|exact| within each slice that reduces `dim` (each element if None), the
    largest over slices; 0 where both are 0."""
    diff, scale = (actual.double() - exact).abs(), exact.abs()
    if dim is not None:
        diff, scale = diff.amax(dim), scale.amax(dim)
    return torch.where(diff == 0, 0.0, diff / scale).max().item()


def cross_entropy_inputs(case, N=64, V=300, seed=0):
    """float64 logits and targets (on CPU); "confident": the target logit 20 above the row's max
    (softmax_t rounds to 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, V, (N,), generator=g)
    if case == "confident":
        logits[torch.arange(N), target] = logits.max(1).values + 20
    return logits, target


def linear_cross_entropy_inputs(case, N=64, H=32, V=300, seed=0):
    """float64 hidden states, weight (V, H) and targets (on CPU); "large": hidden states 8 times larger (logits
    of tens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=torch.float64) * (8 if case == "large" else 1)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    return x, weight, torch.randint(0, V, (N,), generator=g)


def batch_norm_inputs(case, N=200, C=12, seed=0):
    """float64 input, weight, bias and upstream gradient (on CPU); "shifted": input of mean 100 and std 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) + (100 if case == "shifted" else 0)
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bias, dy = torch.randn(C, generator=g, dtype=torch.float64), torch.randn(N, C, generator=g, dtype=torch.float64)
    return x, weight, bias, dy


def cross_entropy_results(fn, logits, target):
    """{quantity: (values, dim of a sample's values)}: per-sample losses and the gradient of their mean."""
    x = logits.detach().clone().requires_grad_()
    fn(x, target).backward()
    return {"loss": (fn(logits, target, reduction="none"), None), "dlogits": (x.grad, 1)}


def linear_cross_entropy_results(fn, x, weight, target):
    """{quantity: (values, dim of a sample's values)}: per-sample losses, and the gradients of their mean with
    respect to the hidden states and the weight."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    fn(*leaves, target).backward()
    loss = fn(x, weight, target, reduction="none")
    return {"loss": (loss, None), "dinput": (leaves[0].grad, 1), "dweight": (leaves[1].grad, 1)}


def linear_then_cross_entropy(x, weight, target, **options):
    """What fusedops.linear_cross_entropy replaces: the logits, then cross-entropy over them."""
    return F.cross_entropy(F.linear(x, weight), target, **options)


def batch_norm_results(fn, x, weight, bias, dy):
    """{quantity: (values, dim of a channel's values)}: training-mode output and every gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = fn(leaves[0], None, None, leaves[1], leaves[2], training=True)
    dx, dgamma, dbeta = torch.autograd.grad(out, leaves, dy)
    return {"out": (out, 0), "dx": (dx, 0), "dgamma": (dgamma, None), "dbeta": (dbeta, None)}


def table(backend=None, device="cpu"):
    """Rows (op, inputs, quantity, dtype, fusedops error, PyTorch error) against float64, every tensor
    on `device`."""
    ce = partial(fusedops.cross_entropy, backend=backend)
    bn = partial(fusedops.batch_norm, backend=backend)
    lce = partial(fusedops.linear_cross_entropy, backend=backend)
    ops = [
        ("cross_entropy", ("random", "confident"), cross_entropy_inputs, cross_entropy_results, ce, F.cross_entropy),
        (
            "linear_cross_entropy",
            ("random", "large"),
            linear_cross_entropy_inputs,
            linear_cross_entropy_results,
            lce,
            linear_then_cross_entropy,
        ),
        ("batch_norm", ("random", "shifted"), batch_norm_inputs, batch_norm_results, bn, F.batch_norm),
    ]
    rows = []
    for op, cases, make_inputs, results, fused, eager in ops:
        for case in cases:
            inputs = [t.to(device) for t in make_inputs(case)]
            for dtype in DTYPES:
                # the same inputs for all three: rounded to dtype, then exactly widened to float64
                rounded = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
                exact = results(eager, *[t.double() if t.is_floating_point() else t for t in rounded])
                ours, theirs = results(fused, *rounded), results(eager, *rounded)
                for quantity, (e, dim) in exact.items():
                    errors = (relative_error(r[quantity][0], e, dim) for r in (ours, theirs))
                    rows.append((op, case, quantity, str(dtype).removeprefix("torch."), *errors))
    return rows


def print_table(backend=None, device="cpu"):
    print("| op | inputs | quantity | dtype | fusedops | PyTorch |\n| --- | --- | --- | --- | --- | --- |")
    for op, case, quantity, dtype, ours, theirs in table(backend, device):
        print(f"| {op} | {case} | {quantity} | {dtype} | {ours:.2e} | {theirs:.2e} |")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python bench/fidelity.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default=None, help="fusedops kernels (default: C++ on CPU, Triton on CUDA)"
    )
    parser.add_argument("--device", default="cpu", help="(default: %(default)s)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False)")
    if args.backend == "triton" and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported: by the first launch
    print_table(args.backend, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
