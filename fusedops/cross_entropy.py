"""Fused cross-entropy: the loss and its gradient from one pass over the logits.

Per row i, with y = softcap * tanh(x / softcap) (or y = x), lse = logsumexp(y), p = softmax(y), class
weights w (ones without) and the target distribution q' = (1-eps) * q + eps/V (q: the one-hot class or
the probability row; eps: label smoothing):
    loss_i = sum_j w_j q'_ij (lse_i - y_ij) + z_loss * lse_i^2          (0 in an ignored row)
    G_i    = scale * ((W_i + 2 z_loss lse_i) p_i - w q'_i) * dy/dx,     W_i = sum_j w_j q'_ij
scale = 1/divisor for the mean (the kept targets' summed weight; N for probability targets), 1 otherwise.
The z-loss term is per token, unweighted: for a weighted mean, cross_entropy scales the class weights by
K / divisor (K the kept rows' count; z_loss_weight), which makes the divisor K and keeps the weighted part's.
The forward op returns the loss, G and lse; backward scales G by the upstream gradient. With
`inplace_backward=True` G is written over the logits.
"""

import math
import weakref

import torch
from torch import Tensor, nn

from ._collectives import sync_group
from ._ops import (
    acc_dtype,
    batched_first,
    check_backend,
    check_no_grad,
    fast_apply,
    kernels,
    no_tangent,
    not_differentiable,
    register,
)
from .errors import ArgumentDtypeError, ArgumentEmptyError, ArgumentTypeError, ArgumentValueError

NONE, MEAN, SUM = 0, 1, 2  # torch's reduction numbering, as the kernels take it
REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)  # class-index targets


def _forward_inplace_fake(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap):
    N = logits.shape[0]
    loss = logits.new_empty((N,) if reduction == NONE else ())
    return loss, logits.new_empty(N, dtype=acc_dtype(logits.dtype))  # the loss, lse


def _forward_fake(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap):
    loss, lse = _forward_inplace_fake(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap)
    return loss, torch.empty_like(logits, memory_format=torch.contiguous_format), lse


def _forward_cuda(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap):
    from . import cross_entropy_triton

    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    loss, lse = cross_entropy_triton.forward(
        logits, target, weight, grad, reduction, ignore_index, label_smoothing, z_loss, softcap
    )
    return loss, grad, lse


def _forward_inplace_cuda(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap):
    from . import cross_entropy_triton

    out = cross_entropy_triton.forward(
        logits, target, weight, logits, reduction, ignore_index, label_smoothing, z_loss, softcap
    )
    torch.autograd.graph.increment_version(logits)  # as every in-place op: autograd sees the write
    return out


def _scale_grad_cuda(grad, scale):
    from . import cross_entropy_triton

    cross_entropy_triton.cross_entropy_scale_grad(grad, scale)
    torch.autograd.graph.increment_version(grad)


register("cross_entropy_forward", _forward_fake, _forward_cuda)
register("cross_entropy_forward_inplace", _forward_inplace_fake, _forward_inplace_cuda)
register("cross_entropy_scale_grad", lambda grad, scale: None, _scale_grad_cuda)


def _keeps_graph():
    """Whether the running backward pass keeps the graph (retain_graph): a saved tensor can be asked
    for again."""
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except RuntimeError:  # not called by the autograd engine
        return True


def consumable(create_graph):
    """Whether backward may scale its saved gradients in place (cross_entropy_scale_grad) and hand them out:
    nothing can ask for them again (no create_graph, no retain_graph), and neither torch.compile nor a
    torch.func transform runs (they take the out-of-place product)."""
    return not (
        create_graph or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or _keeps_graph()
    )


