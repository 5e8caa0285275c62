"""Triton kernels of the fused batch norm (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Every tensor is read and written through its strides as (N, C, L), L the product of the spatial sizes
(1 for (N, C) input), in one of two tilings chosen from the input's storage:
- channels-last, and any input with L = 1: rows r = (n, l) of C channels, given to the kernels as an
  (N*L, C, 1) tensor, in tiles of BLOCK_N rows x BLOCK_C channels, C on the fast axis;
- contiguous, and any other storage: per channel N runs of L values, in tiles of BLOCK_N x BLOCK_C x
  BLOCK_L, L on the fast axis (several channels to a tile when the runs are short).
Each kernel takes tiles [BLOCK_N, BLOCK_C, BLOCK_L] of the (N, C, L) it is given, so one set of kernels
serves both tilings. A program owns a block of channels (program axis 0) and a fixed slice of the tiles
(axis 1). A reduction writes one partial result per slice; a small kernel merges them in slice order
(deterministic, no atomics), and an elementwise kernel uses them. Elementwise math in fp32 (fp64 for fp64
input), offsets in int64. The statistics and sum(dy * (x - mean)) are accumulated in fp64, as in the C++
kernels; the mean is applied as two floats, hi + lo; sum(dy) leaves each program in fp64 and every merge
is in fp64.

The forward fuses out = act(y + residual); given the forward's relu output, the backward reads
dz = grad_out * (output > 0) in place of grad_out, in the reduction and in the elementwise pass.
"""

import torch
import triton
import triton.language as tl

from ._layout import empty_like_input, is_channels_last
from ._math import acc_dtype
from .errors import ArgumentValueError
from .shared_triton import tl_acc_dtype

TILE, MAX_BLOCK_C, MAX_BLOCK_L, MAX_SPLITS, MERGE_BLOCK_C = 8192, 128, 1024, 256, 128
ACTIVATIONS = (0, 1)  # none, relu


@triton.jit
def _channels(C, BLOCK_C: tl.constexpr):
    """This program's channels and their mask."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _first_tile(tiles_per_split):
    """The first tile of this program's slice."""
    return tl.program_id(1).to(tl.int64) * tiles_per_split


