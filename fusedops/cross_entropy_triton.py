"""Triton kernels of the fused cross-entropy (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

One program per row: an online max and sum of exp over the row in blocks, then a second pass that writes
the gradient and sums the loss terms that need the final max. With too few rows to fill the GPU (splits_for),
a row's columns are split across programs instead: two stages, partials merged per row. Math in fp32 (fp64
for fp64 logits), offsets in int64. Each option (class weights, probability targets, label smoothing, z-loss,
soft-capping) is a constexpr flag, so the plain case compiles to the plain kernel.
"""

import torch
import triton
import triton.language as tl

from ._math import MEAN, NONE, acc_dtype, mean_divisors
from .shared_triton import tl_acc_dtype

MAX_BLOCK = 4096


@triton.jit
def _tanh(a):
    """tanh(a) and its derivative 1 - tanh(a)^2 (no tl.tanh here, and libdevice's does not run in the
    interpreter). |a| >= 1/8: (1 - e) / (1 + e) and 4e / (1 + e)^2, e = exp(-2|a|), which never overflow.
    |a| < 1/8, where 1 - e cancels: tanh's Taylor series through a^15 (the next term is 2e-18 relative)."""
    e = tl.exp(-2.0 * tl.abs(a))
    big = (1.0 - e) / (1.0 + e)
    s = a * a
    series = a * (
        1.0
        + s
        * (
            -1 / 3
            + s
            * (
                2 / 15
                + s
                * (
                    -17 / 315
                    + s * (62 / 2835 + s * (-1382 / 155925 + s * (21844 / 6081075 + s * (-929569 / 638512875))))
                )
            )
        )
    )
    small = tl.abs(a) < 0.125
    th = tl.where(small, series, tl.where(a < 0, -big, big))
    return th, tl.where(small, 1.0 - th * th, 4.0 * e / ((1.0 + e) * (1.0 + e)))


@triton.jit
def _capped(x, cap, HAS_SOFTCAP: tl.constexpr):
    """y = cap * tanh(x / cap) (Gemma 2 soft-capping) and dy/dx = 1 - tanh^2; x and 1 without it."""
    if HAS_SOFTCAP:
        th, d = _tanh(x / cap)
        return cap * th, d
    else:
        return x, 1.0


@triton.jit
def _target_weight(
    t_row,
    w_ptr,
    offs,
    mask,
    ls,
    V,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    ACC: tl.constexpr,
):
    """w_j q'_j at columns offs (0 off the row), without the one-hot part of a class target:
    q' = (1-ls) q + ls/V (ls: label smoothing) for a probability target q, ls/V for a class target."""
    if PROB_TARGET:
        wq = tl.load(t_row + offs, mask=mask, other=0.0).to(ACC)
        if SMOOTH:
            wq = (1.0 - ls) * wq + ls / V
    else:
        wq = tl.full(offs.shape, 0.0, ACC) + ls / V  # only called with SMOOTH
    if HAS_WEIGHT:
        wq *= tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, wq, 0.0)


@triton.jit
def _scalars(ls_ptr, cap_ptr, SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The options' scalars label smoothing and softcap, read in ACC (a float argument would be fp32)."""
    ls = 0.0
    if SMOOTH:
        ls = tl.load(ls_ptr)
    cap = 1.0
    if HAS_SOFTCAP:
        cap = tl.load(cap_ptr)
    return ls, cap


@triton.jit
def _class_target(t_row, V, ignore_index):
    """(ignored, bad, t_col) of a row's class target: t_col its column, -1 where there is none. A target out of
    range stops the kernel on the device, as PyTorch's CUDA kernel (no host read); where asserts are compiled
    out (the interpreter) its row's loss and gradient are NaN, never an out-of-bounds access."""
    t = tl.load(t_row).to(tl.int64)
    ignored = t == ignore_index
    bad = ~ignored & ((t < 0) | (t >= V))
    tl.device_assert(~bad, "cross_entropy: target out of range (argument 'target')")
    return ignored, bad, tl.where(ignored | bad, -1, t)


@triton.jit
def _class_weights(w_ptr, sum_w_ptr, t_col, ls, V, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, ACC: tl.constexpr):
    """(w_t, W) of a class target: its class weight, and W = sum_j w_j q'_j = (1-ls) w_t + ls/V sum(w) (1
    without weights)."""
    w_t = 1.0
    W = 1.0
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + t_col, mask=t_col >= 0, other=0.0).to(ACC)
        W = w_t
        if SMOOTH:
            W = (1.0 - ls) * w_t + ls / V * tl.load(sum_w_ptr).to(ACC)
    return w_t, W


