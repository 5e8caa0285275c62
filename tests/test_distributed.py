"""SyncBatchNorm and data-parallel training in real processes over gloo on 127.0.0.1."""

import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import HostReads
from processes import GROUP_TIMEOUT_S, TIMEOUT_S, run_ok, run_ranks
from torch import nn

import fusedops
from fusedops._ops import kernels

TORCH_BATCH_NORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
FUSEDOPS_BATCH_NORM = {
    2: fusedops.BatchNorm1d,
    3: fusedops.BatchNorm1d,
    4: fusedops.BatchNorm2d,
    5: fusedops.BatchNorm3d,
}


def _stored(t, memory_format):
    """t stored in memory_format: "contiguous", "channels_last" (the channels last, whatever the rank)."""
    return t.contiguous() if memory_format == "contiguous" else t.movedim(1, -1).contiguous().movedim(-1, 1)


def _is_stored(t, memory_format):
    return _stored(t, memory_format).stride() == t.stride()


@pytest.mark.parametrize(
    "shape, memory_format",
    [((9, 5), "contiguous"), ((4, 3, 5), "contiguous"), ((3, 2, 2, 3), "contiguous"), ((3, 2, 2, 3), "channels_last")],
)
def test_split_ops_compose_to_the_fused_ones(backend, shape, memory_format):
    """stats, forward with the statistics given, backward_reduce and backward_elemt in one process give
    the fused training forward and backward."""
    g = torch.Generator().manual_seed(1)
    x = _stored(torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3, memory_format)
    ops = kernels(backend, x)
    dy, weight, bias = torch.randn_like(x), torch.rand(shape[1], dtype=torch.float64), torch.randn(shape[1]).double()
    n = x.numel() // shape[1]
    mean, m2 = ops.batch_norm_stats(x)
    torch.testing.assert_close(m2, x.transpose(0, 1).reshape(shape[1], -1).var(1) * (n - 1))
    out, mean_out, invstd, _ = ops.batch_norm_forward(x, weight, bias, mean, m2 / (n - 1), False, True, 1e-5)
    expected = ops.batch_norm_forward(x, weight, bias, None, None, True, True, 1e-5)
    for got, want in zip((out, mean_out, invstd), expected):
        torch.testing.assert_close(got, want)
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(dy, x, mean)
    count = torch.tensor([n], dtype=torch.float64)
    dx = ops.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, True)
    want_dx, want_dw, want_db, _ = ops.batch_norm_backward(dy, x, mean, invstd, weight, True, True)
    torch.testing.assert_close(dx, want_dx)
    assert _is_stored(out, memory_format) and _is_stored(dx, memory_format)
    torch.testing.assert_close(sum_dy, want_db)
    torch.testing.assert_close(sum_dy_xmu * invstd, want_dw)
    empty_mean, empty_m2 = ops.batch_norm_stats(x[:0])  # a process with no rows: zeros
    assert not empty_mean.any() and not empty_m2.any()


def test_backward_elemt_checks_the_count():
    x = torch.randn(4, 3)
    sums = torch.zeros(3, dtype=torch.float64)
    count = torch.tensor([3.0], dtype=torch.float64)
    fusedops._ops.load()
    with pytest.raises(ValueError, match="count must be more than 1 and at least the 4 values per channel here, got 3"):
        torch.ops.fusedops.batch_norm_backward_elemt(x, x, sums, torch.ones(3), None, sums, sums, count, True)


def _batch(sizes, shape, memory_format="contiguous", seed=0):
    """The whole batch of sum(sizes) samples of `shape` (C, *), its output gradient, weight and bias: the
    same in every process."""
    g = torch.Generator().manual_seed(seed)
    channels = shape[0]
    x = torch.randn((sum(sizes), *shape), generator=g) * 3 + 5
    dy = torch.randn(x.shape, generator=g)
    return (
        _stored(x, memory_format),
        _stored(dy, memory_format),
        torch.rand(channels, generator=g) + 0.5,
        torch.randn(channels, generator=g),
    )


