"""The command line: python -m fusedops <command> (see --help)."""
import argparse
import os
import sys

import torch

from fusedops import data, reference

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_data_path():
    """names.txt in the current directory, else the one at the repository's root."""
    return "names.txt" if os.path.exists("names.txt") else os.path.join(REPO_ROOT, "names.txt")


def check(args):
    """The notebooks' check: the hand-written backward vs autograd, step by step, then fusedops'
    cross-entropy gradient vs the hand-written dlogits. Exits 0 if every row is approximately equal."""
    from fusedops.cross_entropy import cross_entropy

    words = data.load_words(args.data)
    vocab = data.Vocab(words)
    (Xtr, Ytr), _, _ = data.splits(words, vocab)
    g = torch.Generator().manual_seed(args.seed)
    params = reference.init_params(vocab_size=len(vocab), generator=g)
    ix = torch.randint(0, Xtr.shape[0], (args.batch_size,), generator=g)
    Xb, Yb = Xtr[ix], Ytr[ix]

    acts = reference.forward(params, Xb, Yb)
    for name in reference.INTERMEDIATES:
        acts[name].retain_grad()
    acts["loss"].backward()
    grads = reference.backward(params, acts, Xb, Yb)
    tensors = {**acts, **params}
    rows = [reference.compare(name, dt, tensors[name].grad) for name, dt in grads.items()]

    logits = acts["logits"].detach().clone().requires_grad_()
    cross_entropy(logits, Yb).backward()
    rows.append(reference.compare("fused dlogits", logits.grad, grads["logits"]))

    print(f"loss {acts['loss'].item():.4f} on a batch of {args.batch_size} from {args.data}")
    for row in rows:
        print(reference.format_row(row))
    return 0 if all(row.approximate for row in rows) else 1


def batch_size(text):
    n = int(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (the batch variance divides by n-1), got {n}")
    return n


def add_data_args(parser):
    parser.add_argument("--data", default=default_data_path(),
                        help="one word per line (default: names.txt here, else the repository's)")
    parser.add_argument("--seed", type=int, default=reference.SEED,
                        help="seeds the generator of the parameters and the batch (default: %(default)s)")
    parser.add_argument("--batch-size", type=batch_size, default=32, help="(default: %(default)s)")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m fusedops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="hand-written gradients vs autograd vs fusedops",
                                       description=check.__doc__)
    add_data_args(check_parser)
    check_parser.set_defaults(run=check)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except data.DataError as e:
        print(f"python -m fusedops {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
