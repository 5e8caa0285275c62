"""cross_entropy's options beyond plain class indices: class weights, probability targets, z-loss, logit
soft-capping, the logsumexp output and uint8 targets, against F.cross_entropy in float64, or where PyTorch
has no such option, against the spec's math composed of torch ops (F.cross_entropy of the soft-capped
logits plus z_loss * logsumexp^2). The C++ kernels and the Triton kernels (interpreter: tiny shapes, and
fewer of the combinations)."""

import pytest
import torch
import torch.nn.functional as F
from cases.cross_entropy import composite, softcapped
from conftest import assert_all_close, loss_and_grad

import fusedops
from fusedops import cross_entropy_triton

REDUCTIONS = ["mean", "sum", "none"]
F64 = torch.float64
INF, NAN = float("inf"), float("nan")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def class_target(shape, V, g, ignore_index=-100, dtype=torch.int64):
    """Class indices with every third one ignored."""
    target = torch.randint(0, V, shape, generator=g)
    target.view(-1)[::3] = ignore_index
    return target.to(dtype)


def prob_target(shape, g, dtype=F64):
    """Rows of class probabilities (class dimension 1, or 0 for one row), some of them zero."""
    logits = torch.randn(shape, generator=g, dtype=F64) * 2
    logits[torch.rand(shape, generator=g) < 0.2] = -INF
    logits.select(1 if len(shape) > 1 else 0, 0).fill_(0.0)  # no row all -inf
    return torch.softmax(logits, 1 if len(shape) > 1 else 0).to(dtype)


def make_target(kind, logits, g, ignore_index=-100):
    V = logits.shape[1 if logits.dim() > 1 else 0]
    if kind == "probs":
        return prob_target(logits.shape, g, logits.dtype)
    return class_target(logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else (), V, g, ignore_index)


def class_weight(V, g, dtype=F64):
    return (torch.rand(V, generator=g, dtype=F64) * 2 + 0.25).to(dtype)


def fused(backend):
    return lambda x, t, *args, **kw: fusedops.cross_entropy(x, t, *args, backend=backend, **kw)


def upstream(loss, seed=9):
    """An upstream gradient that is not all ones (the same values whatever the loss's dtype)."""
    return (torch.rand(loss.shape, generator=gen(seed), dtype=F64) + 0.5).to(loss.dtype)


def loss_lse_and_grad(fn, logits, target, seed=9, **kw):
    """fn(..., return_lse=True) and the gradient of <loss, u> + <lse, v> with respect to the logits."""
    x = logits.detach().clone().requires_grad_()
    loss, lse = fn(x, target, return_lse=True, **kw)
    (g,) = torch.autograd.grad((loss * upstream(loss, seed)).sum() + (lse * upstream(lse, seed + 1)).sum(), x)
    return loss.detach(), lse.detach(), g


# --- every combination of PyTorch's options, against F.cross_entropy ------------------------------

OPTIONS = [
    (kind, weighted, reduction, smoothing, ignore_index)
    for kind in ("class", "probs")
    for weighted in (False, True)
    for reduction in REDUCTIONS
    for smoothing in (0.0, 0.1)
    for ignore_index in (-100, 2)
]


@pytest.mark.parametrize("backend,option", [("cpp", o) for o in OPTIONS] + [("triton", o) for o in OPTIONS[::5]])
def test_options_match_torch(backend, option):
    kind, weighted, reduction, smoothing, ignore_index = option
    g = gen(len(OPTIONS))
    logits = torch.randn(6, 11, generator=g) * 3
    target = make_target(kind, logits, g, ignore_index)
    weight = class_weight(11, g, torch.float32) if weighted else None
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing)
    if kind == "probs" and ignore_index != -100:  # torch's rule: no ignore_index with probabilities
        with pytest.raises(RuntimeError, match="ignore_index"):
            F.cross_entropy(logits, target, weight, **kw)
        with pytest.raises(ValueError, match="ignore_index"):
            fused(backend)(logits, target, weight, **kw)
        return
    go = upstream(torch.empty(6 if reduction == "none" else ()))
    loss, grad = loss_and_grad(fused(backend), logits, target, go, weight=weight, **kw)
    w64 = None if weight is None else weight.double()
    loss_64, grad_64 = loss_and_grad(
        F.cross_entropy, logits.double(), target.to(F64) if kind == "probs" else target, go.double(), weight=w64, **kw
    )
    assert loss.dtype == grad.dtype == torch.float32 and loss.shape == loss_64.shape
    torch.testing.assert_close(loss, loss_64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_64.float(), rtol=1e-5, atol=1e-7)
    assert grad.abs().amax() > 1e-3


