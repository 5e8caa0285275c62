"""The notebooks' makemore character MLP, as a model that trains on names.txt with fusedops layers
(or, for comparison, the same model in plain torch layers): model, training loop, evaluation, sampling.

    embedding (27 x 10) -> Linear 30 -> 64 -> BatchNorm1d (Bessel-corrected) -> tanh -> Linear 64 -> 27 -> cross-entropy
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedops
from fusedops import reference

LAYERS = ("fusedops", "torch")


class BesselBatchNorm1d(nn.BatchNorm1d):
    """torch.nn.BatchNorm1d normalising with the Bessel-corrected batch variance, as the notebooks do:
    the notebooks' batch norm written in torch ops (the chunked reference), for the torch model."""

    def forward(self, input):
        momentum = self.momentum
        if self.training and self.track_running_stats and momentum is None:
            self.num_batches_tracked += 1
            momentum = 1.0 / float(self.num_batches_tracked)
        return reference.batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            momentum,
            self.eps,
            unbiased=True,
        )


class MLP(nn.Module):
    """The notebooks' model with their initialisation, drawn from `generator` in their order."""

    def __init__(
        self,
        vocab_size=27,
        block_size=3,
        n_embd=10,
        n_hidden=64,
        *,
        layers="fusedops",
        bn_momentum=0.001,
        backend=None,
        generator=None,
    ):
        super().__init__()
        if layers not in LAYERS:
            raise ValueError(f"layers must be one of {LAYERS}, got {layers!r}")
        self.layers, self.backend = layers, backend
        p = reference.init_params(vocab_size, n_embd, n_hidden, block_size, generator=generator, bngain=(0.1, 1.0))
        self.embedding = nn.Embedding(vocab_size, n_embd)
        self.hidden = nn.Linear(n_embd * block_size, n_hidden)
        bn = (
            fusedops.BatchNorm1d(n_hidden, momentum=bn_momentum, unbiased=True, backend=backend)
            if layers == "fusedops"
            else BesselBatchNorm1d(n_hidden, momentum=bn_momentum)
        )
        self.bn = bn
        self.output = nn.Linear(n_hidden, vocab_size)
        with torch.no_grad():  # the notebooks keep W as (in, out); nn.Linear as (out, in)
            self.embedding.weight.copy_(p["C"])
            self.hidden.weight.copy_(p["W1"].T), self.hidden.bias.copy_(p["b1"])
            self.bn.weight.copy_(p["bngain"].view(-1)), self.bn.bias.copy_(p["bnbias"].view(-1))
            self.output.weight.copy_(p["W2"].T), self.output.bias.copy_(p["b2"])

    def forward(self, X):
        embcat = self.embedding(X).flatten(1)  # (n, block_size * n_embd)
        h = torch.tanh(self.bn(self.hidden(embcat)))
        return self.output(h)

    def loss(self, X, Y):
        return self.criterion(self(X), Y)

    def criterion(self, logits, Y, reduction="mean"):
        if self.layers == "fusedops":
            return fusedops.cross_entropy(logits, Y, reduction=reduction, backend=self.backend)
        return F.cross_entropy(logits, Y, reduction=reduction)


@torch.no_grad()
def split_loss(model, X, Y, batch_size=65536):
    """Mean loss over a whole split in eval mode (running batch-norm statistics)."""
    was_training = model.training
    model.eval()
    total = sum(
        model.loss(X[i : i + batch_size], Y[i : i + batch_size]).item() * len(X[i : i + batch_size])
        for i in range(0, len(X), batch_size)
    )
    model.train(was_training)
    return total / len(X)


def train(model, X, Y, *, steps, batch_size, lr, generator, decay_step=None, step_fn=None, progress=True):
    """SGD on minibatches drawn with `generator`; lr / 10 from `decay_step` (default: half way).
    Returns (per-step losses, seconds per step)."""
    from tqdm import tqdm

    decay_step = steps // 2 if decay_step is None else decay_step
    params = list(model.parameters())
    step_fn = step_fn or autograd_step
    losses = []
    model.train()
    bar = tqdm(range(steps), disable=not progress, mininterval=0.5, desc=f"{model.layers} layers")
    start = time.perf_counter()
    for i in bar:
        ix = torch.randint(0, X.shape[0], (batch_size,), generator=generator)
        loss, grads = step_fn(model, X[ix], Y[ix])
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-(lr if i < decay_step else lr / 10))  # p -= lr * dp
        losses.append(loss.item())
        if i % 1000 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses, (time.perf_counter() - start) / max(steps, 1)