class CrossEntropyFunction(torch.autograd.Function):
    """loss, G, lse = CrossEntropyFunction.apply(logits, target, weight, reduction, ignore_index,
    label_smoothing, z_loss, softcap, return_lse, inplace_backward, backend): cross-entropy of (N, V) logits
    and (N,) class indices (int64, int32 or uint8) or (N, V) probabilities.

    reduction: 0 none, 1 mean, 2 sum (torch's numbering). G is the loss's gradient with respect to the
    logits; backward returns G times the upstream gradient. G is differentiable (its Jacobian is the
    loss's Hessian), which is how double backward goes through it. lse (acc dtype) is the per-row
    logsumexp, differentiable when return_lse is True. The logits are kept for backward only when it
    needs them: with softcap, return_lse, or probability targets. With
    inplace_backward=True, G is written over the logits and returned as None (no double backward then).
    Unless the graph is retained, backward scales G in place and hands it out: it is consumed, as the
    saved tensor it is.
    """

    @staticmethod
    def forward(
        logits,
        target,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        return_lse,
        inplace_backward,
        backend,
    ):
        ops = kernels(backend, logits)
        args = (target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap)
        if inplace_backward:
            loss, lse = ops.cross_entropy_forward_inplace(logits, *args)
            return loss, None, lse
        return ops.cross_entropy_forward(logits, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, reduction, ignore_index, eps, z_loss, softcap, return_lse, inplace, _ = inputs
        grad = logits if inplace else output[1]
        # (probability targets: their derivatives need the logits, and a forward-mode tangent cannot be seen here)
        keep_logits = not inplace and (softcap is not None or return_lse or target.is_floating_point())
        ctx.save_for_backward(grad, target, weight, output[2], logits if keep_logits else None)
        ctx.save_for_forward(grad, target, weight, output[2], logits if keep_logits else None)
        ctx.options = reduction, ignore_index, eps, z_loss, softcap
        ctx.inplace, ctx.backend = inplace, inputs[-1]
        ctx.lse_differentiable = return_lse and not inplace
        if not ctx.lse_differentiable:
            ctx.mark_non_differentiable(output[2])
        # the G the caller got back (None once dropped): while held, never scaled in place
        ctx.grad_output = None if inplace else weakref.ref(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, grad_grad, grad_lse):
        grad, target, weight, lse, logits = ctx.saved_tensors
        if ctx.needs_input_grad[2]:
            raise not_differentiable("cross_entropy", "weight")
        reduction = ctx.options[0]
        create_graph = torch.is_grad_enabled()
        if create_graph and ctx.inplace:
            raise RuntimeError(
                "cross_entropy: inplace_backward=True has no double backward (the logits it "
                "needs are overwritten by their gradient)"
            )
        grad_lse = grad_lse if ctx.lse_differentiable else None  # (zeros, not None, while compiled)
        needs_rows = grad_grad is not None or grad_lse is not None or ctx.needs_input_grad[1]
        rows = _Rows(grad, target, weight, lse, logits, *ctx.options) if needs_rows else None
        dlogits = dtarget = None
        if grad_grad is not None:  # through G's dependence on the logits, before G is scaled in place
            dlogits = rows.hessian_vp(grad_grad)
        if grad_lse is not None:  # d lse / dx = p * dy/dx
            dlogits = _add(dlogits, (rows.p * rows.dy_dx * grad_lse.unsqueeze(1)).to(grad.dtype))
        if ctx.needs_input_grad[1] and grad_loss is not None:  # d loss_i / dq_ij = scale (1-eps) w_j (lse_i - y_ij)
            dtarget = (rows.target_grad() * _per_row(grad_loss, reduction)).to(target.dtype)
        if ctx.needs_input_grad[1] and grad_grad is not None:
            dtarget = _add(dtarget, rows.target_vjp(grad_grad).to(target.dtype))
        if grad_loss is not None:  # G * upstream (per row for reduction none)
            held = ctx.grad_output is not None and ctx.grad_output() is not None
            if consumable(create_graph) and not held:
                # nothing can ask for G again: scaled in place (not at all for the usual factor 1) and handed out
                kernels(ctx.backend, grad).cross_entropy_scale_grad(grad, grad_loss)
                first = grad
            else:
                first = grad * _per_row(grad_loss, reduction)
            dlogits = _add(dlogits, first)
        return dlogits, dtarget, None, None, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, logits_tangent, target_tangent, weight_tangent, *_):
        grad, target, weight, lse, logits = ctx.saved_tensors
        if ctx.inplace:
            raise RuntimeError("cross_entropy: inplace_backward=True has no forward-mode derivative")
        no_tangent("cross_entropy", ["weight"], [weight_tangent])
        reduction = ctx.options[0]
        rows = _Rows(grad, target, weight, lse, logits, *ctx.options)
        zeros = logits_tangent is None
        tangent = torch.zeros_like(grad) if zeros else logits_tangent
        # d loss_i = sum_j G_ij dx_ij (G holds the mean's scale); dG = H dx; d lse = <p dy/dx, dx>
        row = (grad * tangent).sum(1)
        grad_tangent = rows.hessian_vp(tangent)
        lse_tangent = (rows.p * rows.dy_dx * tangent).sum(1).to(lse.dtype) if ctx.lse_differentiable else None
        if target_tangent is not None and target.is_floating_point():
            row = row + (rows.target_grad() * target_tangent).sum(1)
            grad_tangent = grad_tangent + rows.target_hessian_vp(target_tangent)
        return (row if reduction == NONE else row.sum()), grad_tangent, lse_tangent

    @staticmethod
    def vmap(
        info,
        in_dims,
        logits,
        target,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        return_lse,
        inplace_backward,
        backend,
    ):
        """Each mapped slice its own batch of rows: the slices' rows are folded into one call of
        reduction none, then reduced per slice (a batched weight: one call per slice)."""
        if inplace_backward:
            raise RuntimeError("cross_entropy: inplace_backward=True cannot be used under vmap")
        B = info.batch_size
        logits, target = batched_first(logits, in_dims[0], B), batched_first(target, in_dims[1], B)
        options = (reduction, ignore_index, label_smoothing, z_loss, softcap, return_lse, False, backend)
        if in_dims[2] is not None:
            outs = [
                CrossEntropyFunction.apply(logits[b], target[b], weight.select(in_dims[2], b), *options)
                for b in range(B)
            ]
            return tuple(torch.stack(out) for out in zip(*outs)), (0, 0, 0)
        _, N, V = logits.shape
        rows, grad, lse = CrossEntropyFunction.apply(
            logits.reshape(B * N, V), target.reshape(B * N, *target.shape[2:]), weight, NONE, *options[1:]
        )
        rows, grad, lse = rows.view(B, N), grad.view(B, N, V), lse.view(B, N)
        if reduction == SUM:
            return (rows.sum(1), grad, lse), (0, 0, 0)
        if reduction == MEAN:  # the mean over each slice's divisor
            scale = torch.stack([_mean_scale(target[b], weight, ignore_index) for b in range(B)]).to(rows.dtype)
            return (rows.sum(1) * scale, grad * scale.view(B, 1, 1), lse), (0, 0, 0)
        return (rows, grad, lse), (0, 0, 0)


