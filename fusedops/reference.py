"""The chunked reference: the makemore MLP's forward pass in small steps, each one backpropagated by
hand, and the cross-entropy and batch norm steps as functional references differentiated by autograd.

    emb -> embcat -> hprebn (linear) -> batch norm -> hpreact -> h (tanh) -> logits (linear) -> loss
"""

from collections import namedtuple

import torch
import torch.nn.functional as F

SEED = 2147483647  # the notebooks' generator seed
EPS = 1e-5  # batch norm's epsilon

# the forward pass's intermediates, from the loss down to the embedding
INTERMEDIATES = (
    "logprobs",
    "probs",
    "counts_sum_inv",
    "counts_sum",
    "counts",
    "norm_logits",
    "logit_maxes",
    "logits",
    "h",
    "hpreact",
    "bnraw",
    "bnvar_inv",
    "bnvar",
    "bndiff2",
    "bndiff",
    "bnmeani",
    "hprebn",
    "embcat",
    "emb",
)
PARAMETERS = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")


def init_params(vocab_size=27, n_embd=10, n_hidden=64, block_size=3, seed=SEED, generator=None, bngain=(1.0, 0.0)):
    """The notebooks' parameters, drawn in their order from `generator` (or a fresh one seeded with
    `seed`); all require grad. Pass your own generator to keep drawing minibatches from it after.
    bngain = randn * scale + shift: (1.0, 0.0) as the exercise notebook, which wants gains far from 1
    to expose a wrong backward; (0.1, 1.0) as the notebook that trains the model."""
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    fan_in = n_embd * block_size
    params = {
        "C": torch.randn((vocab_size, n_embd), generator=g),
        "W1": torch.randn((fan_in, n_hidden), generator=g) * (5 / 3) / fan_in**0.5,  # Kaiming: tanh gain / sqrt(fan_in)
        "b1": torch.randn(n_hidden, generator=g) * 0.1,  # useless under batch norm, kept to check it
        "W2": torch.randn((n_hidden, vocab_size), generator=g) * 0.1,
        "b2": torch.randn(vocab_size, generator=g) * 0.1,
        "bngain": torch.randn((1, n_hidden), generator=g) * bngain[0] + bngain[1],
        "bnbias": torch.randn((1, n_hidden), generator=g) * 0.1,
    }
    for p in params.values():
        p.requires_grad = True
    return params


def notebook_batch(X, Y, batch_size=32, seed=SEED, vocab_size=27):
    """The notebooks' parameters, then one minibatch of (X, Y), both drawn from one generator."""
    g = torch.Generator().manual_seed(seed)
    params = init_params(vocab_size=vocab_size, generator=g)
    ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)
    return params, X[ix], Y[ix]


def forward(params, Xb, Yb):
    """The forward pass, one small step at a time: a dict of every intermediate, 'loss' last."""
    C, W1, b1, W2, b2, bngain, bnbias = (params[k] for k in PARAMETERS)
    n = Xb.shape[0]
    emb = C[Xb]  # (n, block_size, n_embd) embed the characters
    embcat = emb.view(emb.shape[0], -1)  # concatenate the vectors
    hprebn = embcat @ W1 + b1  # hidden layer pre-activation
    bnmeani = 1 / n * hprebn.sum(0, keepdim=True)  # mean over the batch
    bndiff = hprebn - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdim=True)  # Bessel's correction: n-1, not n
    bnvar_inv = (bnvar + EPS) ** -0.5
    bnraw = bndiff * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2  # output layer
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes  # subtract the max so that exp cannot overflow
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdim=True)
    counts_sum_inv = counts_sum**-1  # (1.0 / counts_sum) would not backprop bit-exactly
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    loss = -logprobs[range(n), Yb].mean()
    return dict(
        emb=emb,
        embcat=embcat,
        hprebn=hprebn,
        bnmeani=bnmeani,
        bndiff=bndiff,
        bndiff2=bndiff2,
        bnvar=bnvar,
        bnvar_inv=bnvar_inv,
        bnraw=bnraw,
        hpreact=hpreact,
        h=h,
        logits=logits,
        logit_maxes=logit_maxes,
        norm_logits=norm_logits,
        counts=counts,
        counts_sum=counts_sum,
        counts_sum_inv=counts_sum_inv,
        probs=probs,
        logprobs=logprobs,
        loss=loss,
    )