@pytest.mark.parametrize("kind", ["class", "probs"])
@pytest.mark.parametrize("shape", [(9,), (2, 9, 2, 3)])
def test_input_shapes_match_torch(backend, kind, shape):
    """(V,) logits with a 0-d class target or a (V,) probability row; (N, V, d1, d2) with (N, d1, d2) or
    (N, V, d1, d2) targets."""
    g = gen(3)
    logits = torch.randn(shape, generator=g, dtype=F64) * 2
    target = make_target(kind, logits, g)
    if kind == "class" and logits.dim() == 1:
        target = torch.tensor(4)
    weight = class_weight(9, g)
    for reduction in ("mean", "none"):
        for kw in (dict(weight=weight, label_smoothing=0.1), dict()):
            loss, grad = loss_and_grad(fused(backend), logits, target, reduction=reduction, **kw)
            loss_t, grad_t = loss_and_grad(F.cross_entropy, logits, target, reduction=reduction, **kw)
            assert loss.shape == loss_t.shape
            torch.testing.assert_close(loss, loss_t)
            torch.testing.assert_close(grad, grad_t)


@pytest.mark.parametrize("kind", ["class", "probs"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_match_torch(backend, kind, dtype):
    """float64 to float64's rounding; float32 against float64; float16 and bfloat16 against PyTorch's float32
    result on the same rounded logits, weights and probabilities (the math is fp32: only the rounding of the
    result to the dtype is lost)."""
    g = gen(4)
    logits = (torch.randn(7, 23, generator=g, dtype=F64) * 4).to(dtype)
    target = make_target(kind, logits, g)
    weight = class_weight(23, g, dtype)
    ref_dtype = F64 if dtype in (F64, torch.float32) else torch.float32
    as_ref = (lambda t: t.to(ref_dtype)) if kind == "probs" else (lambda t: t)
    tol = {F64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-7)}.get(
        dtype, dict(rtol=torch.finfo(dtype).eps, atol=1e-7)
    )
    for kw in (dict(reduction="none", label_smoothing=0.1), dict(reduction="mean"), dict(reduction="sum")):
        loss, grad = loss_and_grad(fused(backend), logits, target, weight=weight, **kw)
        loss_r, grad_r = loss_and_grad(
            F.cross_entropy, logits.to(ref_dtype), as_ref(target), weight=weight.to(ref_dtype), **kw
        )
        assert loss.dtype == grad.dtype == dtype
        torch.testing.assert_close(loss.to(ref_dtype), loss_r.to(dtype).to(ref_dtype), **tol)
        torch.testing.assert_close(grad.to(ref_dtype), grad_r.to(dtype).to(ref_dtype), **tol)


# --- CrossEntropyLoss(weight=...) as torch.nn.CrossEntropyLoss --------------------------------------


def test_module_weight_is_a_buffer_as_torch():
    weight = class_weight(7, gen(5), torch.float32)
    mine, theirs = fusedops.CrossEntropyLoss(weight=weight), torch.nn.CrossEntropyLoss(weight=weight)
    assert list(mine.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert dict(mine.named_buffers()).keys() == {"weight"} and mine.weight is weight
    assert list(fusedops.CrossEntropyLoss().state_dict()) == list(torch.nn.CrossEntropyLoss().state_dict()) == []
    assert fusedops.CrossEntropyLoss().weight is None
    # load across, both ways
    other = torch.nn.CrossEntropyLoss(weight=torch.ones(7))
    other.load_state_dict(mine.state_dict())
    torch.testing.assert_close(other.weight, weight, rtol=0, atol=0)
    blank = fusedops.CrossEntropyLoss(weight=torch.ones(7))
    blank.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(blank.weight, weight, rtol=0, atol=0)
    # moves with the module
    assert mine.double().weight.dtype == F64 and mine.to(torch.float16).weight.dtype == torch.float16
    assert mine.to("meta").weight.device.type == "meta"
    # repr: what was asked for, like torch's
    text = repr(fusedops.CrossEntropyLoss(weight=weight, label_smoothing=0.1, z_loss=1e-4, softcap=30.0))
    assert text.startswith("CrossEntropyLoss(") and "label_smoothing=0.1" in text
    assert "z_loss=0.0001" in text and "softcap=30.0" in text
    assert "z_loss" not in repr(fusedops.CrossEntropyLoss())


def test_module_with_weight_gives_torch_numbers(backend):
    g = gen(6)
    logits, target, weight = torch.randn(6, 7, generator=g, dtype=F64), class_target((6,), 7, g), class_weight(7, g)
    probs = prob_target((6, 7), g)
    for kw in (dict(), dict(reduction="sum", label_smoothing=0.3), dict(reduction="none", ignore_index=2)):
        mine, theirs = fusedops.CrossEntropyLoss(weight, backend=backend, **kw), torch.nn.CrossEntropyLoss(weight, **kw)
        for t in (target, probs) if "ignore_index" not in kw else (torch.where(target == -100, 2, target),):
            loss, grad = loss_and_grad(mine, logits, t)
            loss_t, grad_t = loss_and_grad(theirs, logits, t)
            torch.testing.assert_close(loss, loss_t)
            torch.testing.assert_close(grad, grad_t)
    # the new options through the module, and the weight after .to()
    module = fusedops.CrossEntropyLoss(
        weight.float(), z_loss=0.01, softcap=2.0, return_lse=True, backend=backend
    ).double()
    loss, lse = module(logits, target)
    loss_c, lse_c = composite(logits, target, weight, z_loss=0.01, softcap=2.0, return_lse=True)
    torch.testing.assert_close(loss, loss_c)
    torch.testing.assert_close(lse, lse_c)


# --- z-loss, soft-capping and the logsumexp, against the composition of torch ops ------------------

ZS = [(0.1, None), (0.0, 3.0), (0.05, 3.0)]  # (z_loss, softcap)


@pytest.mark.parametrize("backend,zs", [("cpp", zs) for zs in ZS] + [("triton", ZS[-1])])
@pytest.mark.parametrize("kind", ["class", "probs"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_and_softcap_match_composite(backend, zs, kind, reduction):
    """With class weights, label smoothing and ignored rows; the loss, the lse and the gradient of both."""
    z_loss, softcap = zs
    g = gen(7)
    logits = torch.randn(6, 13, generator=g, dtype=F64) * 5  # past the softcap
    target = make_target(kind, logits, g)
    kw = dict(weight=class_weight(13, g), reduction=reduction, label_smoothing=0.1, z_loss=z_loss, softcap=softcap)
    loss, lse, grad = loss_lse_and_grad(fused(backend), logits, target, **kw)
    loss_c, lse_c, grad_c = loss_lse_and_grad(composite, logits, target, **kw)
    assert_all_close((loss, lse, grad), (loss_c, lse_c, grad_c))
    # the options are not a no-op: without them the numbers differ
    loss_plain = composite(logits, target, kw["weight"], reduction, label_smoothing=0.1)
    assert (loss - loss_plain).abs().amax() > 1e-3


@pytest.mark.parametrize("shape", [(5, 9), (9,), (2, 9, 3)])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_return_lse(backend, shape, softcap):
    """lse = torch.logsumexp of the soft-capped logits, for every row (ignored ones too), shaped like the loss of
    reduction "none", in the loss's dtype; its gradient when it is used in what is differentiated."""
    g = gen(8)
    logits = torch.randn(shape, generator=g, dtype=F64) * 3
    target = make_target("class", logits, g) if len(shape) > 1 else torch.tensor(-100)
    class_dim = 1 if len(shape) > 1 else 0
    expected_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    for reduction in ("mean", "none"):
        kw = dict(reduction=reduction, softcap=softcap, z_loss=0.01)
        loss, lse, grad = loss_lse_and_grad(fused(backend), logits, target, **kw)
        loss_c, lse_c, grad_c = loss_lse_and_grad(composite, logits, target, **kw)
        assert lse.shape == expected_shape and lse.dtype == loss.dtype == F64
        torch.testing.assert_close(lse, torch.logsumexp(softcapped(logits, softcap), class_dim))
        torch.testing.assert_close(loss, loss_c, equal_nan=True)  # (V,) with an ignored target, mean: NaN
        torch.testing.assert_close(grad, grad_c, equal_nan=True)
    # low precision: lse in the loss's dtype (float16), fp32 under autocast
    x16 = logits.to(torch.float16)
    loss, lse = fusedops.cross_entropy(x16, target, return_lse=True, softcap=softcap, backend=backend)
    assert lse.dtype == loss.dtype == torch.float16
    torch.testing.assert_close(
        lse.float(), torch.logsumexp(softcapped(x16.float(), softcap), class_dim), rtol=1e-3, atol=1e-3
    )
    with torch.autocast("cpu", torch.bfloat16):
        loss, lse = fusedops.cross_entropy(x16, target, return_lse=True, backend=backend)
    assert lse.dtype == loss.dtype == torch.float32


# --- accuracy of the reduced loss, and large vocabularies -----------------------------------------


@torch.no_grad()
def test_reduced_loss_accuracy_at_scale():
    """8192 x 32000 float32 logits: the sum and the mean (with label smoothing too) no further from float64
    than PyTorch's own float32 result (F.cross_entropy on the same logits)."""
    N, V = 8192, 32000
    logits = torch.randn(N, V, generator=gen(10)) * 3
    target = torch.randint(0, V, (N,), generator=gen(11))
    target[::7] = -100
    kept = target != -100
    # float64 rows, in one pass: -log p_t and the label-smoothing term -mean_j log p_j
    nll, smooth = torch.empty(N, dtype=F64), torch.empty(N, dtype=F64)
    for rows in torch.arange(N).split(1024):
        log_p = torch.log_softmax(logits[rows].double(), 1)
        nll[rows] = -log_p.gather(1, torch.where(kept[rows], target[rows], 0).unsqueeze(1)).squeeze(1)
        smooth[rows] = -log_p.mean(1)
    for kw, rows, divisor in [
        (dict(reduction="sum"), nll, 1),
        (dict(reduction="mean"), nll, kept.sum()),
        (dict(reduction="mean", label_smoothing=0.1), 0.9 * nll + 0.1 * smooth, kept.sum()),
    ]:
        exact = (rows * kept).sum() / divisor
        ours = fusedops.cross_entropy(logits, target, backend="cpp", **kw).double()
        theirs = F.cross_entropy(logits, target, **kw).double()
        ours_err, torch_err = ((ours - exact).abs() / exact).item(), ((theirs - exact).abs() / exact).item()
        assert ours_err <= max(torch_err * 1.5, 1e-7), (kw, ours_err, torch_err)


@pytest.mark.parametrize("V", [50257, 129920])
def test_cpp_vocabulary_no_multiple_of_a_block(V):
    g = gen(12)
    logits = torch.randn(3, V, generator=g) * 4
    target = torch.tensor([5, V - 1, -100])
    kw = dict(
        weight=class_weight(V, g, torch.float32), label_smoothing=0.05, z_loss=1e-3, softcap=10.0, reduction="none"
    )
    loss, lse, grad = loss_lse_and_grad(fused("cpp"), logits, target, **kw)
    kw["weight"] = kw["weight"].double()
    loss_64, lse_64, grad_64 = loss_lse_and_grad(composite, logits.double(), target, **kw)
    torch.testing.assert_close(loss, loss_64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, lse_64.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_64.float(), rtol=1e-4, atol=1e-9)


def test_cpp_bfloat16_128k_vocabulary_as_accurate_as_torch():
    """bf16 logits over 128256 classes: the loss and gradient no further from float64 than PyTorch's bf16."""
    g = gen(13)
    V = 128256
    logits = (torch.randn(4, V, generator=g) * 3).bfloat16()
    target = torch.randint(0, V, (4,), generator=g)
    for kw in (dict(reduction="none"), dict(reduction="mean", label_smoothing=0.1)):
        loss, grad = loss_and_grad(fused("cpp"), logits, target, **kw)
        loss_t, grad_t = loss_and_grad(F.cross_entropy, logits, target, **kw)
        loss_64, grad_64 = loss_and_grad(F.cross_entropy, logits.double(), target, **kw)
        assert loss.dtype == grad.dtype == torch.bfloat16

        def error(value, exact):
            return ((value.double() - exact).abs().amax() / exact.abs().amax()).item()

        ulp = torch.finfo(torch.bfloat16).eps
        assert error(loss, loss_64) <= max(2 * error(loss_t, loss_64), ulp / 2)
        assert error(grad, grad_64) <= max(2 * error(grad_t, grad_64), ulp / 2)


@pytest.mark.parametrize("kind", ["class", "probs"])
def test_triton_vocabulary_larger_than_its_block(kind):
    g = gen(14)
    V = 2 * cross_entropy_triton.MAX_BLOCK + 37
    logits = torch.randn(2, V, generator=g) * 4
    target = torch.tensor([3, V - 2]) if kind == "class" else prob_target((2, V), g, torch.float32)
    kw = dict(weight=class_weight(V, g, torch.float32), label_smoothing=0.05, z_loss=1e-3, softcap=10.0)
    loss, lse, grad = loss_lse_and_grad(fused("triton"), logits, target, **kw)
    kw["weight"] = kw["weight"].double()
    loss_64, lse_64, grad_64 = loss_lse_and_grad(
        composite, logits.double(), target.to(F64) if kind == "probs" else target, **kw
    )
    torch.testing.assert_close(loss, loss_64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, lse_64.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_64.float(), rtol=1e-4, atol=1e-9)


# --- edge values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_as_torch(backend, weighted):
    """mean: NaN (0/0), sum: 0, none: zeros; the gradient 0 (z-loss and soft-capping change none of it), the
    lse still computed."""
    g = gen(15)
    logits, target = torch.randn(4, 6, generator=g), torch.full((4,), -100)
    weight = class_weight(6, g, torch.float32) if weighted else None
    for reduction in REDUCTIONS:
        loss_t, grad_t = loss_and_grad(F.cross_entropy, logits, target, reduction=reduction, weight=weight)
        for extra in (dict(), dict(z_loss=0.1, softcap=2.0, label_smoothing=0.1)):
            loss, grad = loss_and_grad(fused(backend), logits, target, reduction=reduction, weight=weight, **extra)
            torch.testing.assert_close(loss, loss_t, equal_nan=True, rtol=0, atol=0)
            torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=0)
            torch.testing.assert_close(grad_t, torch.zeros_like(grad), rtol=0, atol=0)
    _, lse = fusedops.cross_entropy(logits, target, weight, return_lse=True, backend=backend)
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1))


def test_weights_of_the_targets_summing_to_zero_as_torch(backend):
    """The weighted mean's divisor 0: PyTorch's NaN loss and NaN gradient."""
    logits, target = torch.randn(4, 5, generator=gen(16)), torch.tensor([0, 1, -100, 1])
    weight = torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0])
    for reduction in REDUCTIONS:
        loss, grad = loss_and_grad(fused(backend), logits, target, weight=weight, reduction=reduction)
        loss_t, grad_t = loss_and_grad(F.cross_entropy, logits, target, weight=weight, reduction=reduction)
        torch.testing.assert_close(loss, loss_t, equal_nan=True)
        torch.testing.assert_close(grad, grad_t, equal_nan=True)


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the interpreter's numpy on inf/NaN
@pytest.mark.parametrize("kind", ["class", "probs"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_non_finite_logits_as_torch(backend, kind, softcap):
    """NaN, +inf and -inf logits (in the target column too) with class weights and label smoothing: the loss and
    gradient of PyTorch (of the soft-capped logits: softcap * tanh(+-inf / softcap) = +-softcap)."""
    g = gen(17)
    logits = torch.randn(7, 5, generator=g)
    logits[0, 1] = NAN
    logits[1, 2] = INF
    logits[2, 3] = -INF
    logits[3, :] = -INF
    logits[4, 0] = -INF  # the class target
    logits[5, 0], logits[5, 1] = INF, -INF
    target = torch.tensor([0, 1, 2, 3, 0, 1, 4]) if kind == "class" else prob_target((7, 5), g, torch.float32)
    weight = class_weight(5, g, torch.float32)
    for smoothing in (0.0, 0.1):
        kw = dict(weight=weight, reduction="none", label_smoothing=smoothing, softcap=softcap)
        loss, grad = loss_and_grad(fused(backend), logits, target, **kw)
        loss_t, grad_t = loss_and_grad(composite, logits, target, **kw)
        torch.testing.assert_close(loss, loss_t, equal_nan=True, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, grad_t, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 60.0])
def test_confident_predictions_with_weights(backend, softcap):
    """Target logit = max + 20: softmax_t rounds to 1 in fp32, yet the target column's gradient, with class
    weights (and soft-capping), is no worse than PyTorch's (in fp32 on the same soft-capped math)."""
    g = gen(18)
    N, V = (32, 500) if backend == "cpp" else (4, 40)
    logits = torch.randn(N, V, generator=g, dtype=F64)
    target = torch.randint(0, V, (N,), generator=g)
    rows = torch.arange(N)
    logits[rows, target] = logits.max(1).values + 20
    logits = logits.float()
    weight = class_weight(V, g, torch.float32)
    kw = dict(weight=weight, softcap=softcap)
    _, grad_64 = loss_and_grad(composite, logits.double(), target, weight=weight.double(), softcap=softcap)
    exact = grad_64[rows, target]

    def error(fn):
        _, grad = loss_and_grad(fn, logits, target, **kw)
        return ((grad[rows, target].double() - exact).abs() / exact.abs()).max().item()

    fused_error, torch_error = error(fused(backend)), error(composite)
    assert fused_error <= max(torch_error, 1e-6) and fused_error < 1e-5


# --- uint8 targets, in place, host reads ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 7), (2, 7, 3)])
def test_uint8_targets_same_as_int64(backend, shape):
    g = gen(19)
    logits = torch.randn(shape, generator=g)
    target = torch.randint(0, 7, shape[:1] + shape[2:], generator=g)
    target.view(-1)[::4] = 3  # ignored with ignore_index=3
    for kw in (
        dict(),
        dict(
            ignore_index=3,
            weight=class_weight(7, g, torch.float32),
            label_smoothing=0.1,
            reduction="none",
            z_loss=0.01,
            softcap=2.0,
        ),
    ):
        loss, grad = loss_and_grad(fused(backend), logits, target.to(torch.uint8), **kw)
        loss_64, grad_64 = loss_and_grad(fused(backend), logits, target, **kw)
        torch.testing.assert_close(loss, loss_64, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_64, rtol=0, atol=0)
    # torch takes uint8 targets of 2-D logits only (its (N, V, d) kernel wants int64)
    loss_t, grad_t = loss_and_grad(
        F.cross_entropy, logits, target.to(torch.uint8 if len(shape) == 2 else torch.int64), ignore_index=3
    )
    loss, grad = loss_and_grad(fused(backend), logits, target.to(torch.uint8), ignore_index=3)
    torch.testing.assert_close(loss, loss_t)
    torch.testing.assert_close(grad, grad_t)


INPLACE_OPTIONS = {
    "weight_smoothing": dict(weight=True, label_smoothing=0.1),
    "probs": dict(kind="probs", weight=True, reduction="sum"),
    "z_loss_softcap": dict(z_loss=0.05, softcap=2.0, reduction="none"),
}


@pytest.mark.parametrize("option", list(INPLACE_OPTIONS))
def test_inplace_backward_same_gradient(backend, option):
    kw = dict(INPLACE_OPTIONS[option])
    g = gen(20)
    logits = torch.randn(5, 8, generator=g) * 3
    target = make_target(kw.pop("kind", "class"), logits, g)
    if kw.pop("weight", False):
        kw["weight"] = class_weight(8, g, torch.float32)
    grads = []
    for inplace in (False, True):
        w = logits.clone().requires_grad_()
        loss = fused(backend)(w * 1.0, target, inplace_backward=inplace, **kw)
        loss.backward(upstream(loss))
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
    x = logits.double().requires_grad_()
    loss = composite(
        x,
        target.double() if target.is_floating_point() else target,
        **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
    )
    loss.backward(upstream(loss))
    torch.testing.assert_close(grads[1], x.grad.float(), rtol=1e-5, atol=1e-7)


def test_inplace_backward_refuses_a_differentiable_lse(backend):
    """return_lse=True with inplace_backward=True while the logits require grad: refused before anything is
    written (the lse's gradient would need the overwritten logits), never a silently dropped gradient.
    Without grad the in-place write does not happen and the lse comes back."""
    logits, target = torch.randn(4, 6, generator=gen(23)), torch.tensor([1, 2, -100, 0])
    x = logits.clone().requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward=True cannot return_lse=True"):
        fusedops.cross_entropy(x, target, return_lse=True, inplace_backward=True, backend=backend)
    assert torch.equal(x.detach(), logits)
    with torch.no_grad():
        _, lse = fusedops.cross_entropy(x, target, return_lse=True, inplace_backward=True, backend=backend)
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1))


