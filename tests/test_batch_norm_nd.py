"""BatchNorm2d/3d and the fused residual and relu against PyTorch: both memory formats, every dtype,
several training steps then eval, odd sizes, strided views, fp64 gradcheck, torch.func, and the parity
cases of torch's own batch-norm tests (bias=False, empty batches, momentum in eval, eps=0)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_all_close
from torch import nn
from torch.func import jacrev, jvp, vmap

import fusedops

CLASSES = {2: (nn.BatchNorm2d, fusedops.BatchNorm2d), 3: (nn.BatchNorm3d, fusedops.BatchNorm3d)}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# (input shape, memory format): shapes the Triton interpreter runs quickly
SHAPES = [
    ((4, 3, 5, 6), "contiguous"),
    ((4, 3, 5, 6), "channels_last"),
    ((3, 2, 3, 2, 4), "contiguous"),
    ((3, 2, 3, 2, 4), "channels_last"),
]
# bf16/fp16 input with fp32 parameters, as torch allows; each dtype's tolerance against torch
TOLERANCE = {
    torch.float64: {},
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def laid_out(t, memory_format):
    return t.contiguous(memory_format=CHANNELS_LAST[t.dim()]) if memory_format == "channels_last" else t.contiguous()


def fused_and_torch(shape, **kwargs):
    """A fusedops layer and torch's of the input's rank, with the same random parameters and statistics."""
    theirs_cls, ours_cls = CLASSES[len(shape) - 2] if len(shape) > 3 else (nn.BatchNorm1d, fusedops.BatchNorm1d)
    backend = kwargs.pop("backend", None)
    activation = kwargs.pop("activation", None)
    theirs = theirs_cls(shape[1], **kwargs)
    g = torch.Generator().manual_seed(shape[1])
    with torch.no_grad():
        for t in (theirs.weight, theirs.bias):
            if t is not None:
                t.uniform_(-1, 1, generator=g)
    ours = ours_cls(shape[1], backend=backend, activation=activation, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def torch_composition(bn, x, residual, activation):
    """act(bn(x) + residual) in eager torch ops: the oracle of the fused forms."""
    y = bn(x)
    if residual is not None:
        y = y + residual
    return F.relu(y) if activation == "relu" else y


def step(module, x, dy, residual=None, activation=None):
    """One forward+backward on fresh leaves: output, input grad, residual grad, parameter grads."""
    x = x.detach().clone().requires_grad_()
    r = None if residual is None else residual.detach().clone().requires_grad_()
    fused = isinstance(module, (fusedops.BatchNorm1d, fusedops.BatchNorm2d, fusedops.BatchNorm3d))
    y = module(x, r) if fused else torch_composition(module, x, r, activation)
    y.backward(dy)
    params = [p.grad.clone() for p in module.parameters()]
    for p in module.parameters():
        p.grad = None
    return [y.detach(), x.grad, None if r is None else r.grad, *params]


def run_against_torch(
    shape, memory_format, dtype, backend, steps=3, residual=False, activation=None, view=None, **kwargs
):
    """Several training steps, then eval, of fusedops' layer and torch's: outputs, gradients, running
    statistics, the output's memory format."""
    g = torch.Generator().manual_seed(sum(shape))
    ours, theirs = fused_and_torch(shape, backend=backend, activation=activation, **kwargs)
    tol = TOLERANCE[dtype]
    if dtype == torch.float64:
        ours, theirs = ours.double(), theirs.double()
    for i in range(steps + 1):
        ours.train(i < steps), theirs.train(i < steps)
        x, dy, r = [laid_out((torch.randn(shape, generator=g) * 2 + 1).to(dtype), memory_format) for _ in range(3)]
        if view is not None:
            x, dy, r = view(x), view(dy), view(r)
        r = r if residual else None
        got, want = step(ours, x, dy, r), step(theirs, x, dy, r, activation)
        assert_all_close(got, want, **tol)
        expected_format = CHANNELS_LAST.get(len(shape)) if memory_format == "channels_last" else None
        if expected_format is not None and view is None:
            assert got[0].is_contiguous(memory_format=expected_format) and got[1].is_contiguous(
                memory_format=expected_format
            )
        assert_all_close(
            [ours.running_mean, ours.running_var, ours.num_batches_tracked],
            [theirs.running_mean, theirs.running_var, theirs.num_batches_tracked],
            **tol,
        )


