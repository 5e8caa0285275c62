from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_all_close, forward_and_grads

import fusedops
from fusedops import reference


def test_matches_the_chunked_reference(backend, notebook_batch):
    params, Xb, Yb = notebook_batch
    acts = reference.forward(params, Xb, Yb)
    grads = reference.backward(params, acts, Xb, Yb)
    gain, bias = params["bngain"].view(-1), params["bnbias"].view(-1)
    fn = lambda x, w, b: fusedops.batch_norm(
        x,
        None,
        None,
        w,
        b,
        training=True,
        unbiased=True,
        backend=backend,
    )
    hpreact, (dhprebn, dbngain, dbnbias) = forward_and_grads(fn, acts["hprebn"], [gain, bias], grads["hpreact"])
    torch.testing.assert_close(hpreact, acts["hpreact"].detach(), rtol=1e-6, atol=1e-6)  # a few fp32 ulps of |x| < 8
    for fused, chunked in [(dhprebn, grads["hprebn"]), (dbngain, grads["bngain"]), (dbnbias, grads["bnbias"])]:
        assert (fused - chunked.view(fused.shape)).abs().max().item() <= 1e-8  # the notebooks' maxdiff level


@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 6)])
@pytest.mark.parametrize("training", [True, False])
def test_unbiased_matches_the_reference(backend, shape, training):
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(shape, generator=g) * 3 + 1, torch.randn(shape, generator=g)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    rm, rv = torch.randn(shape[1], generator=g), torch.rand(shape[1], generator=g) + 0.5
    stats = {"fused": (rm.clone(), rv.clone()), "reference": (rm.clone(), rv.clone())}
    calls = {"fused": partial(fusedops.batch_norm, backend=backend), "reference": reference.batch_norm}
    results = {}
    for name, call in calls.items():
        fn = lambda x, w, b: call(x, *stats[name], w, b, training, momentum=0.3, unbiased=True)  # noqa: E731,B023
        results[name] = forward_and_grads(fn, x, [w, b], dy)
    (y, grads), (y_ref, grads_ref) = results["fused"], results["reference"]
    torch.testing.assert_close(y, y_ref)
    assert_all_close(grads, grads_ref, rtol=1e-5, atol=1e-6)
    assert_all_close(stats["fused"], stats["reference"])


# (shape, input layout, BatchNorm1d keyword arguments) of the comparisons with torch.nn.BatchNorm1d
TORCH_CASES = {
    "2d": ((64, 16), "contiguous", {}),
    "3d": ((16, 8, 5), "contiguous", {}),
    "2d_non_contiguous": ((64, 16), "transposed", {}),
    "3d_non_contiguous": ((16, 8, 5), "transposed", {}),
    "momentum_none": ((32, 6), "contiguous", dict(momentum=None)),
    "affine_false": ((32, 6, 3), "contiguous", dict(affine=False)),
    "no_running_stats": ((32, 6), "contiguous", dict(track_running_stats=False)),
}


def make_input(shape, layout, generator):
    """A random (N, C) or (N, C, L) input, stored C-last ("transposed") or contiguous."""
    if layout == "contiguous":
        return torch.randn(shape, generator=generator) * 2 + 0.5
    return (torch.randn(shape[:1] + shape[2:] + shape[1:2], generator=generator) * 2 + 0.5).movedim(-1, 1)


