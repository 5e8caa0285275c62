"""Every autograd Function's tensor inputs, one at a time, in both modes of AD: each gives the right derivative
(gradcheck against finite differences, float64) or raises a clear error. None may drop a gradient or a tangent
in silence. Then the defects this walk is there to keep out, each on its own."""

import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from processes import run_ok
from torch.autograd.gradcheck import GradcheckError

import fusedops

F64 = torch.float64
NOT_DIFFERENTIABLE = r"not differentiable with respect to"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ce_case(backend):
    """CrossEntropyFunction with probability targets, class weights and every option a derivative sees."""
    g = gen(1)
    inputs = {
        "logits": torch.randn(3, 4, generator=g, dtype=F64),
        "target": torch.softmax(torch.randn(3, 4, generator=g, dtype=F64), 1),
        "weight": torch.rand(4, generator=g, dtype=F64) + 0.5,
    }

    def fn(logits, target, weight):
        options = fusedops.CrossEntropyOptions(
            reduction=1, label_smoothing=0.1, z_loss=0.05, softcap=2.0, return_lse=True, backend=backend
        )
        return fusedops.CrossEntropyFunction.apply(logits, target, weight, options)

    return fn, inputs


def lce_case(backend):
    """LinearCrossEntropyFunction with probability targets, a bias and class weights, in two chunks."""
    g = gen(2)
    inputs = {
        "input": torch.randn(4, 3, generator=g, dtype=F64),
        "weight": torch.randn(5, 3, generator=g, dtype=F64),
        "bias": torch.randn(5, generator=g, dtype=F64),
        "target": torch.softmax(torch.randn(4, 5, generator=g, dtype=F64), 1),
        "class_weight": torch.rand(5, generator=g, dtype=F64) + 0.5,
    }

    def fn(input, weight, bias, target, class_weight):
        options = fusedops.LinearLossOptions(
            reduction=1,
            label_smoothing=0.1,
            z_loss=0.05,
            softcap=2.0,
            return_lse=True,
            chunk_bytes=2 * 5 * 8,  # two chunks
            backend=backend,
        )
        return fusedops.LinearCrossEntropyFunction.apply(input, weight, bias, target, class_weight, options)

    return fn, inputs


def bn_case(backend, training):
    """BatchNormFunction with a residual and relu, in training or eval."""
    g = gen(3)
    inputs = {
        "input": torch.randn(4, 3, 2, generator=g, dtype=F64),
        "weight": torch.rand(3, generator=g, dtype=F64) + 0.5,
        "bias": torch.randn(3, generator=g, dtype=F64),
        "running_mean": torch.randn(3, generator=g, dtype=F64),
        "running_var": torch.rand(3, generator=g, dtype=F64) + 0.5,
        "residual": torch.randn(4, 3, 2, generator=g, dtype=F64),
    }

    def fn(input, weight, bias, running_mean, running_var, residual):
        options = fusedops.BatchNormOptions(training=training, activation=1, backend=backend)
        return fusedops.BatchNormFunction.apply(input, weight, bias, running_mean, running_var, residual, options)[0]

    return fn, inputs


CASES = {
    "cross_entropy": ce_case,
    "linear_cross_entropy": lce_case,
    "batch_norm_training": lambda backend: bn_case(backend, True),
    "batch_norm_eval": lambda backend: bn_case(backend, False),
}
# (case, input) that must raise: the ops are not differentiable with respect to them, as in PyTorch, and their
# output depends on them (in training, batch norm's output does not depend on the running statistics: a zero
# tangent is the right one there)
RAISES = {
    ("cross_entropy", "weight"),
    ("linear_cross_entropy", "class_weight"),
    ("batch_norm_eval", "running_mean"),
    ("batch_norm_eval", "running_var"),
    ("batch_norm_training", "running_mean", "backward"),
    ("batch_norm_training", "running_var", "backward"),
}


