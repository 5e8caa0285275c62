"""Triton kernels of the fused cross-entropy (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

One program per row: an online max and sum of exp over the row in blocks, then the gradient.
Math in fp32 (fp64 for fp64 logits), offsets in int64.
"""
import torch
import triton
import triton.language as tl

from ._ops import acc_dtype
from .cross_entropy import MEAN, NONE

MAX_BLOCK = 4096


@triton.jit(debug=True)  # keeps the device-side assert on the targets' range
def _forward_kernel(x_ptr, x_stride, t_ptr, g_ptr, g_stride, loss_ptr, count_ptr, V, ignore_index,
                    eps_ptr, IS_MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    eps = tl.load(eps_ptr)  # label smoothing, in ACC (a float argument would be fp32)
    x_row = x_ptr + row * x_stride
    g_row = g_ptr + row * g_stride
    t = tl.load(t_ptr + row).to(tl.int64)
    ignored = t == ignore_index
    # a target out of range stops the kernel on the device, as PyTorch's CUDA kernel (no host read);
    # where asserts are compiled out (the interpreter) its row's loss and gradient are NaN, never an
    # out-of-bounds access
    bad = ~ignored & ((t < 0) | (t >= V))
    tl.device_assert(~bad, "cross_entropy: target out of range (argument 'target')")
    no_target = ignored | bad
    t_col = tl.where(no_target, -1, t)  # the target's column, -1 (none) in an ignored row
    xt = tl.load(x_row + t_col, mask=~no_target, other=0.0).to(ACC)  # read before an in-place write
    cols = tl.arange(0, BLOCK)
    # online max and sum of exp: s = s * exp(m - m') + sum(exp(x - m'))
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    sx = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 0))
        e = tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))  # -inf - -inf would be NaN
        s = s * tl.where(m == m_new, 1.0, tl.exp(m - m_new)) + tl.sum(e, 0)
        sx += tl.sum(tl.where(mask, x, 0.0), 0)
        m = m_new
    smooth = eps / V
    keep = 1.0 - eps
    # loss = logsumexp(x) - (1-eps) * x[t] - eps/V * sum(x)   (the last term skipped when eps = 0)
    #      = (1-eps) * (m - x[t]) + log(s) + eps/V * (V*m - sum(x)): m - x[t] exact near the max
    loss = keep * (m - xt) + tl.log(s) + tl.where(eps > 0, smooth * (V * m - sx), 0.0)
    tl.store(loss_ptr + row, tl.where(bad, float("nan"), tl.where(ignored, 0.0, loss)))
    scale = 1.0
    if IS_MEAN:
        count = tl.load(count_ptr)
        scale = tl.where(count > 0, 1.0 / tl.maximum(count, 1).to(ACC), 0.0)
    inv = 1.0 / s
    # grad = (softmax(x) - eps/V) * scale off the target column
    others = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
        p = tl.exp(x - m) * inv
        off_target = mask & (offs != t_col)
        others += tl.sum(tl.where(off_target, p, 0.0), 0)
        g = tl.where(bad, float("nan"), tl.where(ignored, 0.0, (p - smooth) * scale))
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=off_target)
    # target column: softmax_t - 1, as -(sum of the others) when softmax_t > 1/2 (exact even when
    # softmax_t rounds to 1), else directly (where the sum of the others would cancel)
    p_t = tl.exp(xt - m) * inv
    g_t = tl.where(p_t > 0.5, eps - smooth - others, p_t - smooth - keep) * scale
    tl.store(g_row + t_col, g_t.to(g_ptr.dtype.element_ty), mask=~no_target)


def _block(V):
    return min(triton.next_power_of_2(max(V, 1)), MAX_BLOCK)


def forward(logits, target, grad, reduction, ignore_index, label_smoothing):
    """Writes the gradient into `grad` (may be `logits` itself) and returns the loss."""
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    row_loss = torch.empty(N, device=logits.device, dtype=acc)
    eps = torch.full((), label_smoothing, device=logits.device, dtype=acc)
    count = (target != ignore_index).sum()
    if N > 0:
        _forward_kernel[(N,)](
            logits, logits.stride(0), target, grad, grad.stride(0), row_loss, count, V, ignore_index, eps,
            IS_MEAN=reduction == MEAN, ACC=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK=_block(V), num_warps=8 if V >= 2048 else 4)
    if reduction == NONE:
        return row_loss.to(logits.dtype)
    total = row_loss.sum()
    return (total / count if reduction == MEAN else total).to(logits.dtype)
