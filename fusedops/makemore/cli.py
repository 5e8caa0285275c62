"""The command line: python -m fusedops <command> (see --help)."""

import argparse
import os
import sys

import torch

from fusedops import reference
from fusedops.makemore import data


def check(args):
    """The notebooks' check: the hand-written backward vs autograd, step by step, then fusedops'
    cross-entropy and batch-norm gradients vs the hand-written dlogits and dhprebn. Exits 0 if every
    row is approximately equal."""
    import fusedops

    path = data.locate(args.data)
    words = data.load_words(path)
    vocab = data.Vocab(words)
    (Xtr, Ytr), _, _ = data.splits(words, vocab)
    params, Xb, Yb = reference.notebook_batch(Xtr, Ytr, args.batch_size, args.seed, len(vocab))
    acts = reference.forward(params, Xb, Yb)
    grads = reference.backward(params, acts, Xb, Yb)
    expected = reference.autograd_grads(params, acts)
    rows = [reference.compare(name, dt, expected[name]) for name, dt in grads.items()]

    logits = acts["logits"].detach().clone().requires_grad_()
    fusedops.cross_entropy(logits, Yb).backward()
    rows.append(reference.compare("fused dlogits", logits.grad, grads["logits"]))
    hprebn = acts["hprebn"].detach().clone().requires_grad_()
    hpreact = fusedops.batch_norm(
        hprebn,
        None,
        None,
        params["bngain"].detach().view(-1),
        params["bnbias"].detach().view(-1),
        training=True,
        eps=reference.EPS,
        unbiased=True,
    )
    hpreact.backward(grads["hpreact"])  # upstream: the hand-written dhpreact
    rows.append(reference.compare("fused dhprebn", hprebn.grad, grads["hprebn"]))

    print(f"loss {acts['loss'].item():.4f} on a batch of {args.batch_size} from {path}")
    for row in rows:
        print(reference.format_row(row))
    return 0 if all(row.approximate for row in rows) else 1


def train(args):
    """Trains the notebooks' MLP on the data and reports train/val/test loss (eval mode), sampled
    names and time per step; writes loss.png and run.json to --out."""
    import json
    import time

    from fusedops.makemore import model as makemore

    if args.manual_backward and args.layers == "torch" and not args.compare:
        raise SystemExit("--manual-backward runs the fused kernels by hand: it needs --layers fusedops")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun in each of its processes
    if args.nproc > 1 or world > 1:
        check_data_parallel(args, max(args.nproc, world))
    path = data.locate(args.data, progress=not args.quiet and world == 1)  # torchrun's processes find it cached
    if args.nproc > 1 and world == 1:
        return launch(args)
    words = data.load_words(path)
    vocab = data.Vocab(words)
    device = data_parallel_init(args.device) if world > 1 else args.device
    (Xtr, Ytr), (Xval, Yval), (Xte, Yte) = ((X.to(device), Y.to(device)) for X, Y in data.splits(words, vocab))
    runs = {}
    for layers in makemore.LAYERS if args.compare else (args.layers,):
        g = torch.Generator().manual_seed(args.seed)
        model = makemore.MLP(
            len(vocab),
            n_embd=args.embed,
            n_hidden=args.hidden,
            layers=layers,
            bn_momentum=args.bn_momentum,
            backend=args.backend,
            generator=g,
        ).to(device)
        step_fn = makemore.manual_step if args.manual_backward and layers == "fusedops" else None
        if world > 1:
            step_fn = makemore.data_parallel_step(data_parallel_model(model))
        losses, seconds = makemore.train(
            model,
            Xtr,
            Ytr,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            decay_step=args.decay_step,
            generator=g,
            step_fn=step_fn,
            progress=not args.quiet and is_rank0(),
        )
        if world > 1 and not data_parallel_leave():
            return 0
        runs[layers] = dict(
            layers=layers,
            manual_backward=step_fn is makemore.manual_step,
            ms_per_step=seconds * 1e3,
            train=makemore.split_loss(model, Xtr, Ytr),
            val=makemore.split_loss(model, Xval, Yval),
            test=makemore.split_loss(model, Xte, Yte),
            samples=makemore.sample(model, vocab.itos),
            losses=losses,
        )
    report = {k: v for k, v in vars(args).items() if k not in ("run", "argv")}
    report["nproc"], report["data_file"] = world, path
    if args.compare:
        a, b = runs["fusedops"], runs["torch"]
        report["compare"] = dict(
            speed_ratio=a["ms_per_step"] / b["ms_per_step"],
            max_step_loss_diff=max(abs(x - y) for x, y in zip(a["losses"], b["losses"])),
        )
    print_runs(runs, report.get("compare"))
    out_dir = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)
    makemore.plot_losses({k: r["losses"] for k, r in runs.items()}, os.path.join(out_dir, "loss.png"))
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(dict(report, runs=runs), f)
    print(f"wrote {out_dir}/loss.png and {out_dir}/run.json")
    return 0