def module_step(module, x, dy, call=None):
    """The output of call(x) (default: module(x)) and the gradients w.r.t. x and the module's parameters."""
    x = x.detach().clone().requires_grad_()
    params = [p for p in (module.weight, module.bias) if p is not None]
    for p in params:
        p.grad = None
    y = (call or module)(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in params]


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_module_matches_torch(backend, case):
    shape, layout, kwargs = TORCH_CASES[case]
    g = torch.Generator().manual_seed(2)
    ours = fusedops.BatchNorm1d(shape[1], backend=backend, **kwargs)
    theirs = torch.nn.BatchNorm1d(shape[1], **kwargs)
    if ours.affine:
        with torch.no_grad():
            for p in (ours.weight, ours.bias):
                p.copy_(torch.randn(shape[1], generator=g))
    theirs.load_state_dict(ours.state_dict())
    for step in range(4):  # three training steps, then eval
        if step == 3:
            ours.eval(), theirs.eval()
        x, dy = make_input(shape, layout, g), torch.randn(shape, generator=g)
        assert_all_close(module_step(ours, x, dy), module_step(theirs, x, dy), rtol=1e-5, atol=1e-5)
        assert_all_close(list(ours.state_dict().values()), list(theirs.state_dict().values()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,backend", [((2000, 1100), "cpp"), ((70, 130), "triton")])
def test_several_row_chunks_and_channel_blocks(shape, backend):
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(shape, generator=g) - 2, torch.randn(shape, generator=g)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    y, grads = forward_and_grads(
        lambda x, w, b: fusedops.batch_norm(x, None, None, w, b, True, backend=backend), x, [w, b], dy
    )
    y64, grads64 = forward_and_grads(
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True), x.double(), [w.double(), b.double()], dy.double()
    )
    assert_all_close([y.double()] + [gr.double() for gr in grads], [y64] + grads64, rtol=1e-5, atol=1e-5)


def test_cpp_sums_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(3000, 40, generator=g), torch.randn(3000, 40, generator=g)
    w, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    fn = lambda x, w, b: fusedops.batch_norm(x, None, None, w, b, True, backend="cpp")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            y, grads = forward_and_grads(fn, x, [w, b], dy)
            results.append([y] + grads)
    finally:
        torch.set_num_threads(threads)
    assert_all_close(results[0], results[1], rtol=0, atol=0)


def test_state_dict_round_trips_both_ways():
    g = torch.Generator().manual_seed(5)
    ours, theirs = fusedops.BatchNorm1d(6, momentum=None), torch.nn.BatchNorm1d(6, momentum=None)
    for module in (ours, theirs):
        for _ in range(2):
            module(torch.randn(10, 6, generator=g) * 3 + 1)
    for source, target in [(ours, torch.nn.BatchNorm1d(6)), (theirs, fusedops.BatchNorm1d(6))]:
        target.load_state_dict(source.state_dict())  # strict: the same keys
        assert_all_close(list(target.state_dict().values()), list(source.state_dict().values()))
        source.eval(), target.eval()
        x = torch.randn(5, 6, generator=g)
        torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
@pytest.mark.parametrize("training", [True, False])
def test_half_precision_against_float32(backend, dtype, param_dtype, training):
    g = torch.Generator().manual_seed(6)
    C = 11  # a whole vector of 8 lanes (converted by at::vec) and a tail of 3
    x, dy = (torch.randn(48, C, generator=g) * 2 + 1).to(dtype), torch.randn(48, C, generator=g).to(dtype)
    pdtype = dtype if param_dtype == "same" else torch.float32
    w, b = (torch.randn(C, generator=g).to(pdtype) for _ in range(2))
    rm, rv = torch.randn(C, generator=g).to(pdtype), (torch.rand(C, generator=g) + 0.5).to(pdtype)
    stats32 = rm.float(), rv.float()
    y, grads = forward_and_grads(
        lambda x, w, b: fusedops.batch_norm(x, rm, rv, w, b, training, backend=backend), x, [w, b], dy
    )
    y32, grads32 = forward_and_grads(
        lambda x, w, b: F.batch_norm(x, *stats32, w, b, training), x.float(), [w.float(), b.float()], dy.float()
    )
    assert y.dtype == dtype and [gr.dtype for gr in grads] == [dtype, pdtype, pdtype]
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=4e-2, atol=4e-2)
    assert_all_close([y.float()] + [gr.float() for gr in grads], [y32] + grads32, **tol)
    assert_all_close([rm.float(), rv.float()], list(stats32), **tol)


