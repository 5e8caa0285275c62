"""Fused batch norm of (N, C, *) input, contiguous or channels-last, with an optional residual and
activation. Forward: one reduction pass for the per-channel statistics (training), then one elementwise
pass out = act((x - mean) * gamma * invstd + beta + residual). Backward: one reduction pass for sum(dz)
and sum(dz*xhat), which are dbeta and dgamma (dz = dy, masked by out > 0 after a relu; it is also the
residual's gradient), then one elementwise pass for

    dx = gamma * invstd / n * (n*dz - sum(dz) - f * xhat * sum(dz*xhat)),   f = n/(n-1) if unbiased else 1

`unbiased=True` normalises with the Bessel-corrected variance (as the makemore notebooks do),
`unbiased=False` with the biased one (as PyTorch); running_var always takes the unbiased one. In eval
mode the statistics are constants and dx = dy * gamma * invstd.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from ._autograd import TorchBatchNorm, batched_first, fast_apply
from ._checks import check_activation, check_backend, check_batch_norm, no_tangent, not_differentiable, rank_error
from ._layout import empty_like_input
from ._math import ACTIVATIONS, acc_dtype
from ._ops import kernels, register
from .errors import ArgumentTypeError


def _forward_fake(input, weight, bias, running_mean, running_var, training, unbiased, eps, residual=None, activation=0):
    """out, mean (fp64), invstd, var: the last two per channel in the compute dtype."""
    channels = input.shape[1]
    acc = acc_dtype(input.dtype)
    return (
        empty_like_input(input),
        input.new_empty(channels, dtype=torch.float64),
        input.new_empty(channels, dtype=acc),
        input.new_empty(channels, dtype=acc),
    )


def _backward_fake(grad_out, input, mean, invstd, weight, training, unbiased, output=None, grad_residual=False):
    """grad_input, grad_weight and grad_bias per channel in the compute dtype, grad_residual (empty unless
    the relu output is given and grad_residual is set)."""
    channels = input.shape[1]
    acc = acc_dtype(input.dtype)
    return (
        empty_like_input(input),
        input.new_empty(channels, dtype=acc),
        input.new_empty(channels, dtype=acc),
        empty_like_input(input) if output is not None and grad_residual else input.new_empty(0),
    )


def _per_channel_sums_fake(input, *_):
    """Two fp64 per-channel tensors: mean and m2, or sum(dy) and sum(dy * (x - mean))."""
    return tuple(input.new_empty(input.shape[1], dtype=torch.float64) for _ in range(2))


def _backward_elemt_fake(grad_out, input, *_):
    return empty_like_input(input)


def _cuda(step):
    """The CUDA kernel of batch_norm_<step>: batch_norm_triton.<step>, imported on first use."""

    def launch(*args):
        from . import batch_norm_triton

        return getattr(batch_norm_triton, step)(*args)

    return launch


for _step, _fake in {
    "forward": _forward_fake,
    "backward": _backward_fake,
    "stats": _per_channel_sums_fake,
    "backward_reduce": lambda grad_out, input, mean: _per_channel_sums_fake(input),
    "backward_elemt": _backward_elemt_fake,
}.items():
    register(f"batch_norm_{_step}", _fake, _cuda(_step))
# one kernel for every device (C++, CompositeExplicitAutograd); writes its inputs only
register("batch_norm_update_stats", lambda *args: None, None)


class BatchNormOptions(NamedTuple):
    """BatchNormFunction's options, as `batch_norm` checked them (see there); activation is a code of
    ACTIVATIONS (0: none, 1: relu)."""

    training: bool = True
    unbiased: bool = False
    eps: float = 1e-5
    activation: int = 0
    backend: str | None = None


class BatchNormFunction(torch.autograd.Function):
    """out, mean, invstd, var = BatchNormFunction.apply(input, weight, bias, running_mean, running_var, residual,
    options): act(batch_norm(input) + residual) of (N, C, *) input with the batch's statistics (training) or
    the running ones, which it does not update; options a BatchNormOptions. residual may be None. mean (fp64),
    invstd and var (the unbiased batch variance, or the running one) are per channel and not differentiable:
    mean and var are what the running statistics' update takes.
    weight and bias may be None. backward runs the fused backward op (relu's mask from the saved output, no
    other tensor saved than batch norm's); under create_graph=True it differentiates the same function
    written in torch ops, so double backward is exact."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, residual, options):
        training, unbiased, eps, activation, backend = options
        out, mean, invstd, var = kernels(backend, input).batch_norm_forward(
            input,
            weight,
            bias,
            None if training else running_mean,
            None if training else running_var,
            training,
            unbiased,
            eps,
            residual,
            activation,
        )
        return out, mean, invstd, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, *_, options = inputs
        out, mean, invstd, _ = output
        relu_out = out if options.activation else None  # relu's mask: out > 0
        ctx.save_for_backward(input, weight, bias, mean, invstd, relu_out)
        ctx.save_for_forward(input, weight, mean, invstd, relu_out)
        ctx.options = options
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, *_):
        input, weight, bias, mean, invstd, relu_out = ctx.saved_tensors
        training, unbiased, eps, _, backend = ctx.options
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            raise not_differentiable("batch_norm", "running_mean and running_var")
        needs = ctx.needs_input_grad[:3] + ctx.needs_input_grad[5:6]  # input, weight, bias, residual
        if grad_out is None:
            return None, None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph: the backward in torch ops, differentiable
            grads = _composite_grads(
                grad_out, input, weight, bias, mean, invstd, relu_out, training, unbiased, eps, needs
            )
        else:
            dx, dw, db, dz = kernels(backend, input).batch_norm_backward(
                grad_out, input, mean, invstd, weight, training, unbiased, relu_out, needs[3]
            )
            grads = (
                dx if needs[0] else None,
                dw.to(weight.dtype) if needs[1] else None,
                db.to(bias.dtype) if needs[2] else None,
                (grad_out if relu_out is None else dz) if needs[3] else None,
            )
        dx, dw, db, dresidual = grads
        return dx, dw, db, None, None, dresidual, None

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, running_mean_t, running_var_t, residual_t, _):
        input, weight, mean, invstd, relu_out = ctx.saved_tensors
        training, unbiased = ctx.options.training, ctx.options.unbiased
        if not training:  # (in training the output does not depend on them: their tangent's share is 0)
            no_tangent("batch_norm", ["running_mean", "running_var"], [running_mean_t, running_var_t])
        dims, shape = _reduced_dims(input)
        mean, invstd = mean.to(invstd.dtype).view(shape), invstd.view(shape)
        xhat = (input - mean) * invstd
        xhat_t = torch.zeros_like(xhat) if input_t is None else input_t * invstd
        if training and input_t is not None:  # d xhat = invstd * (dx - mean(dx) - xhat * sum(xhat*dx) / d)
            n = input.numel() // input.shape[1]
            d = n - 1 if unbiased else n
            xhat_t = invstd * (
                input_t - input_t.mean(dims, keepdim=True) - xhat * (xhat * input_t).sum(dims, keepdim=True) / d
            )
        out_t = xhat_t if weight is None else weight.view(shape) * xhat_t
        if weight_t is not None:
            out_t = out_t + weight_t.view(shape) * xhat
        if bias_t is not None:
            out_t = out_t + bias_t.view(shape)
        if residual_t is not None:
            out_t = out_t + residual_t
        if relu_out is not None:  # d relu(z) = dz where z > 0
            out_t = out_t * (relu_out > 0)
        return out_t.to(input.dtype), None, None, None  # the statistics are not differentiable

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, residual, options):
        """Each mapped slice its own batch: (B, N, C, *) runs as (N, B*C, *), every (slice, channel)
        pair a channel of its own."""
        B = info.batch_size

        def batch_second(t, dim):  # (N, B, C, *)
            return t.movedim(dim, 1) if dim is not None else t.expand(B, *t.shape).movedim(0, 1)

        x = batch_second(input, in_dims[0])
        N, C = x.shape[0], x.shape[2]
        per_channel = [
            None if t is None else batched_first(t, dim, B).reshape(B * C)
            for t, dim in zip((weight, bias, running_mean, running_var), in_dims[1:5])
        ]
        if residual is not None:
            residual = batch_second(residual, in_dims[5]).reshape(N, B * C, *x.shape[3:])
        out, mean, invstd, var = BatchNormFunction.apply(
            x.reshape(N, B * C, *x.shape[3:]), *per_channel, residual, options
        )
        out = out.view(N, B, C, *x.shape[3:])
        return (out, mean.view(B, C), invstd.view(B, C), var.view(B, C)), (1, 0, 0, 0)