@triton.jit
def _grad(p, dy, W, wq, zz, scale, SUBTRACT_WQ: tl.constexpr, HAS_Z: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """G_j = scale * ((W + 2 z lse) p_j - w_j q'_j) * dy_j/dx_j (zz = 2 z lse, added after W p - w q', which may
    cancel); the one-hot part of a class target is the target column's own (_target_grad)."""
    g = W * p
    if SUBTRACT_WQ:
        g -= wq
    if HAS_Z:
        g += zz * p
    g *= scale
    if HAS_SOFTCAP:
        g *= dy
    return g


@triton.jit
def _target_grad(
    p_t,
    others,
    w_t,
    dy_t,
    ls,
    V,
    sum_w_ptr,
    zz,
    scale,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr,
):
    """The target column's gradient: (1-ls) w_t (p_t - 1) + ls/V (sum(w) p_t - w_t) + 2 z lse p_t, with p_t - 1
    as -(sum of the others) when p_t > 1/2 (exact even when p_t rounds to 1), else directly (where the sum of
    the others would cancel)."""
    keep = 1.0
    if SMOOTH:
        keep = 1.0 - ls
    g_t = keep * w_t * tl.where(p_t > 0.5, -others, p_t - 1.0)
    if SMOOTH:
        sum_w = tl.zeros((), ACC) + V
        if HAS_WEIGHT:
            sum_w = tl.load(sum_w_ptr).to(ACC)
        g_t += ls / V * (sum_w * p_t - w_t)
    if HAS_Z:
        g_t += zz * p_t
    g_t *= scale
    if HAS_SOFTCAP:
        g_t *= dy_t
    return g_t


@triton.jit(debug=True)  # keeps the device-side assert on the targets' range
def _forward_kernel(
    x_ptr,
    x_stride,
    t_ptr,
    t_stride,
    w_ptr,
    g_ptr,
    g_stride,
    loss_ptr,
    lse_ptr,
    div_ptr,
    sum_w_ptr,
    ls_ptr,
    z_ptr,
    cap_ptr,
    V,
    ignore_index,
    IS_MEAN: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    g_row = g_ptr + row * g_stride
    t_row = t_ptr + row * t_stride
    ls, cap = _scalars(ls_ptr, cap_ptr, SMOOTH, HAS_SOFTCAP)
    ignored = False
    bad = False
    if not PROB_TARGET:
        ignored, bad, t_col = _class_target(t_row, V, ignore_index)
        x_t = tl.load(x_row + t_col, mask=t_col >= 0, other=0.0).to(ACC)  # read before an in-place write
        y_t, dy_t = _capped(x_t, cap, HAS_SOFTCAP)
        w_t, W = _class_weights(w_ptr, sum_w_ptr, t_col, ls, V, HAS_WEIGHT, SMOOTH, ACC)
    cols = tl.arange(0, BLOCK)

    # pass 1: online max and sum of exp, s = s * exp(m - m') + sum(exp(y - m'));
    # W = sum_j w_j q'_j for a probability target
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    if PROB_TARGET:
        W = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        y, _ = _capped(tl.load(x_row + offs, mask=mask, other=float("-inf")).to(ACC), cap, HAS_SOFTCAP)
        y = tl.where(mask, y, float("-inf"))  # soft-capping maps the padding's -inf to -cap
        m_new = tl.maximum(m, tl.max(y, 0))
        e = tl.where(y == float("-inf"), 0.0, tl.exp(y - m_new))  # -inf - -inf would be NaN
        s = s * tl.where(m == m_new, 1.0, tl.exp(m - m_new)) + tl.sum(e, 0)
        m = m_new
        if PROB_TARGET:
            W += tl.sum(_target_weight(t_row, w_ptr, offs, mask, ls, V, PROB_TARGET, HAS_WEIGHT, SMOOTH, ACC), 0)
    log_s = tl.log(s)
    lse = m + log_s  # lse = M + log S
    tl.store(lse_ptr + row, lse)
    zz = 0.0
    if HAS_Z:
        z = tl.load(z_ptr)
        zz = 2.0 * z * lse
    scale = 1.0
    if IS_MEAN:
        # 1/0 = inf when the divisor is 0: every row ignored (G = 0 below) or the kept weights sum to 0 (NaN, as torch)
        scale = 1.0 / tl.load(div_ptr).to(ACC)
    inv = 1.0 / s

    # pass 2: G_j = scale * ((W + 2 z lse) p_j - w_j q'_j) * dy_j/dx_j (the target column of a class
    # target after the loop); with M final, sum_j w_j q'_j (M - y_j) (for a class target: its ls/V part)
    others = tl.zeros((), ACC)  # sum of p off the target column
    wq_gap = tl.zeros((), ACC)  # sum_j w_j q'_j (M - y_j)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        y, dy = _capped(tl.load(x_row + offs, mask=mask, other=0.0).to(ACC), cap, HAS_SOFTCAP)
        p = tl.exp(y - m) * inv
        wq = 0.0
        if PROB_TARGET or SMOOTH:
            wq = _target_weight(t_row, w_ptr, offs, mask, ls, V, PROB_TARGET, HAS_WEIGHT, SMOOTH, ACC)
            wq_gap += tl.sum(tl.where(mask, wq * (m - y), 0.0), 0)
        g = _grad(p, dy, W, wq, zz, scale, PROB_TARGET or SMOOTH, HAS_Z, HAS_SOFTCAP)
        if PROB_TARGET:
            store = mask
        else:
            store = mask & (offs != t_col)
            others += tl.sum(tl.where(store, p, 0.0), 0)
            g = tl.where(bad, float("nan"), tl.where(ignored, 0.0, g))
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=store)

    # loss = sum_j w_j q'_j (M - y_j) + W log S + z lse^2: M - y_j exact near the max
    loss = wq_gap + W * log_s
    if not PROB_TARGET:
        keep = 1.0
        if SMOOTH:
            keep = 1.0 - ls
        loss += keep * w_t * (m - y_t)  # the one-hot part of a class target
    if HAS_Z:
        loss += z * lse * lse
    tl.store(loss_ptr + row, tl.where(bad, float("nan"), tl.where(ignored, 0.0, loss)))

    if not PROB_TARGET:
        p_t = tl.exp(y_t - m) * inv
        g_t = _target_grad(
            p_t, others, w_t, dy_t, ls, V, sum_w_ptr, zz, scale, HAS_WEIGHT, SMOOTH, HAS_Z, HAS_SOFTCAP, ACC
        )
        tl.store(g_row + t_col, tl.where(bad, float("nan"), g_t).to(g_ptr.dtype.element_ty), mask=t_col >= 0)


# Rows split across programs (too few rows to fill the GPU): each of a row's `splits` programs takes `chunk`
# columns. Stage 1 reduces its chunk to (m, s, off, wq, gap) relative to its own max m: s = sum exp(y - m),
# off = the same off the target column, wq = sum w q' and gap = sum w q' (m - y) (but the one-hot part).
# Stage 2 merges a row's partials, with M = max m_k and f_k = exp(m_k - M):
#     S = sum_k f_k s_k,  lse = M + log S,  sum_{j != t} p_j = sum_k f_k off_k / S,  gap = sum_k gap_k + (M - m_k) wq_k
# then writes the gradient of its own chunk as the one-program kernel does; the program owning the target's
# column (chunk 0 where there is none) writes the row's loss and the target column's gradient.
PARTS = 5  # the partials per (row, chunk)


@triton.jit(debug=True)  # keeps the device-side assert on the targets' range
def _split_stats_kernel(
    x_ptr,
    x_stride,
    t_ptr,
    t_stride,
    w_ptr,
    part_ptr,
    ls_ptr,
    cap_ptr,
    N,
    V,
    chunk,
    ignore_index,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    x_row = x_ptr + row * x_stride
    t_row = t_ptr + row * t_stride
    ls, cap = _scalars(ls_ptr, cap_ptr, SMOOTH, HAS_SOFTCAP)
    t_col = -1
    if not PROB_TARGET:
        t_ignored, t_bad, t_col = _class_target(t_row, V, ignore_index)  # (the row's loss: stage 2's)
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    off = tl.zeros((), ACC)
    wq_sum = tl.zeros((), ACC)
    gap = tl.zeros((), ACC)
    first = split.to(tl.int64) * chunk
    for start in range(first, tl.minimum(first + chunk, V), BLOCK):
        offs = start + cols
        mask = offs < V
        y, _ = _capped(tl.load(x_row + offs, mask=mask, other=float("-inf")).to(ACC), cap, HAS_SOFTCAP)
        y = tl.where(mask, y, float("-inf"))
        m_new = tl.maximum(m, tl.max(y, 0))
        rescale = tl.where(m == m_new, 1.0, tl.exp(m - m_new))  # s = s * exp(m - m') + sum(exp(y - m'))
        e = tl.where(y == float("-inf"), 0.0, tl.exp(y - m_new))
        s = s * rescale + tl.sum(e, 0)
        off = off * rescale + tl.sum(tl.where(offs == t_col, 0.0, e), 0)
        if PROB_TARGET or SMOOTH:
            wq = _target_weight(t_row, w_ptr, offs, mask, ls, V, PROB_TARGET, HAS_WEIGHT, SMOOTH, ACC)
            gap += (m_new - tl.where(wq_sum == 0.0, m_new, m)) * wq_sum  # the earlier terms, to the new max
            gap += tl.sum(tl.where(mask, wq * (m_new - y), 0.0), 0)
            wq_sum += tl.sum(wq, 0)
        m = m_new
    at = part_ptr + row * splits + split
    size = N * splits
    tl.store(at, m)
    tl.store(at + size, s)
    tl.store(at + 2 * size, off)
    tl.store(at + 3 * size, wq_sum)
    tl.store(at + 4 * size, gap)


@triton.jit
def _split_grad_kernel(
    x_ptr,
    x_stride,
    t_ptr,
    t_stride,
    w_ptr,
    g_ptr,
    g_stride,
    loss_ptr,
    lse_ptr,
    part_ptr,
    div_ptr,
    sum_w_ptr,
    ls_ptr,
    z_ptr,
    cap_ptr,
    N,
    V,
    chunk,
    ignore_index,
    IS_MEAN: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    x_row = x_ptr + row * x_stride
    g_row = g_ptr + row * g_stride
    t_row = t_ptr + row * t_stride
    ls, cap = _scalars(ls_ptr, cap_ptr, SMOOTH, HAS_SOFTCAP)
    # the row's partials, merged
    ks = tl.arange(0, BLOCK_S)
    kmask = ks < splits
    at = part_ptr + row * splits + ks
    size = N * splits
    m_k = tl.load(at, mask=kmask, other=float("-inf"))
    M = tl.max(m_k, 0)
    f = tl.where(m_k == float("-inf"), 0.0, tl.exp(m_k - M))  # exp(m_k - M)
    S = tl.sum(f * tl.load(at + size, mask=kmask, other=0.0), 0)
    inv = 1.0 / S
    others = tl.sum(f * tl.load(at + 2 * size, mask=kmask, other=0.0), 0) * inv  # sum of p off the target
    log_s = tl.log(S)
    lse = M + log_s
    wq_k = tl.load(at + 3 * size, mask=kmask, other=0.0)
    gap_k = tl.load(at + 4 * size, mask=kmask, other=0.0)
    gap = tl.sum(gap_k + (M - tl.where(wq_k == 0.0, M, m_k)) * wq_k, 0)  # sum_j w_j q'_j (M - y_j)
    ignored = False
    bad = False
    owner = split == 0  # writes the loss (and the lse)
    if PROB_TARGET:
        W = tl.sum(wq_k, 0)
    else:
        ignored, bad, t_col = _class_target(t_row, V, ignore_index)
        owner = tl.where(t_col < 0, split == 0, t_col // chunk == split)
        w_t, W = _class_weights(w_ptr, sum_w_ptr, t_col, ls, V, HAS_WEIGHT, SMOOTH, ACC)
    zz = 0.0
    if HAS_Z:
        z = tl.load(z_ptr)
        zz = 2.0 * z * lse
    scale = 1.0
    if IS_MEAN:
        scale = 1.0 / tl.load(div_ptr).to(ACC)
    cols = tl.arange(0, BLOCK)
    first = split.to(tl.int64) * chunk
    for start in range(first, tl.minimum(first + chunk, V), BLOCK):
        offs = start + cols
        mask = offs < V
        y, dy = _capped(tl.load(x_row + offs, mask=mask, other=0.0).to(ACC), cap, HAS_SOFTCAP)
        p = tl.exp(y - M) * inv
        wq = 0.0
        if PROB_TARGET or SMOOTH:
            wq = _target_weight(t_row, w_ptr, offs, mask, ls, V, PROB_TARGET, HAS_WEIGHT, SMOOTH, ACC)
        g = _grad(p, dy, W, wq, zz, scale, PROB_TARGET or SMOOTH, HAS_Z, HAS_SOFTCAP)
        if PROB_TARGET:
            store = mask
        else:
            store = mask & (offs != t_col)
            g = tl.where(bad, float("nan"), tl.where(ignored, 0.0, g))
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=store)
    if split == 0:
        tl.store(lse_ptr + row, lse)
    if owner:
        loss = gap + W * log_s  # + the one-hot part below, + z lse^2
        if not PROB_TARGET:
            # the target column: never written above, so still the logit (in place too)
            x_t = tl.load(x_row + t_col, mask=t_col >= 0, other=0.0).to(ACC)
            y_t, dy_t = _capped(x_t, cap, HAS_SOFTCAP)
            keep = 1.0
            if SMOOTH:
                keep = 1.0 - ls
            loss += keep * w_t * (M - y_t)
            p_t = tl.exp(y_t - M) * inv
            g_t = _target_grad(
                p_t, others, w_t, dy_t, ls, V, sum_w_ptr, zz, scale, HAS_WEIGHT, SMOOTH, HAS_Z, HAS_SOFTCAP, ACC
            )
            tl.store(g_row + t_col, tl.where(bad, float("nan"), g_t).to(g_ptr.dtype.element_ty), mask=t_col >= 0)
        if HAS_Z:
            loss += z * lse * lse
        tl.store(loss_ptr + row, tl.where(bad, float("nan"), tl.where(ignored, 0.0, loss)))


@triton.jit
def _scale_kernel(g_ptr, g_stride, s_ptr, V, PER_ROW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """grad *= scale over one block of one row; a 0-d scale of 1 returns at once: no pass."""
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW:
        s = tl.load(s_ptr + row)
    else:
        s = tl.load(s_ptr)
        if s == 1.0:
            return
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    g_row = g_ptr + row * g_stride
    g = tl.load(g_row + offs, mask=mask, other=0.0).to(ACC)
    tl.store(g_row + offs, (g * s.to(ACC)).to(g_ptr.dtype.element_ty), mask=mask)


def cross_entropy_scale_grad(grad, scale):
    """grad (N, V), unit stride along V, times scale (0-d or (N,)), in place; nothing is read on the host."""
    N, V = grad.shape
    if N == 0 or V == 0:
        return
    acc = acc_dtype(grad.dtype)
    block = _block(V)
    _scale_kernel[(N, triton.cdiv(V, block))](
        grad,
        grad.stride(0),
        scale.to(acc).contiguous(),
        V,
        PER_ROW=scale.dim() == 1,
        ACC=tl_acc_dtype(acc),
        BLOCK=block,
    )


def _block(V, options=False, acc=torch.float32):
    """The columns a program holds at once: a power of 2, at most MAX_BLOCK; with options on, whose extra values
    per column spill beyond that on sm_80 and sm_90, 2048 (fp32) or 512 (fp64)."""
    most = MAX_BLOCK if not options else 2048 if acc == torch.float32 else 512
    return min(triton.next_power_of_2(max(V, 1)), most)


def _warps(block, acc):
    """8 warps from 8 KB a block of a row: with 4 the kernels spill (ptxas on sm_80 and sm_90)."""
    return 8 if block * acc.itemsize >= 8192 else 4


# rows split across programs: when fewer than TARGET_PROGRAMS rows (an H100's 132 SMs hold about 8 programs
# each), into at most MAX_SPLITS chunks of at least SPLIT_COLUMNS columns
TARGET_PROGRAMS, SPLIT_COLUMNS, MAX_SPLITS = 2048, 8192, 64
SPLIT_BLOCK = 512  # columns a split program holds at once (4 warps): more spill beside the merge on sm_80/90


def splits_for(N, V):
    """How many programs share a row, from N and V alone (no host read): 1 when there are enough rows."""
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, max(N, 1)), V // SPLIT_COLUMNS, MAX_SPLITS))


def forward(logits, target, weight, grad, reduction, ignore_index, label_smoothing, z_loss, softcap, splits=None):
    """Writes the gradient into `grad` (may be `logits` itself) and returns (loss, lse).

    logits (N, V) with unit stride along V; target (N,) class indices (int64, int32, uint8) or (N, V)
    probabilities (contiguous, logits' dtype); weight None or (V,) contiguous; reduction 0 none, 1 mean,
    2 sum; softcap None or > 0. loss: (N,) for none, () otherwise, logits' dtype; lse (N,) in the acc dtype.
    splits: programs per row (default: splits_for(N, V)); above 1 the two-stage kernels run. Nothing is read on
    the host."""
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    device = logits.device
    prob = target.is_floating_point()
    smooth = label_smoothing > 0

    def scalar(value):  # an option's value, read by the kernel in acc
        return torch.full((), value, device=device, dtype=acc)

    row_loss = torch.empty(N, device=device, dtype=acc)
    lse = torch.empty(N, device=device, dtype=acc)
    divisor = mean_divisors(target, weight, ignore_index)[1] if reduction == MEAN else None
    sum_w = weight.sum(dtype=torch.float64) if weight is not None and smooth and not prob else None
    flags = dict(
        PROB_TARGET=prob,
        HAS_WEIGHT=weight is not None,
        SMOOTH=smooth,
        HAS_SOFTCAP=softcap is not None,
        ACC=tl_acc_dtype(acc),
    )
    ls = scalar(label_smoothing) if smooth else None
    cap = scalar(softcap) if softcap is not None else None
    splits = splits_for(N, V) if splits is None else splits
    if N > 0 and splits > 1:
        block = min(_block(triton.cdiv(V, splits)), SPLIT_BLOCK)
        chunk = triton.cdiv(triton.cdiv(V, splits), block) * block  # a whole number of blocks
        splits = triton.cdiv(V, chunk)  # (no empty chunk)
        part = torch.empty(PARTS, N, splits, device=device, dtype=acc)
        grid, warps = (N, splits), 4
        row_args = (logits, logits.stride(0), target, target.stride(0), weight)
        _split_stats_kernel[grid](
            *row_args, part, ls, cap, N, V, chunk, ignore_index, BLOCK=block, num_warps=warps, **flags
        )
        _split_grad_kernel[grid](
            *row_args,
            grad,
            grad.stride(0),
            row_loss,
            lse,
            part,
            divisor,
            sum_w,
            ls,
            scalar(z_loss) if z_loss > 0 else None,
            cap,
            N,
            V,
            chunk,
            ignore_index,
            IS_MEAN=reduction == MEAN,
            HAS_Z=z_loss > 0,
            BLOCK=block,
            BLOCK_S=triton.next_power_of_2(splits),
            num_warps=warps,
            **flags,
        )
    elif N > 0:
        block = _block(V, prob or smooth or z_loss > 0 or softcap is not None, acc)
        _forward_kernel[(N,)](
            logits,
            logits.stride(0),
            target,
            target.stride(0),
            weight,
            grad,
            grad.stride(0),
            row_loss,
            lse,
            divisor,
            sum_w,
            ls,
            scalar(z_loss) if z_loss > 0 else None,
            cap,
            V,
            ignore_index,
            IS_MEAN=reduction == MEAN,
            HAS_Z=z_loss > 0,
            BLOCK=block,
            **flags,
            num_warps=_warps(block, acc),
        )
    if reduction == NONE:
        return row_loss.to(logits.dtype), lse
    total = row_loss.sum(dtype=torch.float64)
    return (total / divisor if reduction == MEAN else total).to(logits.dtype), lse