# every dtype on C++; on Triton's interpreter (slow) the two of a mixed-precision model
BACKEND_DTYPES = [("cpp", dtype) for dtype in TOLERANCE] + [("triton", torch.float32), ("triton", torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape,memory_format", SHAPES)
def test_layer_matches_torch_over_steps_then_eval(backend, shape, memory_format, dtype):
    run_against_torch(shape, memory_format, dtype, backend)


@pytest.mark.parametrize("shape,memory_format", SHAPES)
@pytest.mark.parametrize("fused", ["relu", "add_relu", "add"])
def test_fused_forms_match_the_torch_composition(backend, shape, memory_format, fused):
    run_against_torch(
        shape,
        memory_format,
        torch.float32,
        backend,
        residual=fused.startswith("add"),
        activation="relu" if fused.endswith("relu") else None,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_fused_forms_in_other_dtypes(backend, dtype):
    run_against_torch((3, 4, 3, 5), "channels_last", dtype, backend, steps=2, residual=True, activation="relu")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": None},
        {"affine": False},
        {"track_running_stats": False},
        {"bias": False},
        {"eps": 1e-3, "momentum": 0.5},
    ],
    ids=["momentum_none", "no_affine", "no_running_stats", "no_bias", "eps_momentum"],
)
def test_layer_options_match_torch(backend, kwargs):
    run_against_torch((4, 3, 3, 5), "contiguous", torch.float32, backend, **kwargs)


@pytest.mark.parametrize(
    "shape",
    [(4, 1, 3, 3), (2, 3, 1, 1), (5, 3, 1, 1), (2, 1, 1, 1, 1), (2, 3, 1, 2, 1), (1, 3, 2, 1)],
    ids=["C=1", "1x1_N=2", "1x1", "3d_single_value_N=2", "3d_odd", "N=1"],
)
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_odd_sizes(backend, shape, memory_format):
    run_against_torch(shape, memory_format, torch.float32, backend, residual=True, activation="relu")


VIEWS = {
    "every_other_image": lambda t: torch.cat([t, t]).narrow(0, 0, 2 * t.shape[0])[::2],
    "channel_slice": lambda t: torch.cat([t, t, t], 1)[:, t.shape[1] : 2 * t.shape[1]],
    "cropped": lambda t: torch.nn.functional.pad(t, (1, 1, 1, 1))[..., 1:-1, 1:-1],
    "transposed_hw": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_strided_views(backend, view):
    run_against_torch(
        (3, 2, 4, 5), "contiguous", torch.float32, backend, steps=1, residual=True, activation="relu", view=VIEWS[view]
    )


def test_residual_in_the_other_memory_format(backend):
    ours, theirs = fused_and_torch((2, 3, 4, 5), backend=backend, activation="relu")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)
    r, dy = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    assert_all_close(step(ours, x, dy, r), step(theirs, x, dy, r, "relu"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "backend,training,memory_format",
    [("cpp", training, layout) for training in (True, False) for layout in ("contiguous", "channels_last")]
    + [("triton", True, "channels_last")],
)
def test_gradcheck_and_gradgradcheck(backend, training, memory_format):
    g = torch.Generator().manual_seed(4)
    x = laid_out(torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64), memory_format).requires_grad_()
    r = torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w, b = [torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def fn(x, w, b, r):
        return fusedops.batch_norm(
            x, rm.clone(), rv.clone(), w, b, training, residual=r, activation="relu", backend=backend
        )

    assert torch.autograd.gradcheck(fn, (x, w, b, r))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, r))


