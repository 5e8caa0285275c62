"""Fused batch norm. Forward: one reduction pass for the per-channel statistics (training), then one
elementwise pass y = (x - mean) * gamma * invstd + beta. Backward: one reduction pass for sum(dy) and
sum(dy*xhat), which are dbeta and dgamma, then one elementwise pass for

    dx = gamma * invstd / n * (n*dy - sum(dy) - f * xhat * sum(dy*xhat)),   f = n/(n-1) if unbiased else 1

`unbiased=True` normalises with the Bessel-corrected variance (as the makemore notebooks do),
`unbiased=False` with the biased one (as PyTorch); running_var always takes the unbiased one. In eval
mode the statistics are constants and dx = dy * gamma * invstd.
"""
import collections
from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import reference
from ._backend import acc_dtype, pick_backend, register_cpp_fake

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Triton launches as opaque custom ops, so torch.compile and autograd see the same ops as on CPU.
@torch.library.custom_op("fusedops::batch_norm_forward_triton", mutates_args=())
def _forward_triton(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                    unbiased: bool, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from . import batch_norm_triton

    return batch_norm_triton.forward(input, weight, bias, running_mean, running_var, training, unbiased, eps)


@torch.library.custom_op("fusedops::batch_norm_backward_triton", mutates_args=())
def _backward_triton(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                     training: bool, unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    from . import batch_norm_triton

    return batch_norm_triton.backward(grad_out, input, mean, invstd, weight, training, unbiased)


@torch.library.custom_op("fusedops::batch_norm_stats_triton", mutates_args=())
def _stats_triton(input: Tensor) -> tuple[Tensor, Tensor]:
    from . import batch_norm_triton

    return batch_norm_triton.stats(input)


@torch.library.custom_op("fusedops::batch_norm_backward_reduce_triton", mutates_args=())
def _backward_reduce_triton(grad_out: Tensor, input: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    from . import batch_norm_triton

    return batch_norm_triton.backward_reduce(grad_out, input, mean)


@torch.library.custom_op("fusedops::batch_norm_backward_elemt_triton", mutates_args=())
def _backward_elemt_triton(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                           sum_dy: Tensor, sum_dy_xmu: Tensor, count: int, unbiased: bool) -> Tensor:
    from . import batch_norm_triton

    return batch_norm_triton.backward_elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                                            unbiased)


def _forward_fake(input, weight, bias, running_mean, running_var, training, unbiased, eps):
    """out, mean (fp64), invstd, var: the last two per channel in the compute dtype."""
    channels = input.shape[1]
    acc = acc_dtype(input.dtype)
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            input.new_empty(channels, dtype=torch.float64), input.new_empty(channels, dtype=acc),
            input.new_empty(channels, dtype=acc))


def _backward_fake(grad_out, input, mean, invstd, weight, training, unbiased):
    """grad_input, and grad_weight, grad_bias per channel in the compute dtype."""
    channels = input.shape[1]
    acc = acc_dtype(input.dtype)
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            input.new_empty(channels, dtype=acc), input.new_empty(channels, dtype=acc))


def _per_channel_sums_fake(input, *_):
    """Two fp64 per-channel tensors: mean and m2, or sum(dy) and sum(dy * (x - mean))."""
    return tuple(input.new_empty(input.shape[1], dtype=torch.float64) for _ in range(2))


def _backward_elemt_fake(grad_out, input, *_):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


FAKES = {"forward": _forward_fake, "backward": _backward_fake, "stats": _per_channel_sums_fake,
         "backward_reduce": lambda grad_out, input, mean: _per_channel_sums_fake(input),
         "backward_elemt": _backward_elemt_fake}
for _name, _fake in FAKES.items():
    torch.library.register_fake(f"fusedops::batch_norm_{_name}_triton")(_fake)
    register_cpp_fake(f"fusedops::batch_norm_{_name}", _fake)
register_cpp_fake("fusedops::batch_norm_update_stats", lambda *args: None)  # writes its inputs only

# The ops of a backend. forward and backward run one process's batch norm; stats, backward_reduce and
# backward_elemt are the steps of one split over processes (SyncBatchNorm), a collective between each two.
Ops = collections.namedtuple("Ops", FAKES)


def ops(backend):
    """The batch-norm ops of the "cpp" or "triton" backend."""
    suffix = "" if backend == "cpp" else "_triton"
    return Ops(*(getattr(torch.ops.fusedops, f"batch_norm_{name}{suffix}") for name in FAKES))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, unbiased=False, backend=None):
    """Like `torch.nn.functional.batch_norm` for (N, C) and (N, C, L) input, fused.

    training: normalise with the batch statistics and, if running_mean/running_var are given,
    update them in place: running = (1 - momentum) * running + momentum * batch (running_var with
    the unbiased batch variance). Otherwise normalise with running_mean and running_var.
    unbiased: normalise with the Bessel-corrected batch variance (the makemore notebooks) instead
    of the biased one (PyTorch). backend: None (C++ on CPU, Triton on CUDA), "cpp", "triton" or
    "reference" (the chunked reference, differentiated by autograd).
    """
    if momentum is None:
        raise TypeError("batch_norm: momentum must be a float, got None (momentum=None, the cumulative average, "
                        "needs the batch count that BatchNorm1d keeps)")
    _check_args(input, running_mean, running_var, weight, bias, training, eps, momentum=momentum)
    backend = pick_backend(backend, input)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, unbiased, backend)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, unbiased, backend,
                num_batches_tracked=None):
    """batch_norm on checked arguments. The fused op counts a training batch in num_batches_tracked
    when given, and momentum=None then takes the cumulative average over the counted batches."""
    if backend == "reference":
        return reference.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    unbiased)
    # the forward op, the running statistics' update and autograd, in C++ (csrc/batch_norm_autograd.cpp)
    return torch.ops.fusedops.batch_norm(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                         training, momentum, unbiased, eps, backend == "triton")


