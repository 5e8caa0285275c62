"""No host synchronisation on the Triton path: the forward and backward of every operator, on every option path,
read no tensor value into Python (no item(), tolist(), bool(tensor), int(tensor), nonzero(), ...) and copy no
Python value to the device (no torch.tensor(...)), whatever the tensors' device, so that on CUDA nothing waits
for the GPU and the ops can be captured in a CUDA graph. Here the Triton kernels run on CPU tensors under the
interpreter, with those reads spied on.

What the spy cannot see: reads inside C++ (PyTorch's own ops); the Python-level ones are fusedops'."""

import pytest
import torch
import torch.nn.functional as F
from cases.cross_entropy import composite

import fusedops

# Tensor methods that read a value into Python


def test_the_spy_sees_reads(host_reads):
    t = torch.tensor([1.0, 2.0])
    with host_reads:
        bool(t[0])
        t.sum().item()
        range(torch.tensor(2))
        torch.tensor([1.0])  # a host-to-device copy on CUDA
    t.tolist()  # not watched
    assert [name for name, _ in host_reads.reads] == ["__bool__", "item", "tensor", "__index__", "tensor"]


@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_triton_reads_nothing_on_the_host(host_reads, reduction, inplace_backward):
    logits = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([1, -100, 4, 0])
    results = []
    for smoothing, upstream in [(0.0, 1.0), (0.1, 2.5)]:
        x = logits * 1  # in place overwrites this copy, not the leaf
        with host_reads:
            loss = fusedops.cross_entropy(
                x,
                target,
                reduction=reduction,
                label_smoothing=smoothing,
                inplace_backward=inplace_backward,
                backend="triton",
            )
            loss.backward(torch.full_like(loss, upstream))
        results.append((loss.detach(), logits.grad))
        logits.grad = None
    assert host_reads.reads == []
    for (loss, g), (smoothing, upstream) in zip(results, [(0.0, 1.0), (0.1, 2.5)]):
        loss_t = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=smoothing)
        (g_t,) = torch.autograd.grad(loss_t, logits, torch.full_like(loss_t, upstream))
        torch.testing.assert_close(loss, loss_t.detach())
        torch.testing.assert_close(g, g_t)


def test_batch_norm_triton_reads_nothing_on_the_host(host_reads):
    module = fusedops.BatchNorm1d(3, backend="triton")
    x = torch.randn(4, 3, 2, requires_grad=True)
    with host_reads:
        module(x).square().sum().backward()  # training: batch statistics, running statistics updated
        module.eval()
        module(x).square().sum().backward()
        y = fusedops.batch_norm(
            x,
            module.running_mean,
            module.running_var,
            module.weight,
            module.bias,
            training=True,
            momentum=0.5,
            unbiased=True,
            backend="triton",
        )
        y.square().sum().backward()
    assert host_reads.reads == []
    reference = torch.nn.BatchNorm1d(3)
    reference(x)
    torch.testing.assert_close(module.num_batches_tracked, reference.num_batches_tracked)
    # the functional call's update: running = 0.5 * running + 0.5 * batch (the unbiased variance)
    torch.testing.assert_close(module.running_mean, 0.5 * reference.running_mean + 0.5 * x.mean((0, 2)))
    torch.testing.assert_close(module.running_var, 0.5 * reference.running_var + 0.5 * x.var((0, 2)))


