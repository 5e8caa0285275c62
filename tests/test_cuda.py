"""The Triton kernels natively on CUDA tensors (bench/gpu.sh runs this file on a machine with a GPU):
against PyTorch, float64 gradcheck and gradgradcheck, opcheck, torch.compile, a CUDA graph capturing a
training step (no host synchronisation), and the device-side assert on a target out of range. Elsewhere
the same kernels run on CPU tensors through Triton's interpreter, in every other test file."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from cases import batch_norm, cross_entropy
from conftest import ROOT, loss_and_grad

import fusedops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(dtype, reduction):
    logits = (torch.randn(300, 50257, device=CUDA) * 3).to(dtype)
    target = torch.randint(0, 50257, (300,), device=CUDA)
    target[::7] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1)
    loss, grad = loss_and_grad(fusedops.cross_entropy, logits, target, **kw)
    # against float64 (torch's own fp32 sum is off by more than ours: 7e-5 against 2.4e-7 relative)
    loss_t, grad_t = loss_and_grad(F.cross_entropy, logits.double(), target, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss.double(), loss_t, **tol)
    torch.testing.assert_close(grad.double(), grad_t, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_torch(dtype):
    """The chunked projection with the Triton kernel, several chunks, against F.linear + F.cross_entropy in
    float64: the loss and the gradients of input, weight and bias, each within a fraction of its largest value."""
    x, W, b = (torch.randn(*shape, device=CUDA) for shape in ((1000, 256), (50257, 256), (50257,)))
    x, W, b = x.to(dtype).requires_grad_(), (W / 16).to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    target = torch.randint(0, 50257, (1000,), device=CUDA)
    target[::9] = -100
    kw = dict(label_smoothing=0.1)
    got = fusedops.linear_cross_entropy(x, W, target, b, chunk_bytes=2**24, **kw)
    grads = torch.autograd.grad(got, (x, W, b))
    wrt = [t.detach().double().requires_grad_() for t in (x, W, b)]
    expected = F.cross_entropy(F.linear(*wrt), target, **kw)
    expected_grads = torch.autograd.grad(expected, wrt)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for g, e in zip((got, *grads), (expected, *expected_grads)):
        assert (g.double() - e).abs().max() <= tol * e.abs().max()


@pytest.mark.parametrize("option", ["weight", "probabilities", "z_loss_softcap"])
@pytest.mark.parametrize("V", [50257, 131072])
def test_cross_entropy_options_match_torch(option, V):
    """Class weights, probability targets, z-loss with softcap, at language-model vocabularies, against
    PyTorch's composition in float64."""
    logits = torch.randn(64, V, device=CUDA) * 3
    target = torch.randint(0, V, (64,), device=CUDA)
    target[::5] = -100
    weight = torch.rand(V, device=CUDA) + 0.5
    ours = dict(
        weight=dict(weight=weight, label_smoothing=0.1),
        z_loss_softcap=dict(z_loss=1e-4, softcap=30.0),
        probabilities=dict(label_smoothing=0.1),
    )[option]
    if option == "probabilities":
        target = torch.softmax(torch.randn(64, V, device=CUDA), 1)

    def oracle(x, t):
        if option == "z_loss_softcap":
            y = 30.0 * torch.tanh(x / 30.0)
            lse, kept = torch.logsumexp(y, 1), t != -100
            return (F.cross_entropy(y, t, reduction="sum") + 1e-4 * (lse**2 * kept).sum()) / kept.sum()
        kw = dict(ours)
        return F.cross_entropy(x, t, kw.pop("weight", None).double() if "weight" in kw else None, **kw)

    loss, grad = loss_and_grad(lambda x, t: fusedops.cross_entropy(x, t, **ours), logits, target)
    loss_64, grad_64 = loss_and_grad(oracle, logits.double(), target.double() if option == "probabilities" else target)
    torch.testing.assert_close(loss.double(), loss_64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), grad_64, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("shape", [(4096, 256), (64, 96, 33)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_module_matches_torch(shape, training):
    ours, theirs = fusedops.BatchNorm1d(shape[1]).to(CUDA), torch.nn.BatchNorm1d(shape[1]).to(CUDA)
    for module in (ours, theirs):
        module.train(training)
    x, dy = torch.randn(shape, device=CUDA) * 2 + 1, torch.randn(shape, device=CUDA)
    results = []
    for module in (ours, theirs):
        leaf = x.clone().requires_grad_()
        y = module(leaf)
        y.backward(dy)
        results.append([y.detach(), leaf.grad, module.weight.grad, module.bias.grad, *module.buffers()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (8, 40, 7, 9, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_norm_nd_fused_matches_torch(shape, channels_last, dtype):
    """BatchNorm2d/3d with the residual and relu fused, against nn.BatchNorm2d/3d, + and relu in float64 with
    the same relu mask: where the pre-activation is within rounding of 0, a mask from another rounding would
    flip, and the gradient there with it (by the whole dy), which says nothing about either."""
    cls, torch_cls = (
        (fusedops.BatchNorm2d, torch.nn.BatchNorm2d)
        if len(shape) == 4
        else (fusedops.BatchNorm3d, torch.nn.BatchNorm3d)
    )
    ours, theirs = cls(shape[1], activation="relu").to(CUDA), torch_cls(shape[1]).to(CUDA, torch.float64)
    layout = (
        (torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
        if channels_last
        else torch.contiguous_format
    )
    x, r, dy = [(torch.randn(shape, device=CUDA) * 2 + 1).to(dtype).contiguous(memory_format=layout) for _ in range(3)]
    leaf, res = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = ours(leaf, res)
    y.backward(dy)
    assert y.is_contiguous(memory_format=layout)
    mask = y.detach() > 0  # ours; the float64 pre-activation takes it
    leaf64, res64 = x.double().requires_grad_(), r.double().requires_grad_()
    y64 = torch.where(mask, theirs(leaf64) + res64, 0)
    y64.backward(dy.double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    got = [y.detach(), leaf.grad, res.grad, ours.weight.grad, ours.bias.grad, ours.running_mean, ours.running_var]
    expected = [
        y64,
        leaf64.grad,
        res64.grad,
        theirs.weight.grad,
        theirs.bias.grad,
        theirs.running_mean,
        theirs.running_var,
    ]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_tensor_on_the_second_device_while_the_first_is_current():
    """The device guard: each op runs on its tensors' device, whichever is current."""
    x, t = torch.randn(64, 1000), torch.randint(0, 1000, (64,))
    h = torch.randn(8, 4, 5, 5)
    with torch.cuda.device(0):
        x1 = x.to("cuda:1").requires_grad_()
        loss = fusedops.cross_entropy(x1, t.to("cuda:1"), label_smoothing=0.1)
        loss.backward()
        y = fusedops.BatchNorm2d(4).to("cuda:1")(h.to("cuda:1"))
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    loss_t, grad_t = loss_and_grad(F.cross_entropy, x.double(), t, label_smoothing=0.1)
    torch.testing.assert_close(loss.double().cpu(), loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad.double().cpu(), grad_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.cpu(), torch.nn.BatchNorm2d(4)(h), rtol=1e-4, atol=1e-4)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(6, 9, dtype=torch.float64, device=CUDA, requires_grad=True)
    t = torch.tensor([0, 8, -100, 3, 3, 1], device=CUDA)
    ce = lambda x: fusedops.cross_entropy(x, t, label_smoothing=0.1)
    assert torch.autograd.gradcheck(ce, (x,)) and torch.autograd.gradgradcheck(ce, (x,))
    h = torch.randn(8, 3, 2, dtype=torch.float64, device=CUDA, requires_grad=True)
    w, b = (torch.randn(3, dtype=torch.float64, device=CUDA, requires_grad=True) for _ in range(2))
    bn = lambda h, w, b: fusedops.batch_norm(h, None, None, w, b, training=True, unbiased=True)
    assert torch.autograd.gradcheck(bn, (h, w, b)) and torch.autograd.gradgradcheck(bn, (h, w, b))
    h4 = torch.randn(3, 3, 2, 2, dtype=torch.float64, device=CUDA).to(memory_format=torch.channels_last)
    h4, r = h4.requires_grad_(), torch.randn(3, 3, 2, 2, dtype=torch.float64, device=CUDA, requires_grad=True)
    fused = lambda h, w, b, r: fusedops.batch_norm(
        h,
        None,
        None,
        w,
        b,
        True,
        residual=r,
        activation="relu",
    )
    assert torch.autograd.gradcheck(fused, (h4, w, b, r)) and torch.autograd.gradgradcheck(fused, (h4, w, b, r))


@pytest.mark.parametrize("operator", [cross_entropy, batch_norm])
def test_opcheck(operator):
    for name, args in operator.op_samples():
        args = tuple(a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(torch.ops.fusedops, name), args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    torch._dynamo.reset()
    bn, head = fusedops.BatchNorm1d(16).to(CUDA), torch.nn.Linear(16, 40).to(CUDA)
    bn2d = fusedops.BatchNorm2d(16, activation="relu").to(CUDA)

    def step(x, t):
        h = bn2d(x.view(8, 8, 16, 1).movedim(-2, 1), x.view(8, 16, 8, 1)).reshape(64, 16)  # NCHW, relu(bn + x)
        return fusedops.cross_entropy(head(torch.tanh(bn(h))), t, label_smoothing=0.1)

    x, t = torch.randn(64, 16, device=CUDA), torch.randint(0, 40, (64,), device=CUDA)
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    loss = compiled(x, t)
    loss.backward()
    params = (*bn.parameters(), *bn2d.parameters(), *head.parameters())
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    step(x, t).backward()
    torch.testing.assert_close(loss, step(x, t))
    for got, want in zip(grads, [p.grad for p in params]):
        torch.testing.assert_close(got, want)


def test_a_training_step_is_captured_by_a_cuda_graph():
    """No host synchronisation in forward or backward: the whole step is captured and replayed."""
    bn, head = fusedops.BatchNorm1d(32).to(CUDA), torch.nn.Linear(32, 100).to(CUDA)
    x, t = torch.randn(128, 32, device=CUDA), torch.randint(0, 100, (128,), device=CUDA)

    def step():
        for p in (*bn.parameters(), *head.parameters()):
            p.grad = None
        loss = fusedops.cross_entropy(head(bn(x)), t)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: Triton compiles, the allocator fills its pools
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)


def test_a_target_out_of_range_is_a_device_side_assert():
    code = (
        "import torch, fusedops\n"
        "x = torch.randn(4, 5, device='cuda', requires_grad=True)\n"
        "fusedops.cross_entropy(x, torch.tensor([0, 5, 1, 2], device='cuda')).backward()\n"
        "torch.cuda.synchronize()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert out.returncode != 0
    assert "target out of range" in out.stderr or "device-side assert" in out.stderr, out.stderr


def test_every_other_file_under_the_interpreter_in_a_process_without_a_gpu():
    """The README's test command on a GPU machine: this process runs the compiled kernels (this file), and the
    other test files, which run the Triton kernels on CPU tensors, run here in a process that sees no GPU, as on
    a machine without one. Both must pass."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ignore=tests/test_cuda.py"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
