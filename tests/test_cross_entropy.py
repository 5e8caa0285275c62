import pytest
import torch
import torch.nn.functional as F
from conftest import loss_and_grad
from torch.utils._python_dispatch import TorchDispatchMode

import fusedops
from fusedops import reference


def fused(backend):
    return lambda x, t, **kw: fusedops.cross_entropy(x, t, backend=backend, **kw)


def make_target(N, V, ignored, ignore_index=-100, generator=None):
    target = torch.randint(0, V, (N,), generator=generator)
    if ignored == "some":
        target[::3] = ignore_index
    elif ignored == "all":
        target[:] = ignore_index
    return target


@pytest.mark.parametrize("shape", [(1, 1), (32, 27), (7, 41)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
def test_matches_torch(backend, shape, reduction, label_smoothing, ignored):
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape, generator=g) * 3
    target = make_target(*shape, ignored, generator=g)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    loss, grad = loss_and_grad(fused(backend), logits, target, **kw)
    loss_t, grad_t = loss_and_grad(F.cross_entropy, logits, target, **kw)
    torch.testing.assert_close(loss, loss_t, equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_t, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,N", [("cpp", 64), ("triton", 8)])
def test_vocabulary_larger_than_a_block(backend, N):
    logits = torch.randn(N, 50257) * 4
    target = make_target(N, 50257, "some")
    for kw in (dict(), dict(label_smoothing=0.05, reduction="none")):
        loss, grad = loss_and_grad(fused(backend), logits, target, **kw)
        loss_64, grad_64 = loss_and_grad(F.cross_entropy, logits.double(), target, **kw)
        torch.testing.assert_close(loss, loss_64.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grad_64.float(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_gradient(backend, reduction):
    logits, target = torch.randn(9, 13), torch.randint(0, 13, (9,))
    grad_output = torch.randn(9) if reduction == "none" else torch.tensor(-2.5)
    _, grad = loss_and_grad(fused(backend), logits, target, grad_output, reduction=reduction)
    _, grad_t = loss_and_grad(F.cross_entropy, logits, target, grad_output, reduction=reduction)
    torch.testing.assert_close(grad, grad_t)


def test_float64_is_tight(backend):
    logits, target = torch.randn(16, 300, dtype=torch.float64) * 5, torch.randint(0, 300, (16,))
    loss, grad = loss_and_grad(fused(backend), logits, target, label_smoothing=0.2)
    loss_t, grad_t = loss_and_grad(F.cross_entropy, logits, target, label_smoothing=0.2)
    assert loss.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(loss, loss_t, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(grad, grad_t, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_float32(backend, dtype):
    logits, target = (torch.randn(24, 77) * 4).to(dtype), torch.randint(0, 77, (24,))
    loss, grad = loss_and_grad(fused(backend), logits, target, reduction="none")
    loss_32, grad_32 = loss_and_grad(F.cross_entropy, logits.float(), target, reduction="none")
    assert loss.dtype == grad.dtype == dtype
    ulp = torch.finfo(dtype).eps
    # the math is fp32: only the final rounding to `dtype` is lost
    torch.testing.assert_close(loss.float(), loss_32, rtol=ulp, atol=0)
    torch.testing.assert_close(grad.float(), grad_32, rtol=ulp, atol=1e-7)


def test_layouts(backend):
    """int32 targets, (N, V, d...) and (V,) like PyTorch (strided logits: test_bad_input.py)."""
    target = torch.randint(0, 11, (6,))
    cases = [
        (torch.randn(6, 11), target.int()),
        (torch.randn(2, 11, 3, 4), torch.randint(0, 11, (2, 3, 4))),
        (torch.randn(11), torch.tensor(4)),
    ]
    for logits, t in cases:
        for reduction in ("mean", "none"):
            loss, grad = loss_and_grad(fused(backend), logits, t, reduction=reduction)
            loss_t, grad_t = loss_and_grad(F.cross_entropy, logits, t.long(), reduction=reduction)
            assert loss.shape == loss_t.shape
            torch.testing.assert_close(loss, loss_t)
            torch.testing.assert_close(grad, grad_t)


def test_dlogits_match_the_chunked_reference(backend, notebook_batch):
    params, Xb, Yb = notebook_batch
    acts = reference.forward(params, Xb, Yb)
    dlogits = reference.backward(params, acts, Xb, Yb)["logits"]
    loss, grad = loss_and_grad(fused(backend), acts["logits"], Yb)
    torch.testing.assert_close(loss, acts["loss"].detach(), rtol=1e-6, atol=0)
    assert (grad - dlogits).abs().max().item() <= 1e-8  # the notebooks' maxdiff level


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(backend, reduction):
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 3, 3])
    fn = lambda x: fusedops.cross_entropy(
        x,
        target,
        reduction=reduction,
        label_smoothing=0.1,
        backend=backend,
    )
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("backend", ["cpp"])  # Triton under torch.compile: tests/test_cuda.py
@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph(backend, compiler, inplace):
    torch._dynamo.reset()

    def step(x, t):
        return fusedops.cross_entropy(x * 2, t, label_smoothing=0.1, inplace_backward=inplace, backend=backend) * 3

    logits, target = torch.randn(6, 9), torch.randint(0, 9, (6,))
    loss, grad = loss_and_grad(torch.compile(step, fullgraph=True, backend=compiler), logits, target)
    loss_t, grad_t = loss_and_grad(lambda x, t: F.cross_entropy(x * 2, t, label_smoothing=0.1) * 3, logits, target)
    torch.testing.assert_close(loss, loss_t)
    torch.testing.assert_close(grad, grad_t)


def test_inplace_backward_writes_the_gradient_into_the_logits(backend):
    logits, target = torch.randn(8, 30), torch.randint(0, 30, (8,))
    _, grad_t = loss_and_grad(F.cross_entropy, logits, target)
    x = logits.clone().requires_grad_()
    fusedops.cross_entropy(x, target, inplace_backward=True, backend=backend).backward()
    torch.testing.assert_close(x.grad, grad_t)
    # logits from a layer: the gradient it receives is the logits' own storage, no N x V buffer
    w = logits.clone().requires_grad_()
    y = w * 1.0
    received = []
    y.register_hook(lambda grad: received.append(grad.data_ptr()))
    fusedops.cross_entropy(y, target, inplace_backward=True, backend=backend).backward()
    assert received == [y.data_ptr()]
    torch.testing.assert_close(w.grad, grad_t)
    # upstream gradient != 1
    w.grad = None
    (fusedops.cross_entropy(w * 1.0, target, inplace_backward=True, backend=backend) * 4).backward()
    torch.testing.assert_close(w.grad, 4 * grad_t)


def test_inplace_backward_is_seen_by_autograd_version_checks(backend):
    logits, target = torch.randn(4, 5, requires_grad=True), torch.randint(0, 5, (4,))
    y = logits * 2
    other = (y * y).sum()  # saves y, which the in-place loss then overwrites
    loss = fusedops.cross_entropy(y, target, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()
    y = logits * 2
    loss = fusedops.cross_entropy(y, target, inplace_backward=True, backend=backend)
    y.add_(1)  # the saved gradient is gone
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("inplace", [False, True])
def test_backward_twice_with_retain_graph(backend, inplace):
    logits, target = torch.randn(5, 6), torch.randint(0, 6, (5,))
    _, grad_t = loss_and_grad(F.cross_entropy, logits, target)
    x = logits.clone().requires_grad_()
    loss = fusedops.cross_entropy(x * 1.0, target, inplace_backward=inplace, backend=backend)
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    (loss * 0.5).backward()
    torch.testing.assert_close(x.grad, 2.5 * grad_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confident_predictions(backend, dtype):
    """Target logit = max + 20: softmax_t rounds to 1, yet its gradient is no worse than PyTorch's."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 1000, generator=g, dtype=torch.float64)
    target = torch.randint(0, 1000, (64,), generator=g)
    rows = torch.arange(64)
    logits[rows, target] = logits.max(1).values + 20
    logits = logits.to(dtype)
    _, grad_64 = loss_and_grad(F.cross_entropy, logits.double(), target)
    exact = grad_64[rows, target]

    def error(fn):
        _, grad = loss_and_grad(fn, logits, target)
        return ((grad[rows, target].double() - exact).abs() / exact.abs()).max().item()

    fused_error, torch_error = error(fused(backend)), error(F.cross_entropy)
    assert fused_error <= torch_error
    assert fused_error < (1e-5 if dtype == torch.float32 else 1e-2)


def test_softmax_across_the_whole_exp_range(backend):
    """Logits from -104 up to 0 (the max), so exp(x - max) runs over fp32's whole range below 1,
    subnormal results included: every gradient element (softmax - one_hot, reduction "sum") within
    4 ulp of float64's, absolute error within 4 of the smallest subnormal."""
    V = 64 * 64 + 3  # whole blocks of the C++ kernel and a scalar tail
    logits = torch.linspace(-104.0, 0.0, V).flip(0).roll(V // 3).repeat(3, 1)
    target = torch.tensor([0, V // 2, V - 1])
    _, grad = loss_and_grad(fused(backend), logits, target, reduction="sum")
    _, exact = loss_and_grad(F.cross_entropy, logits.double(), target, reduction="sum")
    ulp = (torch.nextafter(exact.abs().float(), torch.tensor(float("inf"))) - exact.abs().float()).double()
    assert (exact.abs() < torch.finfo(torch.float32).tiny).sum() > 100  # subnormal probabilities are tested
    assert ((grad.double() - exact).abs() <= 4 * ulp).all()


def test_module_mirrors_torch():
    logits, target = torch.randn(10, 7), make_target(10, 7, "some", ignore_index=2)
    for kw in (dict(), dict(reduction="sum", label_smoothing=0.3), dict(ignore_index=2, reduction="none")):
        mine, theirs = fusedops.CrossEntropyLoss(**kw), torch.nn.CrossEntropyLoss(**kw)
        loss, grad = loss_and_grad(mine, logits, target)
        loss_t, grad_t = loss_and_grad(theirs, logits, target)
        torch.testing.assert_close(loss, loss_t)
        torch.testing.assert_close(grad, grad_t)
    with pytest.warns(UserWarning, match="deprecated"):  # the legacy arguments too, as torch
        assert fusedops.CrossEntropyLoss(size_average=False).reduction == "sum"
    with pytest.raises(TypeError, match="weight must be a tensor or None"):
        fusedops.CrossEntropyLoss(weight=[1.0] * 7)
    with pytest.raises(ValueError, match="reduction"):
        fusedops.CrossEntropyLoss(reduction="avg")


@pytest.mark.parametrize("inplace", [False, True])
def test_inference_mode(backend, inplace):
    """Inference mode skips the autograd kernel: the op's own kernel gives the loss alone."""
    logits, target = torch.randn(6, 11), torch.randint(0, 11, (6,))
    with torch.inference_mode():
        x = logits.clone()
        loss = fusedops.cross_entropy(x, target, label_smoothing=0.1, inplace_backward=inplace, backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, label_smoothing=0.1))
    torch.testing.assert_close(x, logits, rtol=0, atol=0)  # without grad there is no in-place gradient


class OpLog(TorchDispatchMode):
    """The ops run under it, with the sizes of their tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sizes = [a.numel() for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        self.calls.append((str(func), sizes))
        return func(*args, **(kwargs or {}))


NO_PASS = {"fusedops.cross_entropy_scale_grad.default", "aten.detach.default", "aten.view.default"}  # read nothing


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_unit_upstream_gradient_makes_no_pass_over_the_saved_gradient(op, reduction):
    """loss.backward() hands out the gradient the forward wrote, untouched: the only op backward runs on it is
    cross_entropy_scale_grad, which makes no pass for the factor 1 (the C++ kernel bumps the version only when it
    writes). With another factor it scales it, in place, once."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 12, 5, 9
    x, target = torch.randn(N, H if op == "linear_cross_entropy" else V, generator=g), torch.randint(0, V, (N,))
    W = torch.randn(V, H, generator=g).requires_grad_()
    versions = {}  # the gradients' version counters after backward: what their writes left
    for factor in (1.0, 2.0):
        leaf = x.clone().requires_grad_()
        loss = (
            fusedops.cross_entropy(leaf, target, reduction=reduction)
            if op == "cross_entropy"
            else fusedops.linear_cross_entropy(leaf, W, target, reduction=reduction, chunk_bytes=4 * V * 4)
        )
        with OpLog() as log:
            loss.backward(torch.tensor(factor))
        scaled = [sizes for name, sizes in log.calls if name == "fusedops.cross_entropy_scale_grad.default"]
        assert len(scaled) == (1 if op == "cross_entropy" else 2)  # G; dX and dW
        # no other op on a tensor of the gradients' size, but views
        assert all(name in NO_PASS or max(sizes, default=0) <= 1 for name, sizes in log.calls), log.calls
        grads = [leaf.grad] + ([W.grad] if op == "linear_cross_entropy" else [])
        versions[factor] = [grad._version for grad in grads]
        expected = torch.func.grad(
            lambda x, W: (
                factor * F.cross_entropy(x if op == "cross_entropy" else x @ W.t(), target, reduction=reduction)
            ),
            argnums=(0, 1),
        )(x, W.detach())
        torch.testing.assert_close(leaf.grad, expected[0])
        if op == "linear_cross_entropy":
            torch.testing.assert_close(W.grad, expected[1])
        W.grad = None
    assert versions[2.0] == [v + 1 for v in versions[1.0]]  # one write more than forward's: the factor's
    if op == "cross_entropy":
        assert versions[1.0] == [0]  # G as the forward op returned it


SPLIT_OPTIONS = {
    "plain": {},
    "weight": {"weighted": True},
    "probabilities": {"prob": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "all": {"weighted": True, "prob": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0},
    "all_class_targets": {"weighted": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0},
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("option", list(SPLIT_OPTIONS))
def test_rows_split_across_programs_match_one_program_a_row(option, dtype):
    """The two-stage Triton kernels (a row's columns in 2 or 5 chunks, partials merged per row) against the
    one-program kernel, for every option and reduction, out of place and in place; class targets with an
    ignored row and one out of range (NaN, the device assert compiled out here)."""
    from fusedops import cross_entropy_triton

    kw = SPLIT_OPTIONS[option]
    g = torch.Generator().manual_seed(3)
    N, V = 5, 70
    x = (torch.randn(N, V, generator=g) * 3).to(dtype)
    if kw.get("prob"):
        target = torch.softmax(torch.randn(N, V, generator=g), 1).to(dtype)
    else:
        target = torch.tensor([3, -100, 69, 75, 40])
    weight = (torch.rand(V, generator=g) + 0.5).to(dtype) if kw.get("weighted") else None
    options = (kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("softcap"))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    for reduction in (0, 1, 2):
        expected_grad = torch.empty_like(x)
        expected = cross_entropy_triton.forward(x, target, weight, expected_grad, reduction, -100, *options, splits=1)
        for splits in (2, 5):
            grad = torch.empty_like(x)
            got = cross_entropy_triton.forward(x, target, weight, grad, reduction, -100, *options, splits=splits)
            in_place = x.clone()
            got_in_place = cross_entropy_triton.forward(
                in_place, target, weight, in_place, reduction, -100, *options, splits=splits
            )
            for a, b in ((got, expected), (got_in_place, expected), ((grad, in_place), (expected_grad,) * 2)):
                for u, v in zip(a, b, strict=True):
                    torch.testing.assert_close(u, v, equal_nan=True, **tol)


def test_the_launcher_splits_rows_by_shape_alone():
    """Programs per row from N and V: one when the rows fill the GPU or V is small, else enough for about
    TARGET_PROGRAMS programs in chunks of at least SPLIT_COLUMNS, at most MAX_SPLITS."""
    from fusedops import cross_entropy_triton as ct

    assert ct.splits_for(4096, 50257) == 1 and ct.splits_for(8, 1024) == 1
    assert ct.splits_for(512, 131072) == 4 and ct.splits_for(1, 256000) == 31
    assert ct.splits_for(1, 10**7) == ct.MAX_SPLITS