def autograd_step(model, Xb, Yb):
    """(loss, gradient of every parameter) by loss.backward()."""
    for p in model.parameters():
        p.grad = None
    loss = model.loss(Xb, Yb)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def data_parallel_step(ddp):
    """A step function for `train` in each process of a DistributedDataParallel model: the process
    takes its share of the minibatch (every process draws the same one), and the gradients and the
    loss are those of the whole minibatch."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()

    def step(model, Xb, Yb):
        for p in model.parameters():
            p.grad = None
        loss_sum = model.criterion(ddp(Xb.tensor_split(world)[rank]), Yb.tensor_split(world)[rank], reduction="sum")
        # DDP averages the processes' gradients: scaled by world / n, that average is the minibatch mean's
        (loss_sum * (world / len(Xb))).backward()
        loss = loss_sum.detach() / len(Xb)
        dist.all_reduce(loss)  # the minibatch's mean loss
        return loss, [p.grad for p in model.parameters()]

    return step


@torch.no_grad()
def manual_step(model, Xb, Yb):
    """The notebooks' last exercise: no loss.backward(). Every gradient by hand (matmuls, tanh, the
    embedding's scatter-add), the fused kernels for the cross-entropy and batch-norm layers."""
    if model.layers != "fusedops":
        raise ValueError("manual_step runs the fused kernels: it needs a model with fusedops layers")
    C, bn = model.embedding.weight, model.bn
    W1, b1, W2, b2 = model.hidden.weight, model.hidden.bias, model.output.weight, model.output.bias
    embcat = C[Xb].flatten(1)
    hprebn = F.linear(embcat, W1, b1)  # embcat @ W1^T + b1
    bn_options = fusedops.BatchNormOptions(training=True, unbiased=bn.unbiased, eps=bn.eps, backend=model.backend)
    hpreact, mean, invstd, var = fusedops.BatchNormFunction.apply(
        hprebn, bn.weight, bn.bias, None, None, None, bn_options
    )
    fusedops.update_running_stats(bn, mean, var)
    h = torch.tanh(hpreact)
    logits = F.linear(h, W2, b2)
    ce_options = fusedops.CrossEntropyOptions(backend=model.backend)  # the mean over the batch
    loss, dlogits, _ = fusedops.CrossEntropyFunction.apply(logits, Yb, None, ce_options)  # (softmax - one_hot) / n
    dh, dW2, db2 = dlogits @ W2, dlogits.T @ h, dlogits.sum(0)  # logits = h @ W2^T + b2
    dhpreact = (1.0 - h**2) * dh  # tanh' = 1 - tanh^2
    dhprebn, dgamma, dbeta = fusedops.batch_norm_backward(
        dhpreact, hprebn, mean, invstd, bn.weight, unbiased=bn.unbiased, backend=model.backend
    )
    dembcat, dW1, db1 = dhprebn @ W1, dhprebn.T @ embcat, dhprebn.sum(0)  # hprebn = embcat @ W1^T + b1
    dC = torch.zeros_like(C).index_add_(0, Xb.view(-1), dembcat.view(-1, C.shape[1]))  # emb = C[Xb]
    return loss, [dC, dW1, db1, dgamma.to(bn.weight.dtype), dbeta.to(bn.bias.dtype), dW2, db2]


@torch.no_grad()
def sample(model, itos, count=20, seed=reference.SEED + 10, block_size=3):
    """Names drawn one character at a time from the model in eval mode, as the notebooks do."""
    g = torch.Generator().manual_seed(seed)
    device = model.embedding.weight.device
    was_training = model.training
    model.eval()
    names = []
    for _ in range(count):
        context, out = [0] * block_size, []
        while True:
            probs = F.softmax(model(torch.tensor([context], device=device)), dim=1)
            ix = torch.multinomial(probs.cpu(), num_samples=1, generator=g).item()
            context = context[1:] + [ix]
            if ix == 0:
                break
            out.append(itos[ix])
        names.append("".join(out))
    model.train(was_training)
    return names


def plot_losses(curves, path, every=1000):
    """log10 of the loss averaged over each `every` steps (fewer for short runs), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, losses in curves.items():
        chunk = max(1, min(every, len(losses) // 20))
        n = len(losses) // chunk * chunk
        means = torch.tensor(losses[:n]).view(-1, chunk).mean(1).log10()
        ax.plot(
            torch.arange(len(means)) * chunk + chunk / 2,
            means,
            label=f"{label} layers",
            linestyle="--" if label == "torch" else "-",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(f"log10 loss (mean per {chunk} steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
