"""Every argument check of the public functions and layers, one message per argument, raised before anything
is written."""

import math
import os

import torch
from torch import Tensor

from ._collectives import sync_group
from ._math import ACTIVATIONS, REDUCTIONS
from .errors import ArgumentDtypeError, ArgumentEmptyError, ArgumentTypeError, ArgumentValueError

BACKENDS = ("cpp", "triton")
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)  # class-index targets
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_backend(backend, tensor, op=None):
    """backend is None, "cpp" (CPU tensors) or "triton" (CUDA tensors; CPU ones under TRITON_INTERPRET=1); op,
    when given, names the function in the messages."""
    if backend is None:
        return
    prefix = "" if op is None else f"{op}: "
    if backend not in BACKENDS:
        raise ArgumentValueError(f"{prefix}backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cpp" and tensor.device.type != "cpu":
        raise ArgumentValueError(f"{prefix}backend='cpp' runs on CPU tensors, got a tensor on {tensor.device}")
    if backend == "triton" and tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ArgumentValueError(
            f"{prefix}backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before triton is first imported)"
        )


def not_differentiable(op, name, what="requires_grad=True"):
    """The error for an input the op is not differentiable with respect to (class weights, running statistics)
    that requires grad or has a forward-mode tangent: raised, never a silently dropped derivative."""
    return ArgumentValueError(
        f"{op}: not differentiable with respect to {name}, which cannot have {what} (as in PyTorch); detach it"
    )


def check_no_grad(op, name, tensor):
    """PyTorch's rule: such an input must not require grad while grad mode is on."""
    if tensor is not None and tensor.requires_grad and torch.is_grad_enabled():
        raise not_differentiable(op, name)


def no_tangent(op, names, tangents):
    """For a jvp rule: raises where such an input has a tangent."""
    for name, tangent in zip(names, tangents):
        if tangent is not None:
            raise not_differentiable(op, name, "a forward-mode tangent")


def check_number(name, value, low, allow_low, op):
    """A real number (not a bool), finite, above `low` (or equal to it when allow_low)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{op}: {name} must be a float, got {value!r}")
    if not low <= value < math.inf or (value == low and not allow_low):  # comparisons: SymFloat-safe, NaN fails
        raise ArgumentValueError(
            f"{op}: {name} must be a finite number {'>=' if allow_low else '>'} {low}, got {value}"
        )


def check_tensor(op, name, t, like, like_name, shape, dtypes=None):
    """`t`, when not None, is a tensor on `like`'s device, of one of `dtypes` (default: `like`'s dtype), of shape
    `shape`: one message per property, naming the argument and the value."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
    if t.device != like.device:
        raise ArgumentValueError(f"{op}: {name} is on {t.device} but {like_name} is on {like.device}")
    dtypes = (like.dtype,) if dtypes is None else dtypes
    if t.dtype not in dtypes:
        expected = f"; expected {' or '.join(map(str, dtypes))}" if len(dtypes) > 1 else ""
        raise ArgumentTypeError(f"{op}: {name} has dtype {t.dtype} but {like_name} has {like.dtype}{expected}")
    if tuple(t.shape) != tuple(shape):
        raise ArgumentValueError(
            f"{op}: {name} has shape {tuple(t.shape)} but {like_name} of shape {tuple(like.shape)} needs {tuple(shape)}"
        )


def check_target(logits, target, ignore_index, op):
    if not isinstance(target, Tensor):
        raise ArgumentTypeError(f"{op}: target must be a tensor, got {type(target)}")
    if target.device != logits.device:
        raise ArgumentValueError(f"{op}: target is on {target.device} but logits is on {logits.device}")
    if target.is_floating_point():  # class probabilities
        if target.dtype != logits.dtype:
            raise ArgumentTypeError(
                f"{op}: a probability target must have the logits' dtype "
                f"{logits.dtype}, got {target.dtype} (argument 'target')"
            )
        if target.shape != logits.shape:
            raise ArgumentValueError(
                f"{op}: target has shape {tuple(target.shape)} but logits of shape "
                f"{tuple(logits.shape)} need the same shape for class probabilities"
            )
        if ignore_index != -100:
            raise ArgumentValueError(
                f"{op}: ignore_index={ignore_index} is not supported with class-"
                "probability targets (argument 'target' is floating-point)"
            )
        return
    if target.dtype not in INDEX_DTYPES:
        raise ArgumentTypeError(
            f"{op}: target must be class indices (int64, int32 or uint8) or class "
            f"probabilities (floating point), got {target.dtype}"
        )
    expected = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else torch.Size([])
    if target.shape != expected:
        raise ArgumentValueError(
            f"{op}: target has shape {tuple(target.shape)} but logits of shape "
            f"{tuple(logits.shape)} need {tuple(expected)}"
        )