@pytest.mark.parametrize("kind", ["class", "probs"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_with_options(kind, dynamic):
    """One graph with class weights, probability targets, z-loss, soft-capping and lse, as eager."""
    torch._dynamo.reset()
    g = gen(22)
    logits = torch.randn(6, 9, generator=g)
    target = make_target(kind, logits, g)
    kw = dict(weight=class_weight(9, g, torch.float32), label_smoothing=0.1, z_loss=0.01, softcap=2.0)

    def step(x, t):
        loss, lse = fusedops.cross_entropy(x * 2, t, return_lse=True, backend="cpp", **kw)
        return loss * 3 + lse.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    loss, grad = loss_and_grad(compiled, logits, target)
    loss_e, grad_e = loss_and_grad(
        lambda x, t: (lambda out: out[0] * 3 + out[1].sum())(composite(x * 2, t, return_lse=True, **kw)), logits, target
    )
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(grad, grad_e)


# --- z-loss under class weights: a per-token term ----------------------------------------------------


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_z_loss_mean_is_over_the_kept_rows_unweighted(backend, op):
    """PaLM's z-loss (and Liger's lse_square_scale, flash-attention's) averages z * lse^2 over the kept tokens,
    whatever the class weights: mean = sum_i w_{t_i} ce_i / sum_i w_{t_i} + z * sum_i lse_i^2 / K."""
    g = gen(11)
    x = torch.randn(8, 5, generator=g, dtype=F64)
    t = torch.randint(0, 5, (8,), generator=g)
    t[[1, 6]] = -100
    w = torch.rand(5, generator=g, dtype=F64) + 0.1
    kept = t != -100

    def expected(x):
        return F.cross_entropy(x, t, weight=w) + 1e-2 * (torch.logsumexp(x[kept], -1) ** 2).mean()

    if op == "cross_entropy":
        fn = lambda x: fusedops.cross_entropy(x, t, w, z_loss=1e-2, backend=backend)
    else:  # the identity projection: the logits are x
        fn = lambda x: fusedops.linear_cross_entropy(
            x,
            torch.eye(5, dtype=F64),
            t,
            class_weight=w,
            z_loss=1e-2,
            chunk_bytes=3 * 5 * 8,
            backend=backend,
        )
    loss, grad = loss_and_grad(lambda x, _: fn(x), x, t)
    loss_e, grad_e = loss_and_grad(lambda x, _: expected(x), x, t)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(grad, grad_e)
    torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(),))


def test_mean_divisor_of_uint8_targets_against_a_negative_ignore_index():
    """uint8 targets >= 156 are kept (a uint8 compared with -100 would wrap to 156); the linear cross-entropy
    takes its mean's divisor in Python."""
    g = gen(12)
    x, W = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(256, 4, generator=g, dtype=F64)
    t = torch.tensor([156, 200, 3, 255, 156, 7], dtype=torch.uint8)
    for kw in ({}, {"class_weight": torch.rand(256, generator=g, dtype=F64)}):
        loss, grad = loss_and_grad(lambda x, t: fusedops.linear_cross_entropy(x, W, t, **kw), x, t)
        loss_e, grad_e = loss_and_grad(lambda x, t: F.cross_entropy(x @ W.t(), t.long(), kw.get("class_weight")), x, t)
        torch.testing.assert_close(loss, loss_e)
        torch.testing.assert_close(grad, grad_e)
