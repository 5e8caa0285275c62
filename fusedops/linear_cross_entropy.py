"""Fused linear cross-entropy: the loss of cross_entropy(linear(input, weight, bias), target) and its
gradients, without ever holding the N x V logits whole.

The rows go in chunks of at most `chunk_bytes` of logits, through one reused buffer. Per chunk c (rows X_c):
    Z_c = X_c W^T + b                          ATen matmul, in the input's dtype (fp32 accumulation inside)
    loss_c, G_c = the cross-entropy kernel     G_c written over Z_c, unscaled (reduction sum)
    dX_c = G_c W,  dW += G_c^T X_c,  db += sum_rows G_c     dW, db accumulated in fp32 for bf16/fp16
and the mean's 1/divisor, taken over all the rows, scales the sums once at the end.
With reduction mean or sum the loss is a scalar, so forward computes the gradients and backward only
scales them by the upstream gradient: three matrix multiplies in all, as eager's. Otherwise (reduction
none, return_lse, probability targets that require grad, double backward, torch.func) backward
recomputes each chunk's logits and takes their gradient through fusedops.cross_entropy.
"""

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._autograd import add_grads, batched_first, consumable, fast_apply, functorch_active
from ._checks import check_cross_entropy, check_linear_cross_entropy, no_tangent, not_differentiable, vocab_group
from ._math import MEAN, NONE, REDUCTIONS, SUM, acc_dtype, capped, mean_scale, z_loss_weight
from ._ops import kernels
from .cross_entropy import cross_entropy, shaped
from .errors import ArgumentTypeError, ArgumentValueError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

CHUNK_BYTES = 64 * 2**20  # default: the most bytes one chunk of logits takes