def _add(a, b):
    return b if a is None else a + b


def _per_row(grad_loss, reduction):
    """The upstream gradient as a factor of each row: (N, 1) for reduction none, a scalar otherwise."""
    return grad_loss.unsqueeze(1) if reduction == NONE else grad_loss


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


def _mean_scale(target, weight, ignore_index):
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


def capped(logits, dtype, softcap):
    """y = softcap * tanh(x / softcap) (Gemma 2's soft-capping; y = x without) in dtype, and dy/dx = 1 - (y /
    softcap)^2 (tanh' = 1 - tanh^2; 1 without). y may be the logits themselves."""
    x = logits.to(dtype)
    if softcap is None:
        return x, 1.0
    y = softcap * torch.tanh(x / softcap)
    return y, 1 - (y / softcap) ** 2


class _Rows:
    """The per-row quantities of the derivatives beyond G, from torch ops (so themselves differentiable):
    p, dy/dx and the Hessian-vector product. p comes from the logits when they were kept, else from G:
    p = (G / scale + w q') / (W + 2 z lse), exact wherever that divisor is not 0 (where it is, without
    z-loss, the row's Hessian is 0 anyway)."""

    def __init__(self, grad, target, weight, lse, logits, reduction, ignore_index, eps, z_loss, softcap):
        acc = lse.dtype
        N, V = grad.shape
        self.z, self.eps, self.softcap = z_loss, eps, softcap
        w = torch.ones(V, dtype=acc, device=grad.device) if weight is None else weight.to(acc)
        if target.is_floating_point():
            self.kept = torch.ones(N, 1, dtype=torch.bool, device=grad.device)
            q = target.to(acc)
        else:
            self.kept = (target != ignore_index).unsqueeze(1)
            q = (target.unsqueeze(1) == torch.arange(V, device=grad.device)).to(acc)  # one-hot (vmap-safe)
        self.w = w
        self.wq = w * ((1 - eps) * q + eps / V) * self.kept  # w q'
        self.A = self.wq.sum(1, keepdim=True) + 2 * z_loss * lse.unsqueeze(1)  # W + 2 z lse
        self.scale = (
            _mean_scale(target, weight, ignore_index)
            if reduction == MEAN
            else torch.ones((), dtype=torch.float64, device=grad.device)
        ).to(acc)
        self.lse = lse.unsqueeze(1)
        if logits is not None:
            self.y, self.dy_dx = capped(logits, acc, softcap)
            self.lse = torch.logsumexp(self.y, 1, keepdim=True)  # again: differentiable
            self.p = torch.exp(self.y - self.lse)
        else:  # (no softcap: it keeps the logits)
            self.y, self.dy_dx = None, 1.0
            A = torch.where(self.A == 0, 1, self.A)
            self.p = torch.where(
                self.A == 0, 0, (grad.to(acc) / torch.where(self.scale == 0, 1, self.scale) + self.wq) / A
            )
        self.dtype = grad.dtype

    def hessian_vp(self, v):
        """H v, H = d G / d logits (symmetric: the Hessian of the loss): with dy = y' v,
        dG_y = scale (A p (dy - <p, dy>) + 2 z p <p, dy>), dG = dG_y y' + G_y y'' v, y'' = -2 y y' / c^2."""
        dy = v.to(self.p.dtype) * self.dy_dx
        p_dy = (self.p * dy).sum(1, keepdim=True)
        d_grad_y = self.scale * (self.A * self.p * (dy - p_dy) + 2 * self.z * self.p * p_dy)
        out = d_grad_y * self.dy_dx
        if self.softcap is not None:  # G_y = scale (A p - w q')
            grad_y = self.scale * (self.A * self.p - self.wq)
            out = out - grad_y * 2 * self.y * self.dy_dx * v.to(self.p.dtype) / self.softcap**2
        return (out * self.kept).to(self.dtype)

    def target_grad(self):
        """d loss_i / d q_ij = scale (1-eps) w_j (lse_i - y_ij) (the probability targets' gradient)."""
        return self.scale * (1 - self.eps) * self.w * (self.lse - self.y)

    def target_vjp(self, v):
        """(d G / d q)^T v = scale (1-eps) w (<p y', v> - y' v)."""
        v = v.to(self.p.dtype) * self.dy_dx
        return self.scale * (1 - self.eps) * self.w * ((self.p * v).sum(1, keepdim=True) - v)

    def target_hessian_vp(self, dq):
        """d G / d q . dq = scale (1-eps) (<w, dq> p - w dq) y'."""
        dq = dq.to(self.p.dtype)
        return (
            self.scale * (1 - self.eps) * ((self.w * dq).sum(1, keepdim=True) * self.p - self.w * dq) * self.dy_dx
        ).to(self.dtype)


