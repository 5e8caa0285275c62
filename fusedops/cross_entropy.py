"""Fused cross-entropy: the loss and its gradient from one pass over the logits.

The forward op computes, per row, loss = logsumexp(x) - (1-eps)*x[t] - eps/V*sum(x) and the gradient
G = (softmax(x) - q) * scale, q = eps/V + (1-eps)*one_hot(t) (0 in an ignored row), scale = 1/count
for the mean. backward scales G by the upstream gradient. With `inplace_backward=True` G is written
over the logits.
"""
import weakref

import torch
from torch import Tensor, nn

from ._ops import batched_first, check_backend, fast_apply, kernels, register
from .errors import ArgumentDtypeError, ArgumentEmptyError, ArgumentTypeError, ArgumentValueError

NONE, MEAN, SUM = 0, 1, 2  # torch's reduction numbering, as the kernels take it
REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}


def _forward_inplace_fake(logits, target, reduction, ignore_index, label_smoothing):
    return logits.new_empty(logits.shape[:1] if reduction == NONE else ())  # the loss


def _forward_fake(logits, target, reduction, ignore_index, label_smoothing):
    loss = _forward_inplace_fake(logits, target, reduction, ignore_index, label_smoothing)
    return loss, torch.empty_like(logits, memory_format=torch.contiguous_format)


def _forward_cuda(logits, target, reduction, ignore_index, label_smoothing):
    from . import cross_entropy_triton

    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return cross_entropy_triton.forward(logits, target, grad, reduction, ignore_index, label_smoothing), grad


def _forward_inplace_cuda(logits, target, reduction, ignore_index, label_smoothing):
    from . import cross_entropy_triton

    loss = cross_entropy_triton.forward(logits, target, logits, reduction, ignore_index, label_smoothing)
    torch.autograd.graph.increment_version(logits)  # as every in-place op: autograd sees the write
    return loss


register("cross_entropy_forward", _forward_fake, _forward_cuda)
register("cross_entropy_forward_inplace", _forward_inplace_fake, _forward_inplace_cuda)


def _keeps_graph():
    """Whether the running backward pass keeps the graph (retain_graph): a saved tensor can be asked
    for again."""
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except RuntimeError:  # not called by the autograd engine
        return True