def check_weight(logits, weight, name, op):
    """Class weights: None, or one per class, of the logits' dtype and device, not requiring grad."""
    check_tensor(op, name, weight, logits, "logits", logits.shape[1 if logits.dim() > 1 else 0 :][:1])
    check_no_grad(op, name, weight)


def check_cross_entropy(
    logits,
    target,
    weight,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    return_lse,
    backend,
    weight_name="weight",
    split=False,
    op="cross_entropy",
):
    """Every argument check of cross_entropy, one message each. The kernels check the targets' range:
    the C++ kernel before it writes anything, the Triton kernel by a device-side assert (as PyTorch's
    CUDA kernel), so that no value is read on the host. split: the classes are split across processes,
    and this one's shard may hold none."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise (ArgumentDtypeError if isinstance(logits, Tensor) else ArgumentTypeError)(
            f"{op}: logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}"
        )
    if logits.dim() == 0 or (logits.shape[1 if logits.dim() > 1 else 0] == 0 and not split):
        raise ArgumentEmptyError(f"{op}: logits must have at least one class, got shape {tuple(logits.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
        raise ArgumentTypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    check_target(logits, target, ignore_index, op)
    check_weight(logits, weight, weight_name, op)
    if reduction not in REDUCTIONS:
        raise ArgumentValueError(f"{op}: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise ArgumentTypeError(f"{op}: label_smoothing must be a float, got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ArgumentValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    check_number("z_loss", z_loss, 0.0, allow_low=True, op=op)
    if softcap is not None:
        check_number("softcap", softcap, 0.0, allow_low=False, op=op)
    if not isinstance(return_lse, bool):
        raise ArgumentTypeError(f"{op}: return_lse must be a bool, got {return_lse!r}")
    check_backend(backend, logits, op)


def check_inplace(logits, return_lse, op="cross_entropy"):
    """The gradient can be written over the logits: unit stride along the classes, rows apart, and no
    differentiable lse asked for (its gradient needs the logits)."""
    if return_lse:
        raise ArgumentValueError(
            f"{op}: inplace_backward=True cannot return_lse=True while the logits require grad: the "
            "lse's gradient needs the logits, which are overwritten by their gradient"
        )
    N, V = logits.shape
    if logits.stride(1) != 1 or (N > 1 and abs(logits.stride(0)) < V):
        raise ArgumentValueError(
            f"{op}: inplace_backward=True needs logits with unit stride along the classes and rows "
            f"that do not overlap, got shape {tuple(logits.shape)} and strides "
            f"{logits.stride()}"
        )


def vocab_group(logits, process_group, vocab_size, inplace_backward, op="cross_entropy"):
    """The group the classes are split over, or None (one process: the logits hold all vocab_size classes)."""
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
        raise ArgumentTypeError(f"{op}: vocab_size must be an int or None, got {vocab_size!r}")
    group = None if process_group is None else sync_group(process_group)
    V = logits.shape[1 if logits.dim() > 1 else 0]
    if group is None and V == 0:  # only a shard of a split may be empty
        raise ArgumentEmptyError(
            f"{op}: logits must have at least one class when the classes are not split "
            f"across processes, got shape {tuple(logits.shape)}"
        )
    if group is None and vocab_size is not None and vocab_size != V:
        raise ArgumentValueError(
            f"{op}: vocab_size={vocab_size} but the logits have {V} classes, not split across processes"
        )
    if group is not None and inplace_backward:
        raise ArgumentValueError(
            f"{op}: inplace_backward=True cannot be used with a process_group that "
            "splits the classes (the gradient comes from autograd there)"
        )
    return group


def check_linear_cross_entropy(input, weight, bias, target, chunk_bytes):
    """The projection's checks and the target's shape; the loss options are cross_entropy's."""
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ArgumentTypeError(
                f"linear_cross_entropy: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}"
            )
    if input.dim() < 1:
        raise ArgumentValueError(
            f"linear_cross_entropy: input must have at least 1 dimension, got shape {tuple(input.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ArgumentValueError(
            f"linear_cross_entropy: weight must have shape (V, {input.shape[-1]}) for input of "
            f"shape {tuple(input.shape)}, got {tuple(weight.shape)}"
        )
    if not isinstance(target, Tensor):
        raise ArgumentTypeError(f"linear_cross_entropy: target must be a tensor, got {type(target)}")
    expected = input.shape[:-1] + (weight.shape[:1] if target.is_floating_point() else ())
    if target.shape != expected:
        raise ArgumentValueError(
            f"linear_cross_entropy: target has shape {tuple(target.shape)} but input of shape "
            f"{tuple(input.shape)} needs {tuple(expected)} ("
            f"{'class probabilities' if target.is_floating_point() else 'class indices'})"
        )
    check_tensor("linear_cross_entropy", "weight", weight, input, "input", weight.shape)  # its device and dtype
    check_tensor("linear_cross_entropy", "bias", bias, input, "input", weight.shape[:1])
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
        raise ArgumentTypeError(f"linear_cross_entropy: chunk_bytes must be an int, got {chunk_bytes!r}")
    if chunk_bytes < 1:
        raise ArgumentValueError(f"linear_cross_entropy: chunk_bytes must be a positive int, got {chunk_bytes!r}")