@triton.jit
def _tile(t, N, L, tiles_l, cmask, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """Tile t of the (N, L) positions, tiles_l of them along L: its n and l indices, its mask with the
    channels' and its number of positions."""
    n0 = t // tiles_l * BLOCK_N
    l0 = t % tiles_l * BLOCK_L
    ns = n0 + tl.arange(0, BLOCK_N)
    ls = l0 + tl.arange(0, BLOCK_L)
    mask = (ns < N)[:, None, None] & cmask[None, :, None] & (ls < L)[None, None, :]
    return ns, ls, mask, tl.minimum(N - n0, BLOCK_N) * tl.minimum(L - l0, BLOCK_L)


@triton.jit
def _at(ptr, ns, cols, ls, s_n, s_c, s_l):
    """The pointers of the tile (ns, cols, ls) of a tensor with strides (s_n, s_c, s_l)."""
    return ptr + (ns[:, None, None] * s_n + cols[None, :, None] * s_c + ls[None, None, :] * s_l)


@triton.jit
def _bc(v):
    """A per-channel vector broadcast over a tile."""
    return v[None, :, None]


@triton.jit
def _channel_sum(t):
    """The sums of a tile per channel, over N and L."""
    return tl.sum(tl.sum(t, 2), 0)


@triton.jit
def _chan_merge(count, mean, m2, count_b, mean_b, m2_b):
    """Count, mean and sum of squared deviations of two groups merged (Chan et al.)."""
    total = count + count_b
    delta = mean_b - mean
    return total, mean + delta * (count_b / total), m2 + m2_b + delta * delta * (count * count_b / total)


@triton.jit
def _mean_hi_lo(mean_ptr, cols, cmask, ACC: tl.constexpr):
    """The fp64 mean as hi + lo in ACC, broadcast over a tile: (x - hi) - lo is accurate even when
    |mean| >> std."""
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    hi = mean.to(ACC)
    return _bc(hi), _bc((mean - hi.to(tl.float64)).to(ACC))


@triton.jit
def _grad_z(
    dy_ptr, out_ptr, ns, cols, ls, mask, sd_n, sd_c, sd_l, so_n, so_c, so_l, HAS_OUTPUT: tl.constexpr, ACC: tl.constexpr
):
    """A tile of dz: grad_out, times (output > 0) when the forward's relu output is given (NaN output: 0)."""
    dz = tl.load(_at(dy_ptr, ns, cols, ls, sd_n, sd_c, sd_l), mask=mask, other=0.0).to(ACC)
    if HAS_OUTPUT:
        out = tl.load(_at(out_ptr, ns, cols, ls, so_n, so_c, so_l), mask=mask, other=0.0).to(ACC)
        dz = tl.where(out > 0, dz, 0.0)
    return dz


@triton.jit
def _stats_kernel(
    x_ptr,
    part_ptr,
    N,
    C,
    L,
    sx_n,
    sx_c,
    sx_l,
    tiles,
    tiles_l,
    tiles_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    cols, cmask = _channels(C, BLOCK_C)
    # shifted by the first value, x - shift is exact when |mean| >> std and the sums stay small
    shift = tl.load(x_ptr + cols * sx_c, mask=cmask, other=0.0).to(tl.float64)
    count = tl.zeros((), tl.float64)
    mean = tl.zeros((BLOCK_C,), tl.float64)
    m2 = tl.zeros((BLOCK_C,), tl.float64)
    total = tl.zeros((BLOCK_C,), tl.float64)  # the plain sum, for a channel that holds an infinity
    t0 = _first_tile(tiles_per_split)
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tiles)):
        ns, ls, mask, n_tile = _tile(t, N, L, tiles_l, cmask, BLOCK_N, BLOCK_L)
        x = tl.load(_at(x_ptr, ns, cols, ls, sx_n, sx_c, sx_l), mask=mask, other=0.0).to(tl.float64)
        d = tl.where(mask, x - _bc(shift), 0.0)
        total += _channel_sum(x)
        n_tile = n_tile.to(tl.float64)
        mean_tile = _channel_sum(d) / n_tile
        dev = tl.where(mask, d - _bc(mean_tile), 0.0)
        # the tile's mean and m2 = sum((d - mean)^2) by two passes over registers, then merged
        count, mean, m2 = _chan_merge(count, mean, m2, n_tile, mean_tile, _channel_sum(dev * dev))
    part = part_ptr + tl.program_id(1).to(tl.int64) * C + cols
    size = tl.num_programs(1).to(tl.int64) * C  # partials (4, splits, C): mean, m2, sum, count
    tl.store(part, mean, mask=cmask)
    tl.store(part + size, m2, mask=cmask)
    tl.store(part + 2 * size, total, mask=cmask)
    tl.store(part + 3 * size, count + tl.zeros((BLOCK_C,), tl.float64), mask=cmask)


