"""Batch norm over a batch split across processes (torch.distributed: gloo on CPU, NCCL on CUDA), with
the fused kernels, all-reduces of O(C) values whatever the number of processes, and no host sync.

forward:  each process r has its count n_r, mean_r and m2_r = sum((x - mean_r)^2) per channel; two
          all-reduces merge them exactly (any n_r, 0 included):
            [n, s] = sum_r [n_r, n_r * mean_r]                   (fp64)  ->  mean = s / n
            m2     = sum_r (m2_r + n_r * (mean_r - mean)^2)      (fp64)
          then each normalises its own values with them.
backward: every process's sum(dy) and sum(dy * (x - mean)), all-reduced; then each computes
          dx = gamma*invstd/n * (n*dy - sum(dy) - f * xhat * sum(dy*xhat)) with the global n and sums.
The collectives are torch.distributed's functional ones, which torch.compile traces (fullgraph=True).
As in torch.nn.SyncBatchNorm, each process's weight and bias gradients are its own share (summed by
DistributedDataParallel's gradient all-reduce).
"""

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._autograd import fast_apply
from ._checks import check_batch_norm, rank_error
from ._collectives import all_reduce, sync_group
from ._ops import kernels
from .batch_norm import BatchNormBase, adopt_state, update_running_stats
from .errors import ArgumentValueError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def global_stats(count, mean, m2, group):
    """n (a one-element fp64 tensor), mean and m2 over the processes of `group` from this one's count (an
    int), mean and m2 (fp64)."""
    sums = all_reduce(
        torch.cat((mean.new_full((1,), count), count * mean)), group, "SyncBatchNorm"
    )  # [n, sum(n_r * mean_r)]
    n, mean_all = sums[:1], sums[1:] / sums[:1]
    m2_all = all_reduce(
        m2 + count * (mean - mean_all).square(), group, "SyncBatchNorm"
    )  # sum(m2_r + n_r * (mean_r - mean)^2)
    return n, mean_all, m2_all


class SyncBatchNormOptions(NamedTuple):
    """SyncBatchNormFunction's options: as batch norm's, and the process group the batch is split over."""

    unbiased: bool
    eps: float
    group: object  # a torch.distributed ProcessGroup
    backend: str | None = None


class SyncBatchNormFunction(torch.autograd.Function):
    """out, mean, invstd, var, count = SyncBatchNormFunction.apply(input, weight, bias, options): training-mode
    batch norm of this process's (N, C, *) input with the statistics of every process's in options.group. mean
    (fp64), invstd, var (the global unbiased variance, fp64) and count (the global values per channel, a
    one-element fp64 tensor) are not differentiable. Its backward is once
    differentiable: asking for a second derivative raises."""

    @staticmethod
    def forward(input, weight, bias, options):
        unbiased, eps, group, backend = options
        ops = kernels(backend, input)
        mean, m2 = ops.batch_norm_stats(input)
        count, mean, m2 = global_stats(input.numel() // input.shape[1], mean, m2, group)
        var = m2 / (count - 1)  # running_var always takes the unbiased variance
        # the batch's statistics given as running ones: the forward kernel normalises with them as they are
        out, mean, invstd, _ = ops.batch_norm_forward(
            input, weight, bias, mean, m2 / (count - 1 if unbiased else count), False, unbiased, eps
        )
        return out, mean, invstd, var, count

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, options = inputs
        _, mean, invstd, _, count = output
        ctx.save_for_backward(input, weight, mean, invstd, count)
        ctx.options, ctx.bias_dtype = options, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_):
        input, weight, mean, invstd, count = ctx.saved_tensors
        unbiased, _, group, backend = ctx.options
        ops = kernels(backend, input)
        sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(grad_out, input, mean)
        grad_input = None
        if ctx.needs_input_grad[0]:
            total_dy, total_dy_xmu = all_reduce(torch.cat((sum_dy, sum_dy_xmu)), group, "SyncBatchNorm").view(2, -1)
            grad_input = ops.batch_norm_backward_elemt(
                grad_out, input, mean, invstd, weight, total_dy, total_dy_xmu, count, unbiased
            )
        need_weight, need_bias = ctx.needs_input_grad[1:3]
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if need_weight else None  # sum(dy * xhat), this share
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None  # sum(dy), this share
        return grad_input, grad_weight, grad_bias, None