@torch.no_grad()
def backward(params, acts, Xb, Yb):
    """The gradient of the loss with respect to every intermediate and parameter, by hand: a dict
    keyed like `acts` and `params`, in the order the notebooks backpropagate."""
    C, W1, b1, W2, b2, bngain, bnbias = (params[k] for k in PARAMETERS)
    (
        logprobs,
        probs,
        counts_sum_inv,
        counts_sum,
        counts,
        norm_logits,
        logit_maxes,
        logits,
        h,
        hpreact,
        bnraw,
        bnvar_inv,
        bnvar,
        bndiff2,
        bndiff,
        bnmeani,
        hprebn,
        embcat,
        emb,
    ) = (acts[k] for k in INTERMEDIATES)
    n = Xb.shape[0]
    dlogprobs = torch.zeros_like(logprobs)
    dlogprobs[range(n), Yb] = -1.0 / n  # loss = -(sum of the n picked logprobs) / n
    # log(p)' = 1/p; dividing as autograd does: (1.0/probs) * dlogprobs rounds twice unless n = 2^k
    dprobs = dlogprobs / probs
    dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)  # probs = counts * counts_sum_inv
    dcounts = counts_sum_inv * dprobs  # ... and the other factor
    dcounts_sum = (-(counts_sum**-2)) * dcounts_sum_inv  # (x^-1)' = -x^-2
    dcounts += torch.ones_like(counts) * dcounts_sum  # counts_sum = counts summed over the row
    dnorm_logits = counts * dcounts  # exp' = exp = counts
    dlogits = dnorm_logits.clone()  # norm_logits = logits - logit_maxes
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)  # ... broadcast over the row
    dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes  # at the argmax
    dh = dlogits @ W2.T  # logits = h @ W2 + b2
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    # tanh' = 1 - tanh^2 (autograd's tanh backward does 1 - h*h in one FMA: from here on, equal to rounding)
    dhpreact = (1.0 - h**2) * dh
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)  # hpreact = bngain * bnraw + bnbias
    dbnraw = bngain * dhpreact
    dbnbias = dhpreact.sum(0, keepdim=True)
    dbndiff = bnvar_inv * dbnraw  # bnraw = bndiff * bnvar_inv
    dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
    dbnvar = (-0.5 * (bnvar + EPS) ** -1.5) * dbnvar_inv  # ((v + eps)^-1/2)' = -1/2 (v + eps)^-3/2
    dbndiff2 = (1.0 / (n - 1)) * torch.ones_like(bndiff2) * dbnvar  # bnvar = (sum over the batch) / (n-1)
    dbndiff += (2 * bndiff) * dbndiff2  # (x^2)' = 2x
    dhprebn = dbndiff.clone()  # bndiff = hprebn - bnmeani
    dbnmeani = (-dbndiff).sum(0, keepdim=True)
    dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)  # bnmeani = (sum over the batch) / n
    dembcat = dhprebn @ W1.T  # hprebn = embcat @ W1 + b1
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    demb = dembcat.view(emb.shape)  # embcat is a view of emb
    dC = torch.zeros_like(C).index_add_(0, Xb.view(-1), demb.view(-1, C.shape[1]))  # emb = C[Xb]: scatter-add
    return dict(
        logprobs=dlogprobs,
        probs=dprobs,
        counts_sum_inv=dcounts_sum_inv,
        counts_sum=dcounts_sum,
        counts=dcounts,
        norm_logits=dnorm_logits,
        logit_maxes=dlogit_maxes,
        logits=dlogits,
        h=dh,
        W2=dW2,
        b2=db2,
        hpreact=dhpreact,
        bngain=dbngain,
        bnraw=dbnraw,
        bnbias=dbnbias,
        bnvar_inv=dbnvar_inv,
        bnvar=dbnvar,
        bndiff2=dbndiff2,
        bndiff=dbndiff,
        bnmeani=dbnmeani,
        hprebn=dhprebn,
        embcat=dembcat,
        W1=dW1,
        b1=db1,
        emb=demb,
        C=dC,
    )


def autograd_grads(params, acts):
    """What autograd says: loss.backward(), then the .grad of every intermediate and parameter."""
    for name in INTERMEDIATES:
        acts[name].retain_grad()
    acts["loss"].backward()
    return {name: t.grad for name, t in {**acts, **params}.items() if name != "loss"}


Row = namedtuple("Row", "name exact approximate maxdiff")


def compare(name, dt, expected):
    """The notebooks' cmp: is `dt` exactly / approximately (torch.allclose) `expected`?"""
    exact = bool(torch.all(dt == expected))
    approximate = torch.allclose(dt, expected)
    maxdiff = (dt - expected).abs().max().item()
    return Row(name, exact, approximate, maxdiff)