@triton.jit
def _stats_merge_kernel(
    x_ptr,
    sx_c,
    part_ptr,
    mean_ptr,
    m2_ptr,
    invstd_ptr,
    var_ptr,
    C,
    splits,
    eps_ptr,
    UNBIASED: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols, cmask = _channels(C, BLOCK_C)
    count = tl.zeros((BLOCK_C,), tl.float64)
    mean = tl.zeros((BLOCK_C,), tl.float64)
    m2 = tl.zeros((BLOCK_C,), tl.float64)
    total = tl.zeros((BLOCK_C,), tl.float64)
    size = (tl.zeros((), tl.int64) + splits) * C
    parts = part_ptr + cols
    for _ in range(0, splits):
        count_split = tl.load(parts + 3 * size, mask=cmask, other=1.0)
        mean_split = tl.load(parts, mask=cmask, other=0.0)
        m2_split = tl.load(parts + size, mask=cmask, other=0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, count_split, mean_split, m2_split)
        total += tl.load(parts + 2 * size, mask=cmask, other=0.0)
        parts += C
    shift = tl.load(x_ptr + cols * sx_c, mask=cmask, other=0.0).to(tl.float64)
    mean64 = shift + mean  # x_0 + mean(x - x_0)
    # an infinite value makes the shifted mean NaN (inf - inf); the plain mean keeps +-inf, as PyTorch
    finite = tl.abs(mean64) < float("inf")
    tl.store(mean_ptr + cols, tl.where(finite, mean64, total / count), mask=cmask)
    tl.store(m2_ptr + cols, m2, mask=cmask)
    var = m2 / tl.maximum(count - 1, 1)  # running_var always takes the unbiased variance (count > 1 in training)
    tl.store(var_ptr + cols, var, mask=cmask)
    if not UNBIASED:
        var = m2 / count
    eps = tl.load(eps_ptr)  # fp64 (a float argument would reach the kernel as fp32)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=cmask)  # 1 / sqrt(var + eps), rounded once


@triton.jit
def _normalize_kernel(
    x_ptr,
    y_ptr,
    r_ptr,
    mean_ptr,
    invstd_ptr,
    w_ptr,
    b_ptr,
    N,
    C,
    L,
    sx_n,
    sx_c,
    sx_l,
    sy_n,
    sy_c,
    sy_l,
    sr_n,
    sr_c,
    sr_l,
    tiles,
    tiles_l,
    tiles_per_split,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    cols, cmask = _channels(C, BLOCK_C)
    hi, lo = _mean_hi_lo(mean_ptr, cols, cmask, ACC)
    a = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    if HAS_WEIGHT:
        a *= tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)  # a = gamma * invstd
    beta = tl.zeros((BLOCK_C,), ACC)
    if HAS_BIAS:
        beta = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    a, beta = _bc(a), _bc(beta)
    t0 = _first_tile(tiles_per_split)
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tiles)):
        ns, ls, mask, _ = _tile(t, N, L, tiles_l, cmask, BLOCK_N, BLOCK_L)
        x = tl.load(_at(x_ptr, ns, cols, ls, sx_n, sx_c, sx_l), mask=mask, other=0.0).to(ACC)
        y = tl.fma((x - hi) - lo, a, beta)  # y = (x - mean) * a + beta
        if HAS_RESIDUAL:
            y += tl.load(_at(r_ptr, ns, cols, ls, sr_n, sr_c, sr_l), mask=mask, other=0.0).to(ACC)
        if RELU:
            y = tl.where(y < 0, 0.0, y)  # relu, NaN kept
        tl.store(_at(y_ptr, ns, cols, ls, sy_n, sy_c, sy_l), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(
    dy_ptr,
    out_ptr,
    x_ptr,
    mean_ptr,
    part_ptr,
    N,
    C,
    L,
    sd_n,
    sd_c,
    sd_l,
    so_n,
    so_c,
    so_l,
    sx_n,
    sx_c,
    sx_l,
    tiles,
    tiles_l,
    tiles_per_split,
    HAS_OUTPUT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    cols, cmask = _channels(C, BLOCK_C)
    hi, lo = _mean_hi_lo(mean_ptr, cols, cmask, ACC)
    sum_dz = tl.zeros((BLOCK_N, BLOCK_C, BLOCK_L), ACC)
    sum_dzx = tl.zeros((BLOCK_N, BLOCK_C, BLOCK_L), tl.float64)  # fp64, as the C++ kernel
    t0 = _first_tile(tiles_per_split)
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tiles)):
        ns, ls, mask, _ = _tile(t, N, L, tiles_l, cmask, BLOCK_N, BLOCK_L)
        dz = _grad_z(dy_ptr, out_ptr, ns, cols, ls, mask, sd_n, sd_c, sd_l, so_n, so_c, so_l, HAS_OUTPUT, ACC)
        x = tl.load(_at(x_ptr, ns, cols, ls, sx_n, sx_c, sx_l), mask=mask, other=0.0).to(ACC)
        sum_dz += dz
        sum_dzx += dz.to(tl.float64) * ((x - hi) - lo).to(tl.float64)  # dz * (x - mean)
    part = part_ptr + tl.program_id(1).to(tl.int64) * C + cols  # partials (2, splits, C) in fp64, from here on
    tl.store(part, _channel_sum(sum_dz.to(tl.float64)), mask=cmask)
    tl.store(part + tl.num_programs(1).to(tl.int64) * C, _channel_sum(sum_dzx), mask=cmask)