_apply = fast_apply(CrossEntropyFunction)


def cross_entropy(
    input,
    target,
    weight=None,
    *,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
    inplace_backward=False,
    backend=None,
    process_group=None,
    vocab_size=None,
):
    """Like `torch.nn.functional.cross_entropy`, fused: loss and gradient from one pass over the logits.

    input: (N, V), (V,) or (N, V, d1, ...) logits. target: class indices shaped (N,), () or (N, d1, ...)
    (int64, int32 or uint8), or class probabilities shaped like input, of its dtype. weight: (V,) class
    weights. reduction, ignore_index, label_smoothing: as PyTorch's (the weighted mean divides by the
    kept targets' summed weight; probability targets take no ignore_index).
    z_loss: adds z_loss * logsumexp(y)^2 to each kept row's loss (PaLM, Chowdhery et al. 2022, sec. 5); a
    per-token term, unweighted: the mean averages it over the kept rows (N for probability targets), whatever
    the class weights, while the weighted cross-entropy divides by the kept targets' summed weight.
    softcap: replaces the logits x by y = softcap * tanh(x / softcap) before everything (Gemma 2, 2024: 30 for
    the final logits). return_lse: also return the rows' logsumexp(y), shaped like
    the loss of reduction "none", differentiable.
    inplace_backward: write the gradient over `input` (2-D or 1-D) instead of a new buffer; its values
    are gone after the call. backend: None (C++ on CPU, Triton on CUDA), "cpp" or "triton". Under
    torch.autocast the loss is computed and returned in float32, as PyTorch's.
    process_group: a torch.distributed group over which the classes are split (fusedops/vocab_parallel.py):
    each process holds a contiguous shard of them, in rank order: input's columns, weight's and, for
    probability targets, target's; class indices stay global, the same on every rank. The loss (and lse) is
    the whole vocabulary's on every rank, each rank's gradient its shard's; the upstream gradient must be
    the same on every rank (loss.backward() on each). With one process, or torch.distributed not
    initialised, it is the plain call. No inplace_backward then. vocab_size: the number of classes of the
    whole vocabulary, checked against the shards' sizes (without a split, the logits' V).
    """
    _check_args(
        input,
        target,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        return_lse,
        backend,
        split=process_group is not None,
    )
    group = None
    if process_group is not None or vocab_size is not None:
        group = _vocab_group(input, process_group, vocab_size, inplace_backward)
    logits = input
    if torch.is_autocast_enabled(logits.device.type) and logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # cross_entropy is on autocast's float32 list
        weight = None if weight is None else weight.float()
        target = target.float() if target.is_floating_point() else target
    code = REDUCTIONS[reduction]
    prob = target.is_floating_point()
    out_shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else torch.Size([])  # one loss per row
    if logits.dim() == 1:
        logits, target = logits.unsqueeze(0), target.reshape(1, -1) if prob else target.reshape(1)
    elif logits.dim() > 2:
        if inplace_backward:
            raise ArgumentValueError(f"inplace_backward=True needs 1-D or 2-D logits, got shape {tuple(logits.shape)}")
        V = logits.shape[1]
        logits = logits.movedim(1, -1).reshape(-1, V)
        target = target.movedim(1, -1).reshape(-1, V) if prob else target.reshape(-1)
    inplace = inplace_backward and logits.requires_grad and torch.is_grad_enabled()
    if inplace:
        _check_inplace(logits, return_lse)
    elif logits.stride(1) != 1:
        logits = logits.contiguous()
    if prob:
        target = target.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    if group is None:
        weight = z_loss_weight(target, weight, ignore_index, code, z_loss)  # z-loss's mean: kept rows, unweighted
        loss, _, lse = _apply(
            logits, target, weight, code, ignore_index, label_smoothing, z_loss, softcap, return_lse, inplace, backend
        )
    else:
        from . import vocab_parallel

        loss, lse = vocab_parallel.cross_entropy(
            logits, target, weight, code, ignore_index, label_smoothing, z_loss, softcap, return_lse, group, vocab_size
        )
    return shaped(loss, lse, code, out_shape, return_lse)