def _rows(sizes, rank):
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def _train_steps(bn, x, dy, steps):
    """`steps` training steps of `bn` on x: the last output and the gradients."""
    for _ in range(steps):
        xr = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        bn.zero_grad()
        out = bn(xr)
        out.backward(dy)
    return dict(
        out=out.detach(),
        dx=xr.grad,
        dw=bn.weight.grad,
        db=None if bn.bias is None else bn.bias.grad,
        state=bn.state_dict(),
    )


def _with_weight_and_bias(bn, weight, bias):
    with torch.no_grad():
        bn.weight.copy_(weight)
        if bn.bias is not None:
            bn.bias.copy_(bias)
    return bn


def _sync_steps(rank, world, sizes, shape, memory_format, options, backend, steps):
    """`steps` training steps of SyncBatchNorm on this rank's samples of the batch, and the tensor values read
    on the host (from Python) meanwhile."""
    x, dy, weight, bias = _batch(sizes, shape, memory_format)
    rows = _rows(sizes, rank)
    bn = _with_weight_and_bias(fusedops.SyncBatchNorm(shape[0], backend=backend, **options), weight, bias)
    host_reads = HostReads()
    host_reads.install()
    with host_reads:
        result = _train_steps(bn, x[rows], dy[rows], steps)
    return dict(result, host_reads=host_reads.reads)


@pytest.mark.parametrize(
    "world, sizes, shape, memory_format, options, backend",
    [
        (2, (5, 11), (6,), "contiguous", dict(unbiased=True), "cpp"),
        (3, (1, 7, 4), (6, 3, 2), "contiguous", dict(momentum=0.3), "cpp"),
        (3, (0, 9, 2), (6, 2, 3), "channels_last", dict(momentum=0.3), "cpp"),  # a process with no samples takes part
        (2, (3, 4), (5, 2, 2, 3), "channels_last", dict(momentum=None, bias=False), "cpp"),
        (2, (3, 6), (6, 2), "contiguous", dict(unbiased=True), "triton"),
    ],
)
def test_sync_batch_norm_equals_one_process_on_the_whole_batch(
    tmp_path, world, sizes, shape, memory_format, options, backend
):
    """Outputs, input gradients, the ranks' weight and bias gradients summed (as DistributedDataParallel
    does), the running statistics: those of one batch norm on the whole batch (torch's, or fusedops' for
    the unbiased normalisation, which torch lacks). Nothing is read on the host."""
    steps = 2
    results = run_ok(tmp_path, world, _sync_steps, sizes, shape, memory_format, options, backend, steps)
    x, dy, weight, bias = _batch(sizes, shape, memory_format)
    layer = FUSEDOPS_BATCH_NORM[x.dim()] if options.get("unbiased") else TORCH_BATCH_NORM[x.dim()]
    one = _train_steps(_with_weight_and_bias(layer(shape[0], **options), weight, bias), x, dy, steps)
    tol = dict(rtol=1e-5, atol=1e-5)
    for key in ("out", "dx"):
        torch.testing.assert_close(torch.cat([r[key] for r in results]), one[key], **tol)
        assert all(_is_stored(r[key], memory_format) for r in results)
    torch.testing.assert_close(sum(r["dw"] for r in results), one["dw"], **tol)
    if one["db"] is None:
        assert all(r["db"] is None for r in results)
    else:
        torch.testing.assert_close(sum(r["db"] for r in results), one["db"], **tol)
    for r in results:  # the same running statistics everywhere
        assert r["state"].keys() == one["state"].keys()
        for key, value in one["state"].items():
            torch.testing.assert_close(r["state"][key], value, **tol)
        assert r["host_reads"] == []


def _large_mean_batch(sizes):
    """(N, 4, 3, 2) fp64 samples whose channels have |mean| = 1000 * std, std from 0.01 to 100."""
    g = torch.Generator().manual_seed(3)
    std = torch.tensor([0.01, 1.0, 3.0, 100.0], dtype=torch.float64).view(1, 4, 1, 1)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64).view(1, 4, 1, 1)
    return torch.randn(sum(sizes), 4, 3, 2, generator=g, dtype=torch.float64) * std + sign * 1000 * std


