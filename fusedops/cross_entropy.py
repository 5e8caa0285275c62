"""Fused cross-entropy: the loss and its gradient from one pass over the logits.

Per row i, with y = softcap * tanh(x / softcap) (or y = x), lse = logsumexp(y), p = softmax(y), class
weights w (ones without) and the target distribution q' = (1-ls) * q + ls/V (q: the one-hot class or
the probability row; ls: label smoothing):
    loss_i = sum_j w_j q'_ij (lse_i - y_ij) + z_loss * lse_i^2          (0 in an ignored row)
    G_i    = scale * ((W_i + 2 z_loss lse_i) p_i - w q'_i) * dy/dx,     W_i = sum_j w_j q'_ij
scale = 1/divisor for the mean (the kept targets' summed weight; N for probability targets), 1 otherwise.
The z-loss term is per token, unweighted: for a weighted mean, cross_entropy scales the class weights by
K / divisor (K the kept rows' count; z_loss_weight), which makes the divisor K and keeps the weighted part's.
The forward op returns the loss, G and lse; backward scales G by the upstream gradient. With
`inplace_backward=True` G is written over the logits.
"""

import weakref
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from ._autograd import add_grads, batched_first, consumable, fast_apply, legacy_reduction
from ._checks import check_cross_entropy, check_inplace, no_tangent, not_differentiable, vocab_group
from ._math import MEAN, NONE, REDUCTIONS, SUM, acc_dtype, capped, mean_scale, z_loss_weight
from ._ops import kernels, register
from .errors import ArgumentTypeError, ArgumentValueError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


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


class CrossEntropyOptions(NamedTuple):
    """CrossEntropyFunction's options, as `cross_entropy` checked them (see there); reduction is a code of
    REDUCTIONS (0 none, 1 mean, 2 sum: torch's numbering)."""

    reduction: int = MEAN
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    return_lse: bool = False
    inplace_backward: bool = False
    backend: str | None = None


