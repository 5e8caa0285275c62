"""Triton kernels of the fused batch norm (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

The input is read as rows r = (n, l) of C channels through its strides, so (N, C), (N, C, L) and
non-contiguous input need no copy. Programs own tiles of BLOCK_N rows x BLOCK_C channels (C on the
fast axis). A reduction splits the rows into a fixed number of slices, one program per slice and
block of channels writing its partial result; a small kernel merges the partials in slice order
(deterministic, no atomics), and an elementwise kernel uses them. Elementwise math in fp32 (fp64
for fp64 input), offsets in int64. The statistics and sum(dy * (x - mean)) are accumulated in fp64,
as in the C++ kernels; the mean is applied as two floats, hi + lo; sum(dy) leaves each program in
fp64 and every merge is in fp64.
"""
import collections

import torch
import triton
import triton.language as tl

from ._ops import acc_dtype

MAX_BLOCK_N, MAX_BLOCK_C, MAX_SPLITS = 64, 128, 256


@triton.jit
def _offsets(rows, cols, L, stride_n, stride_c, stride_l):
    """Offsets of the tile rows x cols, row r being (n, l) = (r // L, r % L)."""
    return ((rows // L) * stride_n + (rows % L) * stride_l)[:, None] + cols[None, :] * stride_c


@triton.jit
def _program_tiles(R, C, rows_per_split, BLOCK_C: tl.constexpr):
    """This program's channels (and their mask) and its slice of rows [row0, row1)."""
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row0 = tl.program_id(0).to(tl.int64) * rows_per_split
    return cols, cols < C, row0, tl.minimum(row0 + rows_per_split, R)


@triton.jit
def _chan_merge(count, mean, m2, count_b, mean_b, m2_b):
    """Count, mean and sum of squared deviations of two groups merged (Chan et al.)."""
    total = count + count_b
    delta = mean_b - mean
    return total, mean + delta * (count_b / total), m2 + m2_b + delta * delta * (count * count_b / total)


@triton.jit
def _mean_hi_lo(mean_ptr, cols, cmask, ACC: tl.constexpr):
    """The fp64 mean as hi + lo in ACC: (x - hi) - lo is accurate even when |mean| >> std."""
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    hi = mean.to(ACC)
    return hi, (mean - hi.to(tl.float64)).to(ACC)


@triton.jit
def _stats_kernel(x_ptr, mean_part_ptr, m2_part_ptr, sum_part_ptr, R, C, L, sx_n, sx_c, sx_l, rows_per_split,
                  ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    cols, cmask, row0, row1 = _program_tiles(R, C, rows_per_split, BLOCK_C)
    # shifted by row 0, x - shift is exact when |mean| >> std and the sums stay small
    shift = tl.load(x_ptr + cols * sx_c, mask=cmask, other=0.0).to(ACC)
    count = tl.zeros((), ACC)
    mean = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    total = tl.zeros((BLOCK_C,), ACC)  # the plain sum, for a channel that holds an infinity
    for start in range(row0, row1, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        rmask = rows < row1
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + _offsets(rows, cols, L, sx_n, sx_c, sx_l), mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, x - shift[None, :], 0.0)
        total += tl.sum(x, 0)
        n_tile = tl.sum(rmask.to(ACC), 0)
        mean_tile = tl.sum(d, 0) / n_tile
        dev = tl.where(mask, d - mean_tile[None, :], 0.0)
        # the tile's mean and m2 = sum((d - mean)^2) by two passes over registers, then merged
        count, mean, m2 = _chan_merge(count, mean, m2, n_tile, mean_tile, tl.sum(dev * dev, 0))
    part = tl.program_id(0).to(tl.int64) * C + cols
    tl.store(mean_part_ptr + part, mean, mask=cmask)
    tl.store(m2_part_ptr + part, m2, mask=cmask)
    tl.store(sum_part_ptr + part, total, mask=cmask)


@triton.jit
def _stats_merge_kernel(x_ptr, sx_c, mean_part_ptr, m2_part_ptr, sum_part_ptr, mean_ptr, m2_ptr, invstd_ptr, var_ptr, R, C,
                        splits, rows_per_split, eps, UNBIASED: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    count = tl.zeros((), ACC)
    mean = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    total = tl.zeros((BLOCK_C,), ACC)
    row0 = tl.zeros((), tl.int64)
    mean_parts, m2_parts, sum_parts = mean_part_ptr + cols, m2_part_ptr + cols, sum_part_ptr + cols
    for _ in range(0, splits):
        n_split = (tl.minimum(row0 + rows_per_split, R) - row0).to(ACC)
        mean_split = tl.load(mean_parts, mask=cmask, other=0.0)
        m2_split = tl.load(m2_parts, mask=cmask, other=0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_split, mean_split, m2_split)
        total += tl.load(sum_parts, mask=cmask, other=0.0)
        row0 += rows_per_split
        mean_parts += C
        m2_parts += C
        sum_parts += C
    shift = tl.load(x_ptr + cols * sx_c, mask=cmask, other=0.0).to(ACC)
    mean64 = shift.to(tl.float64) + mean.to(tl.float64)  # x_0 + mean(x - x_0)
    # an infinite value makes the shifted mean NaN (inf - inf); the plain mean keeps +-inf, as PyTorch
    finite = tl.abs(mean64) < float("inf")
    tl.store(mean_ptr + cols, tl.where(finite, mean64, total.to(tl.float64) / R), mask=cmask)
    tl.store(m2_ptr + cols, m2.to(tl.float64), mask=cmask)
    var = m2 / tl.maximum(R - 1, 1)  # running_var always takes the unbiased variance (R > 1 when training)
    tl.store(var_ptr + cols, var, mask=cmask)
    if not UNBIASED:
        var = m2 / R
    if ACC == tl.float64:  # 1 / sqrt(var + eps), with a correctly rounded square root
        invstd = 1.0 / tl.sqrt(var + eps)
    else:
        invstd = 1.0 / tl.sqrt_rn(var + eps)
    tl.store(invstd_ptr + cols, invstd, mask=cmask)


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, R, C, L, sx_n, sx_c, sx_l,
                      sy_n, sy_c, sy_l, rows_per_split, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    cols, cmask, row0, row1 = _program_tiles(R, C, rows_per_split, BLOCK_C)
    hi, lo = _mean_hi_lo(mean_ptr, cols, cmask, ACC)
    a = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    if HAS_WEIGHT:
        a *= tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)  # a = gamma * invstd
    beta = tl.zeros((BLOCK_C,), ACC)
    if HAS_BIAS:
        beta = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    for start in range(row0, row1, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows < row1)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + _offsets(rows, cols, L, sx_n, sx_c, sx_l), mask=mask, other=0.0).to(ACC)
        y = tl.fma((x - hi[None, :]) - lo[None, :], a[None, :], beta[None, :])  # y = (x - mean) * a + beta
        tl.store(y_ptr + _offsets(rows, cols, L, sy_n, sy_c, sy_l), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, mean_ptr, dy_part_ptr, dyx_part_ptr, R, C, L, sd_n, sd_c, sd_l,
                      sx_n, sx_c, sx_l, rows_per_split, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    cols, cmask, row0, row1 = _program_tiles(R, C, rows_per_split, BLOCK_C)
    hi, lo = _mean_hi_lo(mean_ptr, cols, cmask, ACC)
    sum_dy = tl.zeros((BLOCK_N, BLOCK_C), ACC)
    sum_dyx = tl.zeros((BLOCK_N, BLOCK_C), tl.float64)  # fp64, as the C++ kernel
    for start in range(row0, row1, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows < row1)[:, None] & cmask[None, :]
        dy = tl.load(dy_ptr + _offsets(rows, cols, L, sd_n, sd_c, sd_l), mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + _offsets(rows, cols, L, sx_n, sx_c, sx_l), mask=mask, other=0.0).to(ACC)
        sum_dy += dy
        sum_dyx += dy.to(tl.float64) * ((x - hi[None, :]) - lo[None, :]).to(tl.float64)  # dy * (x - mean)
    part = tl.program_id(0).to(tl.int64) * C + cols  # the partials in fp64, from here on
    tl.store(dy_part_ptr + part, tl.sum(sum_dy.to(tl.float64), 0), mask=cmask)
    tl.store(dyx_part_ptr + part, tl.sum(sum_dyx, 0), mask=cmask)


@triton.jit
def _grad_merge_kernel(dy_part_ptr, dyx_part_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr, coef_ptr, R, C, splits,
                       TRAINING: tl.constexpr, UNBIASED: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sum_dy = tl.zeros((BLOCK_C,), tl.float64)
    sum_dyx = tl.zeros((BLOCK_C,), tl.float64)
    dy_parts, dyx_parts = dy_part_ptr + cols, dyx_part_ptr + cols
    for _ in range(0, splits):
        sum_dy += tl.load(dy_parts, mask=cmask, other=0.0)
        sum_dyx += tl.load(dyx_parts, mask=cmask, other=0.0)
        dy_parts += C
        dyx_parts += C
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
    tl.store(dw_ptr + cols, (sum_dyx * invstd).to(ACC), mask=cmask)  # dgamma = sum(dy * xhat)
    tl.store(db_ptr + cols, sum_dy.to(ACC), mask=cmask)  # dbeta = sum(dy)
    k1 = invstd
    if HAS_WEIGHT:
        k1 *= tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float64)  # gamma * invstd
    k2 = tl.zeros((BLOCK_C,), tl.float64)
    k3 = tl.zeros((BLOCK_C,), tl.float64)
    if TRAINING:  # dx = gamma*invstd/n * (n*dy - sum(dy) - f * xhat * sum(dy*xhat)) = k1*dy + k2*(x-mean) + k3
        n = tl.zeros((), tl.float64) + R
        f_over_n = 1.0 / n
        if UNBIASED:
            f_over_n = 1.0 / (n - 1)  # f / n with f = n / (n-1)
        k2 = -k1 * invstd * invstd * sum_dyx * f_over_n
        k3 = -k1 * sum_dy / n
    tl.store(coef_ptr + cols, k1.to(ACC), mask=cmask)
    tl.store(coef_ptr + C + cols, k2.to(ACC), mask=cmask)
    tl.store(coef_ptr + 2 * C + cols, k3.to(ACC), mask=cmask)


@triton.jit
def _grad_input_kernel(dy_ptr, x_ptr, mean_ptr, coef_ptr, dx_ptr, R, C, L, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l,
                       so_n, so_c, so_l, rows_per_split, TRAINING: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    cols, cmask, row0, row1 = _program_tiles(R, C, rows_per_split, BLOCK_C)
    hi, lo = _mean_hi_lo(mean_ptr, cols, cmask, ACC)
    k1 = tl.load(coef_ptr + cols, mask=cmask, other=0.0)
    k2 = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0)
    k3 = tl.load(coef_ptr + 2 * C + cols, mask=cmask, other=0.0)
    for start in range(row0, row1, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        mask = (rows < row1)[:, None] & cmask[None, :]
        dy = tl.load(dy_ptr + _offsets(rows, cols, L, sd_n, sd_c, sd_l), mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + _offsets(rows, cols, L, sx_n, sx_c, sx_l), mask=mask, other=0.0).to(ACC)
        dx = k1[None, :] * dy
        if TRAINING:  # eval: the statistics are constants, and 0 * (x - mean) would be NaN for x = inf
            dx += k2[None, :] * ((x - hi[None, :]) - lo[None, :]) + k3[None, :]
        tl.store(dx_ptr + _offsets(rows, cols, L, so_n, so_c, so_l), dx.to(dx_ptr.dtype.element_ty), mask=mask)


Grid = collections.namedtuple("Grid", "block_n block_c rows_per_split splits channel_blocks")


def _grid(R, C):
    """Tiles and the fixed split of the R rows; a function of the shape only."""
    block_n = min(triton.next_power_of_2(max(R, 1)), MAX_BLOCK_N)
    block_c = min(triton.next_power_of_2(max(C, 1)), MAX_BLOCK_C)
    tiles = max(triton.cdiv(R, block_n), 1)
    rows_per_split = triton.cdiv(tiles, min(tiles, MAX_SPLITS)) * block_n
    return Grid(block_n, block_c, rows_per_split, max(triton.cdiv(R, rows_per_split), 1), triton.cdiv(C, block_c))


def _as_3d(t):
    """(N, C) as an (N, C, 1) view: every kernel takes (N, C, L) strides."""
    return t if t.dim() == 3 else t.unsqueeze(2)


def _per_channel(*tensors):
    """Per-channel tensors as the kernels read them: contiguous (None stays None)."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _batch_stats(x, eps, unbiased):
    """mean (fp64), m2 (fp64), invstd and unbiased var (compute dtype) of x (N, C, L) over N and L."""
    N, C, L = x.shape
    R, acc = N * L, acc_dtype(x.dtype)
    mean, m2 = (torch.zeros(C, dtype=torch.float64, device=x.device) for _ in range(2))
    invstd, var = (torch.empty(C, dtype=acc, device=x.device) for _ in range(2))
    if R > 0 and C > 0:  # the statistics accumulated in fp64, as the C++ kernel: no less accurate than PyTorch
        g = _grid(R, C)
        mean_part, m2_part, sum_part = torch.empty((3, g.splits, C), dtype=torch.float64, device=x.device)
        _stats_kernel[(g.splits, g.channel_blocks)](x, mean_part, m2_part, sum_part, R, C, L, *x.stride(),
                                                    g.rows_per_split, ACC=tl.float64, BLOCK_N=g.block_n,
                                                    BLOCK_C=g.block_c)
        _stats_merge_kernel[(g.channel_blocks,)](x, x.stride(1), mean_part, m2_part, sum_part, mean, m2, invstd, var,
                                                 R, C, g.splits, g.rows_per_split, eps, UNBIASED=unbiased,
                                                 ACC=tl.float64, BLOCK_C=g.block_c)
    return mean, m2, invstd, var


def stats(input):
    """mean and m2 (fp64), as the C++ op batch_norm_stats."""
    mean, m2, _, _ = _batch_stats(_as_3d(input), 1.0, False)  # eps 1: the unused invstd stays finite
    return mean, m2


def forward(input, weight, bias, running_mean, running_var, training, unbiased, eps):
    """out, mean (fp64), invstd, var, as the C++ op batch_norm_forward."""
    x = _as_3d(input)
    weight, bias = _per_channel(weight, bias)
    N, C, L = x.shape
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if training:
        mean, _, invstd, var = _batch_stats(x, eps, unbiased)
    else:
        mean = running_mean.to(torch.float64, copy=True)
        var = running_var.to(acc_dtype(input.dtype), copy=True)
        invstd = torch.rsqrt(var + eps)  # 1 / sqrt(var + eps)
    if out.numel() > 0:
        g = _grid(N * L, C)
        _normalize_kernel[(g.splits, g.channel_blocks)](
            x, out, mean, invstd, weight, bias, N * L, C, L, *x.stride(), *_as_3d(out).stride(), g.rows_per_split,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC=_tl_acc(input.dtype),
            BLOCK_N=g.block_n, BLOCK_C=g.block_c)
    return out, mean, invstd, var


def _grad_sums(dy, x, mean, g):
    """Per split of the rows, sum(dy) and sum(dy * (x - mean)): (splits, C) fp64 each."""
    N, C, L = x.shape
    dy_part, dyx_part = torch.empty((2, g.splits, C), dtype=torch.float64, device=x.device)
    _grad_sums_kernel[(g.splits, g.channel_blocks)](dy, x, mean, dy_part, dyx_part, N * L, C, L, *dy.stride(),
                                                    *x.stride(), g.rows_per_split, ACC=_tl_acc(x.dtype),
                                                    BLOCK_N=g.block_n, BLOCK_C=g.block_c)
    return dy_part, dyx_part


def _grad_input(dy, x, mean, invstd, weight, dy_parts, dyx_parts, count, training, unbiased, g, grad_input):
    """grad_input from the sums' partials over `count` values per channel; returns grad_weight, grad_bias."""
    N, C, L = x.shape
    acc = acc_dtype(x.dtype)
    grad_weight, grad_bias = (torch.empty(C, dtype=acc, device=x.device) for _ in range(2))
    coef = torch.empty((3, C), dtype=acc, device=x.device)
    _grad_merge_kernel[(g.channel_blocks,)](dy_parts, dyx_parts, invstd, weight, grad_weight, grad_bias, coef, count,
                                            C, dy_parts.shape[0], TRAINING=training, UNBIASED=unbiased,
                                            HAS_WEIGHT=weight is not None, ACC=_tl_acc(x.dtype), BLOCK_C=g.block_c)
    _grad_input_kernel[(g.splits, g.channel_blocks)](dy, x, mean, coef, grad_input, N * L, C, L, *dy.stride(),
                                                     *x.stride(), *_as_3d(grad_input).stride(), g.rows_per_split,
                                                     TRAINING=training, ACC=_tl_acc(x.dtype), BLOCK_N=g.block_n,
                                                     BLOCK_C=g.block_c)
    return grad_weight, grad_bias


def backward(grad_out, input, mean, invstd, weight, training, unbiased):
    """grad_input, grad_weight, grad_bias, as the C++ op batch_norm_backward."""
    x, dy = _as_3d(input), _as_3d(grad_out)
    mean, invstd, weight = _per_channel(mean, invstd, weight)
    N, C, L = x.shape
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if grad_input.numel() == 0:
        return (grad_input, *(torch.zeros(C, dtype=acc_dtype(input.dtype), device=input.device) for _ in range(2)))
    g = _grid(N * L, C)
    dy_part, dyx_part = _grad_sums(dy, x, mean, g)
    grad_weight, grad_bias = _grad_input(dy, x, mean, invstd, weight, dy_part, dyx_part, N * L, training, unbiased,
                                         g, grad_input)
    return grad_input, grad_weight, grad_bias


def backward_reduce(grad_out, input, mean):
    """sum(dy) and sum(dy * (x - mean)) (fp64), as the C++ op batch_norm_backward_reduce."""
    x, dy = _as_3d(input), _as_3d(grad_out)
    (mean,) = _per_channel(mean)
    N, C, L = x.shape
    if N * L == 0 or C == 0:
        return tuple(torch.zeros(C, dtype=torch.float64, device=input.device) for _ in range(2))
    dy_part, dyx_part = _grad_sums(dy, x, mean, _grid(N * L, C))
    return dy_part.sum(0), dyx_part.sum(0)  # partials in split order: deterministic


def backward_elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count, unbiased):
    """grad_input from the sums over all processes, as the C++ op batch_norm_backward_elemt."""
    x, dy = _as_3d(input), _as_3d(grad_out)
    mean, invstd, weight = _per_channel(mean, invstd, weight)
    N, C, L = x.shape
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if grad_input.numel() > 0:
        sums = torch.stack((sum_dy, sum_dy_xmu)).to(torch.float64).view(2, 1, C)  # one split
        _grad_input(dy, x, mean, invstd, weight, sums[0], sums[1], count, True, unbiased, _grid(N * L, C), grad_input)
    return grad_input
