"""Fused cross-entropy: the loss and its gradient from one pass over the logits.

The forward kernel computes, per row, loss = logsumexp(x) - (1-eps)*x[t] - eps/V*sum(x) and the
gradient (softmax(x) - eps/V - (1-eps)*one_hot(t)) / n; backward only scales the saved gradient
by the upstream one (or hands it back as it is). With `inplace_backward=True` that gradient is written over the logits.
"""
import torch
from torch import Tensor, nn

from . import reference
from ._backend import pick_backend, register_cpp_fake

NONE, MEAN, SUM = 0, 1, 2  # torch's reduction numbering, as the kernels take it
REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}


# Triton launches as opaque custom ops, so torch.compile and autograd see the same ops as on CPU.
@torch.library.custom_op("fusedops::cross_entropy_forward_triton", mutates_args=())
def _forward_triton(logits: Tensor, target: Tensor, reduction: int, ignore_index: int,
                    label_smoothing: float) -> tuple[Tensor, Tensor]:
    from . import cross_entropy_triton

    _check_target_range(target, logits.shape[1], ignore_index)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    loss = cross_entropy_triton.forward(logits, target, grad, reduction, ignore_index, label_smoothing)
    return loss, grad


@torch.library.custom_op("fusedops::cross_entropy_forward_inplace_triton", mutates_args=("logits",))
def _forward_inplace_triton(logits: Tensor, target: Tensor, reduction: int, ignore_index: int,
                            label_smoothing: float) -> Tensor:
    from . import cross_entropy_triton

    _check_target_range(target, logits.shape[1], ignore_index)
    return cross_entropy_triton.forward(logits, target, logits, reduction, ignore_index, label_smoothing)


def _check_target_range(target, num_classes, ignore_index):
    """The C++ kernel checks this itself; here for the Triton kernel and the reference, before they write."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"cross_entropy: target[{i}] = {int(target[i])} is out of range for "
                         f"{num_classes} classes (argument 'target')")


def _forward_inplace_fake(logits, target, reduction, ignore_index, label_smoothing):
    return logits.new_empty(logits.shape[:1] if reduction == NONE else ())  # the loss


def _forward_fake(logits, target, reduction, ignore_index, label_smoothing):
    loss = _forward_inplace_fake(logits, target, reduction, ignore_index, label_smoothing)
    return loss, torch.empty_like(logits, memory_format=torch.contiguous_format)


_forward_triton.register_fake(_forward_fake)
_forward_inplace_triton.register_fake(_forward_inplace_fake)
register_cpp_fake("fusedops::cross_entropy_forward", _forward_fake)
register_cpp_fake("fusedops::cross_entropy_forward_inplace", _forward_inplace_fake)


def forward_op(backend):
    """The op of a backend that computes the loss and its gradient (the differentiable op runs it)."""
    ops = torch.ops.fusedops
    return ops.cross_entropy_forward if backend == "cpp" else ops.cross_entropy_forward_triton


def cross_entropy(logits, target, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                  inplace_backward=False, backend=None):
    """Like `torch.nn.functional.cross_entropy` with class-index targets, fused.

    logits: (N, V), (V,) or (N, V, d1, ...); target: (N,), () or (N, d1, ...), int64 or int32.
    inplace_backward: write the gradient over `logits` (2-D or 1-D) instead of a new buffer; the
    logits' values are gone after the call. backend: None (C++ on CPU, Triton on CUDA), "cpp",
    "triton" or "reference" (the chunked reference, differentiated by autograd).
    """
    _check_args(logits, target, reduction, ignore_index, label_smoothing)
    code = REDUCTIONS[reduction]
    backend = pick_backend(backend, logits)
    out_shape = target.shape
    if logits.dim() == 1:
        logits, target = logits.unsqueeze(0), target.reshape(1)
    elif logits.dim() > 2:
        if inplace_backward:
            raise ValueError(f"inplace_backward=True needs 1-D or 2-D logits, got shape {tuple(logits.shape)}")
        logits, target = logits.movedim(1, -1).reshape(-1, logits.shape[1]), target.reshape(-1)
    inplace = inplace_backward and logits.requires_grad and torch.is_grad_enabled()
    if inplace:
        _check_inplace(logits)
    if backend == "reference":  # differentiated by autograd, never in place
        _check_target_range(target, logits.shape[1], ignore_index)  # the kernels' own check and error
        loss = reference.cross_entropy(logits, target, reduction, ignore_index, label_smoothing)
    else:
        if not inplace and logits.stride(1) != 1:
            logits = logits.contiguous()
        # the loss and its gradient from one pass, autograd in C++ (csrc/cross_entropy_autograd.cpp)
        op = torch.ops.fusedops.cross_entropy_inplace if inplace else torch.ops.fusedops.cross_entropy
        loss = op(logits, target, code, ignore_index, label_smoothing, backend == "triton")
    return loss.reshape(out_shape) if code == NONE else loss


def _check_inplace(logits):
    """The gradient can be written over the logits: unit stride along the classes, rows apart."""
    N, V = logits.shape
    if logits.stride(1) != 1 or (N > 1 and abs(logits.stride(0)) < V):
        raise ValueError("inplace_backward=True needs logits with unit stride along the classes and rows "
                         f"that do not overlap, got shape {tuple(logits.shape)} and strides {logits.stride()}")


def _check_args(logits, target, reduction, ignore_index, label_smoothing):
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"cross_entropy: logits must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits))}")
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cross_entropy: target must be an int64 or int32 tensor of class indices, got "
                        f"{getattr(target, 'dtype', type(target))} (class-probability targets are not supported)")
    if target.device != logits.device:
        raise ValueError(f"cross_entropy: target is on {target.device} but logits on {logits.device}")
    if logits.dim() == 0 or logits.shape[1 if logits.dim() > 1 else 0] == 0:
        raise ValueError(f"cross_entropy: logits must have at least one class, got shape {tuple(logits.shape)}")
    expected = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else torch.Size([])
    if target.shape != expected:
        raise ValueError(f"cross_entropy: target has shape {tuple(target.shape)} but logits of shape "
                         f"{tuple(logits.shape)} need {tuple(expected)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
        raise TypeError(f"cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"cross_entropy: label_smoothing must be a float, got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")


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
            raise ValueError(f"CrossEntropyLoss: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.inplace_backward, self.backend = inplace_backward, backend

    def forward(self, input, target):
        return cross_entropy(input, target, reduction=self.reduction, ignore_index=self.ignore_index,
                             label_smoothing=self.label_smoothing, inplace_backward=self.inplace_backward,
                             backend=self.backend)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
