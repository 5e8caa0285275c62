"""Cross-entropy over a vocabulary split across processes (tensor parallelism over the classes), on any
torch.distributed backend (gloo on CPU, NCCL on CUDA).

Each of the R processes of the group holds a contiguous shard of the V classes, in rank order (sizes may
differ, 0 included): its logits' columns x (N, V_r), or for linear_cross_entropy its rows of the weight
(V_r, H) and bias (V_r,); its class weights w (V_r,); for probability targets, its columns of q (N, V_r).
Class-index targets are global, the same tensor on every rank. The loss is cross_entropy's (see
fusedops/cross_entropy.py) over the whole vocabulary: with y = softcap * tanh(x / softcap) (or x),
q' = (1-ls) q + ls/V (ls: label smoothing) and M_i the max of row i over all shards,
    lse_i  = M_i + log s_i,                  s_i = sum_j exp(y_ij - M_i)
    loss_i = D_i (lse_i - M_i) - S_i + z_loss lse_i^2 (kept rows; the mean divides the z-loss by their count),
             S_i = sum_j w_j q'_ij (y_ij - M_i),    D_i = sum_j w_j q'_ij
where every sum over j is a sum over the shards of each one's partial sum. Those are torch ops on the
shard, so autograd gives every derivative: backward, double backward, torch.func's grad and vjp.

Collectives, whatever R (b: the bytes of the accumulation dtype, fp32 or fp64):
  forward   1. all_reduce MAX of [the shard's row max (N), its size at slot r (R)], fp64: 8 (N + R) bytes.
               The max is detached (lse does not depend on it); the sizes give the offsets, V and the checks.
            2. all_reduce SUM of the stacked partial rows [s, S, D] (3N), plus the kept targets' weights
               (N more) for the mean of class indices with class weights: b 3N (or 4N) bytes.
  backward  none: every rank holds the same loss and the same upstream gradient (loss.backward() on each),
            which is then already the gradient of the sums; the sum's backward is the identity.
            linear_cross_entropy: 1 all_reduce SUM of the input's gradient, N H elements of its dtype.
  double backward: 1 all_reduce SUM more of the rows above (the Hessian's terms across the shards);
            linear_cross_entropy: and 1 of the input's gradient again (N H).
A training step (forward and backward): 2 all-reduces of 8 (N + R) + 3bN bytes (+ bN with class weights and
the mean); linear_cross_entropy: 3, plus N H times the input's itemsize.
The checks (vocab_size, the targets' range over all shards) need the shards' sizes: they follow the first
collective, on the same sizes and target everywhere, so every rank raises alike and none waits.
The shard's logits (N x V_r) are held whole, with a few tensors like them that autograd saves.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._autograd import assert_async
from ._collectives import all_reduce
from ._math import MEAN, NONE, acc_dtype, capped
from .errors import ArgumentIndexError, ArgumentValueError


class _ReduceFromRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks of `group`. Its backward is the identity: the sum and its upstream
    gradient are the same on every rank (one loss, differentiated once), which is already the gradient of
    each rank's term."""

    @staticmethod
    def forward(tensor, group, name):
        return all_reduce(tensor, group, name)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group, ctx.name = inputs[1:]

    @staticmethod
    def backward(ctx, grad):
        return _CopyToRanks.apply(grad, ctx.group, ctx.name), None, None


class _CopyToRanks(torch.autograd.Function):
    """The identity on a tensor that is the same on every rank of `group`; its backward sums the gradients of
    every rank's use of it over the ranks. (The adjoint of _ReduceFromRanks: double backward sums the
    second-order terms of every rank through it.)"""

    @staticmethod
    def forward(tensor, group, name):
        return tensor.view_as(tensor)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group, ctx.name = inputs[1:]

    @staticmethod
    def backward(ctx, grad):
        return _ReduceFromRanks.apply(grad, ctx.group, ctx.name), None, None