def check_batch_norm(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    eps,
    min_values=2,
    momentum=None,
    backend=None,
    residual=None,
    activation=None,
):
    """Every argument check of batch norm, one message each. min_values: the values per channel that
    training needs here (SyncBatchNorm counts all processes'); an empty batch passes, as in torch.
    momentum: checked in training only, a float in [0, 1] or None (the cumulative average)."""
    if not isinstance(input, Tensor) or input.dtype not in FLOAT_DTYPES:
        raise (ArgumentDtypeError if isinstance(input, Tensor) else ArgumentTypeError)(
            f"batch_norm: input must be a float16, bfloat16, float32 or float64 tensor, got "
            f"{getattr(input, 'dtype', type(input))}"
        )
    if input.dim() < 2:
        raise ArgumentValueError(
            f"batch_norm: input must be (N, C, *), got {input.dim()}-D input of shape {tuple(input.shape)}"
        )
    channels = input.shape[1]
    if channels == 0:
        raise ArgumentValueError(f"batch_norm: input must have at least one channel, got shape {tuple(input.shape)}")
    # per-channel tensors: the input's dtype, or float32 for float16/bfloat16 input (mixed precision)
    dtypes = (input.dtype,) if input.dtype in (torch.float32, torch.float64) else (input.dtype, torch.float32)
    named = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    for name, t in named.items():
        check_tensor("batch_norm", name, t, input, "input", (channels,), dtypes)
        if name.startswith("running"):
            check_no_grad("batch_norm", name, t)
    if (running_mean is None) != (running_var is None):
        raise ArgumentValueError(
            "batch_norm: running_mean and running_var must both be tensors or both be None, "
            f"got running_mean={type(running_mean).__name__}, "
            f"running_var={type(running_var).__name__}"
        )
    if not training and running_mean is None:
        raise ArgumentValueError("batch_norm: training=False normalises with running_mean and running_var, got None")
    if training and 0 < input.numel() // channels < min_values:
        raise ArgumentValueError(
            f"batch_norm: expected more than 1 value per channel when training, got input of shape {tuple(input.shape)}"
        )
    if not isinstance(training, bool):
        raise ArgumentTypeError(f"batch_norm: training must be a bool, got {training!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ArgumentTypeError(f"batch_norm: eps must be a float, got {eps!r}")
    if not eps >= 0:
        raise ArgumentValueError(f"batch_norm: eps must be a non-negative number, got {eps!r}")
    if training and eps == 0:  # the variance of a constant channel is 0: invstd would be inf
        raise ArgumentValueError(f"batch_norm: eps must be positive when training, got {eps!r}")
    if training and momentum is not None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise ArgumentTypeError(f"batch_norm: momentum must be a float, got {momentum!r}")
        if not 0 <= momentum <= 1:  # running = (1 - momentum) * running + momentum * batch
            raise ArgumentValueError(f"batch_norm: momentum must be in [0, 1], got {momentum!r}")
    check_tensor("batch_norm", "residual", residual, input, "input", input.shape)
    check_activation(activation)
    check_backend(backend, input, "batch_norm")


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ArgumentValueError(f"batch_norm: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")


def rank_error(layer, expected, input):
    return ArgumentValueError(f"{layer}: expected {expected} input (got {input.dim()}D input)")