class CrossEntropyFunction(torch.autograd.Function):
    """loss, grad = CrossEntropyFunction.apply(logits, target, reduction, ignore_index, label_smoothing,
    inplace_backward, backend): cross-entropy of (N, V) logits and (N,) class indices (int64 or int32).

    reduction: 0 none, 1 mean, 2 sum (torch's numbering). The second output `grad` is the loss's
    gradient with respect to the logits, G = (softmax(x) - q) * scale; backward returns G times the
    upstream gradient. It is differentiable (d G / dx = scale * (diag(p) - p p^T) per row), which is
    how double backward goes through it. With inplace_backward=True, G is written over the logits and
    `grad` is None (no double backward then: the logits are gone). Unless the graph is retained,
    backward scales G in place and hands it out: it is consumed, as the saved tensor it is.
    """

    @staticmethod
    def forward(logits, target, reduction, ignore_index, label_smoothing, inplace_backward, backend):
        ops = kernels(backend, logits)
        if inplace_backward:
            return ops.cross_entropy_forward_inplace(logits, target, reduction, ignore_index, label_smoothing), None
        return ops.cross_entropy_forward(logits, target, reduction, ignore_index, label_smoothing)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, reduction, ignore_index, label_smoothing, inplace_backward, _ = inputs
        grad = logits if inplace_backward else output[1]
        ctx.save_for_backward(grad, target)
        ctx.save_for_forward(grad, target)
        ctx.options = reduction, ignore_index, label_smoothing, inplace_backward
        # the G the caller got back (None once dropped): while held, never scaled in place
        ctx.grad_output = None if inplace_backward else weakref.ref(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, grad_grad):
        grad, target = ctx.saved_tensors
        reduction, _, _, inplace_backward = ctx.options
        create_graph = torch.is_grad_enabled()
        if create_graph and inplace_backward:
            raise RuntimeError("cross_entropy: inplace_backward=True has no double backward (the logits it "
                               "needs are overwritten by their gradient)")
        dlogits = None
        if grad_grad is not None:  # through G's dependence on the logits, before G is scaled in place
            dlogits = _softmax_vjp(grad, target, grad_grad, *ctx.options[:3])
        if grad_loss is not None:  # G * upstream (per row for reduction none)
            scale = grad_loss.unsqueeze(1) if reduction == NONE else grad_loss
            held = ctx.grad_output is not None and ctx.grad_output() is not None
            if torch.compiler.is_compiling() or create_graph or _keeps_graph() or held:
                first = grad * scale
            else:  # nothing can ask for G again: scale it in place, once, and hand it out
                first = grad.mul_(scale)
            dlogits = first if dlogits is None else dlogits + first
        return dlogits, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, logits_tangent, *_):
        grad, target = ctx.saved_tensors
        reduction, _, _, inplace_backward = ctx.options
        if inplace_backward:
            raise RuntimeError("cross_entropy: inplace_backward=True has no forward-mode derivative")
        # d loss_i = sum_j G_ij dx_ij (G holds the mean's 1/count); dG = J dx, J symmetric
        row = (grad * logits_tangent).sum(1)
        loss_tangent = row if reduction == NONE else row.sum()
        return loss_tangent, _softmax_vjp(grad, target, logits_tangent, *ctx.options[:3])

    @staticmethod
    def vmap(info, in_dims, logits, target, reduction, ignore_index, label_smoothing, inplace_backward, backend):
        """Each mapped slice its own batch of rows: the slices' rows are folded into one call of
        reduction none, then reduced per slice."""
        if inplace_backward:
            raise RuntimeError("cross_entropy: inplace_backward=True cannot be used under vmap")
        B = info.batch_size
        logits = batched_first(logits, in_dims[0], B)
        target = batched_first(target, in_dims[1], B)
        _, N, V = logits.shape
        rows, grad = CrossEntropyFunction.apply(logits.reshape(B * N, V), target.reshape(B * N), NONE,
                                                ignore_index, label_smoothing, False, backend)
        rows, grad = rows.view(B, N), grad.view(B, N, V)
        if reduction == SUM:
            return (rows.sum(1), grad), (0, 0)
        if reduction == MEAN:  # the mean over each slice's non-ignored targets
            count = (target != ignore_index).sum(1).to(rows.dtype)
            return (rows.sum(1) / count, grad / count.view(B, 1, 1)), (0, 0)
        return (rows, grad), (0, 0)


def _softmax_vjp(grad, target, v, reduction, ignore_index, label_smoothing):
    """J^T v = J v with J = d G / d logits = scale * (diag(p) - p p^T) per row (0 in an ignored row),
    p recovered from G: p = G / scale + q. Torch ops, so itself differentiable."""
    V = grad.shape[1]
    kept = (target != ignore_index).unsqueeze(1)
    if reduction == MEAN:
        count = kept.sum().to(grad.dtype)
        inv_scale, scale = count, 1 / count.clamp(min=1)
    else:
        inv_scale = scale = 1.0
    one_hot = torch.nn.functional.one_hot(torch.where(kept.squeeze(1), target, 0).long(), V).to(grad.dtype)
    q = (label_smoothing / V + (1 - label_smoothing) * one_hot) * kept  # the target distribution
    p = grad * inv_scale + q
    pv = p * v
    return (pv - p * pv.sum(1, keepdim=True)) * scale * kept


_apply = fast_apply(CrossEntropyFunction)


