"""Bad input raises an exception that names the argument, before anything is written; edge input
(empty, non-finite, extreme, strided) gives PyTorch's numbers, or ones closer to float64."""

from functools import partial

import cases
import pytest
import torch
import torch.nn.functional as F
from cases import batch_norm as bn_cases
from cases import cross_entropy as ce_cases
from conftest import assert_all_close, forward_and_grads, loss_and_grad

import fusedops
from fusedops import errors

INF, NAN = float("inf"), float("nan")
EXACT = {"rtol": 0, "atol": 0}

# --- every operator: its tests/cases table's bad inputs, through one runner ------------------------------

OPERATORS = cases.operators()
# (operator, case, api): each bad input through the function, and through CrossEntropyLoss, which takes the
# same arguments (batch norm's layers have their own table, MODULE_BAD_INPUTS)
REJECTS = [
    (name, case, api)
    for name, module in OPERATORS.items()
    for case in module.BAD_INPUTS
    for api in (("function", "module") if name == "cross_entropy" else ("function",))
]
FUSEDOPS_ERRORS = (errors.ArgumentValueError, errors.ArgumentTypeError, errors.ArgumentIndexError)


def snapshot(arguments):
    """Copies of the tensor arguments that hold values (not meta)."""
    return {k: v.clone() for k, v in arguments.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


@pytest.mark.parametrize("operator,case,api", REJECTS)
def test_rejects_before_writing(operator, case, api, backend):
    """The operator's exception (a fusedops error class), its message naming the operator and matching the
    case's pattern, raised before anything is written: no argument changed (in place either: the differentiable
    ones require grad), no gradient."""
    cases = OPERATORS[operator]
    replace, error, message = cases.BAD_INPUTS[case]
    arguments = cases.good_arguments() | {"backend": backend} | replace
    for name in cases.DIFFERENTIABLE:
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.is_leaf:
            arguments[name] = value.requires_grad_()
    before = snapshot(arguments)
    with pytest.raises(error, match=message) as info:
        cases.call(api, **arguments)
    assert isinstance(info.value, FUSEDOPS_ERRORS), repr(info.value)
    assert api == "module" or str(info.value).startswith(f"{operator}: "), str(info.value)  # (a layer: its name)
    for name, value in before.items():
        assert torch.equal(arguments[name].detach(), value), name  # nothing written, not even in place
        assert getattr(arguments[name], "grad", None) is None, name


# --- cross-entropy --------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["function", "module"])
@pytest.mark.parametrize("case", list(ce_cases.TARGETS_OUT_OF_RANGE))
def test_cross_entropy_cpp_rejects_targets_out_of_range_before_writing(case, api):
    replace, message = ce_cases.TARGETS_OUT_OF_RANGE[case]
    kw = ce_cases.good_arguments() | {"backend": "cpp"} | replace
    logits, target = kw.pop("input"), kw.pop("target")
    saved = logits.clone()
    with pytest.raises(IndexError, match=message):
        ce_cases.call(api, input=logits.requires_grad_(), target=target, **kw)
    assert torch.equal(logits.detach(), saved)  # nothing written, not even in place


@pytest.mark.parametrize("case", list(ce_cases.TARGETS_OUT_OF_RANGE))
def test_cross_entropy_triton_gives_nan_rows_for_targets_out_of_range(case):
    """No host read on the Triton path: under the interpreter (device asserts compiled out) the rows whose
    target is out of range get a NaN loss and gradient, the others their right values."""
    replace, _ = ce_cases.TARGETS_OUT_OF_RANGE[case]
    kw = ce_cases.good_arguments() | replace
    logits, target = kw.pop("input"), kw.pop("target")
    kw.pop("inplace_backward", None)
    ignore_index = kw.get("ignore_index", -100)
    V = logits.shape[1]
    flat_target = target.reshape(-1)
    bad = (flat_target != ignore_index) & ((flat_target < 0) | (flat_target >= V))
    x = logits.detach().requires_grad_()
    loss = fusedops.cross_entropy(x, target, reduction="none", backend="triton", **kw).reshape(-1)
    loss.sum().backward()
    grad = x.grad.movedim(1, -1).reshape(-1, V)
    assert loss[bad].isnan().all() and grad[bad].isnan().all()
    safe = torch.where(bad, 0, flat_target).view(target.shape).long()
    expected = F.cross_entropy(logits, safe, kw.get("weight"), reduction="none", ignore_index=ignore_index).reshape(-1)
    torch.testing.assert_close(loss[~bad], expected[~bad].detach())


def test_cross_entropy_ops_refuse_overlapping_rows():
    fusedops._ops.load()
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.fusedops.cross_entropy_forward_inplace(
            torch.zeros(1, 6).expand(4, 6), torch.zeros(4, dtype=torch.long), None, 1, -100, 0.0, 0.0, None
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (2, 5, 0)])
def test_cross_entropy_empty_like_torch(backend, reduction, shape):
    logits, target = torch.randn(shape), torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
    loss, grad = loss_and_grad(partial(fusedops.cross_entropy, backend=backend), logits, target, reduction=reduction)
    loss_t, grad_t = loss_and_grad(F.cross_entropy, logits, target, reduction=reduction)
    torch.testing.assert_close(loss, loss_t, equal_nan=True)  # mean of nothing: nan, as PyTorch
    assert grad.shape == grad_t.shape == shape


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the interpreter's numpy on inf/NaN
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_non_finite_like_torch(backend, dtype):
    logits = torch.randn(7, 5)
    logits[0, 1] = NAN
    logits[1, 2] = INF
    logits[2, 3] = -INF  # not the target: a masked class, harmless
    logits[3, :] = -INF
    logits[4, 0] = -INF  # the target itself
    logits[5, 0], logits[5, 1] = INF, -INF
    logits = logits.to(dtype)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 4])
    for smoothing in (0.0, 0.1):
        kw = {"reduction": "none", "label_smoothing": smoothing}
        loss, grad = loss_and_grad(partial(fusedops.cross_entropy, backend=backend), logits, target, **kw)
        loss_t, grad_t = loss_and_grad(F.cross_entropy, logits.float(), target, **kw)
        torch.testing.assert_close(loss.float(), loss_t, equal_nan=True, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(grad.float(), grad_t, equal_nan=True, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4)])