@pytest.mark.parametrize("mode", ["train", "train_unbiased", "eval"])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2)])
def test_gradcheck(backend, mode, shape):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    training = mode != "eval"
    running = torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    stats = (None, None) if training else running
    fn = lambda x, w, b: fusedops.batch_norm(
        x,
        *stats,
        w,
        b,
        training,
        unbiased=mode == "train_unbiased",
        backend=backend,
    )
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_eval_backward_is_the_plain_affine_one(backend):
    g = torch.Generator().manual_seed(8)
    x, dy = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    w, b = torch.randn(4, generator=g), torch.randn(4, generator=g)
    rm, rv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    fn = lambda x, w, b: fusedops.batch_norm(x, rm, rv, w, b, training=False, backend=backend)
    _, (dx, dw, db) = forward_and_grads(fn, x, [w, b], dy)
    invstd = (rv + 1e-5).rsqrt()
    torch.testing.assert_close(dx, dy * w * invstd)  # the statistics are constants
    torch.testing.assert_close(dw, (dy * (x - rm) * invstd).sum(0))
    torch.testing.assert_close(db, dy.sum(0))


@pytest.mark.parametrize("backend,compiler", [("cpp", "aot_eager"), ("cpp", "inductor")])  # Triton: test_cuda.py
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph(backend, compiler, momentum):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    ours = fusedops.BatchNorm1d(5, momentum=momentum, backend=backend)
    theirs = torch.nn.BatchNorm1d(5, momentum=momentum)
    compiled = torch.compile(lambda x: ours(x * 2), fullgraph=True, backend=compiler)
    for _ in range(2):
        x, dy = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
        assert_all_close(module_step(ours, x, dy, compiled), module_step(theirs, x, dy, lambda x: theirs(x * 2)))
        assert_all_close(list(ours.state_dict().values()), list(theirs.state_dict().values()))


def test_module_with_a_parametrized_weight():
    """A parametrization moves the weight out of the module's parameter dict: it is still used."""

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    x = torch.randn(8, 3)
    bn = fusedops.BatchNorm1d(3)
    torch.nn.utils.parametrize.register_parametrization(bn, "weight", Doubled())
    expected = torch.nn.functional.batch_norm(
        x, None, None, 2 * bn.parametrizations.weight.original, bn.bias, training=True
    )
    torch.testing.assert_close(bn(x), expected)


def test_inference_mode(backend):
    """Inference mode skips the autograd kernel: the op's own kernel normalises and updates the statistics."""
    torch.manual_seed(0)
    x = torch.randn(10, 4, 3)
    ours, theirs = fusedops.BatchNorm1d(4, backend=backend), torch.nn.BatchNorm1d(4)
    with torch.inference_mode():
        for training in (True, False):
            ours.train(training), theirs.train(training)
            torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


def test_triton_eps_reaches_the_kernel_in_fp64(monkeypatch):
    """A Python float argument reaches a compiled Triton kernel as fp32 (the interpreter keeps fp64, so only the
    launch shows it): eps goes to the statistics kernel as an fp64 tensor, and fp64 invstd is then C++'s."""
    from fusedops import batch_norm_triton

    launches = []
    kernel = batch_norm_triton._stats_merge_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(args)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(batch_norm_triton, "_stats_merge_kernel", Recorder())
    x = torch.full((6, 3), 2.0, dtype=torch.float64)
    x[0] += 1e-9  # a variance near 0: invstd is eps's
    out = fusedops.batch_norm(x, None, None, training=True, eps=1e-5, backend="triton")
    (eps,) = [a for a in launches[0] if isinstance(a, torch.Tensor) and a.dim() == 0]
    assert eps.dtype == torch.float64 and eps.item() == 1e-5
    assert not any(isinstance(a, float) for a in launches[0])
    torch.testing.assert_close(out, fusedops.batch_norm(x, None, None, training=True, eps=1e-5, backend="cpp"))