def update_running_stats(module, mean, var):
    """Counts a training batch of `module` (a BatchNorm1d) and updates its running statistics with the
    batch mean and unbiased variance, as its forward does (fusedops::batch_norm_update_stats), for
    callers that run the forward op themselves."""
    if module.track_running_stats:
        torch.ops.fusedops.batch_norm_update_stats(module.running_mean, module.running_var,
                                                   module.num_batches_tracked, mean, var, module.momentum)


def _check_args(input, running_mean, running_var, weight, bias, training, eps, min_values=2, momentum=None):
    """min_values: the values per channel that training needs here (SyncBatchNorm counts all processes').
    momentum: a float in [0, 1], or None (the cumulative average)."""
    if not isinstance(input, Tensor) or input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"batch_norm: input must be a float16, bfloat16, float32 or float64 tensor, got "
                        f"{getattr(input, 'dtype', type(input))}")
    if input.dim() not in (2, 3):
        raise ValueError(f"batch_norm: input must be (N, C) or (N, C, L), got {input.dim()}-D input of shape "
                         f"{tuple(input.shape)}")
    channels = input.shape[1]
    if channels == 0:
        raise ValueError(f"batch_norm: input must have at least one channel, got shape {tuple(input.shape)}")
    # per-channel tensors: the input's dtype, or float32 for float16/bfloat16 input (mixed precision)
    dtypes = (input.dtype,) if input.dtype in (torch.float32, torch.float64) else (input.dtype, torch.float32)
    named = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    device = input.device
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"batch_norm: {name} must be a tensor or None, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"batch_norm: {name} is on {t.device} but input is on {device}")
        if t.dtype not in dtypes:
            raise TypeError(f"batch_norm: {name} has dtype {t.dtype} but input has {input.dtype}; expected "
                            f"{' or '.join(map(str, dtypes))}")
        if t.shape != (channels,):
            raise ValueError(f"batch_norm: {name} has shape {tuple(t.shape)} but input has {channels} channels, "
                             f"expected ({channels},)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: running_mean and running_var must both be tensors or both be None, got "
                         f"running_mean={type(running_mean).__name__}, running_var={type(running_var).__name__}")
    if not training and running_mean is None:
        raise ValueError("batch_norm: training=False normalises with running_mean and running_var, got None")
    values_per_channel = input.shape[0] * (input.shape[2] if input.dim() == 3 else 1)
    if training and values_per_channel < min_values:
        raise ValueError("batch_norm: expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(input.shape)}")
    if not isinstance(training, bool):
        raise TypeError(f"batch_norm: training must be a bool, got {training!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"batch_norm: eps must be a float, got {eps!r}")
    if not eps >= 0:
        raise ValueError(f"batch_norm: eps must be a non-negative number, got {eps!r}")
    if momentum is not None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise TypeError(f"batch_norm: momentum must be a float, got {momentum!r}")
        if not 0 <= momentum <= 1:  # running = (1 - momentum) * running + momentum * batch
            raise ValueError(f"batch_norm: momentum must be in [0, 1], got {momentum!r}")


class BatchNorm1d(_BatchNorm):
    """Drop-in for `torch.nn.BatchNorm1d`: the same parameters, buffers and state_dict, fused.

    unbiased=True normalises with the Bessel-corrected batch variance (the makemore notebooks).
    backend: as `batch_norm`.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, unbiased=False, backend=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.unbiased, self.backend = unbiased, backend

    def _check_input_dim(self, input):
        if input.dim() not in (2, 3):
            raise ValueError(f"BatchNorm1d: expected 2D or 3D input, got {input.dim()}D input")

    def forward(self, input):
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, counter = self._tensors()
        training = self.training
        use_batch_stats = training or running_mean is None
        if training and not self.track_running_stats:  # batch statistics, nothing to update
            running_mean = running_var = None
        _check_args(input, running_mean, running_var, weight, bias, use_batch_stats, self.eps, momentum=self.momentum)
        backend = pick_backend(self.backend, input)
        if backend == "reference":  # the notebooks' own update, given the batch's weight
            return _batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats,
                               self._reference_momentum() if training else 0.0, self.eps, self.unbiased, backend)
        counter = counter if training and running_mean is not None else None
        return _batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, self.momentum,
                           self.eps, self.unbiased, backend, counter)  # the op counts the batch

    def _tensors(self):
        """weight, bias, running_mean, running_var, num_batches_tracked. Read from the module's dicts:
        `self.weight` goes through an AttributeError that nn.Module.__getattr__ catches, which costs
        more than the kernel at the notebooks' sizes. Attributes as a fallback (a parametrized weight)."""
        params, buffers = self._parameters, self._buffers
        try:
            return (params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"],
                    buffers["num_batches_tracked"])
        except KeyError:
            return self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked

    def _reference_momentum(self):
        """Counts a training batch; returns its weight in the running statistics' update, for the
        reference backend, whose forward updates them its own way (the fused ops count and weigh
        the batch themselves)."""
        if not self.track_running_stats:
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # the cumulative average: running = mean of the batches so far
            return 1.0 / self.num_batches_tracked.double()
        return self.momentum

    def extra_repr(self):
        return super().extra_repr() + f", unbiased={self.unbiased}, backend={self.backend!r}"