def test_cross_entropy_extreme_logits_match_float64(backend, dtype, scale):
    """Logits at +-scale: the loss (up to 2*scale, past fp16's range for 6e4) and the gradient are those of
    float64 rounded to the dtype."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randint(-1, 2, (9, 7), generator=g) * scale).to(dtype)
    target = torch.randint(0, 7, (9,), generator=g)
    for reduction in ("none", "mean"):
        fused = partial(fusedops.cross_entropy, backend=backend)
        loss, grad = loss_and_grad(fused, logits, target, reduction=reduction)
        loss_64, grad_64 = loss_and_grad(F.cross_entropy, logits.double(), target, reduction=reduction)
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(loss, loss_64.to(dtype), rtol=ulp, atol=0)
        torch.testing.assert_close(grad, grad_64.to(dtype), rtol=ulp, atol=ulp / 9)
    if dtype == torch.float16:  # rows past fp16's range: PyTorch's fp16 mean overflows, the fp32 sum does not
        assert F.cross_entropy(logits, target).isinf() and loss.isfinite()


@pytest.mark.parametrize("layout", list(ce_cases.LAYOUTS))
def test_cross_entropy_strided_equals_contiguous(backend, layout):
    torch.manual_seed(0)
    logits = ce_cases.LAYOUTS[layout]()
    target = torch.randint(0, 13, logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ())
    results = []
    for x in (logits.detach().requires_grad_(), logits.contiguous().requires_grad_()):
        loss = fusedops.cross_entropy(x, target, reduction="none", label_smoothing=0.1, backend=backend)
        loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape))
        results.append((loss.detach(), x.grad))
    assert_all_close(results[0], results[1], **EXACT)


# --- batch norm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(bn_cases.MODULE_BAD_INPUTS))
def test_module_rejects_bad_input_before_counting_it(backend, case):
    kwargs, input, error, message = bn_cases.MODULE_BAD_INPUTS[case]
    module = fusedops.BatchNorm1d(4, backend=backend, **kwargs)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error, match=message):
        module(input)
    assert_all_close(list(module.state_dict().values()), list(saved.values()), rtol=0, atol=0)


def test_batch_norm_ops_check_their_arguments():
    fusedops._ops.load()
    with pytest.raises(ValueError, match=r"input must be \(N, C, \*\)"):
        torch.ops.fusedops.batch_norm_forward(torch.randn(4), None, None, None, None, True, False, 1e-5)
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.fusedops.batch_norm_forward(torch.randn(4, 3), torch.ones(2), None, None, None, True, False, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.ops.fusedops.batch_norm_forward(torch.randn(1, 3), None, None, None, None, True, False, 1e-5)


@pytest.mark.parametrize("shape", [(0, 4), (3, 4, 0)])
def test_batch_norm_empty_eval_like_torch(backend, shape):
    running = torch.randn(4), torch.rand(4) + 0.5
    w, b = torch.randn(4), torch.randn(4)
    x, dy = torch.randn(shape), torch.randn(shape)
    y, grads = forward_and_grads(lambda x, w, b: fusedops.batch_norm(x, *running, w, b, backend=backend), x, [w, b], dy)
    y_t, grads_t = forward_and_grads(lambda x, w, b: F.batch_norm(x, *running, w, b), x, [w, b], dy)
    assert_all_close([y] + grads, [y_t] + grads_t)


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the interpreter's numpy on inf/NaN
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_batch_norm_non_finite_like_torch(backend, training, value):
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(6, 3, 2, generator=g), torch.randn(6, 3, 2, generator=g)
    x[2, 0, 1] = value  # channel 0: its statistics (training) or only that output (eval)
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    running = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    results = {}
    for name, fn in [("ours", lambda *a: fusedops.batch_norm(*a, backend=backend)), ("torch", F.batch_norm)]:
        stats = [t.clone() for t in running]
        call = lambda x, w, b: fn(x, *stats, w, b, training, 0.1, 1e-5)
        y, (dx, dw, db) = forward_and_grads(call, x, [w, b], dy)
        results[name] = [y, dx, dw, db, *stats]
    assert_all_close(results["ours"], results["torch"], equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mean,std", [(1e3, 1e-2), (1e4, 1e-3)])
def test_batch_norm_large_mean_small_std_match_float64(backend, mean, std):
    """The statistics of an input far from 0 relative to its spread: output and gradients as float64's."""
    g = torch.Generator().manual_seed(9)
    x, dy = mean + std * torch.randn(256, 8, generator=g), torch.randn(256, 8, generator=g)
    w, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    y, grads = forward_and_grads(
        lambda x, w, b: fusedops.batch_norm(x, None, None, w, b, True, backend=backend), x, [w, b], dy
    )
    y64, grads64 = forward_and_grads(
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True), x.double(), [w.double(), b.double()], dy.double()
    )
    for ours, exact in zip([y] + grads, [y64] + grads64):
        assert (ours - exact).abs().max() <= 1e-3 * exact.abs().max()  # torch.nn.functional: ~6e-3 at 1e3


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", list(bn_cases.LAYOUTS))
def test_batch_norm_strided_equals_contiguous(backend, training, layout):
    torch.manual_seed(0)
    x = bn_cases.LAYOUTS[layout]()
    dy, w, b = torch.randn(x.shape), torch.randn(5), torch.randn(5)
    results = []
    for stored in (x, x.contiguous()):
        leaves = [t.detach().requires_grad_() for t in (stored, w, b)]  # the input as it is stored
        running = [torch.zeros(5), torch.ones(5)]
        y = fusedops.batch_norm(leaves[0], *running, *leaves[1:], training, backend=backend)
        results.append([y.detach(), *torch.autograd.grad(y, leaves, dy), *running])
    assert_all_close(results[0], results[1], **EXACT)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_strided_per_channel_tensors_equal_contiguous(backend, training):
    """weight, bias and running statistics every other element of a longer tensor, bit for bit as contiguous."""
    torch.manual_seed(0)
    x, dy = torch.randn(8, 5), torch.randn(8, 5)
    values = [torch.randn(5), torch.randn(5), torch.randn(5), torch.rand(5) + 0.5]
    results = []
    for layout in (lambda t: torch.empty(10)[::2].copy_(t), torch.clone):
        w, b, *running = (layout(t) for t in values)
        leaves = [t.requires_grad_() for t in (x.clone(), w, b)]
        y = fusedops.batch_norm(leaves[0], *running, *leaves[1:], training, backend=backend)
        results.append([y.detach(), *torch.autograd.grad(y, leaves, dy), *running])
    assert running[0].stride() == (1,) and results[0][-1].stride() == (2,)
    assert_all_close(results[0], results[1], **EXACT)