def _reduced_dims(input):
    """The dims batch norm reduces over, and the shape that broadcasts a per-channel tensor."""
    return [0, *range(2, input.dim())], (1, -1) + (1,) * (input.dim() - 2)


def _composite_grads(grad_out, input, weight, bias, mean, invstd, relu_out, training, unbiased, eps, needs):
    """The gradients of input, weight, bias and residual in closed form, in torch ops on the inputs (in
    training the statistics recomputed from the input), so differentiable again; no nested autograd.grad,
    which torch.func's vjp/jacrev/hessian cannot run."""
    dims, shape = _reduced_dims(input)
    acc = invstd.dtype
    dz = grad_out if relu_out is None else grad_out * (relu_out > 0)  # relu: dz = dy where out > 0
    x, dy = input.to(acc), dz.to(acc)
    if training:  # the statistics as functions of the input
        d = x.numel() // x.shape[1] - (1 if unbiased else 0)
        centred = x - x.mean(dims, keepdim=True)
        inv = torch.rsqrt(centred.square().sum(dims, keepdim=True) / d + eps)
    else:  # constants: the running statistics the forward normalised with
        centred, inv = x - mean.to(acc).view(shape), invstd.view(shape)
    xhat = centred * inv
    g = dy if weight is None else dy * weight.view(shape)  # d loss / d xhat
    dx = dw = db = None
    if needs[0]:  # training: dx = invstd * (g - mean(g) - xhat * sum(g * xhat) / d); eval: g * invstd
        dx = (
            inv * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).sum(dims, keepdim=True) / d)
            if training
            else g * inv
        )
        dx = dx.to(input.dtype)
    if needs[1]:  # dw = sum(dy * xhat)
        dw = (dy * xhat).sum(dims).to(weight.dtype)
    if needs[2]:  # db = sum(dy)
        db = dy.sum(dims).to(bias.dtype)
    return dx, dw, db, dz if needs[3] else None


