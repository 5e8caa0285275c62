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
from conftest import loss_and_grad

import fusedops
from cases import batch_norm, cross_entropy

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
    loss_t, grad_t = loss_and_grad(F.cross_entropy, logits.float(), target, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss.float(), loss_t, **tol)
    torch.testing.assert_close(grad.float(), grad_t, **tol)


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


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(6, 9, dtype=torch.float64, device=CUDA, requires_grad=True)
    t = torch.tensor([0, 8, -100, 3, 3, 1], device=CUDA)
    ce = lambda x: fusedops.cross_entropy(x, t, label_smoothing=0.1)  # noqa: E731
    assert torch.autograd.gradcheck(ce, (x,)) and torch.autograd.gradgradcheck(ce, (x,))
    h = torch.randn(8, 3, 2, dtype=torch.float64, device=CUDA, requires_grad=True)
    w, b = (torch.randn(3, dtype=torch.float64, device=CUDA, requires_grad=True) for _ in range(2))
    bn = lambda h, w, b: fusedops.batch_norm(h, None, None, w, b, training=True, unbiased=True)  # noqa: E731
    assert torch.autograd.gradcheck(bn, (h, w, b)) and torch.autograd.gradgradcheck(bn, (h, w, b))


@pytest.mark.parametrize("operator", [cross_entropy, batch_norm])
def test_opcheck(operator):
    for name, args in operator.op_samples():
        args = tuple(a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(torch.ops.fusedops, name), args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    torch._dynamo.reset()
    bn, head = fusedops.BatchNorm1d(16).to(CUDA), torch.nn.Linear(16, 40).to(CUDA)

    def step(x, t):
        return fusedops.cross_entropy(head(torch.tanh(bn(x))), t, label_smoothing=0.1)

    x, t = torch.randn(64, 16, device=CUDA), torch.randint(0, 40, (64,), device=CUDA)
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    loss = compiled(x, t)
    loss.backward()
    grads = [p.grad.clone() for p in (*bn.parameters(), *head.parameters())]
    for p in (*bn.parameters(), *head.parameters()):
        p.grad = None
    step(x, t).backward()
    torch.testing.assert_close(loss, step(x, t))
    for got, want in zip(grads, [p.grad for p in (*bn.parameters(), *head.parameters())]):
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
    code = ("import torch, fusedops\n"
            "x = torch.randn(4, 5, device='cuda', requires_grad=True)\n"
            "fusedops.cross_entropy(x, torch.tensor([0, 5, 1, 2], device='cuda')).backward()\n"
            "torch.cuda.synchronize()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode != 0
    assert "target out of range" in out.stderr or "device-side assert" in out.stderr, out.stderr
