"""The numbers and codes the operators share, in torch ops only (no Triton): the reduction and activation
codes the kernels take, the accumulator dtype, the soft-capping, and the mean's one divisor."""

import torch

NONE, MEAN, SUM = 0, 1, 2  # torch's reduction numbering, as the kernels take it
REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}
ACTIVATIONS = {None: 0, "relu": 1}  # the activation's code in the ops' schemas


def acc_dtype(dtype):
    """The dtype the kernels compute in: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def capped(logits, dtype, softcap):
    """y = softcap * tanh(x / softcap) (Gemma 2's soft-capping; y = x without) in dtype, and dy/dx = 1 - (y /
    softcap)^2 (tanh' = 1 - tanh^2; 1 without). y may be the logits themselves."""
    x = logits.to(dtype)
    if softcap is None:
        return x, 1.0
    y = softcap * torch.tanh(x / softcap)
    return y, 1 - (y / softcap) ** 2


def mean_divisors(target, weight, ignore_index):
    """(K, D), fp64 on the device: the kept targets' count K and summed weight D (D = K without weights; both N
    for probability targets). Torch ops: no host read, no host-to-device copy."""
    if target.is_floating_point():
        n = torch.full((), target.shape[0], dtype=torch.float64, device=target.device)
        return n, n
    kept = target.long() != ignore_index  # (long: a uint8 target against a negative ignore_index)
    count = kept.sum(dtype=torch.float64)
    if weight is None:
        return count, count
    # (clamped: a target out of range makes the kernels raise, or give its row NaN)
    w_t = weight.index_select(0, target.long().clamp(0, weight.shape[0] - 1))
    return count, torch.where(kept, w_t, 0).sum(dtype=torch.float64)


def mean_scale(target, weight, ignore_index):
    """1 / the mean's divisor D (0 when every target is ignored): the kept targets' summed weight (their
    count without weights), N for probability targets."""
    count, divisor = mean_divisors(target, weight, ignore_index)
    return torch.where(count > 0, 1 / divisor, 0.0)


def z_loss_weight(target, weight, ignore_index, reduction, z_loss):
    """The class weights the kernels take: for the mean of class indices with class weights and z-loss, scaled
    so that its divisor becomes the kept count K, w' = w K / D; the weighted cross-entropy then still divides
    by D, and the z-loss, a per-token term, by K:
        loss = sum_i w_{t_i} ce_i / D + z_loss * sum_i lse_i^2 / K        (kept rows i)
    (PaLM's z-loss averages over tokens, unweighted.) Otherwise, or for a divisor D of 0, `weight` itself."""
    if reduction != MEAN or weight is None or not z_loss > 0 or target.is_floating_point():
        return weight
    count, divisor = mean_divisors(target, weight, ignore_index)
    return (weight.double() * torch.where(divisor != 0, count / divisor, 1.0)).to(weight.dtype)