def _chunk_rows(V, dtype, chunk_bytes):
    """Rows per chunk: as many as chunk_bytes of logits hold, at least one."""
    return max(1, chunk_bytes // (V * dtype.itemsize))


def _chunks(N, rows):
    return ((start, min(start + rows, N)) for start in range(0, N, rows))


def _forward(input, weight, bias, target, class_weight, options):
    """(loss, lse, dX, dW, db) of 2-D input; the gradients (of a unit upstream gradient) only when
    options.with_grads (reduction mean or sum), else None."""
    N, V = input.shape[0], weight.shape[0]
    reduction, ignore_index, with_grads = options.reduction, options.ignore_index, options.with_grads
    acc = acc_dtype(input.dtype)
    ops = kernels(options.backend, input)
    # the kernel's arguments after the target: the chunks' sums, reduced here
    kernel_args = (class_weight, NONE if reduction == NONE else SUM, *options[1:5])
    rows = _chunk_rows(V, input.dtype, options.chunk_bytes)
    buffer = input.new_empty(min(rows, N), V)
    lse = input.new_empty(N, dtype=acc)
    row_losses, total = [], torch.zeros((), dtype=torch.float64, device=input.device)
    dX = dW = db = None
    if with_grads:
        dX = torch.empty_like(input)
        dW = _WeightGrad(weight)
        db = None if bias is None else bias.new_zeros(V, dtype=acc)
    for start, stop in _chunks(N, rows):
        x = input[start:stop]
        logits = buffer[: stop - start]
        torch.mm(x, weight.t(), out=logits)  # Z = X W^T
        if bias is not None:
            logits.add_(bias)  # + b
        loss, lse[start:stop] = ops.cross_entropy_forward_inplace(logits, target[start:stop], *kernel_args)
        if reduction == NONE:
            row_losses.append(loss)
        else:
            total += loss  # fp64
        if with_grads:  # logits now hold G
            torch.mm(logits, weight, out=dX[start:stop])  # dX = G W
            dW.add(logits, x)  # dW += G^T X
            if db is not None:
                db += logits.sum(0)  # db += sum_rows G
        del logits
    del buffer  # before the gradients' casts: these and a chunk are never held at once
    if reduction == NONE:
        return torch.cat(row_losses) if row_losses else input.new_empty(0), lse, dX, dW, db
    if reduction == MEAN:
        scale = mean_scale(target, class_weight, ignore_index)
        total = torch.where(scale == 0, torch.nan, total * scale)  # every target ignored: 0/0, as torch
        for grad in (dX, db):
            if grad is not None:
                grad.mul_(scale.to(grad.dtype))
    return total.to(input.dtype), lse, dX, _cast(dW, weight, scale if reduction == MEAN else None), _cast(db, bias)


def _cast(grad, like, scale=None):
    """A gradient (a tensor, a _WeightGrad or None) in the parameter's dtype."""
    if isinstance(grad, _WeightGrad):
        return grad.result(scale)
    return None if grad is None else grad.to(like.dtype)


class _WeightGrad:
    """dW = sum over chunks of G_c^T X_c, accumulated in the weight's dtype for fp32/fp64 (addmm_ in place)
    and in fp32 for bf16/fp16, a block of classes at a time there, so that no dW-sized product is held."""

    BLOCK = 2048  # classes per block of a low-precision product

    def __init__(self, weight):
        self.dtype = weight.dtype
        self.sum = torch.zeros(weight.shape, dtype=acc_dtype(weight.dtype), device=weight.device)

    def add(self, grad, x):
        """dW += grad^T x."""
        if self.sum.dtype == grad.dtype:
            self.sum.addmm_(grad.t(), x)
            return
        for a in range(0, self.sum.shape[0], self.BLOCK):
            self.sum[a : a + self.BLOCK] += grad[:, a : a + self.BLOCK].t() @ x  # fp32 += the block's product

    def result(self, scale=None):
        """scale * dW (scale: a tensor or None), rounded once to the weight's dtype."""
        if scale is not None:
            self.sum.mul_(scale.to(self.sum.dtype))
        return self.sum.to(self.dtype)


class LinearLossOptions(NamedTuple):
    """LinearCrossEntropyFunction's options, as `linear_cross_entropy` checked them: cross-entropy's (reduction
    a code of REDUCTIONS), then the most bytes one chunk of logits takes and with_grads (below)."""

    reduction: int = MEAN
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    return_lse: bool = False
    chunk_bytes: int = CHUNK_BYTES
    with_grads: bool = False
    backend: str | None = None


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss, lse[, dX, dW, db] = LinearCrossEntropyFunction.apply(input, weight, bias, target, class_weight,
    options): cross-entropy of the logits input @ weight.T + bias, chunk by chunk, for 2-D input (N, H), weight
    (V, H), bias (V,) or None, target (N,) class indices or (N, V) probabilities, class_weight (V,) or None,
    and a LinearLossOptions. lse (acc dtype) is differentiable when return_lse. With with_grads (reduction mean
    or sum), dX, dW, db are the gradients of a unit upstream gradient, computed in forward and scaled by backward (not
    differentiable; not returned without with_grads; db None without bias), and consumed by it: scaled in place
    unless the graph is retained. Backward recomputes the chunks
    when it needs more: a per-row upstream gradient, the lse's, the targets', or a differentiable result
    (create_graph)."""

    @staticmethod
    def forward(input, weight, bias, target, class_weight, options):
        out = _forward(input, weight, bias, target, class_weight, options)
        return out if options.with_grads else out[:2]  # (no None outputs where it can: torch.compile's backward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, class_weight, options = inputs
        _, lse, dX, dW, db = output if options.with_grads else (*output, None, None, None)
        ctx.save_for_backward(input, weight, bias, target, class_weight, dX, dW, db)
        ctx.save_for_forward(input, weight, bias, target, class_weight, lse)
        ctx.options = options
        ctx.mark_non_differentiable(*(g for g in (dX, dW, db) if g is not None))
        if not options.return_lse:
            ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, *_):
        input, weight, bias, target, class_weight, dX, dW, db = ctx.saved_tensors
        if ctx.needs_input_grad[4]:
            raise not_differentiable("linear_cross_entropy", "class_weight")
        # a differentiable backward (double backward; not a torch.func pullback, whose saved tensors need no grad)
        create_graph = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, weight, bias, target)
        )
        grad_lse = grad_lse if ctx.options.return_lse else None  # (zeros, not None, while compiled)
        if ctx.options.with_grads and grad_lse is None and not create_graph and not ctx.needs_input_grad[3]:
            if grad_loss is None:
                return None, None, None, None, None, None
            in_place = consumable(create_graph)
            dX, dW, db = (
                (_scaled(g, grad_loss, ctx.options.backend) if in_place else g * grad_loss) if needed else None
                for g, needed in zip((dX, dW, db), ctx.needs_input_grad[:3])
            )
            return dX, dW, db, None, None, None
        dX, dW, db, dT = _recompute_grads(
            ctx, input, weight, bias, target, class_weight, grad_loss, grad_lse, create_graph
        )
        return dX, dW, db, dT, None, None

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, target_t, class_weight_t, _):
        input, weight, bias, target, class_weight, lse = ctx.saved_tensors
        no_tangent("linear_cross_entropy", ["class_weight"], [class_weight_t])
        reduction, ignore_index, label_smoothing, z_loss, softcap, return_lse = ctx.options[:6]
        target_t = target_t if target.is_floating_point() else None
        row_t, lse_t = [], []
        for start, stop in _chunks(input.shape[0], _chunk_rows(weight.shape[0], input.dtype, ctx.options.chunk_bytes)):
            x = input[start:stop]
            logits = F.linear(x, weight, bias)
            d_logits = torch.zeros_like(logits)  # dZ = dX W^T + X dW^T + db (out of place: tangents may be batched)
            if input_t is not None:
                d_logits = d_logits + input_t[start:stop] @ weight.t()
            if weight_t is not None:
                d_logits = d_logits + x @ weight_t.t()
            if bias_t is not None:
                d_logits = d_logits + bias_t
            row = 0.0
            if return_lse or target_t is not None:  # (before the kernel writes G over the logits)
                y, dy_dx = capped(logits, lse.dtype, softcap)
                if return_lse:  # d lse = <p, dy>
                    lse_t.append((torch.exp(y - lse[start:stop, None]) * dy_dx * d_logits.to(lse.dtype)).sum(1))
                if target_t is not None:  # d loss_i += sum_j (1-ls) w_j (lse_i - y_ij) dq_ij
                    w = 1.0 if class_weight is None else class_weight.to(lse.dtype)
                    row = (
                        (1 - label_smoothing) * w * (lse[start:stop, None] - y) * target_t[start:stop].to(lse.dtype)
                    ).sum(1)
            kernels(ctx.options.backend, input).cross_entropy_forward_inplace(
                logits, target[start:stop], class_weight, NONE, ignore_index, label_smoothing, z_loss, softcap
            )
            row_t.append(row + (logits.to(lse.dtype) * d_logits.to(lse.dtype)).sum(1))  # + <G_i, dZ_i>
        rows = torch.cat(row_t) if row_t else lse.new_zeros(0)
        if reduction == MEAN:
            rows = rows * mean_scale(target, class_weight, ignore_index).to(rows.dtype)
        loss_t = rows if reduction == NONE else rows.sum()
        lse_t = (torch.cat(lse_t) if lse_t else lse.new_zeros(0)) if return_lse else None
        return (loss_t.to(input.dtype), lse_t) + ((None, None, None) if ctx.options.with_grads else ())

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, target, class_weight, options):
        """One call per mapped slice."""
        B = info.batch_size
        tensors = [
            None if t is None else batched_first(t, d, B)
            for t, d in zip((input, weight, bias, target, class_weight), in_dims)
        ]
        options = options._replace(with_grads=False)
        outs = [
            LinearCrossEntropyFunction.apply(*(None if t is None else t[b] for t in tensors), options) for b in range(B)
        ]
        return tuple(torch.stack(out) for out in zip(*outs)), (0, 0)


def _scaled(grad, factor, backend):
    """grad * factor (a 0-d upstream gradient) in place, by the cross_entropy_scale_grad op: no pass for the usual
    factor 1."""
    kernels(backend, grad).cross_entropy_scale_grad(grad.view(-1, grad.shape[-1]), factor)
    return grad


def _recompute_grads(ctx, input, weight, bias, target, class_weight, grad_loss, grad_lse, create_graph):
    """The gradients of input, weight, bias and target, chunk by chunk: each chunk's logits recomputed, and
    their gradient the kernel's G times each row's upstream gradient (plus p dy/dx times the lse's), or, for
    a differentiable result (create_graph: the chunks' graphs are then kept, N x V in all), taken through
    fusedops.cross_entropy."""
    reduction, ignore_index, label_smoothing, z_loss, softcap = ctx.options[:5]
    need_input, need_weight, need_bias, need_target = ctx.needs_input_grad[:4]
    N, V = input.shape[0], weight.shape[0]
    acc = acc_dtype(input.dtype)
    if grad_loss is None:
        row_grad = torch.zeros(N, dtype=acc, device=input.device)
    elif reduction == NONE:
        row_grad = grad_loss
    else:  # d loss / d loss_i: the upstream gradient, over the divisor for the mean
        scale = mean_scale(target, class_weight, ignore_index).to(acc) if reduction == MEAN else 1.0
        row_grad = (grad_loss * scale).expand(N)
    dX, dT = [], []
    # the sums in place, unless they must be differentiable or may be batched (torch.func)
    in_place = not create_graph and not functorch_active()
    dW = _WeightGrad(weight) if in_place and need_weight else None
    db = input.new_zeros(V, dtype=acc) if in_place and need_bias else None
    for start, stop in _chunks(N, _chunk_rows(V, input.dtype, ctx.options.chunk_bytes)):
        x, t = input[start:stop], target[start:stop]
        if create_graph:
            d_logits, d_target = _chunk_vjp(
                ctx,
                x,
                weight,
                bias,
                t,
                class_weight,
                row_grad[start:stop],
                None if grad_lse is None else grad_lse[start:stop],
            )
        else:  # G from the kernel, times the row's upstream gradient
            with torch.no_grad():
                d_logits = F.linear(x, weight, bias)
            if grad_lse is not None or need_target:  # the capped logits, kept from the kernel's write of G
                y, dy_dx = capped(d_logits, acc, softcap)
                y = y.clone() if y is d_logits else y
            _, lse = kernels(ctx.options.backend, input).cross_entropy_forward_inplace(
                d_logits, t, class_weight, NONE, ignore_index, label_smoothing, z_loss, softcap
            )
            upstream = row_grad[start:stop, None]
            d_logits = d_logits.mul_(upstream) if in_place else d_logits * upstream  # dZ = G * upstream
            if grad_lse is not None:  # + d lse / dZ = p dy/dx, times the lse's upstream gradient
                d_logits = d_logits + (torch.exp(y - lse[:, None]) * dy_dx * grad_lse[start:stop, None]).to(
                    d_logits.dtype
                )
            if need_target:  # d loss_i / d q_ij = (1-ls) w_j (lse_i - y_ij), times the row's upstream gradient
                w = 1.0 if class_weight is None else class_weight.to(acc)
                d_target = ((1 - label_smoothing) * w * (lse[:, None] - y) * upstream).to(t.dtype)
        if need_target:
            dT.append(d_target)
        if need_input:
            dX.append(d_logits @ weight)  # dX = dZ W
        if not in_place:
            dW = add_grads(dW, d_logits.t() @ x) if need_weight else None  # dW += dZ^T X
            db = add_grads(db, d_logits.sum(0)) if need_bias else None
        else:
            if need_weight:
                dW.add(d_logits, x)
            if need_bias:
                db += d_logits.sum(0)
    empty_rows = input.new_zeros(0, input.shape[1])
    return (
        (torch.cat(dX) if dX else empty_rows) if need_input else None,
        _finish(_cast(dW, weight), weight, need_weight),
        _finish(db, bias, need_bias),
        (torch.cat(dT) if dT else torch.zeros_like(target)) if need_target else None,
    )


def _chunk_vjp(ctx, x, weight, bias, target, class_weight, row_grad, lse_grad):
    """A chunk's (dZ, d target) through fusedops.cross_entropy (reduction none, return_lse) by torch.func.vjp,
    for the upstream gradients of its rows' losses and lse, differentiable (double backward)."""
    reduction, ignore_index, label_smoothing, z_loss, softcap = ctx.options[:5]

    def loss_and_lse(logits, target):
        return cross_entropy(
            logits,
            target,
            class_weight,
            reduction="none",
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            return_lse=True,
            backend=ctx.options.backend,
        )

    logits = F.linear(x, weight, bias)
    if ctx.needs_input_grad[3]:  # probability targets
        (loss, lse), pullback = torch.func.vjp(loss_and_lse, logits, target)
    else:
        (loss, lse), pullback = torch.func.vjp(lambda logits: loss_and_lse(logits, target), logits)
    grads = pullback((row_grad.to(loss.dtype), torch.zeros_like(lse) if lse_grad is None else lse_grad.to(lse.dtype)))
    return grads[0], grads[1] if len(grads) > 1 else None


def _finish(grad, like, needed):
    """A parameter's gradient in its dtype (zeros when no chunk added to it), or None when not needed."""
    if not needed:
        return None
    return torch.zeros_like(like) if grad is None else grad.to(like.dtype)


_apply = fast_apply(LinearCrossEntropyFunction)


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    class_weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    process_group: "ProcessGroup | None" = None,
    vocab_size: int | None = None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`cross_entropy(F.linear(input, weight, bias), target, class_weight, ...)`, fused: the logits are
    computed, turned into their gradient and multiplied out chunk by chunk, never held whole.

    Accumulation is in fp32 for bf16 and fp16.

    Args:
        input: (N, H) or (B, T, H) (any leading dimensions).
        weight: (V, H), as an nn.Linear's.
        target: class indices shaped like input without its last dimension (int64, int32 or uint8), or class
            probabilities shaped like the logits (..., V).
        bias: (V,) or None.
        class_weight: (V,) class weights (the `weight` of torch's cross_entropy), or None.
        reduction: as fusedops.cross_entropy's.
        ignore_index: as fusedops.cross_entropy's.
        label_smoothing: as fusedops.cross_entropy's.
        z_loss: as fusedops.cross_entropy's.
        softcap: as fusedops.cross_entropy's.
        return_lse: as fusedops.cross_entropy's.
        chunk_bytes: the most bytes one chunk of logits takes (default 64 MiB): peak memory beyond the
            gradients is about one chunk.
        process_group: a torch.distributed group over which the vocabulary is split: this process holds the
            rows of weight (and bias, class_weight) of a contiguous shard of the classes, in rank order; target
            holds global class indices. None: no split.
        vocab_size: when given, checked against the shards' sizes (without a split, against V).
        backend: as fusedops.cross_entropy's.

    Returns:
        The loss: a scalar for reduction "mean" or "sum", else shaped like input without its last dimension.
        With return_lse, the tuple (loss, lse), lse shaped like the loss of reduction "none".
    """
    check_linear_cross_entropy(input, weight, bias, target, chunk_bytes)
    V = weight.shape[0]
    prob = target.is_floating_point()
    # the logits' shape without the logits, (N, V, d1, ...) as cross_entropy takes them: one element (checks only)
    logits_like = input.new_empty(()).expand(*input.shape[:-1], V).movedim(-1, min(1, input.dim() - 1))
    # cross_entropy's checks of the loss options, in this function's name
    check_cross_entropy(
        logits_like,
        target.movedim(-1, 1) if prob and target.dim() > 1 else target,
        class_weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        return_lse,
        backend,
        weight_name="class_weight",
        split=process_group is not None,
        op="linear_cross_entropy",
    )
    group = vocab_group(logits_like, process_group, vocab_size, False, op="linear_cross_entropy")
    code = REDUCTIONS[reduction]
    out_shape = input.shape[:-1]
    x = input.reshape(-1, input.shape[-1])
    target = target.reshape(x.shape[0], V) if prob else target.reshape(-1)  # (V may be 0: a shard)
    if group is None:  # (the split reduces its z rows apart)
        class_weight = z_loss_weight(target, class_weight, ignore_index, code, z_loss)  # z-loss's mean: kept rows
    if group is not None:  # the classes split across processes
        from . import vocab_parallel

        loss, lse = vocab_parallel.linear_cross_entropy(
            x,
            weight,
            target,
            bias,
            class_weight,
            code,
            ignore_index,
            label_smoothing,
            z_loss,
            softcap,
            return_lse,
            group,
            vocab_size,
        )
        return shaped(loss, lse, code, out_shape, return_lse)
    with_grads = (
        code != NONE
        and not return_lse
        and torch.is_grad_enabled()
        and not functorch_active()
        and not (prob and target.requires_grad)
        and any(t is not None and t.requires_grad for t in (input, weight, bias))
    )
    loss, lse, *_ = _apply(
        x,
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        target.contiguous() if prob else target,
        class_weight,
        LinearLossOptions(
            code, ignore_index, label_smoothing, z_loss, softcap, return_lse, chunk_bytes, with_grads, backend
        ),
    )
    return shaped(loss, lse, code, out_shape, return_lse)


class LinearCrossEntropy(nn.Module):
    """A language model's output layer and its loss in one: holds `weight` (num_classes, in_features) and
    `bias` exactly as nn.Linear(in_features, num_classes, bias) does (the same initialisation and
    state_dict), and `forward(input, target)` returns linear_cross_entropy(input, weight, target, bias,
    **options). `logits(input)` returns the logits, for inference. class_weight is kept as a buffer."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        class_weight: Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        process_group: "ProcessGroup | None" = None,
        vocab_size: int | None = None,
        backend: str | None = None,
    ) -> None:
        """The layer's parameters, as nn.Linear(in_features, num_classes, bias, device=device, dtype=dtype)
        makes them, and the loss's options (see `linear_cross_entropy`).

        Args:
            in_features: H, the size of each input row.
            num_classes: V, the number of classes (this process's shard of them with a process_group).
            bias: whether the layer has a (num_classes,) bias (default False, unlike nn.Linear).
            device: the parameters' device, as nn.Linear's.
            dtype: the parameters' dtype, as nn.Linear's.
            class_weight: (num_classes,) class weights, or None; kept as the buffer `class_weight`.
            reduction: "none", "mean" or "sum" (see `linear_cross_entropy`).
            ignore_index: see `linear_cross_entropy`.
            label_smoothing: see `linear_cross_entropy`.
            z_loss: see `linear_cross_entropy`.
            softcap: see `linear_cross_entropy`.
            chunk_bytes: see `linear_cross_entropy`.
            process_group: see `linear_cross_entropy`.
            vocab_size: see `linear_cross_entropy`.
            backend: see `linear_cross_entropy`.
        """
        super().__init__()
        linear = nn.Linear(in_features, num_classes, bias, device=device, dtype=dtype)  # its initialisation
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = linear.weight
        self.bias = linear.bias
        if class_weight is not None and not isinstance(class_weight, Tensor):
            raise ArgumentTypeError(
                f"LinearCrossEntropy: class_weight must be a tensor or None, got {type(class_weight)}"
            )
        self.register_buffer("class_weight", class_weight)
        if reduction not in REDUCTIONS:
            raise ArgumentValueError(
                f"LinearCrossEntropy: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}"
            )
        self.reduction, self.ignore_index, self.label_smoothing = reduction, ignore_index, label_smoothing
        self.z_loss, self.softcap, self.chunk_bytes = z_loss, softcap, chunk_bytes
        self.process_group, self.vocab_size, self.backend = process_group, vocab_size, backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """`linear_cross_entropy(input, self.weight, target, self.bias, ...)` with the module's options.

        Args:
            input: (N, in_features) or (B, T, in_features) (any leading dimensions).
            target: class indices shaped like input without its last dimension, or class probabilities shaped
                like the logits (..., num_classes).

        Returns:
            The loss (no lse: the layer does not take return_lse).
        """
        return linear_cross_entropy(
            input,
            self.weight,
            target,
            self.bias,
            class_weight=self.class_weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_bytes=self.chunk_bytes,
            process_group=self.process_group,
            vocab_size=self.vocab_size,
            backend=self.backend,
        )

    def logits(self, input: Tensor) -> Tensor:
        """input @ weight.T + bias: the whole logits, for inference.

        Args:
            input: (..., in_features).

        Returns:
            The logits, (..., num_classes).
        """
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
            f"reduction={self.reduction!r}"
        )