def cross_entropy(logits, target, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                  inplace_backward=False, backend=None):
    """Like `torch.nn.functional.cross_entropy` with class-index targets, fused.

    logits: (N, V), (V,) or (N, V, d1, ...); target: (N,), () or (N, d1, ...), int64 or int32.
    inplace_backward: write the gradient over `logits` (2-D or 1-D) instead of a new buffer; the
    logits' values are gone after the call. backend: None (C++ on CPU, Triton on CUDA), "cpp" or
    "triton". Under torch.autocast the loss is computed and returned in float32, as PyTorch's.
    """
    _check_args(logits, target, reduction, ignore_index, label_smoothing, backend)
    if torch.is_autocast_enabled(logits.device.type) and logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # cross_entropy is on autocast's float32 list
    code = REDUCTIONS[reduction]
    out_shape = target.shape
    if logits.dim() == 1:
        logits, target = logits.unsqueeze(0), target.reshape(1)
    elif logits.dim() > 2:
        if inplace_backward:
            raise ArgumentValueError(f"inplace_backward=True needs 1-D or 2-D logits, got shape "
                                     f"{tuple(logits.shape)}")
        logits, target = logits.movedim(1, -1).reshape(-1, logits.shape[1]), target.reshape(-1)
    inplace = inplace_backward and logits.requires_grad and torch.is_grad_enabled()
    if inplace:
        _check_inplace(logits)
    elif logits.stride(1) != 1:
        logits = logits.contiguous()
    loss, _ = _apply(logits, target, code, ignore_index, label_smoothing, inplace, backend)
    return loss.reshape(out_shape) if code == NONE else loss


def _check_inplace(logits):
    """The gradient can be written over the logits: unit stride along the classes, rows apart."""
    N, V = logits.shape
    if logits.stride(1) != 1 or (N > 1 and abs(logits.stride(0)) < V):
        raise ArgumentValueError("inplace_backward=True needs logits with unit stride along the classes and rows "
                                 f"that do not overlap, got shape {tuple(logits.shape)} and strides "
                                 f"{logits.stride()}")


def _check_args(logits, target, reduction, ignore_index, label_smoothing, backend):
    """Every argument check of cross_entropy, one message each. The kernels check the targets' range:
    the C++ kernel before it writes anything, the Triton kernel by a device-side assert (as PyTorch's
    CUDA kernel), so that no value is read on the host."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise (ArgumentDtypeError if isinstance(logits, Tensor) else ArgumentTypeError)(f"cross_entropy: logits must be a floating-point tensor, got "
                                f"{getattr(logits, 'dtype', type(logits))}")
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise ArgumentTypeError(f"cross_entropy: target must be an int64 or int32 tensor of class indices, got "
                                f"{getattr(target, 'dtype', type(target))} (class-probability targets are not "
                                "supported)")
    if target.device != logits.device:
        raise ArgumentValueError(f"cross_entropy: target is on {target.device} but logits on {logits.device}")
    if logits.dim() == 0 or logits.shape[1 if logits.dim() > 1 else 0] == 0:
        raise ArgumentEmptyError(f"cross_entropy: logits must have at least one class, got shape "
                                 f"{tuple(logits.shape)}")
    expected = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else torch.Size([])
    if target.shape != expected:
        raise ArgumentValueError(f"cross_entropy: target has shape {tuple(target.shape)} but logits of shape "
                                 f"{tuple(logits.shape)} need {tuple(expected)}")
    if reduction not in REDUCTIONS:
        raise ArgumentValueError(f"cross_entropy: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
        raise ArgumentTypeError(f"cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise ArgumentTypeError(f"cross_entropy: label_smoothing must be a float, got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ArgumentValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    check_backend(backend, logits)


class CrossEntropyLoss(nn.Module):
    """Drop-in for `torch.nn.CrossEntropyLoss` (class-index targets, no class weights)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, inplace_backward=False, backend=None):
        super().__init__()
        if weight is not None:
            raise NotImplementedError("fusedops.CrossEntropyLoss: class weights (argument 'weight') are not supported")
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        if reduction not in REDUCTIONS:
            raise ArgumentValueError(f"CrossEntropyLoss: reduction must be one of {tuple(REDUCTIONS)}, got "
                                     f"{reduction!r}")
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.inplace_backward, self.backend = inplace_backward, backend

    def forward(self, input, target):
        return cross_entropy(input, target, reduction=self.reduction, ignore_index=self.ignore_index,
                             label_smoothing=self.label_smoothing, inplace_backward=self.inplace_backward,
                             backend=self.backend)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