def cross_entropy(
    logits,
    target,
    weight,
    reduction_code,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    return_lse,
    group,
    vocab_size,
):
    """(loss, lse) of this rank's shard of checked 2-D logits (N, V_r) over the whole vocabulary of `group`'s
    shards, as CrossEntropyFunction's: the loss in the logits' dtype, reduced by reduction_code (0 none,
    1 mean, 2 sum); lse (N,) in the accumulation dtype, differentiable when return_lse. target: (N,)
    global class indices or the shard's (N, V_r) probabilities; weight: the shard's (V_r,) class weights or
    None; vocab_size: None or the whole V, checked."""
    return _loss(
        logits,
        target,
        weight,
        reduction_code,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        return_lse,
        group,
        vocab_size,
        "cross_entropy",
    )


def linear_cross_entropy(
    input,
    weight,
    target,
    bias,
    class_weight,
    reduction_code,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    return_lse,
    group,
    vocab_size,
):
    """cross_entropy of the shard's logits F.linear(input, weight, bias), held whole (N x V_r): input (N, H)
    the same on every rank, weight (V_r, H) and bias (V_r,) this rank's rows. input's gradient is the whole
    vocabulary's on every rank (all-reduced in backward)."""
    logits = F.linear(_CopyToRanks.apply(input, group, "linear_cross_entropy"), weight, bias)
    return _loss(
        logits,
        target,
        class_weight,
        reduction_code,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        return_lse,
        group,
        vocab_size,
        "linear_cross_entropy",
    )


def _loss(
    logits, target, weight, code, ignore_index, label_smoothing, z_loss, softcap, return_lse, group, vocab_size, name
):
    """cross_entropy's (loss, lse); `name` is the op errors name."""
    y, _ = capped(logits, acc_dtype(logits.dtype), softcap)
    M, sizes = _max_and_sizes(y.detach(), group, name)
    V = sizes.sum()
    _check(sizes, V, target, ignore_index, vocab_size, name)
    y = y - M.unsqueeze(1)  # y - M: exp cannot overflow
    w = None if weight is None else weight.to(y.dtype)  # (a weight's tangent carries through: torch ops)
    ls_V = label_smoothing / V.to(y.dtype)  # ls/V, V the whole vocabulary
    if target.is_floating_point():
        kept = torch.ones(target.shape[0], dtype=torch.bool, device=y.device)
        parts = _probability_sums(y, target.to(y.dtype), w, label_smoothing, ls_V)
    else:
        kept = target != ignore_index
        offset = sizes[: dist.get_rank(group)].sum()  # the shard's first class
        parts = _class_sums(y, target.long() - offset, w, kept, label_smoothing, ls_V, code == MEAN and w is not None)
    s = y.exp().sum(1)  # s_i = sum_j exp(y_ij - M_i), this shard's part
    s, S, D, *kept_weights = _ReduceFromRanks.apply(torch.stack((s, *parts)), group, name)  # all shards' sums
    log_s = torch.log(s)  # lse - M
    lse = M + log_s
    loss = D * log_s - S  # sum_j w_j q'_ij (lse_i - y_ij)
    z_rows = z_loss * lse.square() * kept if z_loss else None  # per token, unweighted
    if code == NONE:
        loss = loss if z_rows is None else loss + z_rows
    else:  # the mean's divisor: sum_i w_{t_i} over the kept rows (their count without weights; N); z-loss's: K
        loss = _reduced(loss, kept, kept_weights[0].sum() if kept_weights else kept.sum(), code)
        if z_rows is not None:
            loss = loss + _reduced(z_rows, kept, kept.sum(), code)
    return loss.to(logits.dtype), lse if return_lse else lse.detach()