def shaped(loss, lse, code, out_shape, return_lse):
    """What cross_entropy returns from the rows' results: the loss (reshaped to out_shape for reduction
    none), and the lse shaped alike, in the loss's dtype, when return_lse."""
    if code == NONE:
        loss = loss.reshape(out_shape)
    return (loss, lse.reshape(out_shape).to(loss.dtype)) if return_lse else loss


def _vocab_group(logits, process_group, vocab_size, inplace_backward, op="cross_entropy"):
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


def _check_inplace(logits, return_lse):
    """The gradient can be written over the logits: unit stride along the classes, rows apart, and no
    differentiable lse asked for (its gradient needs the logits)."""
    if return_lse:
        raise ArgumentValueError(
            "inplace_backward=True cannot return_lse=True while the logits require grad: the "
            "lse's gradient needs the logits, which are overwritten by their gradient"
        )
    N, V = logits.shape
    if logits.stride(1) != 1 or (N > 1 and abs(logits.stride(0)) < V):
        raise ArgumentValueError(
            "inplace_backward=True needs logits with unit stride along the classes and rows "
            f"that do not overlap, got shape {tuple(logits.shape)} and strides "
            f"{logits.stride()}"
        )


def _check_number(name, value, low, allow_low, op):
    """A real number (not a bool), finite, above `low` (or equal to it when allow_low)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{op}: {name} must be a float, got {value!r}")
    if not low <= value < math.inf or (value == low and not allow_low):  # comparisons: SymFloat-safe, NaN fails
        raise ArgumentValueError(
            f"{op}: {name} must be a finite number {'>=' if allow_low else '>'} {low}, got {value}"
        )


def _check_target(logits, target, ignore_index, op):
    if not isinstance(target, Tensor):
        raise ArgumentTypeError(f"{op}: target must be a tensor, got {type(target)}")
    if target.device != logits.device:
        raise ArgumentValueError(f"{op}: target is on {target.device} but logits on {logits.device}")
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


def _check_weight(logits, weight, name, op):
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise ArgumentTypeError(f"{op}: {name} must be a tensor or None, got {type(weight)}")
    V = logits.shape[1 if logits.dim() > 1 else 0]
    if weight.shape != (V,):
        raise ArgumentValueError(f"{op}: {name} must have shape ({V},), one per class, got {tuple(weight.shape)}")
    if weight.dtype != logits.dtype:
        raise ArgumentTypeError(f"{op}: {name} must have the logits' dtype {logits.dtype}, got {weight.dtype}")
    if weight.device != logits.device:
        raise ArgumentValueError(f"{op}: {name} is on {weight.device} but logits on {logits.device}")
    check_no_grad(op, name, weight)


def _check_args(
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
    _check_target(logits, target, ignore_index, op)
    _check_weight(logits, weight, weight_name, op)
    if reduction not in REDUCTIONS:
        raise ArgumentValueError(f"{op}: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise ArgumentTypeError(f"{op}: label_smoothing must be a float, got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ArgumentValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    _check_number("z_loss", z_loss, 0.0, allow_low=True, op=op)
    if softcap is not None:
        _check_number("softcap", softcap, 0.0, allow_low=False, op=op)
    if not isinstance(return_lse, bool):
        raise ArgumentTypeError(f"{op}: return_lse must be a bool, got {return_lse!r}")
    check_backend(backend, logits, op)


class CrossEntropyLoss(nn.Module):
    """Drop-in for `torch.nn.CrossEntropyLoss`: the same arguments, `weight` kept as a buffer (the same
    state_dict), plus z_loss, softcap, return_lse, inplace_backward, backend, process_group and vocab_size (see
    `cross_entropy`)."""

    def __init__(
        self,
        weight=None,
        size_average=None,
        ignore_index=-100,
        reduce=None,
        reduction="mean",
        label_smoothing=0.0,
        *,
        z_loss=0.0,
        softcap=None,
        return_lse=False,
        inplace_backward=False,
        backend=None,
        process_group=None,
        vocab_size=None,
    ):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        if reduction not in REDUCTIONS:
            raise ArgumentValueError(
                f"CrossEntropyLoss: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}"
            )
        if weight is not None and not isinstance(weight, Tensor):
            raise ArgumentTypeError(f"CrossEntropyLoss: weight must be a tensor or None, got {type(weight)}")
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.return_lse = z_loss, softcap, return_lse
        self.inplace_backward, self.backend = inplace_backward, backend
        self.process_group, self.vocab_size = process_group, vocab_size

    def forward(self, input, target):
        return cross_entropy(
            input,
            target,
            self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            return_lse=self.return_lse,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
            process_group=self.process_group,
            vocab_size=self.vocab_size,
        )

    def extra_repr(self):
        extra = "".join(
            f", {name}={getattr(self, name)!r}"
            for name, default in (("z_loss", 0.0), ("softcap", None), ("return_lse", False), ("vocab_size", None))
            if getattr(self, name) != default
        )
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}{extra}"
        )
