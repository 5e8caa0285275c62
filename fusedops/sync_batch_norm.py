"""Batch norm over a batch split across processes (torch.distributed: gloo on CPU, NCCL on CUDA), with
the fused kernels and one collective each way.

forward:  every process's count n_r, mean_r and m2_r = sum((x - mean_r)^2) per channel, all-gathered
          and merged exactly (Chan et al., any n_r): n = sum(n_r), mean = sum(n_r * mean_r) / n,
          m2 = sum(m2_r) + sum(n_r * (mean_r - mean)^2); then each normalises its rows with them.
backward: every process's sum(dy) and sum(dy * (x - mean)), all-reduced; then each computes
          dx = gamma*invstd/n * (n*dy - sum(dy) - f * xhat * sum(dy*xhat)) with the global n and sums.
As in torch.nn.SyncBatchNorm, each process's weight and bias gradients are its own share (summed by
DistributedDataParallel's gradient all-reduce).
"""
import torch
import torch.distributed as dist
from torch import nn

from torch.autograd.function import once_differentiable

from ._ops import kernels
from .batch_norm import BatchNorm1d, _check_args, as_ncl, update_running_stats
from .errors import ArgumentValueError


def _collective(name, fn, tensor_args, group):
    """fn(*tensor_args, group=group), turning a failed peer into an error that says so."""
    try:
        fn(*tensor_args, group=group)
    except RuntimeError as e:
        raise RuntimeError(f"SyncBatchNorm: {name} over the process group failed: a peer process may have "
                           f"exited or stalled past the group's timeout ({e})") from e


def global_stats(mean, m2, count, group):
    """(n, mean, m2) over the processes of `group` from each one's count, mean and m2 (fp64)."""
    channels = mean.shape[0]
    local = torch.cat((mean.new_full((1,), float(count)), mean, m2))
    gathered = local.new_empty(dist.get_world_size(group) * local.numel())
    _collective("all_gather", dist.all_gather_single, (gathered, local), group)
    gathered = gathered.view(-1, local.numel())
    counts, means, m2s = gathered[:, :1], gathered[:, 1:channels + 1], gathered[:, channels + 1:]
    n = counts.sum()
    mean = (counts * means).sum(0) / n  # mean = sum(n_r * mean_r) / n
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)  # m2 = sum(m2_r) + sum(n_r * (mean_r - mean)^2)
    return int(n.item()), mean, m2


class SyncBatchNormFunction(torch.autograd.Function):
    """out, mean, var = SyncBatchNormFunction.apply(input, weight, bias, unbiased, eps, group, backend):
    training-mode batch norm of this process's rows with the statistics of every process's rows.
    mean and var (the global mean and unbiased variance) are not differentiable. Its backward is
    once differentiable: asking for a second derivative raises."""

    @staticmethod
    def forward(input, weight, bias, unbiased, eps, group, backend):
        ops = kernels(backend, input)
        x = as_ncl(input)
        mean, m2 = ops.batch_norm_stats(x)
        count, mean, m2 = global_stats(mean, m2, x.numel() // max(x.shape[1], 1), group)
        if count < 2:
            raise ArgumentValueError(f"SyncBatchNorm: expected more than 1 value per channel over all processes, "
                                     f"got {count}")
        var = m2 / (count - 1)  # running_var always takes the unbiased variance
        # the batch's statistics given as running ones: the forward kernel normalises with them as they are
        out, mean, invstd, _ = ops.batch_norm_forward(x, weight, bias, mean, m2 / (count - 1 if unbiased else count),
                                                      False, unbiased, eps)
        return out.view(input.shape), mean, invstd, var, count

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, unbiased, _, group, backend = inputs
        _, mean, invstd, _, count = output
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.options = count, unbiased, group, backend, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(*output[1:4])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_):
        input, weight, mean, invstd = ctx.saved_tensors
        count, unbiased, group, backend, bias_dtype = ctx.options
        ops = kernels(backend, input)
        x, dy = as_ncl(input), as_ncl(grad_out)
        sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(dy, x, mean)
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat((sum_dy, sum_dy_xmu))
            _collective("all_reduce", dist.all_reduce, (sums,), group)
            total_dy, total_dy_xmu = sums.view(2, -1)
            grad_input = ops.batch_norm_backward_elemt(dy, x, mean, invstd, weight, total_dy, total_dy_xmu, count,
                                                       unbiased).view(input.shape)
        need_weight, need_bias = ctx.needs_input_grad[1:3]
        return (grad_input,
                (sum_dy_xmu * invstd).to(weight.dtype) if need_weight else None,  # sum(dy * xhat), this share
                sum_dy.to(bias_dtype) if need_bias else None,  # sum(dy), this share
                None, None, None, None)


def _distributed(group):
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class SyncBatchNorm(BatchNorm1d):
    """fusedops.BatchNorm1d whose training statistics cover the batch of every process in
    `process_group` (default: the whole world), on CPU (gloo) and CUDA (NCCL). In eval mode, in a
    single process, or without an initialised process group it is exactly BatchNorm1d.
    Arguments as torch.nn.SyncBatchNorm, plus fusedops.BatchNorm1d's unbiased and backend."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, unbiased=False, backend=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         unbiased=unbiased, backend=backend)
        self.process_group = process_group

    def forward(self, input):
        if not (self.training and _distributed(self.process_group)):
            return super().forward(input)
        self._check_input_dim(input)
        _check_args(input, self.running_mean, self.running_var, self.weight, self.bias, True, self.eps,
                    min_values=0, momentum=self.momentum, backend=self.backend)  # the global count matters
        out, mean, _, var, _ = SyncBatchNormFunction.apply(input, self.weight, self.bias, self.unbiased, self.eps,
                                                           self.process_group, self.backend)
        update_running_stats(self, mean, var)  # the same global statistics, the same update in every process
        return out


def convert_sync_batchnorm(module, process_group=None):
    """Every BatchNorm1d in `module` (fusedops' or torch's) replaced by a SyncBatchNorm that keeps its
    parameters, buffers, options and mode; returns the module, itself replaced if it is one."""
    if isinstance(module, (BatchNorm1d, nn.BatchNorm1d)) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, process_group, device="meta",
                             unbiased=getattr(module, "unbiased", False), backend=getattr(module, "backend", None))
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(sync, name, getattr(module, name))
        return sync.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