@triton.jit
def _grad_merge_kernel(
    part_ptr,
    invstd_ptr,
    w_ptr,
    dw_ptr,
    db_ptr,
    coef_ptr,
    count_ptr,
    count,
    C,
    splits,
    TRAINING: tl.constexpr,
    UNBIASED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COUNT_IN_MEMORY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols, cmask = _channels(C, BLOCK_C)
    sum_dz = tl.zeros((BLOCK_C,), tl.float64)
    sum_dzx = tl.zeros((BLOCK_C,), tl.float64)
    size = (tl.zeros((), tl.int64) + splits) * C
    parts = part_ptr + cols
    for _ in range(0, splits):
        sum_dz += tl.load(parts, mask=cmask, other=0.0)
        sum_dzx += tl.load(parts + size, mask=cmask, other=0.0)
        parts += C
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
    tl.store(dw_ptr + cols, (sum_dzx * invstd).to(ACC), mask=cmask)  # dgamma = sum(dz * xhat)
    tl.store(db_ptr + cols, sum_dz.to(ACC), mask=cmask)  # dbeta = sum(dz)
    k1 = invstd
    if HAS_WEIGHT:
        k1 *= tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float64)  # gamma * invstd
    k2 = tl.zeros((BLOCK_C,), tl.float64)
    k3 = tl.zeros((BLOCK_C,), tl.float64)
    if TRAINING:  # dx = gamma*invstd/n * (n*dz - sum(dz) - f * xhat * sum(dz*xhat)) = k1*dz + k2*(x-mean) + k3
        if COUNT_IN_MEMORY:
            n = tl.load(count_ptr).to(tl.float64)  # the values per channel over all processes, read here
        else:
            n = tl.zeros((), tl.float64) + count
        f_over_n = 1.0 / n
        if UNBIASED:
            f_over_n = 1.0 / (n - 1)  # f / n with f = n / (n-1)
        k2 = -k1 * invstd * invstd * sum_dzx * f_over_n
        k3 = -k1 * sum_dz / n
    tl.store(coef_ptr + cols, k1.to(ACC), mask=cmask)
    tl.store(coef_ptr + C + cols, k2.to(ACC), mask=cmask)
    tl.store(coef_ptr + 2 * C + cols, k3.to(ACC), mask=cmask)