def _max_and_sizes(y, group, name):
    """The rows' max over all shards (0 where not finite, as torch.logsumexp) and every shard's size (int64),
    from one all_reduce MAX of [this shard's row max, its size at slot rank], fp64 (exact for both)."""
    N, V_r = y.shape
    m = y.amax(1) if V_r else y.new_full((N,), -math.inf)  # an empty shard has no max
    sizes = torch.zeros(dist.get_world_size(group), dtype=torch.float64, device=y.device)
    sizes[dist.get_rank(group)] = V_r
    maxed = all_reduce(torch.cat((m.double(), sizes)), group, name, "max")
    M = maxed[:N].to(y.dtype)
    return torch.where(M.isfinite(), M, 0), maxed[N:].long()


def _check(sizes, V, target, ignore_index, vocab_size, name):
    """The shards add up to vocab_size (when given) and every class index is in [0, V) or ignore_index. Every
    rank holds the same sizes and target, so all raise alike. Read on the host for CPU tensors; on CUDA by
    device-side asserts, which do not stall the stream."""
    on_host = sizes.device.type == "cpu"
    if vocab_size is not None:
        if not on_host:
            assert_async(V == vocab_size, f"{name}: the shards' sizes do not add up to vocab_size={vocab_size}")
        elif V != vocab_size:
            raise ArgumentValueError(
                f"{name}: vocab_size={vocab_size} but the {sizes.numel()} shards' sizes "
                f"{sizes.tolist()} add up to {int(V)}"
            )
    if target.is_floating_point():
        return
    bad = ((target < 0) & (target != ignore_index)) | (target >= V)
    if not on_host:
        assert_async(~bad.any(), f"{name}: target out of range for the classes of all shards (argument 'target')")
    elif bad.any():
        i = int(bad.nonzero()[0])
        raise ArgumentIndexError(
            f"{name}: target[{i}] = {int(target[i])} is out of range for the {int(V)} classes "
            f"of the shards of sizes {sizes.tolist()} (argument 'target')"
        )


def _probability_sums(y, q, w, label_smoothing, ls_V):
    """This shard's S_i and D_i for probability targets q."""
    d = (1 - label_smoothing) * q + ls_V  # q'
    if w is not None:
        d = d * w
    return (d * y).sum(1), d.sum(1)


def _class_sums(y, local, w, kept, label_smoothing, ls_V, with_divisor):
    """This shard's S_i and D_i for class targets at `local` (the index in this shard, which holds the
    classes in [0, V_r)), and with_divisor, its kept targets' weights w_t (the mean's divisor is their sum)."""
    owned = kept & (local >= 0) & (local < y.shape[1])
    local = torch.where(owned, local, 0)
    w_t = owned.to(y.dtype) if w is None else _at(w, local, owned)
    S = (1 - label_smoothing) * w_t * _at(y, local, owned)  # (1-label_smoothing) w_t y_t
    D = (1 - label_smoothing) * w_t
    if label_smoothing:  # + label_smoothing/V sum_j w_j y_ij, + label_smoothing/V sum_j w_j
        S = S + ls_V * (y.sum(1) if w is None else y @ w) * kept
        D = D + ls_V * (y.shape[1] if w is None else w.sum()) * kept
    return (S, D, w_t) if with_divisor else (S, D)


def _at(t, local, owned):
    """t[i, local_i] of 2-D t (t[local_i] of 1-D t) where owned, 0 elsewhere (everywhere in an empty shard)."""
    if t.shape[-1] == 0:
        return t.new_zeros(local.shape)
    picked = t.gather(1, local.unsqueeze(1)).squeeze(1) if t.dim() == 2 else t[local]
    return torch.where(owned, picked, 0)


def _reduced(loss, kept, divisor, code):
    """The rows' sum in fp64, or their mean: / divisor, the kept targets' summed weight. Every target ignored:
    NaN with gradient 0, as cross_entropy."""
    total = loss.double().sum()
    if code != MEAN:
        return total
    some = kept.any()
    return torch.where(some, total * torch.where(some, 1 / divisor.double(), 0), math.nan)
