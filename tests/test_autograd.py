"""fusedops as an autograd citizen, against PyTorch's own ops as the oracle (F.cross_entropy,
F.batch_norm; for unbiased=True, which PyTorch lacks, batch norm written in torch ops): double
backward, forward-mode AD, torch.func, vmap, autocast, gradients that are never aliased, and the
exception classes a drop-in user catches. Every test runs the C++ kernels and the Triton kernels (on
CPU tensors, under the interpreter, which is slow: tiny shapes, and numerical checks in fast mode)."""

import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from cases import BACKENDS
from cases import batch_norm as bn_cases
from cases import cross_entropy as ce_cases
from cases.cross_entropy import composite
from conftest import assert_all_close
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fusedops
from fusedops import errors

# PyTorch's own jacfwd/jacrev warn so on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64 = torch.float64
EPS = 1e-5


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def fresh(*tensors):
    """Leaves that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def numerical_options(backend):
    """gradcheck's options: exhaustive on the C++ kernels, one random direction under the interpreter."""
    return {"fast_mode": True, "check_undefined_grad": False} if backend == "triton" else {}


def second_derivatives(outputs, inputs, grad_outputs, directions):
    """d/d(inputs, grad_outputs) of sum_i <d<outputs, grad_outputs>/d inputs_i, directions_i>: the second
    derivative, every part of it (a part no input reaches is zeros)."""
    firsts = torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=True)
    inner = sum((f * d).sum() for f, d in zip(firsts, directions))
    wrt = [*inputs, grad_outputs]
    seconds = torch.autograd.grad(inner, wrt, allow_unused=True)
    return [f.detach() for f in firsts], [torch.zeros_like(w) if s is None else s for s, w in zip(seconds, wrt)]


# --- cross-entropy ---------------------------------------------------------------------------------

REDUCTIONS = ["mean", "sum", "none"]
TARGETS = {"some_ignored": [1, -100, 4, 0], "all_ignored": [-100] * 4}
LOGITS = randn(4, 5, seed=1)


def ce_fused(backend, reduction, label_smoothing=0.0, **kw):
    return lambda x, t: fusedops.cross_entropy(
        x, t, reduction=reduction, label_smoothing=label_smoothing, backend=backend, **kw
    )