def format_row(row):
    s, ex, app, maxdiff = row
    return f"{s:15s} | exact: {str(ex):5s} | approximate: {str(app):5s} | maxdiff: {maxdiff}"


def cross_entropy(logits, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """F.cross_entropy for (N, V) logits and (N,) class indices or (N, V) class probabilities, with
    optional class weights (V,), in the notebooks' steps.

    Computed in float32 for float16/bfloat16 logits. Like the notebooks it takes log(probs), so a
    probability that underflows to 0 (logits ~90 below the row's max in float32) gives -inf.
    """
    prob = target.is_floating_point()
    if logits.dim() != 2 or target.shape != (logits.shape if prob else logits.shape[:1]):
        raise ValueError(
            f"cross_entropy: need logits (N, V) and target (N,) or (N, V), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    n, V = x.shape
    w = torch.ones(V, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    keep = torch.ones(n, dtype=torch.bool, device=x.device) if prob else target != ignore_index  # rows that count
    if not prob and ((target[keep] < 0) | (target[keep] >= V)).any():
        raise ValueError(f"cross_entropy: target values must be in [0, {V}) or ignore_index={ignore_index}")
    logit_maxes = x.max(1, keepdim=True).values
    norm_logits = x - logit_maxes  # subtract the max so that exp cannot overflow
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdim=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    if prob:  # -sum_j w_j q_ij log p_ij
        row_loss = -(1 - label_smoothing) * (w * target.to(x.dtype) * logprobs).sum(1)
        divisor = torch.tensor(float(n), dtype=x.dtype)
    else:
        kept_target = torch.where(keep, target, 0)
        picked = logprobs[torch.arange(n, device=x.device), kept_target]  # log p[i, target_i]
        row_loss = -(1 - label_smoothing) * w[kept_target] * picked
        divisor = (w[kept_target] * keep).sum()  # the kept targets' weight: their count without weights
    if label_smoothing:  # the target is (1 - eps) q + eps / V everywhere
        row_loss = row_loss - label_smoothing / V * (w * logprobs).sum(1)
    row_loss = torch.where(keep, row_loss, 0.0)  # ignored rows contribute 0
    if reduction == "none":
        return row_loss.to(logits.dtype)
    loss = row_loss.sum()
    if reduction == "mean":
        loss = loss / divisor  # 0/0 = nan when no target counts
    return loss.to(logits.dtype)


def batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, unbiased=False
):
    """F.batch_norm for (N, C) and (N, C, L) input, in the notebooks' steps: statistics over every
    dim but 1. unbiased=False normalises with the biased variance (as PyTorch), True with the
    Bessel-corrected one (as the notebooks). In training, given running stats are updated in place
    with the batch mean and the unbiased variance; `momentum` is the update factor (not None)."""
    if input.dim() not in (2, 3):
        raise ValueError(f"batch_norm: input must be (N, C) or (N, C, L), got {tuple(input.shape)}")
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    dims = [0] + list(range(2, x.dim()))  # every dim but the channels
    shape = [1, -1] + [1] * (x.dim() - 2)  # a per-channel vector, broadcast over the rest
    n = x.numel() // x.shape[1]  # values per channel
    if training:
        if n < 2:
            raise ValueError(
                f"batch_norm: training needs more than 1 value per channel, got input of shape {tuple(input.shape)}"
            )
        bnmeani = 1 / n * x.sum(dims, keepdim=True)
        bndiff = x - bnmeani
        bndiff2 = bndiff**2
        bnvar = 1 / (n - 1 if unbiased else n) * bndiff2.sum(dims, keepdim=True)
        with torch.no_grad():
            if running_mean is not None:  # running = (1 - momentum) * running + momentum * batch
                running_mean.mul_(1 - momentum).add_(momentum * bnmeani.view(-1).to(running_mean.dtype))
            if running_var is not None:  # always the unbiased variance
                unbiased_var = bndiff2.sum(dims) / (n - 1)
                running_var.mul_(1 - momentum).add_(momentum * unbiased_var.to(running_var.dtype))
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: running_mean and running_var are needed when training=False")
        bndiff = x - running_mean.view(shape).to(x.dtype)
        bnvar = running_var.view(shape).to(x.dtype)
    bnvar_inv = (bnvar + eps) ** -0.5
    bnraw = bndiff * bnvar_inv
    hpreact = bnraw if weight is None else weight.view(shape) * bnraw
    hpreact = hpreact if bias is None else hpreact + bias.view(shape)
    return hpreact.to(input.dtype)