def test_cross_entropy_triton_target_out_of_range_reads_nothing(host_reads):
    """The Triton kernel checks the targets' range with a device-side assert (tl.device_assert in a
    debug=True kernel), which on a GPU stops the kernel, as PyTorch's CUDA kernel does (not run here).
    The interpreter compiles device asserts out (its options have debug=False, whatever the kernel's),
    so here nothing is raised: the rows whose target is out of range get a NaN loss and gradient, the
    others their right values, and no value is read on the host to find out."""
    logits = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([1, 5, -100, -1])
    with host_reads:
        loss = fusedops.cross_entropy(logits, target, reduction="none", backend="triton")
        loss.sum().backward()
        mean = fusedops.cross_entropy(logits, target, backend="triton")
    assert host_reads.reads == []
    assert loss[[1, 3]].isnan().all() and logits.grad[[1, 3]].isnan().all()
    safe = torch.tensor([1, 0, -100, 0])
    loss_t = F.cross_entropy(logits, safe, reduction="none")
    (g_t,) = torch.autograd.grad(loss_t.sum(), logits)
    torch.testing.assert_close(loss[[0, 2]], loss_t[[0, 2]].detach())
    torch.testing.assert_close(logits.grad[[0, 2]], g_t[[0, 2]])
    assert mean.isnan()


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_2d_fused_triton_reads_nothing_on_the_host(host_reads, channels_last):
    module = fusedops.BatchNorm2d(3, activation="relu", momentum=None, backend="triton")
    x = torch.randn(2, 3, 2, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x, r = x.requires_grad_(), torch.randn(2, 3, 2, 3, requires_grad=True)
    with host_reads:
        y = module(x, r)
        y.square().sum().backward()
        module(torch.randn(0, 3, 2, 3))  # an empty batch: counted, nothing normalised
    assert host_reads.reads == []
    reference = torch.nn.BatchNorm2d(3, momentum=None)
    torch.testing.assert_close(y, F.relu(reference(x) + r))
    reference(torch.randn(0, 3, 2, 3))
    torch.testing.assert_close(list(module.buffers()), list(reference.buffers()))


def test_cross_entropy_triton_options_read_nothing_on_the_host(host_reads):
    """Class weights (the weighted mean's divisor), probability targets, z-loss, softcap and lse on the Triton
    path: no value read into Python, and the numbers of the torch composite."""
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(4, 5, generator=g, requires_grad=True)
    weight = torch.rand(5, generator=g) + 0.5
    for target in (torch.tensor([1, -100, 4, 0]), torch.softmax(torch.randn(4, 5, generator=g), 1)):
        kw = dict(weight=weight, label_smoothing=0.1, z_loss=0.01, softcap=3.0)
        with host_reads:
            loss, lse = fusedops.cross_entropy(logits, target, return_lse=True, backend="triton", **kw)
            (loss + lse.sum()).backward()
        assert host_reads.reads == []
        loss_c, lse_c = composite(logits, target, return_lse=True, **kw)
        (g_c,) = torch.autograd.grad(loss_c + lse_c.sum(), logits)
        torch.testing.assert_close(loss, loss_c.detach())
        torch.testing.assert_close(logits.grad, g_c)
        logits.grad = None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_triton_reads_nothing_on_the_host(host_reads, reduction):
    """The LM head on the Triton path, in chunks (the mean's divisor over all of them), with class weights,
    probability targets and every option: no value read into Python, and the numbers of the composition."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(6, 3, generator=g, requires_grad=True)
    W = torch.randn(5, 3, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    class_weight = torch.rand(5, generator=g) + 0.5
    targets = (torch.tensor([1, -100, 4, 0, 2, -100]), torch.softmax(torch.randn(6, 5, generator=g), 1))
    for target in targets:
        kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=0.01, softcap=3.0)
        with host_reads:
            loss = fusedops.linear_cross_entropy(
                x, W, target, b, class_weight=class_weight, chunk_bytes=2 * 5 * 4, backend="triton", **kw
            )
            grads = torch.autograd.grad(loss.sum() * 1.5, [x, W, b])
        assert host_reads.reads == []
        loss_c = composite(F.linear(x, W, b), target, weight=class_weight, **kw)
        grads_c = torch.autograd.grad(loss_c.sum() * 1.5, [x, W, b])
        torch.testing.assert_close(loss, loss_c)
        torch.testing.assert_close(grads, grads_c)