def check_data_parallel(args, nproc):
    if args.layers != "fusedops" or args.compare or args.manual_backward:
        raise SystemExit(
            "--nproc trains data-parallel with fusedops.SyncBatchNorm and loss.backward(): it "
            "needs --layers fusedops, without --compare and --manual-backward"
        )
    if args.batch_size < 2 * nproc:
        raise SystemExit(
            f"--nproc {nproc} splits each minibatch over the processes: --batch-size must be at "
            f"least {2 * nproc}, got {args.batch_size}"
        )


def launch(args):
    """Runs this command in --nproc processes through torchrun; its exit code. The processes get the
    command line without --nproc (torchrun's own options would claim it): WORLD_SIZE tells them."""
    import subprocess

    argv, rest = [], iter(args.argv)
    for arg in rest:
        if arg == "--nproc":
            next(rest)
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "fusedops",
        *argv,
    ]
    return subprocess.run(cmd).returncode


def data_parallel_init(device):
    """Joins torchrun's process group (gloo on CPU, NCCL on CUDA); this process's device."""
    import torch.distributed as dist

    if torch.device(device).type == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return device


def data_parallel_model(model):
    """model with every batch norm synchronised, wrapped in DistributedDataParallel. Buffers are synced
    once, not before every forward: the synchronised running statistics stay the same everywhere."""
    from torch.nn.parallel import DistributedDataParallel

    import fusedops

    return DistributedDataParallel(fusedops.convert_sync_batchnorm(model), forward_sync_buffers=False)


def data_parallel_leave():
    """Leaves the process group once every process has trained (a process that exits while gloo's threads
    still run aborts); whether this process is rank 0, which goes on to evaluate and report alone."""
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    dist.barrier()
    dist.destroy_process_group()
    return rank0


def is_rank0():
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def print_runs(runs, compare):
    names = list(runs)
    print("\n" + " " * 16 + "".join(f"{n:>14s}" for n in names))
    for key, fmt in (("train", ".4f"), ("val", ".4f"), ("test", ".4f"), ("ms_per_step", ".3f")):
        print(
            f"{key + ' loss' if key != 'ms_per_step' else 'ms per step':16s}"
            + "".join(f"{runs[n][key]:>14{fmt}}" for n in names)
        )
    if compare:
        print(
            f"fusedops / torch time per step: {compare['speed_ratio']:.2f}; largest per-step loss "
            f"difference: {compare['max_step_loss_diff']:.2e}"
        )
    for n in names:
        print(f"\n{n} samples: " + " ".join(runs[n]["samples"]))


def batch_size(text):
    n = int(text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (the batch variance divides by n-1), got {n}")
    return n


def positive_int(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_data_args(parser):
    parser.add_argument(
        "--data",
        default=None,
        help="a path or http(s) URL to a file of one word per line (a URL is downloaded once "
        "into $XDG_CACHE_HOME/fusedops or ~/.cache/fusedops). Default: names.txt here, "
        "else at the repository's root, else in that cache, else downloaded from "
        f"{data.NAMES_URL}",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=reference.SEED,
        help="seeds the generator of the parameters and the batch (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=batch_size, default=32, help="(default: %(default)s)")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m fusedops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser(
        "check", help="hand-written gradients vs autograd vs fusedops", description=check.__doc__
    )
    add_data_args(check_parser)
    check_parser.set_defaults(run=check)

    train_parser = commands.add_parser(
        "train", help="train the notebooks' MLP with fusedops layers", description=train.__doc__
    )
    add_data_args(train_parser)
    train_parser.add_argument("--steps", type=int, default=200_000, help="(default: %(default)s)")
    train_parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate, / 10 from --decay-step")
    train_parser.add_argument("--decay-step", type=int, default=None, help="(default: half of --steps)")
    train_parser.add_argument("--embed", type=int, default=10, help="embedding size (default: %(default)s)")
    train_parser.add_argument("--hidden", type=int, default=64, help="hidden units (default: %(default)s)")
    train_parser.add_argument(
        "--bn-momentum",
        type=float,
        default=0.001,
        help="running statistics: r = (1-m) r + m batch (default: %(default)s)",
    )
    train_parser.add_argument("--device", default="cpu")
    train_parser.add_argument(
        "--backend",
        choices=("cpp", "triton"),
        default=None,
        help="fusedops kernels (default: C++ on CPU, Triton on CUDA)",
    )
    train_parser.add_argument(
        "--layers",
        choices=("fusedops", "torch"),
        default="fusedops",
        help="torch: the same model in torch layers, for comparison",
    )
    train_parser.add_argument("--compare", action="store_true", help="train with both layers, side by side")
    train_parser.add_argument(
        "--manual-backward",
        action="store_true",
        help="no loss.backward(): every gradient by hand, with the fused kernels",
    )
    train_parser.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="data-parallel over this many processes (torchrun, gloo on CPU), each "
        "taking its share of every minibatch, batch norm synchronised",
    )
    train_parser.add_argument("--out", default=None, help="output directory (default: runs/<timestamp>)")
    train_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    train_parser.set_defaults(run=train)

    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except data.DataError as e:
        print(f"python -m fusedops {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