_apply = fast_apply(SyncBatchNormFunction)


class SyncBatchNorm(BatchNormBase):
    """A fusedops batch norm on (N, C, *) input whose training statistics cover the batch of every process
    in `process_group` (default: the whole world), on CPU (gloo) and CUDA (NCCL). In eval mode, in a
    single process, or without an initialised process group it is the plain fused batch norm.
    Arguments as torch.nn.SyncBatchNorm, plus the fusedops layers' unbiased and backend.

    Fewer than 2 values per channel in training is refused only when there is no other process to count
    with, as in torch.nn.SyncBatchNorm: the count over all processes is known only on the device, and
    reading it would stall every step. With one value over all processes the variance is 0 (unbiased:
    NaN) and running_var takes NaN; with none at all the running statistics stay as they are."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: "ProcessGroup | None" = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        unbiased: bool = False,
        backend: str | None = None,
    ) -> None:
        """Arguments as torch.nn.SyncBatchNorm, plus the fusedops layers' unbiased and backend.

        Args:
            num_features: C, the number of channels.
            eps: as BatchNormBase's.
            momentum: as BatchNormBase's (None: the cumulative average).
            affine: as BatchNormBase's.
            track_running_stats: as BatchNormBase's.
            process_group: the torch.distributed group whose processes' batches the training statistics
                cover; None: the whole world.
            device: as BatchNormBase's.
            dtype: as BatchNormBase's.
            bias: as BatchNormBase's.
            unbiased: as BatchNormBase's.
            backend: as BatchNormBase's.
        """
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            unbiased=unbiased,
            backend=backend,
        )
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise rank_error("SyncBatchNorm", "at least 2D", input)

    def forward(self, input: Tensor) -> Tensor:
        """Batch norm of this process's input with the statistics of every process's batch in training (the
        running ones updated when tracked); the plain fused batch norm in eval mode, in a single process, or
        without an initialised process group.

        Args:
            input: (N, C, *) input, at least 2-D.

        Returns:
            The output, shaped like input.
        """
        group = sync_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, _ = self._tensors()
        check_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            True,
            self.eps,
            min_values=0,
            momentum=self.momentum,
            backend=self.backend,
        )  # the count over all processes is not known here
        options = SyncBatchNormOptions(self.unbiased, self.eps, group, self.backend)
        out, mean, _, var, count = _apply(input, weight, bias, options)
        if self.track_running_stats:  # an empty batch everywhere (count 0) leaves them as they are
            update_running_stats(
                self, torch.where(count > 0, mean, running_mean), torch.where(count > 0, var, running_var)
            )
        return out


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNormBase)


def convert_sync_batchnorm(module: nn.Module, process_group: "ProcessGroup | None" = None) -> nn.Module:
    """Every batch norm in `module` (torch's BatchNorm1d/2d/3d and SyncBatchNorm, fusedops' layers) replaced
    by a SyncBatchNorm over `process_group` that keeps its parameters and buffers (the same tensors), options
    and mode.

    Args:
        module: the model, converted in place; a fusedops layer with a fused activation raises (SyncBatchNorm
            has none).
        process_group: the group of the new layers; when None, a torch SyncBatchNorm's own group, else the
            whole world.

    Returns:
        The module, itself replaced if it is one.
    """
    if isinstance(module, BATCH_NORMS) and not isinstance(module, SyncBatchNorm):
        if getattr(module, "activation", None) is not None:
            raise ArgumentValueError(
                f"convert_sync_batchnorm: SyncBatchNorm has no fused activation, got a "
                f"{type(module).__name__} with activation={module.activation!r}"
            )
        group = getattr(module, "process_group", None) if process_group is None else process_group
        sync = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            group,
            device="meta",
            bias=module.bias is not None,
            unbiased=getattr(module, "unbiased", False),
            backend=getattr(module, "backend", None),
        )
        return adopt_state(sync, module)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