def test_forward_mode_and_vmap_match_torch():
    g = torch.Generator().manual_seed(5)
    x, r, tx, tr = [torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    w, b = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)

    def ours(x, r):
        return fusedops.batch_norm(x, None, None, w, b, True, residual=r, activation="relu")

    def theirs(x, r):
        return F.relu(F.batch_norm(x, None, None, w, b, True) + r)

    assert_all_close(jvp(ours, (x, r), (tx, r)), jvp(theirs, (x, r), (tx, r)))
    assert_all_close(jacrev(ours, argnums=(0, 1))(x, r), jacrev(theirs, argnums=(0, 1))(x, r))
    xs, rs = torch.stack([x, 2 * x - 1]), torch.stack([r, -r])
    assert_all_close([vmap(ours)(xs, rs)], [vmap(theirs)(xs, rs)])
    assert_all_close([vmap(ours, in_dims=(0, None))(xs, r)], [vmap(theirs, in_dims=(0, None))(xs, r)])


def test_backward_saves_no_tensor_but_the_input_and_output(backend):
    """The relu's mask comes from the saved output: no full-size tensor is saved that the caller does not
    hold already."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    r = torch.randn(2, 3, 4, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fusedops.BatchNorm2d(3, activation="relu", backend=backend)(x, r)
    full_size = {t.data_ptr() for t in saved if t.numel() == x.numel()}
    assert full_size == {x.data_ptr(), y.data_ptr()}


@pytest.mark.parametrize("cls,rank", [(fusedops.BatchNorm1d, 1), (fusedops.BatchNorm2d, 2), (fusedops.BatchNorm3d, 3)])
def test_state_dict_and_signature_are_torchs(cls, rank):
    theirs_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
    for kwargs in [{}, {"bias": False}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}]:
        ours, theirs = cls(5, **kwargs), theirs_cls(5, **kwargs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
    assert "activation='relu'" in repr(cls(5, activation="relu"))


@pytest.mark.parametrize(
    "cls,good,bad",
    [
        (fusedops.BatchNorm1d, (4, 3), (4, 3, 2, 2)),
        (fusedops.BatchNorm2d, (4, 3, 2, 2), (4, 3, 2)),
        (fusedops.BatchNorm2d, (4, 3, 2, 2), (4, 3, 2, 2, 2)),
        (fusedops.BatchNorm3d, (4, 3, 2, 2, 2), (4, 3, 2, 2)),
    ],
)
def test_wrong_rank_raises_like_torch(cls, good, bad):
    theirs = {
        fusedops.BatchNorm1d: nn.BatchNorm1d,
        fusedops.BatchNorm2d: nn.BatchNorm2d,
        fusedops.BatchNorm3d: nn.BatchNorm3d,
    }[cls](3)
    with pytest.raises(ValueError) as torch_error:
        theirs(torch.randn(bad))
    with pytest.raises(ValueError) as our_error:
        cls(3)(torch.randn(bad))
    assert str(our_error.value).endswith(str(torch_error.value))  # "expected 4D input (got 3D input)"
    assert cls(3)(torch.randn(good)).shape == good


def test_unknown_activation_is_rejected_by_the_layer():
    with pytest.raises(ValueError, match=r"activation must be one of \[None, 'relu'\], got 'gelu'"):
        fusedops.BatchNorm2d(3, activation="gelu")


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2), (2, 3, 0, 4), (0, 3, 1, 2, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_in_training_like_torch(backend, shape, momentum):
    """An empty output, zero parameter gradients, the batch counted and the statistics left as they are."""
    ours, theirs = fused_and_torch(shape, backend=backend, momentum=momentum)
    for m in (ours, theirs):
        m.running_mean.fill_(2.0), m.running_var.fill_(3.0)
    x, dy = torch.randn(shape), torch.randn(shape)
    got, want = step(ours, x, dy), step(theirs, x, dy)
    assert got[0].shape == shape
    assert_all_close(got, want)
    assert_all_close(
        [ours.running_mean, ours.running_var, ours.num_batches_tracked],
        [theirs.running_mean, theirs.running_var, theirs.num_batches_tracked],
    )


@pytest.mark.parametrize("momentum", [-1.0, 5.0])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_momentum_is_ignored_in_eval(momentum, rank):
    shape = (4, 3) + (2,) * (rank - 1)
    ours, theirs = fused_and_torch(shape, momentum=momentum)
    ours.eval(), theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(
        fusedops.batch_norm(x, ours.running_mean, ours.running_var, momentum=momentum),
        F.batch_norm(x, theirs.running_mean, theirs.running_var, momentum=momentum),
    )


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_eps_zero_raises_in_training_and_runs_in_eval_like_torch(rank):
    shape = (4, 3) + (2,) * (rank - 1)
    ours, theirs = fused_and_torch(shape, eps=0.0)
    x = torch.randn(shape)
    for m in (ours, theirs):
        with pytest.raises(ValueError, match="eps must be positive"):
            m(x)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_functional_fused_forms_match_f_batch_norm(backend):
    g = torch.Generator().manual_seed(6)
    x, r = torch.randn(3, 4, 3, 3, generator=g), torch.randn(3, 4, 3, 3, generator=g)
    rm, rv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    w, b = torch.randn(4, generator=g), torch.randn(4, generator=g)
    stats = {"ours": (rm.clone(), rv.clone()), "theirs": (rm.clone(), rv.clone())}
    got = fusedops.batch_norm(x, *stats["ours"], w, b, True, 0.2, residual=r, activation="relu", backend=backend)
    want = F.relu(F.batch_norm(x, *stats["theirs"], w, b, True, 0.2) + r)
    assert_all_close([got, *stats["ours"]], [want, *stats["theirs"]], rtol=1e-5, atol=1e-5)


def test_module_deepcopy_and_train_eval_keep_the_activation():
    m = fusedops.BatchNorm2d(3, activation="relu", momentum=None)
    c = copy.deepcopy(m).eval()
    assert c.activation == "relu" and c.momentum is None and not c.training
    assert (c(torch.randn(2, 3, 2, 2)) >= 0).all()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])  # Triton: test_cuda.py
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_compile_fullgraph_of_a_residual_block(compiler, memory_format):
    """conv -> bn+relu -> conv -> bn+add+relu compiled whole, against torch's eager block."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    conv1, conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
    ours1, theirs1 = fused_and_torch((2, 3, 4, 4), activation="relu", momentum=None, backend="cpp")
    ours2, theirs2 = fused_and_torch((2, 3, 4, 4), activation="relu", backend="cpp")

    def block(x, bn1, bn2, fused):
        if fused:
            return bn2(conv2(bn1(conv1(x))), x)
        return F.relu(bn2(conv2(F.relu(bn1(conv1(x))))) + x)

    compiled = torch.compile(lambda x: block(x, ours1, ours2, True), fullgraph=True, backend=compiler)
    for _ in range(2):
        x = laid_out(torch.randn(2, 3, 4, 4, generator=g), memory_format)
        dy = torch.randn(2, 3, 4, 4, generator=g)
        results = []
        for fn in (compiled, lambda x: block(x, theirs1, theirs2, False)):
            leaf = x.clone().requires_grad_()
            y = fn(leaf)
            y.backward(dy)
            results.append([y.detach(), leaf.grad] + [p.grad.clone() for p in conv1.parameters()])
            for p in conv1.parameters():
                p.grad = None
        assert_all_close(*results, rtol=1e-4, atol=1e-4)
        for ours, theirs in ((ours1, theirs1), (ours2, theirs2)):
            assert_all_close(list(ours.state_dict().values()), list(theirs.state_dict().values()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "layer,memory_format", [(fusedops.BatchNorm2d, torch.channels_last), (fusedops.BatchNorm3d, torch.channels_last_3d)]
)
@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_keeps_its_memory_format(backend, layer, memory_format, training):
    """No element says which layout an empty tensor has: its strides do, and the output takes them, as
    PyTorch's (and its gradient too)."""
    shape = (0, 5, 2, 2) if layer is fusedops.BatchNorm2d else (0, 5, 2, 2, 2)
    x = torch.randn(shape).to(memory_format=memory_format).requires_grad_()
    torch_layer = getattr(torch.nn, layer.__name__)(5).train(training)
    out, expected = layer(5, backend=backend).train(training)(x), torch_layer(x)
    assert out.shape == expected.shape and out.stride() == expected.stride() == x.stride()
    out.sum().backward()
    assert x.grad.shape == x.shape and x.grad.stride() == x.stride()