class CrossEntropyFunction(torch.autograd.Function):
    """loss, G, lse = CrossEntropyFunction.apply(logits, target, weight, options): cross-entropy of (N, V)
    logits and (N,) class indices (int64, int32 or uint8) or (N, V) probabilities, with (V,) class weights or
    None, and a CrossEntropyOptions.

    G is the loss's gradient with respect to the
    logits; backward returns G times the upstream gradient. G is differentiable (its Jacobian is the
    loss's Hessian), which is how double backward goes through it. lse (acc dtype) is the per-row
    logsumexp, differentiable when return_lse is True. The logits are kept for backward only when it
    needs them: with softcap, return_lse, or probability targets. With
    inplace_backward=True, G is written over the logits and returned as None (no double backward then).
    Unless the graph is retained, backward scales G in place and hands it out: it is consumed, as the
    saved tensor it is.
    """

    @staticmethod
    def forward(logits, target, weight, options):
        ops = kernels(options.backend, logits)
        args = (target, weight, *options[:5])  # reduction, ignore_index, label_smoothing, z_loss, softcap
        if options.inplace_backward:
            loss, lse = ops.cross_entropy_forward_inplace(logits, *args)
            return loss, None, lse
        return ops.cross_entropy_forward(logits, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, options = inputs
        inplace = options.inplace_backward
        grad = logits if inplace else output[1]
        # (probability targets: their derivatives need the logits, and a forward-mode tangent cannot be seen here)
        keep_logits = not inplace and (options.softcap is not None or options.return_lse or target.is_floating_point())
        ctx.save_for_backward(grad, target, weight, output[2], logits if keep_logits else None)
        ctx.save_for_forward(grad, target, weight, output[2], logits if keep_logits else None)
        ctx.options = options
        ctx.lse_differentiable = options.return_lse and not inplace
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
        reduction = ctx.options.reduction
        create_graph = torch.is_grad_enabled()
        if create_graph and ctx.options.inplace_backward:
            raise RuntimeError(
                "cross_entropy: inplace_backward=True has no double backward (the logits it "
                "needs are overwritten by their gradient)"
            )
        grad_lse = grad_lse if ctx.lse_differentiable else None  # (zeros, not None, while compiled)
        needs_rows = grad_grad is not None or grad_lse is not None or ctx.needs_input_grad[1]
        rows = _Rows(grad, target, weight, lse, logits, ctx.options) if needs_rows else None
        dlogits = dtarget = None
        if grad_grad is not None:  # through G's dependence on the logits, before G is scaled in place
            dlogits = rows.hessian_vp(grad_grad)
        if grad_lse is not None:  # d lse / dx = p * dy/dx
            dlogits = add_grads(dlogits, (rows.p * rows.dy_dx * grad_lse.unsqueeze(1)).to(grad.dtype))
        if ctx.needs_input_grad[1] and grad_loss is not None:  # d loss_i / dq_ij = scale (1-ls) w_j (lse_i - y_ij)
            dtarget = (rows.target_grad() * _per_row(grad_loss, reduction)).to(target.dtype)
        if ctx.needs_input_grad[1] and grad_grad is not None:
            dtarget = add_grads(dtarget, rows.target_vjp(grad_grad).to(target.dtype))
        if grad_loss is not None:  # G * upstream (per row for reduction none)
            held = ctx.grad_output is not None and ctx.grad_output() is not None
            if consumable(create_graph) and not held:
                # nothing can ask for G again: scaled in place (not at all for the usual factor 1) and handed out
                kernels(ctx.options.backend, grad).cross_entropy_scale_grad(grad, grad_loss)
                first = grad
            else:
                first = grad * _per_row(grad_loss, reduction)
            dlogits = add_grads(dlogits, first)
        return dlogits, dtarget, None, None

    @staticmethod
    def jvp(ctx, logits_tangent, target_tangent, weight_tangent, _):
        grad, target, weight, lse, logits = ctx.saved_tensors
        if ctx.options.inplace_backward:
            raise RuntimeError("cross_entropy: inplace_backward=True has no forward-mode derivative")
        no_tangent("cross_entropy", ["weight"], [weight_tangent])
        reduction = ctx.options.reduction
        rows = _Rows(grad, target, weight, lse, logits, ctx.options)
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
    def vmap(info, in_dims, logits, target, weight, options):
        """Each mapped slice its own batch of rows: the slices' rows are folded into one call of
        reduction none, then reduced per slice (a batched weight: one call per slice)."""
        if options.inplace_backward:
            raise RuntimeError("cross_entropy: inplace_backward=True cannot be used under vmap")
        B = info.batch_size
        logits, target = batched_first(logits, in_dims[0], B), batched_first(target, in_dims[1], B)
        if in_dims[2] is not None:
            outs = [
                CrossEntropyFunction.apply(logits[b], target[b], weight.select(in_dims[2], b), options)
                for b in range(B)
            ]
            return tuple(torch.stack(out) for out in zip(*outs)), (0, 0, 0)
        _, N, V = logits.shape
        rows, grad, lse = CrossEntropyFunction.apply(
            logits.reshape(B * N, V), target.reshape(B * N, *target.shape[2:]), weight, options._replace(reduction=NONE)
        )
        rows, grad, lse = rows.view(B, N), grad.view(B, N, V), lse.view(B, N)
        if options.reduction == SUM:
            return (rows.sum(1), grad, lse), (0, 0, 0)
        if options.reduction == MEAN:  # the mean over each slice's divisor
            scale = torch.stack([mean_scale(target[b], weight, options.ignore_index) for b in range(B)]).to(rows.dtype)
            return (rows.sum(1) * scale, grad * scale.view(B, 1, 1), lse), (0, 0, 0)
        return (rows, grad, lse), (0, 0, 0)


def _per_row(grad_loss, reduction):
    """The upstream gradient as a factor of each row: (N, 1) for reduction none, a scalar otherwise."""
    return grad_loss.unsqueeze(1) if reduction == NONE else grad_loss


class _Rows:
    """The per-row quantities of the derivatives beyond G, from torch ops (so themselves differentiable):
    p, dy/dx and the Hessian-vector product. p comes from the logits when they were kept, else from G:
    p = (G / scale + w q') / (W + 2 z lse), exact wherever that divisor is not 0 (where it is, without
    z-loss, the row's Hessian is 0 anyway)."""

    def __init__(self, grad, target, weight, lse, logits, options):
        reduction, ignore_index, label_smoothing, z_loss, softcap = options[:5]
        acc = lse.dtype
        N, V = grad.shape
        self.z, self.label_smoothing, self.softcap = z_loss, label_smoothing, softcap
        w = torch.ones(V, dtype=acc, device=grad.device) if weight is None else weight.to(acc)
        if target.is_floating_point():
            self.kept = torch.ones(N, 1, dtype=torch.bool, device=grad.device)
            q = target.to(acc)
        else:
            self.kept = (target != ignore_index).unsqueeze(1)
            q = (target.unsqueeze(1) == torch.arange(V, device=grad.device)).to(acc)  # one-hot (vmap-safe)
        self.w = w
        self.wq = w * ((1 - label_smoothing) * q + label_smoothing / V) * self.kept  # w q'
        self.A = self.wq.sum(1, keepdim=True) + 2 * z_loss * lse.unsqueeze(1)  # W + 2 z lse
        self.scale = (
            mean_scale(target, weight, ignore_index)
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
        """d loss_i / d q_ij = scale (1-ls) w_j (lse_i - y_ij) (the probability targets' gradient)."""
        return self.scale * (1 - self.label_smoothing) * self.w * (self.lse - self.y)

    def target_vjp(self, v):
        """(d G / d q)^T v = scale (1-ls) w (<p y', v> - y' v)."""
        v = v.to(self.p.dtype) * self.dy_dx
        return self.scale * (1 - self.label_smoothing) * self.w * ((self.p * v).sum(1, keepdim=True) - v)

    def target_hessian_vp(self, dq):
        """d G / d q . dq = scale (1-ls) (<w, dq> p - w dq) y'."""
        dq = dq.to(self.p.dtype)
        return (
            self.scale
            * (1 - self.label_smoothing)
            * ((self.w * dq).sum(1, keepdim=True) * self.p - self.w * dq)
            * self.dy_dx
        ).to(self.dtype)


_apply = fast_apply(CrossEntropyFunction)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
    process_group: "ProcessGroup | None" = None,
    vocab_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Like `torch.nn.functional.cross_entropy`, fused: loss and gradient from one pass over the logits.

    Under torch.autocast the loss is computed and returned in float32, as PyTorch's.

    Args:
        input: (N, V), (V,) or (N, V, d1, ...) logits.
        target: class indices shaped (N,), () or (N, d1, ...) (int64, int32 or uint8), or class probabilities
            shaped like input, of its dtype.
        weight: (V,) class weights, or None (all ones).
        reduction: "none", "mean" or "sum", as PyTorch's (the weighted mean divides by the kept targets'
            summed weight).
        ignore_index: as PyTorch's: the class index whose rows are left out of the loss (probability targets
            take no ignore_index).
        label_smoothing: as PyTorch's, in [0, 1]: the share of the target mass spread evenly over the V
            classes (q' = (1 - label_smoothing) * q + label_smoothing / V).
        z_loss: adds z_loss * logsumexp(y)^2 to each kept row's loss (PaLM, Chowdhery et al. 2022, sec. 5); a
            per-token term, unweighted: the mean averages it over the kept rows (N for probability targets),
            whatever the class weights, while the weighted cross-entropy divides by the kept targets' summed
            weight. 0 (the default) adds nothing.
        softcap: replaces the logits x by y = softcap * tanh(x / softcap) before everything (Gemma 2, 2024: 30
            for the final logits); None: no soft-capping (y = x).
        return_lse: also return the rows' logsumexp(y), shaped like the loss of reduction "none",
            differentiable.
        inplace_backward: write the gradient over `input` (2-D or 1-D) instead of a new buffer; its values are
            gone after the call.
        backend: None (C++ on CPU, Triton on CUDA), "cpp" or "triton".
        process_group: a torch.distributed group over which the classes are split (fusedops/vocab_parallel.py):
            each process holds a contiguous shard of them, in rank order: input's columns, weight's and, for
            probability targets, target's; class indices stay global, the same on every rank. The loss (and
            lse) is the whole vocabulary's on every rank, each rank's gradient its shard's; the upstream
            gradient must be the same on every rank (loss.backward() on each). With one process, or
            torch.distributed not initialised, it is the plain call. No inplace_backward then. None: no split.
        vocab_size: the number of classes of the whole vocabulary, checked against the shards' sizes (without
            a split, the logits' V); None: not checked.

    Returns:
        The loss: a scalar for reduction "mean" or "sum", else one per row, shaped (N,), () or (N, d1, ...)
        as the class-index target. With return_lse, the tuple (loss, lse), lse shaped like the loss of
        reduction "none", in the loss's dtype.
    """
    check_cross_entropy(
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
        group = vocab_group(input, process_group, vocab_size, inplace_backward)
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
            raise ArgumentValueError(
                f"cross_entropy: inplace_backward=True needs 1-D or 2-D logits, got shape {tuple(logits.shape)}"
            )
        V = logits.shape[1]
        logits = logits.movedim(1, -1).reshape(-1, V)
        target = target.movedim(1, -1).reshape(-1, V) if prob else target.reshape(-1)
    inplace = inplace_backward and logits.requires_grad and torch.is_grad_enabled()
    if inplace:
        check_inplace(logits, return_lse)
    elif logits.stride(1) != 1:
        logits = logits.contiguous()
    if prob:
        target = target.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    if group is None:
        weight = z_loss_weight(target, weight, ignore_index, code, z_loss)  # z-loss's mean: kept rows, unweighted
        options = CrossEntropyOptions(
            code, ignore_index, label_smoothing, z_loss, softcap, return_lse, inplace, backend
        )
        loss, _, lse = _apply(logits, target, weight, options)
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


class CrossEntropyLoss(nn.Module):
    """Drop-in for `torch.nn.CrossEntropyLoss`: the same arguments, `weight` kept as a buffer (the same
    state_dict), plus z_loss, softcap, return_lse, inplace_backward, backend, process_group and vocab_size (see
    `cross_entropy`)."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        return_lse: bool = False,
        inplace_backward: bool = False,
        backend: str | None = None,
        process_group: "ProcessGroup | None" = None,
        vocab_size: int | None = None,
    ) -> None:
        """The loss's options, as torch.nn.CrossEntropyLoss's plus fusedops' (see `cross_entropy`).

        Args:
            weight: (V,) class weights, or None; kept as the buffer `weight`.
            size_average: deprecated, as in torch.nn.CrossEntropyLoss: when it or `reduce` is not None, the two
                set `reduction` (torch's legacy rule) in place of the `reduction` argument.
            ignore_index: see `cross_entropy`.
            reduce: deprecated, as in torch.nn.CrossEntropyLoss (see size_average).
            reduction: "none", "mean" or "sum" (see `cross_entropy`).
            label_smoothing: see `cross_entropy`.
            z_loss: see `cross_entropy`.
            softcap: see `cross_entropy`.
            return_lse: see `cross_entropy`: forward then returns (loss, lse).
            inplace_backward: see `cross_entropy`.
            backend: see `cross_entropy`.
            process_group: see `cross_entropy`.
            vocab_size: see `cross_entropy`.
        """
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = legacy_reduction(size_average, reduce)
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

    def forward(self, input: Tensor, target: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """`cross_entropy(input, target, self.weight, ...)` with the module's options.

        Args:
            input: the logits, (N, V), (V,) or (N, V, d1, ...).
            target: class indices or class probabilities, as `cross_entropy` takes them.

        Returns:
            The loss, or (loss, lse) with return_lse.
        """
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