def derivative_check(fn, inputs, name, mode):
    """gradcheck of fn with respect to inputs[name] alone, in backward or forward mode: None when it passes,
    else the exception raised."""

    def of(t):
        return fn(**(inputs | {name: t}))

    x = inputs[name].clone().requires_grad_()
    forward = mode == "forward"
    try:
        torch.autograd.gradcheck(
            of,
            (x,),
            check_forward_ad=forward,
            check_backward_ad=not forward,
            check_undefined_grad=False,
            check_batched_grad=False,
        )
    except GradcheckError:
        raise  # a wrong derivative: the failure this test is for
    except RuntimeError as e:
        return e
    return None


@pytest.mark.parametrize("mode", ["backward", "forward"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_input_gives_its_derivative_or_raises(case, backend, mode):
    fn, inputs = CASES[case](backend)
    for name in inputs:
        error = derivative_check(fn, inputs, name, mode)
        must_raise = (case, name) in RAISES or (case, name, mode) in RAISES
        if must_raise:
            assert error is not None and re.search(NOT_DIFFERENTIABLE, str(error)), (name, error)
            assert name in str(error)
        else:
            assert error is None, (name, error)


def _sync_batch_norm_derivatives(rank, world):
    """In a one-process group: SyncBatchNormFunction's backward with respect to each input, and its forward
    mode, which it does not have (a clear error)."""
    group = torch.distributed.group.WORLD
    g = gen(4)
    inputs = {
        "input": torch.randn(4, 3, 2, generator=g, dtype=F64),
        "weight": torch.rand(3, generator=g, dtype=F64),
        "bias": torch.randn(3, generator=g, dtype=F64),
    }

    def fn(input, weight, bias):
        options = fusedops.SyncBatchNormOptions(unbiased=False, eps=1e-5, group=group, backend="cpp")
        return fusedops.SyncBatchNormFunction.apply(input, weight, bias, options)[0]

    return {
        f"{name} {mode}": str(derivative_check(fn, inputs, name, mode))
        for name in inputs
        for mode in ("backward", "forward")
    }


def test_sync_batch_norm_inputs_give_their_derivative_or_raise(tmp_path):
    (result,) = run_ok(tmp_path, 1, _sync_batch_norm_derivatives)
    for name in ("input", "weight", "bias"):
        assert result[f"{name} backward"] == "None"
        assert "jvp" in result[f"{name} forward"]  # torch's own error: no forward-mode rule


# --- the defects, each on its own ------------------------------------------------------------------


@pytest.mark.parametrize("stat", ["running_mean", "running_var"])
def test_eval_tangent_of_a_running_statistic_raises(backend, stat):
    """In eval the output depends on the running statistics, and they take no derivative (as in PyTorch): a
    tangent on one raises, through the function, the module and torch.func, instead of coming back as 0."""
    x, stats = torch.randn(3, 2, 5), {"running_mean": torch.randn(2), "running_var": torch.rand(2) + 0.5}
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=f"{NOT_DIFFERENTIABLE} {stat}"):
        dual = stats | {stat: fwAD.make_dual(stats[stat], torch.ones(2))}
        fusedops.batch_norm(
            fwAD.make_dual(x, torch.zeros_like(x)),
            dual["running_mean"],
            dual["running_var"],
            training=False,
            backend=backend,
        )
    module = fusedops.BatchNorm1d(2, backend=backend).eval()
    with pytest.raises(RuntimeError, match=f"{NOT_DIFFERENTIABLE} {stat}"):
        torch.func.jvp(lambda s: torch.func.functional_call(module, {stat: s}, (x,)), (stats[stat],), (torch.ones(2),))


def test_training_tangent_of_the_running_statistics_is_zero_as_torch(backend):
    """In training the output does not depend on them: their tangent contributes 0, as in PyTorch."""
    x, rm, rv = torch.randn(3, 2, 5, dtype=F64), torch.randn(2, dtype=F64), torch.rand(2, dtype=F64) + 0.5
    dx = torch.randn_like(x)
    tangents = []
    for fn in (F.batch_norm, lambda *a, **k: fusedops.batch_norm(*a, **k, backend=backend)):
        with fwAD.dual_level():
            out = fn(
                fwAD.make_dual(x, dx), fwAD.make_dual(rm.clone(), torch.ones(2, dtype=F64)), rv.clone(), training=True
            )
            tangents.append(fwAD.unpack_dual(out).tangent)
    torch.testing.assert_close(tangents[1], tangents[0])


@pytest.mark.parametrize("api", ["function", "module", "sync_module"])
@pytest.mark.parametrize("training", [True, False])
def test_running_statistics_that_require_grad_raise_as_torch(api, training):
    """PyTorch raises for them in both modes; so does every entry point, before the statistics are updated."""
    x = torch.randn(4, 2, 3, requires_grad=True)
    rm = torch.zeros(2, requires_grad=True)
    if api == "function":
        call = lambda: fusedops.batch_norm(x, rm, torch.ones(2), training=training)
    else:
        module = (fusedops.BatchNorm1d(2) if api == "module" else fusedops.SyncBatchNorm(2)).train(training)
        module.running_mean.requires_grad_()
        rm = module.running_mean
        call = lambda: module(x)
    with pytest.raises(RuntimeError, match=f"{NOT_DIFFERENTIABLE} running_mean"):
        call()
    assert torch.equal(rm.detach(), torch.zeros(2))
    with torch.no_grad():  # no gradient asked for: no error, as in PyTorch
        call()


@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1, "reduction": "none"}, {"weight": True, "z_loss": 0.05, "softcap": 2.0}]
)
def test_forward_mode_through_probability_targets(backend, options):
    """torch.func.jvp with respect to the logits and probability targets that do not require grad, and a dual
    target, against PyTorch's (the z-loss and softcap against the composition of torch ops)."""
    from cases.cross_entropy import composite

    g = gen(5)
    x, dx = torch.randn(4, 5, generator=g, dtype=F64), torch.randn(4, 5, generator=g, dtype=F64)
    q, dq = torch.softmax(torch.randn(4, 5, generator=g, dtype=F64), 1), torch.randn(4, 5, generator=g, dtype=F64)
    kw = options | ({"weight": torch.rand(5, generator=g, dtype=F64) + 0.5} if options.get("weight") else {})
    fused = lambda a, b: fusedops.cross_entropy(a, b, **kw, backend=backend)
    expected = lambda a, b: composite(a, b, **kw)
    out, tangent = torch.func.jvp(fused, (x, q), (dx, dq))
    out_c, tangent_c = torch.func.jvp(expected, (x, q), (dx, dq))
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(tangent, tangent_c)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(fused(x, fwAD.make_dual(q, dq))).tangent
    torch.testing.assert_close(dual, torch.func.jvp(lambda b: expected(x, b), (q,), (dq,))[1])