def ce_torch(reduction, label_smoothing=0.0):
    return lambda x, t: F.cross_entropy(x, t, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_double_backward(backend, reduction, targets, label_smoothing):
    target = torch.tensor(TARGETS[targets])
    fused, oracle = ce_fused(backend, reduction, label_smoothing), ce_torch(reduction, label_smoothing)
    go_shape = (4,) if reduction == "none" else ()
    go, v = randn(*go_shape, seed=2) + 1.5, randn(4, 5, seed=3)
    results = []
    for fn in (fused, oracle):
        (x,), (g,) = fresh(LOGITS), fresh(go)
        loss = fn(x, target)
        results.append((loss.detach(), *second_derivatives(loss, [x], g, [v])))
    (loss, first, second), (loss_t, first_t, second_t) = results
    torch.testing.assert_close(loss, loss_t, equal_nan=True)  # all ignored, mean: 0/0, as PyTorch
    if targets == "some_ignored":
        assert_all_close(first + second, first_t + second_t)
        # never a silent zero: d^2 loss / dx^2 and d grad / d upstream
        assert second[0].abs().amax() > 1e-3 and second[1].abs().amax() > 1e-3
    else:  # the gradient is 0 whatever the logits and the upstream gradient, so are its derivatives (PyTorch's
        # derivative of a mean's gradient by the upstream gradient is 0/0 = NaN there)
        assert_all_close(first + second, [torch.zeros_like(t) for t in first_t + second_t], rtol=0, atol=0)
    # numerical checks (a NaN loss has none), on the interpreter for a spread of the options
    spread = backend == "cpp" or (targets == "some_ignored") == (label_smoothing > 0)
    if spread and not (targets == "all_ignored" and reduction == "mean"):
        (x,) = fresh(LOGITS)
        assert gradcheck(lambda x: fused(x, target), (x,), **numerical_options(backend))
        assert gradgradcheck(lambda x: fused(x, target), (x,), **numerical_options(backend))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_inplace_backward_refuses_double_backward(backend, reduction):
    target = torch.tensor(TARGETS["some_ignored"])
    (x,) = fresh(LOGITS)
    loss = fusedops.cross_entropy(x * 1, target, reduction=reduction, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="inplace_backward=True has no double backward"):
        torch.autograd.grad(loss.sum(), x, create_graph=True)
    # torch.func.grad runs its backward with create_graph: refused as well, never a wrong number
    with pytest.raises(RuntimeError, match="inplace_backward=True"):
        grad(lambda x: ce_fused(backend, reduction, inplace_backward=True)(x * 1, target).sum())(LOGITS)
    # a plain backward of the same graph is right
    loss = fusedops.cross_entropy(x * 1, target, reduction=reduction, inplace_backward=True, backend=backend)
    (got,) = torch.autograd.grad(loss.sum(), x)
    (expected,) = torch.autograd.grad(F.cross_entropy(x, target, reduction=reduction).sum(), x)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_forward_mode(backend, reduction):
    target = torch.tensor(TARGETS["some_ignored"])
    fused = lambda x: ce_fused(backend, reduction, 0.1)(x, target)
    oracle = lambda x: ce_torch(reduction, 0.1)(x, target)
    assert_forward_mode_matches(fused, oracle)


def assert_forward_mode_matches(fused, oracle):
    """jvp, jacfwd (never all zero) and dual tensors of fused at LOGITS equal oracle's."""
    tangent = randn(4, 5, seed=4)
    assert_all_close(jvp(fused, (LOGITS,), (tangent,)), jvp(oracle, (LOGITS,), (tangent,)))
    jacobian = jacfwd(fused)(LOGITS)
    assert jacobian.abs().amax() > 1e-3
    torch.testing.assert_close(jacobian, jacfwd(oracle)(LOGITS))
    duals = []
    for fn in (fused, oracle):
        with fwAD.dual_level():
            out = fwAD.unpack_dual(fn(fwAD.make_dual(LOGITS, tangent)))
            duals.append((out.primal.clone(), out.tangent.clone()))
    assert_all_close(*duals)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_torch_func(backend, reduction):
    target = torch.tensor(TARGETS["some_ignored"])
    fused = lambda x: ce_fused(backend, reduction, 0.1)(x, target)
    oracle = lambda x: ce_torch(reduction, 0.1)(x, target)
    scalar = lambda fn: lambda x: (fn(x) * torch.linspace(1, 2, 4, dtype=F64)).sum()
    cotangent = randn(4, seed=5) if reduction == "none" else torch.tensor(1.7, dtype=F64)
    for transform in (grad, hessian):
        torch.testing.assert_close(transform(scalar(fused))(LOGITS), transform(scalar(oracle))(LOGITS))
    torch.testing.assert_close(jacrev(fused)(LOGITS), jacrev(oracle)(LOGITS))
    out, pullback = vjp(fused, LOGITS)
    out_t, pullback_t = vjp(oracle, LOGITS)
    assert_all_close((out, *pullback(cotangent)), (out_t, *pullback_t(cotangent)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_vmap_each_slice_its_own_batch(backend, reduction):
    """Per-sample gradients of a loss over each slice's rows (the mean over each slice's own non-ignored
    targets), and of single rows, against a loop."""
    logits = randn(3, 4, 5, seed=6)
    target = torch.tensor([[1, 2, -100, 0], [3, 4, 0, 1], [-100, -100, 2, 2]])
    fused = lambda x, t: ce_fused(backend, reduction, 0.1)(x, t).sum()
    oracle = lambda x, t: ce_torch(reduction, 0.1)(x, t).sum()
    torch.testing.assert_close(vmap(fused)(logits, target), torch.stack([oracle(*s) for s in zip(logits, target)]))
    torch.testing.assert_close(
        vmap(grad(fused))(logits, target), torch.stack([grad(oracle)(*s) for s in zip(logits, target)])
    )
    rows, row_targets = logits[0], torch.tensor([1, 2, 3, 0])  # one sample: (V,) logits, a 0-d target
    torch.testing.assert_close(
        vmap(grad(fused))(rows, row_targets), torch.stack([grad(oracle)(*s) for s in zip(rows, row_targets)])
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_autocast_dtypes(backend, dtype):
    target = torch.tensor(TARGETS["some_ignored"])
    results = []
    for fn in (ce_fused(backend, "mean"), ce_torch("mean")):
        (x,) = fresh(LOGITS.to(dtype))
        with torch.autocast("cpu", torch.bfloat16):
            loss = fn(x, target)
        (g,) = torch.autograd.grad(loss, x)
        results.append((loss, g))
    (loss, g), (loss_t, g_t) = results
    assert (loss.dtype, g.dtype) == (loss_t.dtype, g_t.dtype) == (torch.float32, dtype)
    torch.testing.assert_close(loss, loss_t)
    torch.testing.assert_close(g, g_t)


@pytest.mark.parametrize("kind", ["class", "probs"])
def test_cross_entropy_options_autocast(backend, kind):
    """bf16 logits, class weights and probability targets under autocast: fp32 loss and lse, as torch's loss."""
    target = CE_PROBS.bfloat16() if kind == "probs" else torch.tensor(TARGETS["some_ignored"])
    weight = CE_WEIGHT.bfloat16()
    results = []
    for fn in (
        lambda x: fusedops.cross_entropy(x, target, weight, label_smoothing=0.1, backend=backend),
        lambda x: F.cross_entropy(x, target, weight, label_smoothing=0.1),
    ):
        (x,) = fresh(LOGITS.bfloat16())
        with torch.autocast("cpu", torch.bfloat16):
            loss = fn(x)
        (g,) = torch.autograd.grad(loss, x)
        results.append((loss, g))
    (loss, g), (loss_t, g_t) = results
    assert (loss.dtype, g.dtype) == (loss_t.dtype, g_t.dtype) == (torch.float32, torch.bfloat16)
    torch.testing.assert_close(loss, loss_t)
    torch.testing.assert_close(g, g_t)
    with torch.autocast("cpu", torch.bfloat16):
        _, lse = fusedops.cross_entropy(LOGITS.bfloat16(), target, weight, return_lse=True, backend=backend)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("upstream", [1.0, 2.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_gradients_are_never_aliased(backend, reduction, upstream):
    target = torch.tensor(TARGETS["some_ignored"])
    (x,) = fresh(LOGITS)
    loss = fusedops.cross_entropy(x, target, reduction=reduction, backend=backend)
    go = torch.full_like(loss, upstream)
    (expected,) = torch.autograd.grad(F.cross_entropy(x, target, reduction=reduction), x, go)
    (first,) = torch.autograd.grad(loss, x, go, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, go, retain_graph=True)
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, expected)
    exact = first.clone()
    torch.testing.assert_close(second, exact, rtol=0, atol=0)
    first.mul_(3)  # a change of the first is not seen by the second, nor makes a later call raise
    torch.testing.assert_close(second, exact, rtol=0, atol=0)
    (third,) = torch.autograd.grad(loss, x, go, retain_graph=True)
    torch.testing.assert_close(third, exact, rtol=0, atol=0)
    loss.backward(go)  # the last, plain backward
    torch.testing.assert_close(x.grad, exact, rtol=0, atol=0)
    assert x.grad.data_ptr() not in (first.data_ptr(), second.data_ptr(), third.data_ptr())


CODES = {0: "none", 1: "mean", 2: "sum"}  # CrossEntropyFunction's reduction argument


def ce_function(
    x,
    target,
    code,
    backend,
    weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    """CrossEntropyFunction.apply: (loss, G, lse) of 2-D logits, not in place."""
    options = fusedops.CrossEntropyOptions(
        code, ignore_index, label_smoothing, z_loss, softcap, return_lse, False, backend
    )
    return fusedops.CrossEntropyFunction.apply(x, target, weight, options)


@pytest.mark.parametrize("code", list(CODES))
def test_cross_entropy_function_output_not_changed_by_backward(backend, code):
    """CrossEntropyFunction.apply returns (loss, G); a plain backward of the loss, with an upstream
    gradient that is not 1, leaves the G the caller holds as it was, and x.grad is not G."""
    target = torch.tensor([1, 2, 4, 0])
    (x,) = fresh(LOGITS)
    loss, G, lse = ce_function(x, target, code, backend)
    assert lse.dtype == F64 and lse.shape == (4,)
    torch.testing.assert_close(lse, torch.logsumexp(LOGITS, 1))
    G_before = G.detach().clone()
    loss.backward(torch.full_like(loss, 2.5))
    torch.testing.assert_close(G.detach(), G_before, rtol=0, atol=0)
    assert x.grad.data_ptr() != G.data_ptr()


@pytest.mark.parametrize("code", list(CODES))
def test_cross_entropy_function_both_outputs_differentiated(backend, code):
    """The loss and its gradient G (CrossEntropyFunction's second output) both in what is differentiated,
    with an upstream gradient that is not 1, by a plain backward: PyTorch's gradient."""
    target = torch.tensor([1, 2, 4, 0])
    weights = randn(4, 5, seed=7)
    (x,) = fresh(LOGITS)
    loss, G, _ = ce_function(x, target, code, backend)
    (2.5 * loss.sum() + (G * weights).sum()).backward()
    (x_t,) = fresh(LOGITS)
    loss_t = F.cross_entropy(x_t, target, reduction=CODES[code])
    (G_t,) = torch.autograd.grad(loss_t.sum(), x_t, create_graph=True)
    (2.5 * loss_t.sum() + (G_t * weights).sum()).backward()
    torch.testing.assert_close(x.grad, x_t.grad)


@pytest.mark.parametrize("option", ["weight_probs", "z_loss_softcap"])
def test_cross_entropy_function_options(backend, option):
    """CrossEntropyFunction with the new options: G is the loss's gradient (times nothing), lse the rows'
    logsumexp of the soft-capped logits in the accumulation dtype, and both differentiate as the composite."""
    target, kw = (
        (CE_PROBS, dict(weight=CE_WEIGHT, label_smoothing=0.1))
        if option == "weight_probs"
        else (torch.tensor(TARGETS["some_ignored"]), dict(z_loss=0.1, softcap=1.5, label_smoothing=0.1))
    )
    weights = randn(4, 5, seed=7)
    (x,) = fresh(LOGITS)
    loss, G, lse = ce_function(x, target, 1, backend, return_lse=True, **kw)
    (x_t,) = fresh(LOGITS)
    loss_t, lse_t = composite(x_t, target, return_lse=True, **kw)
    (G_t,) = torch.autograd.grad(loss_t, x_t, create_graph=True)
    assert_all_close((loss, G, lse), (loss_t, G_t, lse_t))
    (2.5 * loss + (G * weights).sum() + lse.square().sum()).backward()
    (2.5 * loss_t + (G_t * weights).sum() + lse_t.square().sum()).backward()
    torch.testing.assert_close(x.grad, x_t.grad)


# the new options (class weights, probability targets, z-loss, soft-capping, the logsumexp output) against the
# composite of torch ops, on the 4 x 5 float64 logits
CE_WEIGHT = torch.rand(5, generator=torch.Generator().manual_seed(60), dtype=F64) + 0.5
CE_PROBS = torch.softmax(randn(4, 5, seed=61) * 2, 1)
CE_OPTIONS = {
    "weight": dict(weight=True, label_smoothing=0.1),
    "probs": dict(kind="probs", weight=True, label_smoothing=0.1),
    "z_loss": dict(z_loss=0.1),
    "softcap": dict(softcap=1.5, weight=True),
    "all": dict(weight=True, label_smoothing=0.1, z_loss=0.1, softcap=1.5),
    "probs_all": dict(kind="probs", label_smoothing=0.1, z_loss=0.1, softcap=1.5),
}


def ce_options(option, backend, reduction, return_lse=False):
    """(fusedops' x -> output, the composite's) for one of CE_OPTIONS; with return_lse the output is the loss
    (flattened) and the lse concatenated, so that one tensor holds both."""
    kw = dict(CE_OPTIONS[option])
    target = CE_PROBS if kw.pop("kind", "class") == "probs" else torch.tensor(TARGETS["some_ignored"])
    if kw.pop("weight", False):
        kw["weight"] = CE_WEIGHT

    def of(fn):
        def output(x, target=target):
            out = fn(x, target, reduction=reduction, return_lse=return_lse, **kw)
            return torch.cat([out[0].reshape(-1), out[1].reshape(-1)]) if return_lse else out

        return output

    return of(lambda *a, **k: fusedops.cross_entropy(*a, **k, backend=backend)), of(composite)


# the C++ kernels: every option, reduction and lse; the interpreter: a spread
CE_GRID = [
    (b, o, r, lse)
    for o in CE_OPTIONS
    for r in REDUCTIONS
    for lse in (False, True)
    for b in BACKENDS
    if b == "cpp" or (list(CE_OPTIONS).index(o) + REDUCTIONS.index(r) + lse) % 4 == 0
]


@pytest.mark.parametrize("backend,option,reduction,return_lse", CE_GRID)
def test_cross_entropy_options_double_backward(backend, option, reduction, return_lse):
    fused, oracle = ce_options(option, backend, reduction, return_lse)
    results = []
    for fn in (fused, oracle):
        (x,) = fresh(LOGITS)
        out = fn(x)
        (g,) = fresh(randn(*out.shape, seed=2) + 1.5)
        results.append((out.detach(), *second_derivatives(out, [x], g, [randn(4, 5, seed=3)])))
    (out, first, second), (out_t, first_t, second_t) = results
    assert_all_close([out, *first, *second], [out_t, *first_t, *second_t])
    assert second[0].abs().amax() > 1e-3 and second[1].abs().amax() > 1e-3  # never a silent zero
    (x,) = fresh(LOGITS)
    assert gradcheck(fused, (x,), **numerical_options(backend))
    assert gradgradcheck(fused, (x,), **numerical_options(backend))


@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_cross_entropy_options_forward_mode(backend, option):
    """jvp, jacfwd and dual tensors of the loss and the lse."""
    for reduction in ("mean", "none"):
        assert_forward_mode_matches(*ce_options(option, backend, reduction, return_lse=True))


@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_cross_entropy_options_torch_func(backend, option):
    """grad and hessian of a scalar of the loss and the lse, jacrev and vjp."""
    for reduction in ("mean", "none"):
        fused, oracle = ce_options(option, backend, reduction, return_lse=True)
        n = 5 if reduction == "mean" else 8
        scalar = lambda fn: lambda x: (fn(x) * torch.linspace(1, 2, n, dtype=F64)).sum()
        for transform in (grad, hessian):
            torch.testing.assert_close(transform(scalar(fused))(LOGITS), transform(scalar(oracle))(LOGITS))
        torch.testing.assert_close(jacrev(fused)(LOGITS), jacrev(oracle)(LOGITS))
        cotangent = randn(n, seed=5)
        out, pullback = vjp(fused, LOGITS)
        out_t, pullback_t = vjp(oracle, LOGITS)
        assert_all_close((out, *pullback(cotangent)), (out_t, *pullback_t(cotangent)))


@pytest.mark.parametrize("option", list(CE_OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_options_vmap_each_slice_its_own_batch(backend, option, reduction):
    """Per-slice losses, lse and gradients (the weighted mean over each slice's own kept targets), against a
    loop; probability targets mapped with the logits."""
    fused, oracle = ce_options(option, backend, reduction, return_lse=True)
    logits = randn(3, 4, 5, seed=6)
    if CE_OPTIONS[option].get("kind") == "probs":
        target = torch.softmax(randn(3, 4, 5, seed=62), 2)
    else:
        target = torch.tensor([[1, 2, -100, 0], [3, 4, 0, 1], [-100, -100, 2, 2]])
    n = 5 if reduction == "mean" else 8  # the loss (flattened) and the lse
    scalar = lambda fn: lambda x, t: (fn(x, t) * torch.linspace(1, 2, n, dtype=F64)).sum()
    torch.testing.assert_close(vmap(fused)(logits, target), torch.stack([oracle(*s) for s in zip(logits, target)]))
    torch.testing.assert_close(
        vmap(grad(scalar(fused)))(logits, target), torch.stack([grad(scalar(oracle))(*s) for s in zip(logits, target)])
    )


def test_cross_entropy_vmap_over_class_weights(backend):
    """A batched weight: each slice its own class weights."""
    logits, target = randn(2, 4, 5, seed=63), torch.tensor([[1, 2, -100, 0], [3, 4, 0, 1]])
    weights = torch.rand(2, 5, generator=torch.Generator().manual_seed(64), dtype=F64) + 0.5
    kw = dict(label_smoothing=0.1, z_loss=0.1)
    fused = lambda x, t, w: fusedops.cross_entropy(x, t, w, **kw, backend=backend)
    oracle = lambda x, t, w: composite(x, t, w, **kw)
    torch.testing.assert_close(
        vmap(fused)(logits, target, weights), torch.stack([oracle(*s) for s in zip(logits, target, weights)])
    )
    torch.testing.assert_close(
        vmap(grad(fused))(logits, target, weights),
        torch.stack([grad(oracle)(*s) for s in zip(logits, target, weights)]),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_probability_target_gradient(backend, reduction):
    """Probability targets that require grad get PyTorch's gradient (d loss / d q = -(1-eps) w log p), to the
    second derivative."""
    kw = dict(weight=CE_WEIGHT, label_smoothing=0.1, reduction=reduction, z_loss=0.1, softcap=1.5)
    results = []
    for fn in (lambda x, q: fusedops.cross_entropy(x, q, backend=backend, **kw), lambda x, q: composite(x, q, **kw)):
        x, q = fresh(LOGITS, CE_PROBS)
        out = fn(x, q)
        (g,) = fresh(randn(*out.shape, seed=2) + 1.5)
        results.append((out.detach(), *second_derivatives(out, [x, q], g, [randn(4, 5, seed=3), randn(4, 5, seed=8)])))
    (out, first, second), (out_t, first_t, second_t) = results
    assert_all_close([out, *first, *second], [out_t, *first_t, *second_t])
    assert first[1].abs().amax() > 1e-3
    x, q = fresh(LOGITS, CE_PROBS)
    fn = lambda x, q: fusedops.cross_entropy(x, q, backend=backend, **kw)
    assert gradcheck(fn, (x, q), **numerical_options(backend))
    if backend == "cpp":
        assert gradgradcheck(fn, (x, q))


# --- batch norm ------------------------------------------------------------------------------------

# (input shape, training, affine, unbiased); unbiased changes nothing in eval
BN_OPTIONS = [
    (shape, True, affine, unbiased)
    for shape in [(6, 3), (4, 3, 2)]
    for affine in (True, False)
    for unbiased in (False, True)
] + [(shape, False, affine, False) for shape in [(6, 3), (4, 3, 2)] for affine in (True, False)]
RUNNING_MEAN, RUNNING_VAR = (
    randn(3, seed=10),
    torch.rand(3, generator=torch.Generator().manual_seed(11), dtype=F64) + 0.5,
)


def bn_id(option):
    shape, training, affine, unbiased = option
    return (
        f"{len(shape)}d-{'train' if training else 'eval'}-{'affine' if affine else 'plain'}"
        f"{'-unbiased' if unbiased else ''}"
    )


def bn_composite(x, weight, bias, training, unbiased):
    """Batch norm in torch ops, the oracle for unbiased=True: y = (x - mean) / sqrt(var + eps) * w + b."""
    dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
    if training:
        mean, var = x.mean(dims, keepdim=True), x.var(dims, keepdim=True, correction=1 if unbiased else 0)
    else:
        mean, var = RUNNING_MEAN.view(shape), RUNNING_VAR.view(shape)
    y = (x - mean) * torch.rsqrt(var + EPS)
    y = y if weight is None else y * weight.view(shape)
    return y if bias is None else y + bias.view(shape)


def bn_fused(backend, training, unbiased, running=(RUNNING_MEAN, RUNNING_VAR)):
    running = (None, None) if training else running
    return lambda x, w, b: fusedops.batch_norm(
        x, *running, w, b, training=training, eps=EPS, unbiased=unbiased, backend=backend
    )


def bn_oracle(training, unbiased, running=(RUNNING_MEAN, RUNNING_VAR)):
    if unbiased:
        return lambda x, w, b: bn_composite(x, w, b, training, unbiased)
    running = (None, None) if training else running
    return lambda x, w, b: F.batch_norm(x, *running, w, b, training=training, eps=EPS)


def bn_inputs(shape, affine, seed=20):
    weight, bias = (randn(3, seed=seed + 1) + 1.5, randn(3, seed=seed + 2)) if affine else (None, None)
    return randn(*shape, seed=seed), weight, bias


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_composite_oracle_is_torch(shape, training):
    """The unbiased=True oracle, with unbiased=False, is F.batch_norm, to the second derivative."""
    x0, w0, b0 = bn_inputs(shape, True)
    u, directions = randn(*shape, seed=22), [randn(*shape, seed=23), randn(3, seed=24), randn(3, seed=25)]
    results = []
    for fn in (lambda *a: bn_composite(*a, training, False), bn_oracle(training, False)):
        leaves, (g,) = fresh(x0, w0, b0), fresh(u)
        out = fn(*leaves)
        results.append([out.detach(), *sum(second_derivatives(out, leaves, g, directions), [])])
    assert_all_close(*results)


@pytest.mark.parametrize("option", BN_OPTIONS, ids=bn_id)
def test_batch_norm_double_backward(backend, option):
    shape, training, affine, unbiased = option
    fused, oracle = bn_fused(backend, training, unbiased), bn_oracle(training, unbiased)
    x0, w0, b0 = bn_inputs(shape, affine)
    u, directions = randn(*shape, seed=22), [randn(*shape, seed=23), randn(3, seed=24), randn(3, seed=25)]
    results = []
    for fn in (fused, oracle):
        x, w, b = fresh(x0, w0, b0)
        (g,) = fresh(u)
        leaves = [t for t in (x, w, b) if t is not None]
        out = fn(x, w, b)
        results.append((out.detach(), *second_derivatives(out, leaves, g, directions[: len(leaves)])))
    (out, first, second), (out_t, first_t, second_t) = results
    assert_all_close([out, *first, *second], [out_t, *first_t, *second_t])
    # never a silent zero: in training d dx / dx, in eval (where it is 0) d dx / d upstream
    assert second[0 if training else -1].abs().amax() > 1e-3
    if affine:  # d dweight / dx = sum(u * d xhat / dx)
        assert second[0].abs().amax() > 1e-3
    if backend == "cpp" or option in BN_OPTIONS[::3]:  # numerical checks: a spread of options on the interpreter
        leaves = fresh(*(t for t in (x0, w0, b0) if t is not None))
        fn = (lambda x, w, b: fused(x, w, b)) if affine else (lambda x: fused(x, None, None))
        assert gradcheck(fn, leaves, **numerical_options(backend))
        assert gradgradcheck(fn, leaves, **numerical_options(backend))


@pytest.mark.parametrize("option", BN_OPTIONS, ids=bn_id)
def test_batch_norm_forward_mode(backend, option):
    """jvp, jacfwd and dual tensors with respect to the input, the weight and the bias."""
    shape, training, affine, unbiased = option
    fused, oracle = bn_fused(backend, training, unbiased), bn_oracle(training, unbiased)
    if not affine:
        fused, oracle = (lambda x, fn=fused: fn(x, None, None)), (lambda x, fn=oracle: fn(x, None, None))
    primals = bn_inputs(shape, True)[: 3 if affine else 1]
    tangents = (randn(*shape, seed=30), randn(3, seed=31), randn(3, seed=32))[: len(primals)]
    assert_all_close(jvp(fused, primals, tangents), jvp(oracle, primals, tangents))
    for argnum in range(len(primals)):
        jacobian = jacfwd(fused, argnums=argnum)(*primals)
        assert jacobian.abs().amax() > 1e-3
        torch.testing.assert_close(jacobian, jacfwd(oracle, argnums=argnum)(*primals))
    duals = []
    for fn in (fused, oracle):
        with fwAD.dual_level():
            out = fwAD.unpack_dual(fn(*map(fwAD.make_dual, primals, tangents)))
            duals.append((out.primal.clone(), out.tangent.clone()))
    assert_all_close(*duals)


def bn_scalar(fn):
    """A scalar of batch norm's output whose Hessian is not zero."""
    return lambda x, w, b: (fn(x, w, b).pow(3) * torch.linspace(-1, 2, x.shape[-1], dtype=F64)).sum()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "hessian"])
def test_batch_norm_torch_func(backend, training, transform):
    fused, oracle = bn_fused(backend, training, False), bn_oracle(training, False)
    if transform == "hessian":  # F.batch_norm's own Hessian is wrong under torch.func in training (d2/dw dx;
        # its backward's batching rule, pytorch/functorch#534): batch norm in torch ops instead
        oracle = lambda x, w, b: bn_composite(x, w, b, training, False)
    primals = bn_inputs((4, 3, 2), True)
    if transform == "vjp":
        cotangent = randn(4, 3, 2, seed=33)
        (out, pullback), (out_t, pullback_t) = vjp(fused, *primals), vjp(oracle, *primals)
        assert_all_close((out, *pullback(cotangent)), (out_t, *pullback_t(cotangent)))
    elif transform == "jacrev":
        assert_all_close(jacrev(fused, argnums=(0, 1, 2))(*primals), jacrev(oracle, argnums=(0, 1, 2))(*primals))
    else:
        of = {"grad": grad, "hessian": hessian}[transform]
        got = of(bn_scalar(fused), argnums=(0, 1, 2))(*primals)
        torch.testing.assert_close(got, of(bn_scalar(oracle), argnums=(0, 1, 2))(*primals))


@pytest.mark.parametrize("weight_batched", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2)])
def test_batch_norm_vmap_training_each_slice_its_own_batch(backend, shape, weight_batched):
    xs, weights, bias = randn(2, *shape, seed=40), randn(2, 3, seed=41), randn(3, seed=42)
    fused = lambda x, w: fusedops.batch_norm(x, None, None, w, bias, training=True, backend=backend)
    oracle = lambda x, w: F.batch_norm(x, None, None, w, bias, training=True)
    if weight_batched:
        got, expected = vmap(fused)(xs, weights), torch.stack([oracle(x, w) for x, w in zip(xs, weights)])
    else:
        got = vmap(fused, in_dims=(0, None))(xs, weights[0])
        expected = torch.stack([oracle(x, weights[0]) for x in xs])
    torch.testing.assert_close(got, expected)
    # the mapped dimension elsewhere than first
    torch.testing.assert_close(
        vmap(fused, in_dims=(1, None))(xs.movedim(0, 1), weights[0]), torch.stack([oracle(x, weights[0]) for x in xs])
    )


def test_per_sample_gradients_of_a_tiny_model(backend):
    """vmap(grad(...)) of a linear layer, batch norm in eval, another linear layer and cross-entropy,
    one sample at a time, against a loop over PyTorch's ops."""
    g = torch.Generator().manual_seed(50)
    params = [
        torch.randn(4, 3, generator=g, dtype=F64),
        torch.randn(3, generator=g, dtype=F64) + 1,
        torch.randn(3, generator=g, dtype=F64),
        torch.randn(3, 5, generator=g, dtype=F64),
    ]
    inputs, targets = torch.randn(6, 4, generator=g, dtype=F64), torch.tensor([0, 4, 2, -100, 1, 3])

    def model(norm, loss):
        def f(params, x, t):
            w1, gamma, beta, w2 = params
            h = norm((x @ w1).unsqueeze(0), RUNNING_MEAN, RUNNING_VAR, gamma, beta, training=False)
            return loss(h.squeeze(0) @ w2, t, label_smoothing=0.1, reduction="sum")

        return f

    fused = model(
        lambda *a, **k: fusedops.batch_norm(*a, **k, backend=backend),
        lambda *a, **k: fusedops.cross_entropy(*a, **k, backend=backend),
    )
    oracle = model(F.batch_norm, F.cross_entropy)
    per_sample = vmap(grad(fused), in_dims=(None, 0, 0))(params, inputs, targets)
    loop = [grad(oracle)(params, x, t) for x, t in zip(inputs, targets)]
    assert_all_close(per_sample, [torch.stack(parts) for parts in zip(*loop)])
    assert per_sample[0][3].abs().amax() == 0 and per_sample[0][0].abs().amax() > 1e-3  # an ignored sample


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_norm_autocast_dtypes(backend, dtype, training):
    x0, w0, b0 = (t.float() for t in bn_inputs((6, 3), True))
    running = (RUNNING_MEAN.float(), RUNNING_VAR.float())
    results = []
    for fn in (bn_fused(backend, training, False, running), bn_oracle(training, False, running)):
        x, w, b = fresh(x0.to(dtype), w0, b0)
        with torch.autocast("cpu", torch.bfloat16):
            y = fn(x, w, b)
        grads = torch.autograd.grad(y.float().square().sum(), (x, w, b))
        results.append((y, *grads))
    (y, *grads), (y_t, *grads_t) = results
    assert (
        [t.dtype for t in (y, *grads)]
        == [t.dtype for t in (y_t, *grads_t)]
        == [dtype, dtype, torch.float32, torch.float32]
    )
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    assert_all_close((y, *grads), (y_t, *grads_t), **tol)


# --- errors a drop-in user can catch ---------------------------------------------------------------

# bad inputs the shared tables (tests/cases) do not hold: (what replaces the good arguments, the exception,
# a pattern naming the argument)
BN_EXTRA_BAD_INPUTS = {
    "wrong_running_var": ({"running_var": torch.ones(5)}, ValueError, r"running_var has shape \(5,\)"),
    "wrong_bias": ({"bias": torch.zeros(3)}, ValueError, r"bias has shape \(3,\)"),
}
# torch raises these by design; anything else (an AttributeError from a list where a tensor goes) is no
# contract of PyTorch's
TORCH_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
FUSEDOPS_ERRORS = (errors.ArgumentValueError, errors.ArgumentTypeError, errors.ArgumentIndexError)


def raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the point is which class)
        return e
    return None


def assert_catchable_like_torch(torch_error, fused_error, expected, message):
    """fusedops raises its own class, naming the argument, and where torch raises by design, an instance of
    torch's class."""
    assert isinstance(fused_error, FUSEDOPS_ERRORS) and isinstance(fused_error, expected), repr(fused_error)
    assert re.search(message, str(fused_error)), str(fused_error)
    if isinstance(torch_error, TORCH_ERRORS):
        assert isinstance(fused_error, type(torch_error)), (
            f"torch raises {type(torch_error).__name__} ({torch_error}), fusedops {type(fused_error).__mro__}"
        )


@pytest.mark.parametrize("api", ["function", "module"])
@pytest.mark.parametrize("case", list(ce_cases.BAD_INPUTS))
def test_cross_entropy_errors_catchable_like_torch(case, backend, api):
    replace, expected, message = ce_cases.BAD_INPUTS[case]
    kw = ce_cases.good_arguments() | replace
    logits, target = kw.pop("input"), kw.pop("target")
    if isinstance(logits, torch.Tensor) and logits.is_floating_point():
        logits = logits.detach().requires_grad_()  # so that in place is really asked for (strides kept)
    torch_kw = {
        k: v for k, v in kw.items() if k not in ("backend", "inplace_backward", "z_loss", "softcap", "return_lse")
    }
    torch_error = None
    if torch_kw.keys() == kw.keys():  # only arguments torch has
        torch_error = raised(
            lambda: (
                F.cross_entropy(logits, target, **torch_kw)
                if api == "function"
                else torch.nn.CrossEntropyLoss(**torch_kw)(logits, target)
            )
        )
    kw.setdefault("backend", backend)
    fused_error = raised(
        lambda: (
            fusedops.cross_entropy(logits, target, **kw)
            if api == "function"
            else fusedops.CrossEntropyLoss(**kw)(logits, target)
        )
    )
    assert_catchable_like_torch(torch_error, fused_error, expected, message)


@pytest.mark.parametrize("case", list(ce_cases.TARGETS_OUT_OF_RANGE))
def test_cross_entropy_target_out_of_range_catchable_like_torch(case):
    """The C++ kernel's eager check (the Triton kernel's device-side one is in test_host_sync.py)."""
    replace, message = ce_cases.TARGETS_OUT_OF_RANGE[case]
    kw = ce_cases.good_arguments() | replace
    logits, target = kw.pop("input"), kw.pop("target")
    logits.requires_grad_()
    torch_kw = {k: v for k, v in kw.items() if k != "inplace_backward"}
    # int32 targets are fusedops' extension: torch is asked with the same indices as int64
    torch_error = raised(lambda: F.cross_entropy(logits, target.long(), **torch_kw))
    fused_error = raised(
        lambda: fusedops.cross_entropy(logits.detach().requires_grad_() * 1, target, **kw, backend="cpp")
    )
    assert isinstance(torch_error, IndexError) and isinstance(fused_error, IndexError), repr(fused_error)
    assert re.search(message, str(fused_error)), str(fused_error)


@pytest.mark.parametrize("case", list(bn_cases.BAD_INPUTS) + list(BN_EXTRA_BAD_INPUTS))
def test_batch_norm_errors_catchable_like_torch(case, backend):
    replace, expected, message = (bn_cases.BAD_INPUTS | BN_EXTRA_BAD_INPUTS)[case]
    args = {
        "input": torch.randn(8, 4),
        "running_mean": torch.randn(4),
        "running_var": torch.rand(4) + 0.5,
        "weight": torch.ones(4),
        "bias": torch.zeros(4),
        "training": True,
        "momentum": 0.1,
        "eps": 1e-5,
    } | replace
    torch_error = None
    if not {"backend", "residual", "activation"} & set(args):  # an argument torch has
        torch_error = raised(lambda: F.batch_norm(**args))
    args.setdefault("backend", backend)
    assert_catchable_like_torch(torch_error, raised(lambda: fusedops.batch_norm(**args)), expected, message)


@pytest.mark.parametrize("case", list(bn_cases.MODULE_BAD_INPUTS))
def test_batch_norm_module_errors_catchable_like_torch(case, backend):
    kwargs, input, expected, message = bn_cases.MODULE_BAD_INPUTS[case]
    torch_error = raised(lambda: torch.nn.BatchNorm1d(4, **kwargs)(input))
    fused_error = raised(lambda: fusedops.BatchNorm1d(4, **kwargs, backend=backend)(input))
    assert_catchable_like_torch(torch_error, fused_error, expected, message)