def _large_mean(rank, world, sizes):
    """This rank's statistics, and the global ones SyncBatchNormFunction merges, of _large_mean_batch in
    fp64 and fp32."""
    x = _large_mean_batch(sizes)[_rows(sizes, rank)]
    result = dict(local=kernels("cpp", x).batch_norm_stats(x))
    for name, xr in (("fp64", x), ("fp32", x.float())):
        options = fusedops.SyncBatchNormOptions(unbiased=False, eps=1e-5, group=dist.group.WORLD, backend="cpp")
        out, mean, _, var, count = fusedops.SyncBatchNormFunction.apply(xr, None, None, options)
        result[name] = dict(out=out, mean=mean, var=var, count=count)
    return result


def _exact_stats(x):
    """Per-channel mean and unbiased variance of (N, C, *) fp64 x, two passes in long double."""
    values = x.transpose(0, 1).reshape(x.shape[1], -1).numpy().astype(np.longdouble)
    mean = values.mean(1)
    return mean, ((values - mean[:, None]) ** 2).sum(1) / (values.shape[1] - 1)


def _chan(counts, means, m2s):
    """The merge of the all-gather SyncBatchNorm had before (Chan et al.): mean and m2 over the ranks."""
    counts = torch.tensor(counts, dtype=torch.float64).view(-1, 1)
    mean = (counts * means).sum(0) / counts.sum()
    return mean, m2s.sum(0) + (counts * (means - mean).square()).sum(0)


def test_large_mean_statistics_are_as_accurate_as_the_all_gather_merge(tmp_path):
    """|mean| = 1000 * std, unequal batches over 3 processes: the global mean and variance of the two
    all-reduces are within a few fp64 roundings of the exact ones (measured: 1.1e-13 std and 5.4e-15
    relative, the all-gather merge 1.1e-13 and 5.7e-15), no worse than the all-gather merge of the same
    per-process statistics, fp32 input included; the outputs are batch norm's on the whole batch (fp32:
    within 2e-7 of the exact ones, where torch.nn.BatchNorm2d's are 5e-5 off)."""
    sizes = (3, 40, 17)
    results = run_ok(tmp_path, 3, _large_mean, sizes)
    x = _large_mean_batch(sizes)
    n = x.numel() // x.shape[1]

    def errors(xs, mean, var):  # |mean error| in stds, relative variance error, against the exact ones of xs
        exact_mean, exact_var = _exact_stats(xs.double())
        return (
            float(np.max(np.abs(mean.numpy().astype(np.longdouble) - exact_mean) / np.sqrt(exact_var))),
            float(np.max(np.abs(var.double().numpy().astype(np.longdouble) / exact_var - 1))),
        )

    chan_mean, chan_m2 = _chan(
        [s * 6 for s in sizes],
        torch.stack([r["local"][0] for r in results]),
        torch.stack([r["local"][1] for r in results]),
    )
    chan_mean_error, chan_var_error = errors(x, chan_mean, chan_m2 / (n - 1))
    for r in results:
        assert r["fp64"]["count"].dtype == torch.float64 and r["fp64"]["count"].tolist() == [n]
        mean_error, var_error = errors(x, r["fp64"]["mean"], r["fp64"]["var"])
        assert mean_error <= 2 * chan_mean_error + 1e-15 and var_error <= 2 * chan_var_error + 1e-15
        assert max(mean_error, var_error, *errors(x.float(), r["fp32"]["mean"], r["fp32"]["var"])) < 1e-12
    one = nn.BatchNorm2d(4, dtype=torch.float64)
    torch.testing.assert_close(torch.cat([r["fp64"]["out"] for r in results]), one(x).detach(), rtol=0, atol=1e-10)
    exact32 = one(x.float().double()).detach().float()
    torch.testing.assert_close(torch.cat([r["fp32"]["out"] for r in results]), exact32, rtol=0, atol=1e-6)