def test_linear_cross_entropy_forward_mode_through_probability_targets(backend):
    """A dual target (torch.func.jvp runs the Triton interpreter on functorch's wrapped tensors, which it cannot
    read: the C++ kernel only there)."""
    g = gen(6)
    x, W = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    q, dq = torch.softmax(torch.randn(6, 5, generator=g, dtype=F64), 1), torch.randn(6, 5, generator=g, dtype=F64)
    for reduction in ("mean", "none"):
        fused = lambda b: fusedops.linear_cross_entropy(
            x,
            W,
            b,
            reduction=reduction,
            label_smoothing=0.1,
            chunk_bytes=2 * 5 * 8,
            backend=backend,
        )
        expected = lambda b: F.cross_entropy(x @ W.t(), b, reduction=reduction, label_smoothing=0.1)
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(fused(fwAD.make_dual(q, dq))).tangent
        torch.testing.assert_close(dual, torch.func.jvp(expected, (q,), (dq,))[1])
        if backend == "cpp":
            torch.testing.assert_close(torch.func.jvp(fused, (q,), (dq,))[1], dual)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_a_tangent_on_the_class_weights_raises(op):
    """PyTorch drops it silently; fusedops raises."""
    x, t, w = torch.randn(4, 5, dtype=F64), torch.tensor([0, 4, -100, 2]), torch.rand(5, dtype=F64)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=NOT_DIFFERENTIABLE):
        dual = fwAD.make_dual(w, torch.ones(5, dtype=F64))
        if op == "cross_entropy":
            fusedops.cross_entropy(fwAD.make_dual(x, torch.ones_like(x)), t, dual)
        else:
            fusedops.linear_cross_entropy(
                fwAD.make_dual(x, torch.ones_like(x)), torch.eye(5, dtype=F64), t, class_weight=dual
            )