_apply = fast_apply(BatchNormFunction)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    activation: str | None = None,
    unbiased: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Like `torch.nn.functional.batch_norm` for (N, C, *) input, contiguous or channels-last, fused with
    an optional residual and activation: act(batch_norm(input) + residual) in one elementwise pass.

    Args:
        input: (N, C, *) input, contiguous or channels-last.
        running_mean: (C,) running means, or None (training only).
        running_var: (C,) running variances, or None with running_mean.
        weight: (C,) scale gamma, or None (no scaling).
        bias: (C,) shift beta, or None (no shift).
        training: normalise with the batch statistics and, if running_mean/running_var are given,
            update them in place: running = (1 - momentum) * running + momentum * batch (running_var with
            the unbiased batch variance). Otherwise normalise with running_mean and running_var.
        momentum: the running statistics' update factor in training (None raises here: the cumulative
            average needs the batch count that the BatchNorm layers keep); unused otherwise.
        eps: added to the variance before its inverse square root; must be positive in training.
        residual: None or a tensor like input, added before the activation.
        activation: None or "relu".
        unbiased: normalise with the Bessel-corrected batch variance (the makemore notebooks) instead
            of the biased one (PyTorch).
        backend: None (C++ on CPU, Triton on CUDA), "cpp" or "triton".

    Returns:
        act(batch_norm(input) + residual), shaped like input.
    """
    if training and momentum is None:
        raise ArgumentTypeError(
            "batch_norm: momentum must be a float, got None (momentum=None, the cumulative "
            "average, needs the batch count that the BatchNorm modules keep)"
        )
    check_batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        eps,
        momentum=momentum,
        backend=backend,
        residual=residual,
        activation=activation,
    )
    return _batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        unbiased,
        backend,
        residual=residual,
        activation=activation,
    )


def _batch_norm(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    unbiased,
    backend,
    num_batches_tracked=None,
    residual=None,
    activation=None,
):
    """batch_norm on checked arguments. In training with running statistics, counts the batch in
    num_batches_tracked when given, and momentum=None then takes the cumulative average over the
    counted batches. An empty batch is counted and leaves the statistics as they are, as in torch."""
    if residual is input:  # relu(bn(x) + x): torch.compile traces no Function given one tensor twice
        residual = input.view_as(input)
    options = BatchNormOptions(training, unbiased, eps, ACTIVATIONS[activation], backend)
    out, mean, _, var = _apply(input, weight, bias, running_mean, running_var, residual, options)
    if training and running_mean is not None:
        if input.numel():
            torch.ops.fusedops.batch_norm_update_stats(
                running_mean, running_var, num_batches_tracked, mean, var, momentum
            )
        elif num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    return out


def update_running_stats(module: "BatchNormBase", mean: Tensor, var: Tensor) -> None:
    """Counts a training batch of `module` (a fusedops batch-norm layer) and updates its running statistics
    with the batch mean and unbiased variance, as its forward does (fusedops::batch_norm_update_stats), for
    callers that run the forward op themselves.

    Nothing is done when the module does not track running statistics.

    Args:
        module: the fusedops batch-norm layer whose running_mean, running_var and num_batches_tracked are
            updated, with its momentum (None: the cumulative average).
        mean: (C,) the batch mean.
        var: (C,) the batch's unbiased variance.
    """
    if module.track_running_stats:
        torch.ops.fusedops.batch_norm_update_stats(
            module.running_mean, module.running_var, module.num_batches_tracked, mean, var, module.momentum
        )


def batch_norm_backward(
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    *,
    training: bool = True,
    unbiased: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm's fused backward, for a backward pass written by hand (the makemore notebooks' last
    exercise): the gradients of input, weight and bias from grad_out and the forward's statistics, as
    BatchNormFunction returns them. In training
        dx = gamma * invstd / n * (n*dy - sum(dy) - f * xhat * sum(dy*xhat)),   f = n/(n-1) if unbiased else 1
    and dx = dy * gamma * invstd in eval.

    Args:
        grad_out: the output's gradient, shaped and laid out like input.
        input: (N, C, *) the forward's input.
        mean: (C,) the forward's mean (fp64), as BatchNormFunction returns it.
        invstd: (C,) the forward's 1 / sqrt(var + eps).
        weight: (C,) gamma, or None (ones).
        training: whether the forward normalised with the batch's statistics (else with constants).
        unbiased: whether it normalised with the Bessel-corrected variance.
        backend: None (C++ on CPU, Triton on CUDA), "cpp" or "triton".

    Returns:
        grad_input (input's dtype and layout), grad_weight and grad_bias (per channel, fp32 or fp64).
    """
    check_backend(backend, input, "batch_norm_backward")
    grad_input, grad_weight, grad_bias, _ = kernels(backend, input).batch_norm_backward(
        grad_out, input, mean, invstd, weight, training, unbiased
    )
    return grad_input, grad_weight, grad_bias