def _compiled_and_eager(rank, world, sizes, shape):
    """Two training steps of SyncBatchNorm under torch.compile(fullgraph=True) and eagerly."""
    x, dy, weight, bias = _batch(sizes, shape, "channels_last", seed=4)
    rows = _rows(sizes, rank)
    eager = _with_weight_and_bias(fusedops.SyncBatchNorm(shape[0], momentum=0.5, backend="cpp"), weight, bias)
    compiled = copy.deepcopy(eager)
    # aot_eager: Dynamo and AOTAutograd trace the step as for inductor, without its C++ build (tens of seconds)
    compiled.forward = torch.compile(compiled.forward, fullgraph=True, backend="aot_eager")
    return dict(eager=_train_steps(eager, x[rows], dy[rows], 2), compiled=_train_steps(compiled, x[rows], dy[rows], 2))


def test_fullgraph_compile_equals_eager(tmp_path):
    """torch.compile(fullgraph=True) traces the whole step, collectives included (torch.nn.SyncBatchNorm's
    graph-breaks), and computes what eager does."""
    results = run_ok(tmp_path, 2, _compiled_and_eager, (3, 5), (3, 4, 2), timeout=3 * TIMEOUT_S)
    for r in results:
        for key, value in r["eager"].items():
            torch.testing.assert_close(r["compiled"][key], value, rtol=1e-5, atol=1e-5)


def _lonely_rank(rank, world):
    """Rank 1 leaves at once; rank 0 then needs it in SyncBatchNorm's collective."""
    if rank == 1:
        os._exit(0)
    bn = fusedops.SyncBatchNorm(4)
    start = time.monotonic()
    try:
        bn(torch.randn(8, 4, 2, 2))
    except RuntimeError as e:
        return dict(message=str(e), seconds=time.monotonic() - start, num_batches_tracked=bn.num_batches_tracked)
    return dict(message=None)


def test_a_dead_peer_is_a_clear_error_not_a_hang(tmp_path):
    survivor, _ = run_ranks(tmp_path, 2, _lonely_rank)
    assert survivor["message"] is not None and "error" not in survivor
    assert "SyncBatchNorm: all_reduce over the process group failed" in survivor["message"]
    assert survivor["seconds"] < GROUP_TIMEOUT_S + 5
    assert survivor["num_batches_tracked"] == 0  # the failed batch is not counted


def _fewer_than_two_values(rank, world):
    """A batch with no value anywhere, then one with one value over both processes."""
    bn = fusedops.SyncBatchNorm(3, momentum=0.5)
    with torch.no_grad():
        bn.running_mean.fill_(2.0), bn.bias.fill_(0.25)
    empty = bn(torch.randn(0, 3, 2))
    after_empty = copy.deepcopy(bn.state_dict())
    x = torch.full((1 - rank, 3, 1), 4.0)
    return dict(empty=empty, after_empty=after_empty, out=bn(x), after_one=bn.state_dict())


def test_fewer_than_two_values_over_all_processes(tmp_path):
    """As torch.nn.SyncBatchNorm: fewer than 2 values per channel is refused only without another process
    (the count over all processes is on the device; reading it would stall every step). With none at all
    the running statistics stay as they are; with one the variance is 0 and running_var takes NaN."""
    for rank, r in enumerate(run_ok(tmp_path, 2, _fewer_than_two_values)):
        assert r["empty"].shape == (0, 3, 2)
        torch.testing.assert_close(r["after_empty"]["running_mean"], torch.full((3,), 2.0))
        torch.testing.assert_close(r["after_empty"]["running_var"], torch.ones(3))
        assert r["after_empty"]["num_batches_tracked"] == 1
        torch.testing.assert_close(r["out"], torch.full((1 - rank, 3, 1), 0.25))  # (x - mean) * invstd + bias
        torch.testing.assert_close(r["after_one"]["running_mean"], torch.full((3,), 3.0))  # 0.5 * 2 + 0.5 * 4
        assert r["after_one"]["running_var"].isnan().all() and r["after_one"]["num_batches_tracked"] == 2
    with pytest.raises(ValueError, match="expected more than 1 value per channel when training"):
        fusedops.SyncBatchNorm(3)(torch.randn(1, 3, 1, 1))  # no process group: nobody else to count