@triton.jit
def _grad_input_kernel(
    dy_ptr,
    out_ptr,
    x_ptr,
    mean_ptr,
    coef_ptr,
    dx_ptr,
    dz_ptr,
    N,
    C,
    L,
    sd_n,
    sd_c,
    sd_l,
    so_n,
    so_c,
    so_l,
    sx_n,
    sx_c,
    sx_l,
    sdx_n,
    sdx_c,
    sdx_l,
    sdz_n,
    sdz_c,
    sdz_l,
    tiles,
    tiles_l,
    tiles_per_split,
    HAS_OUTPUT: tl.constexpr,
    GRAD_RESIDUAL: tl.constexpr,
    TRAINING: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    cols, cmask = _channels(C, BLOCK_C)
    hi, lo = _mean_hi_lo(mean_ptr, cols, cmask, ACC)
    k1 = _bc(tl.load(coef_ptr + cols, mask=cmask, other=0.0))
    k2 = _bc(tl.load(coef_ptr + C + cols, mask=cmask, other=0.0))
    k3 = _bc(tl.load(coef_ptr + 2 * C + cols, mask=cmask, other=0.0))
    t0 = _first_tile(tiles_per_split)
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tiles)):
        ns, ls, mask, _ = _tile(t, N, L, tiles_l, cmask, BLOCK_N, BLOCK_L)
        dz = _grad_z(dy_ptr, out_ptr, ns, cols, ls, mask, sd_n, sd_c, sd_l, so_n, so_c, so_l, HAS_OUTPUT, ACC)
        dx = k1 * dz
        if TRAINING:  # eval: the statistics are constants, and 0 * (x - mean) would be NaN for x = inf
            x = tl.load(_at(x_ptr, ns, cols, ls, sx_n, sx_c, sx_l), mask=mask, other=0.0).to(ACC)
            dx += k2 * ((x - hi) - lo) + k3
        tl.store(_at(dx_ptr, ns, cols, ls, sdx_n, sdx_c, sdx_l), dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if GRAD_RESIDUAL:  # d residual = dz
            tl.store(_at(dz_ptr, ns, cols, ls, sdz_n, sdz_c, sdz_l), dz.to(dz_ptr.dtype.element_ty), mask=mask)


class _Plan:
    """How the kernels tile an input x (N, C, L): as (N*L, C, 1) rows when channels-last or L = 1, else as
    (N, C, L); the tiles, and their fixed split into slices (a function of the shape and layout only)."""

    def __init__(self, x):
        N, C, L = x.shape
        self.rows = L == 1 or is_channels_last(x)
        if self.rows:
            N, L = N * L, 1
        block_l = min(triton.next_power_of_2(max(L, 1)), MAX_BLOCK_L)
        block_c = min(triton.next_power_of_2(C), max(MAX_BLOCK_C // block_l, 1))
        block_n = min(triton.next_power_of_2(max(N, 1)), TILE // (block_c * block_l))
        tiles_l = triton.cdiv(L, block_l)
        tiles = triton.cdiv(N, block_n) * tiles_l
        tiles_per_split = max(triton.cdiv(tiles, MAX_SPLITS), 1)
        self.splits = max(triton.cdiv(tiles, tiles_per_split), 1)
        self.sizes = (N, C, L)
        self.loop = (tiles, tiles_l, tiles_per_split)
        # 8 warps from half a tile: with 4, a thread holds 32 or 64 of its values and the kernels spill (ptxas on
        # sm_80 and sm_90: bench/results/compile_kernels.md)
        warps = 8 if block_n * block_c * block_l >= TILE // 2 else 4
        self.blocks = dict(BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_L=block_l, num_warps=warps)
        self.grid = (triton.cdiv(C, block_c), self.splits)
        self.merge_block_c = min(triton.next_power_of_2(C), MERGE_BLOCK_C)
        self.merge_grid = (triton.cdiv(C, self.merge_block_c),)

    def strides(self, t):
        """The strides of t (N, C, L) as the kernels index it (rows (n, l) one stride apart when tiled as
        rows); zeros for None."""
        if t is None:
            return 0, 0, 0
        s_n, s_c, s_l = t.stride()
        return (s_l if t.shape[2] > 1 else s_n, s_c, 0) if self.rows else (s_n, s_c, s_l)


def _ncl(t):
    """(N, C, *) as (N, C, L): a view for contiguous and channels-last storage."""
    return t.unsqueeze(2) if t.dim() == 2 else t.flatten(2)


def _beside(name, t, input, plan):
    """grad_out, residual or output t (shaped like input) as the (N, C, L) the kernels read: as stored,
    unless stored in the other layout than input's (contiguous or channels-last) or in strides that rows
    cannot be read through; then copied into input's layout."""
    if t.shape != input.shape:
        raise ArgumentValueError(
            f"batch_norm: {name} must have the input's shape {tuple(input.shape)}, got {tuple(t.shape)}"
        )
    t3 = _ncl(t)
    other_layout = is_channels_last(t) != is_channels_last(input) and (t.is_contiguous() or is_channels_last(t))
    N, _, L = t3.shape
    no_rows = plan.rows and N > 1 and L > 1 and t3.stride(0) != L * t3.stride(2)
    return _ncl(empty_like_input(input)).copy_(t3) if other_layout or no_rows else t3


def _per_channel(*tensors):
    """Per-channel tensors as the kernels read them: contiguous (None stays None)."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _batch_stats(x, plan, eps, unbiased):
    """mean (fp64), m2 (fp64), invstd and unbiased var (compute dtype) of x (N, C, L) over N and L; for an
    empty batch mean and m2 are 0, invstd and var NaN."""
    N, C, L = x.shape
    mean, m2 = (torch.zeros(C, dtype=torch.float64, device=x.device) for _ in range(2))
    invstd, var = (torch.empty(C, dtype=acc_dtype(x.dtype), device=x.device) for _ in range(2))
    if N * L == 0:
        return mean, m2, invstd.fill_(float("nan")), var.fill_(float("nan"))
    part = torch.empty((4, plan.splits, C), dtype=torch.float64, device=x.device)
    _stats_kernel[plan.grid](x, part, *plan.sizes, *plan.strides(x), *plan.loop, **plan.blocks)
    _stats_merge_kernel[plan.merge_grid](
        x,
        x.stride(1),
        part,
        mean,
        m2,
        invstd,
        var,
        C,
        plan.splits,
        torch.full((), eps, dtype=torch.float64, device=x.device),
        UNBIASED=unbiased,
        BLOCK_C=plan.merge_block_c,
    )
    return mean, m2, invstd, var


def stats(input):
    """mean and m2 (fp64), as the C++ op batch_norm_stats."""
    x = _ncl(input)
    mean, m2, _, _ = _batch_stats(x, _Plan(x), 1.0, False)  # eps 1: the unused invstd stays finite
    return mean, m2


def forward(input, weight, bias, running_mean, running_var, training, unbiased, eps, residual=None, activation=0):
    """out = act(batch_norm(input) + residual), mean (fp64), invstd, var, as the C++ op batch_norm_forward."""
    if activation not in ACTIVATIONS:
        raise ArgumentValueError(f"batch_norm_forward: activation must be 0 (none) or 1 (relu), got {activation!r}")
    x = _ncl(input)
    plan = _Plan(x)
    weight, bias = _per_channel(weight, bias)
    out = empty_like_input(input)
    if training:
        mean, _, invstd, var = _batch_stats(x, plan, eps, unbiased)
    else:
        mean = running_mean.to(torch.float64, copy=True)
        var = running_var.to(acc_dtype(input.dtype), copy=True)
        invstd = torch.rsqrt(var + eps)  # 1 / sqrt(var + eps)
    if out.numel() > 0:
        r = None if residual is None else _beside("residual", residual, input, plan)
        y = _ncl(out)
        _normalize_kernel[plan.grid](
            x,
            y,
            r,
            mean,
            invstd,
            weight,
            bias,
            *plan.sizes,
            *plan.strides(x),
            *plan.strides(y),
            *plan.strides(r),
            *plan.loop,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=r is not None,
            RELU=activation == 1,
            ACC=tl_acc_dtype(input.dtype),
            **plan.blocks,
        )
    return out, mean, invstd, var


def _grad_sums(dy, out, x, mean, plan):
    """Per slice of the tiles, sum(dz) and sum(dz * (x - mean)), dz = dy (times output > 0 when given):
    (2, splits, C) fp64."""
    part = torch.empty((2, plan.splits, x.shape[1]), dtype=torch.float64, device=x.device)
    _grad_sums_kernel[plan.grid](
        dy,
        out,
        x,
        mean,
        part,
        *plan.sizes,
        *plan.strides(dy),
        *plan.strides(out),
        *plan.strides(x),
        *plan.loop,
        HAS_OUTPUT=out is not None,
        ACC=tl_acc_dtype(x.dtype),
        **plan.blocks,
    )
    return part


def _grad_input(dy, out, x, mean, invstd, weight, part, count, training, unbiased, plan, grad_input, grad_z):
    """grad_input (and grad_z = dz when given) from the sums' partials over `count` values per channel (an
    int, or a one-element tensor read on the device); returns grad_weight, grad_bias."""
    C = x.shape[1]
    acc = acc_dtype(x.dtype)
    grad_weight, grad_bias = (torch.empty(C, dtype=acc, device=x.device) for _ in range(2))
    coef = torch.empty((3, C), dtype=acc, device=x.device)
    in_memory = isinstance(count, torch.Tensor)
    _grad_merge_kernel[plan.merge_grid](
        part,
        invstd,
        weight,
        grad_weight,
        grad_bias,
        coef,
        count if in_memory else None,
        0 if in_memory else count,
        C,
        part.shape[1],
        TRAINING=training,
        UNBIASED=unbiased,
        HAS_WEIGHT=weight is not None,
        COUNT_IN_MEMORY=in_memory,
        ACC=tl_acc_dtype(x.dtype),
        BLOCK_C=plan.merge_block_c,
    )
    dx = _ncl(grad_input)
    dz = None if grad_z is None else _ncl(grad_z)
    _grad_input_kernel[plan.grid](
        dy,
        out,
        x,
        mean,
        coef,
        dx,
        dz,
        *plan.sizes,
        *plan.strides(dy),
        *plan.strides(out),
        *plan.strides(x),
        *plan.strides(dx),
        *plan.strides(dz),
        *plan.loop,
        HAS_OUTPUT=out is not None,
        GRAD_RESIDUAL=dz is not None,
        TRAINING=training,
        ACC=tl_acc_dtype(x.dtype),
        **plan.blocks,
    )
    return grad_weight, grad_bias


def backward(grad_out, input, mean, invstd, weight, training, unbiased, output=None, grad_residual=False):
    """grad_input, grad_weight, grad_bias, grad_residual, as the C++ op batch_norm_backward."""
    x = _ncl(input)
    plan = _Plan(x)
    mean, invstd, weight = _per_channel(mean, invstd, weight)
    N, C, L = x.shape
    grad_input = empty_like_input(input)
    grad_z = empty_like_input(input) if output is not None and grad_residual else None
    grad_res = input.new_empty(0) if grad_z is None else grad_z
    if N * L == 0:
        return (
            grad_input,
            *(torch.zeros(C, dtype=acc_dtype(input.dtype), device=input.device) for _ in range(2)),
            grad_res,
        )
    dy = _beside("grad_out", grad_out, input, plan)
    out = None if output is None else _beside("output", output, input, plan)
    part = _grad_sums(dy, out, x, mean, plan)
    grad_weight, grad_bias = _grad_input(
        dy, out, x, mean, invstd, weight, part, N * L, training, unbiased, plan, grad_input, grad_z
    )
    return grad_input, grad_weight, grad_bias, grad_res


def backward_reduce(grad_out, input, mean):
    """sum(dy) and sum(dy * (x - mean)) (fp64), as the C++ op batch_norm_backward_reduce."""
    x = _ncl(input)
    plan = _Plan(x)
    (mean,) = _per_channel(mean)
    N, C, L = x.shape
    if N * L == 0:
        return tuple(torch.zeros(C, dtype=torch.float64, device=input.device) for _ in range(2))
    part = _grad_sums(_beside("grad_out", grad_out, input, plan), None, x, mean, plan)
    return tuple(p.sum(0) for p in part)  # partials in slice order: deterministic


def backward_elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count, unbiased):
    """grad_input from the sums and the count (a one-element tensor) over all processes, as the C++ op
    batch_norm_backward_elemt."""
    x = _ncl(input)
    plan = _Plan(x)
    mean, invstd, weight = _per_channel(mean, invstd, weight)
    grad_input = empty_like_input(input)
    if grad_input.numel() > 0:
        part = torch.stack((sum_dy, sum_dy_xmu)).to(torch.float64).view(2, 1, x.shape[1])  # one slice
        _grad_input(
            _beside("grad_out", grad_out, input, plan),
            None,
            x,
            mean,
            invstd,
            weight,
            part,
            count,
            True,
            unbiased,
            plan,
            grad_input,
            None,
        )
    return grad_input