class BatchNormBase(TorchBatchNorm):
    """The fusedops batch-norm layers: torch's parameters, buffers and state_dict, fused, with an optional
    activation after an optional residual: forward(input, residual=None) = act(bn(input) + residual).

    unbiased=True normalises with the Bessel-corrected batch variance (the makemore notebooks).
    backend: as `batch_norm`. Subclasses name the input ranks they take."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        activation: str | None = None,
        unbiased: bool = False,
        backend: str | None = None,
    ) -> None:
        """torch's batch-norm arguments (the same parameters and buffers), plus fusedops' options.

        Args:
            num_features: C, the number of channels.
            eps: added to the variance before its inverse square root, as torch's.
            momentum: the running statistics' update factor, as torch's; None: the cumulative average over
                the batches counted in num_batches_tracked.
            affine: whether the layer has a learnable weight (and bias), as torch's.
            track_running_stats: whether the layer keeps running statistics, as torch's.
            device: the parameters' and buffers' device, as torch's.
            dtype: the parameters' and buffers' dtype, as torch's.
            bias: with affine, whether the layer has a learnable bias, as torch's.
            activation: None or "relu", applied after the residual add.
            unbiased: normalise with the Bessel-corrected batch variance (the makemore notebooks) instead of
                the biased one (PyTorch).
            backend: as `batch_norm`.
        """
        check_activation(activation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.activation, self.unbiased, self.backend = activation, unbiased, backend

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """act(bn(input) + residual): batch statistics in training (updating the running ones when tracked),
        else the running ones (the batch's when the layer tracks none).

        Args:
            input: (N, C, *) input, of the ranks the subclass takes.
            residual: None or a tensor like input, added before the activation.

        Returns:
            The output, shaped like input.
        """
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, counter = self._tensors()
        training = self.training
        use_batch_stats = training or running_mean is None
        if training and not self.track_running_stats:  # batch statistics, nothing to update
            running_mean = running_var = None
        check_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            use_batch_stats,
            self.eps,
            momentum=self.momentum if training else None,
            backend=self.backend,
            residual=residual,
            activation=self.activation,
        )
        counter = counter if training and running_mean is not None else None
        return _batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            self.unbiased,
            self.backend,
            counter,
            residual,
            self.activation,
        )

    def _tensors(self):
        """weight, bias, running_mean, running_var, num_batches_tracked. Read from the module's dicts:
        `self.weight` goes through an AttributeError that nn.Module.__getattr__ catches, which costs
        more than the kernel at the notebooks' sizes. Attributes as a fallback (a parametrized weight)."""
        params, buffers = self._parameters, self._buffers
        try:
            return (
                params["weight"],
                params["bias"],
                buffers["running_mean"],
                buffers["running_var"],
                buffers["num_batches_tracked"],
            )
        except KeyError:
            return self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked

    def extra_repr(self):
        activation = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + f"{activation}, unbiased={self.unbiased}, backend={self.backend!r}"


def adopt_state(new, module):
    """`new`, a batch-norm layer built on the meta device, holding `module`'s own parameters and buffers
    (the same tensors) and in its mode: how the conversions swap one layer for another."""
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(module, name))
    return new.train(module.training)


class BatchNorm1d(BatchNormBase):
    """Drop-in for `torch.nn.BatchNorm1d` on (N, C) or (N, C, L) input (see BatchNormBase)."""

    def _check_input_dim(self, input):
        if input.dim() not in (2, 3):
            raise rank_error("BatchNorm1d", "2D or 3D", input)


class BatchNorm2d(BatchNormBase):
    """Drop-in for `torch.nn.BatchNorm2d` on (N, C, H, W) input, contiguous or channels_last (see BatchNormBase)."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise rank_error("BatchNorm2d", "4D", input)


class BatchNorm3d(BatchNormBase):
    """Drop-in for `torch.nn.BatchNorm3d` on (N, C, D, H, W) input, contiguous or channels_last_3d
    (see BatchNormBase)."""

    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise rank_error("BatchNorm3d", "5D", input)