def test_without_a_process_group_it_is_the_fused_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(10, 5, 3, 2, requires_grad=True)
    sync, plain = fusedops.SyncBatchNorm(5, unbiased=True), fusedops.BatchNorm2d(5, unbiased=True)
    assert not dist.is_initialized()
    out = sync(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.state_dict(), plain.state_dict(), rtol=0, atol=0)
    sync.eval(), plain.eval()
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)


def test_signature_and_input_ranks_as_torch():
    sync = fusedops.SyncBatchNorm(4, 1e-3, 0.2, True, True, None, "cpu", torch.float64, bias=False)
    torch_sync = nn.SyncBatchNorm(4, 1e-3, 0.2, True, True, None, "cpu", torch.float64, bias=False)
    assert sync.state_dict().keys() == torch_sync.state_dict().keys() and "bias" not in sync.state_dict()
    assert sync.weight.dtype == torch.float64 and (sync.eps, sync.momentum) == (1e-3, 0.2)
    for shape in [(3, 4), (3, 4, 2), (3, 4, 2, 2), (3, 4, 2, 1, 2), (2, 4, 1, 1, 1, 2)]:
        assert sync(torch.randn(shape, dtype=torch.float64)).shape == shape
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected at least 2D input \(got 1D input\)"):
        sync(torch.randn(4, dtype=torch.float64))


def test_convert_keeps_parameters_buffers_and_options():
    group = object()  # a torch SyncBatchNorm's own group, kept when convert_sync_batchnorm is given none
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=0.2),
        nn.Sequential(
            nn.BatchNorm3d(4, affine=False),
            nn.SyncBatchNorm(4, process_group=group),
            fusedops.BatchNorm1d(4, eps=1e-3, unbiased=True, backend="cpp"),
            fusedops.BatchNorm2d(4, bias=False, track_running_stats=False),
        ),
    )
    model[1].running_mean.fill_(0.5)
    model.eval()
    model[2][1].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [model[1], *model[2]]
    params = [[*m.parameters()] for m in modules]
    converted = fusedops.convert_sync_batchnorm(model)
    assert converted is model
    syncs = [model[1], *model[2]]
    assert all(type(m) is fusedops.SyncBatchNorm for m in syncs)
    for sync, module, ps in zip(syncs, modules, params):
        assert all(a is b for a, b in zip(sync.parameters(), ps, strict=True))  # an optimizer built before sees them
        assert sync.running_mean is module.running_mean and sync.training == module.training
        for option in ("eps", "momentum", "affine", "track_running_stats"):
            assert getattr(sync, option) == getattr(module, option)
    assert (syncs[0].process_group, syncs[2].process_group) == (None, group)
    assert (syncs[3].unbiased, syncs[3].backend, syncs[4].bias) == (True, "cpp", None)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    single = fusedops.convert_sync_batchnorm(nn.BatchNorm3d(2), process_group=group)
    assert type(single) is fusedops.SyncBatchNorm and single.process_group is group
    with pytest.raises(ValueError, match="SyncBatchNorm has no fused activation"):
        fusedops.convert_sync_batchnorm(fusedops.BatchNorm2d(2, activation="relu"))


def _train(tmp_path, name, *args):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "fusedops", "train", "--steps", "50", "--quiet", "--out", str(out), *args]
    subprocess.run(cmd, check=True, timeout=TIMEOUT_S * 2)
    with open(out / "run.json") as f:
        return json.load(f)


def test_data_parallel_training_equals_one_process(tmp_path):
    two = _train(tmp_path, "two", "--nproc", "2")
    one = _train(tmp_path, "one")
    assert two["nproc"] == 2 and one["nproc"] == 1
    (run2,), (run1,) = two["runs"].values(), one["runs"].values()
    assert len(run2["losses"]) == len(run1["losses"]) == 50
    torch.testing.assert_close(torch.tensor(run2["losses"]), torch.tensor(run1["losses"]), rtol=0, atol=1e-4)
    assert abs(run2["val"] - run1["val"]) < 1e-3
    assert (tmp_path / "two" / "loss.png").exists()
