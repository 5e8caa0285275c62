"""SyncBatchNorm and data-parallel training in real processes over gloo on 127.0.0.1."""
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedops
from fusedops._ops import kernels

TIMEOUT_S = 60  # a whole group of processes, start to end
GROUP_TIMEOUT_S = 10  # a collective waiting on a peer that never comes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir, fn, args):
    """One process: joins the group, runs fn(rank, world, *args), saves its result or its error."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        result = fn(rank, world, *args)
    except Exception as e:  # noqa: BLE001  (handed to the test, which asserts on it)
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # no teardown: a peer may be gone


def run_ranks(tmp_path, world, fn, *args):
    """fn in `world` processes; their results, in rank order (None for a process that saved none)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(tmp_path), fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        p.kill()
    assert not alive, f"ranks {alive} still running after {TIMEOUT_S} s"
    paths = [tmp_path / f"rank{r}.pt" for r in range(world)]
    return [torch.load(p) if p.exists() else None for p in paths]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("shape", [(9, 5), (4, 3, 5)])
def test_split_ops_compose_to_the_fused_ones(backend, shape):
    """stats, forward with the statistics given, backward_reduce and backward_elemt in one process give
    the fused training forward and backward."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3
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
    dx = ops.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, n, True)
    want_dx, want_dw, want_db = ops.batch_norm_backward(dy, x, mean, invstd, weight, True, True)
    torch.testing.assert_close(dx, want_dx)
    torch.testing.assert_close(sum_dy, want_db)
    torch.testing.assert_close(sum_dy_xmu * invstd, want_dw)
    empty_mean, empty_m2 = ops.batch_norm_stats(x[:0])  # a process with no rows: zeros
    assert not empty_mean.any() and not empty_m2.any()


def test_backward_elemt_checks_the_count():
    x = torch.randn(4, 3)
    sums = torch.zeros(3, dtype=torch.float64)
    fusedops._ops.load()
    with pytest.raises(ValueError, match="count must be more than 1 and at least the 4 values per channel here, got 3"):
        torch.ops.fusedops.batch_norm_backward_elemt(x, x, sums, torch.ones(3), None, sums, sums, 3, True)


def _batch(sizes, channels, length):
    """The whole batch, its output gradient, weight and bias: the same in every process."""
    g = torch.Generator().manual_seed(0)
    shape = (sum(sizes), channels) + ((length,) if length else ())
    x = torch.randn(shape, generator=g) * 3 + 5
    return x, torch.randn(shape, generator=g), torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)


def _sync_steps(rank, world, sizes, channels, length, unbiased, backend, steps):
    """`steps` training steps of SyncBatchNorm on this rank's rows of the batch."""
    x, dy, weight, bias = _batch(sizes, channels, length)
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    bn = fusedops.SyncBatchNorm(channels, momentum=0.3, unbiased=unbiased, backend=backend)
    with torch.no_grad():
        bn.weight.copy_(weight), bn.bias.copy_(bias)
    for _ in range(steps):
        xr = x[rows].clone().requires_grad_()
        bn.zero_grad()
        out = bn(xr)
        out.backward(dy[rows])
    return dict(out=out.detach(), dx=xr.grad, dw=bn.weight.grad, db=bn.bias.grad, state=bn.state_dict())


@pytest.mark.parametrize("world, sizes, length, unbiased, backend", [
    (2, (5, 11), 0, True, "cpp"),
    (3, (1, 7, 4), 3, False, "cpp"),
    (3, (0, 9, 2), 0, True, "cpp"),  # a process with no rows still takes part
    (2, (3, 6), 2, True, "triton"),
])
def test_sync_batch_norm_equals_one_process_on_the_whole_batch(tmp_path, world, sizes, length, unbiased, backend):
    channels, steps = 6, 2
    results = run_ranks(tmp_path, world, _sync_steps, sizes, channels, length, unbiased, backend, steps)
    for r in results:
        assert "error" not in r, r.get("traceback")
    x, dy, weight, bias = _batch(sizes, channels, length)
    bn = fusedops.BatchNorm1d(channels, momentum=0.3, unbiased=unbiased, backend="cpp")
    with torch.no_grad():
        bn.weight.copy_(weight), bn.bias.copy_(bias)
    for _ in range(steps):
        xr = x.clone().requires_grad_()
        bn.zero_grad()
        out = bn(xr)
        out.backward(dy)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), out.detach(), **tol)
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]), xr.grad, **tol)
    torch.testing.assert_close(sum(r["dw"] for r in results), bn.weight.grad, **tol)
    torch.testing.assert_close(sum(r["db"] for r in results), bn.bias.grad, **tol)
    for r in results:  # the same running statistics everywhere
        for key, value in bn.state_dict().items():
            torch.testing.assert_close(r["state"][key], value, **tol)


def _lonely_rank(rank, world):
    """Rank 1 leaves at once; rank 0 then needs it in SyncBatchNorm's collective."""
    if rank == 1:
        os._exit(0)
    bn = fusedops.SyncBatchNorm(4)
    start = time.monotonic()
    try:
        bn(torch.randn(8, 4))
    except RuntimeError as e:
        return dict(message=str(e), seconds=time.monotonic() - start, num_batches_tracked=bn.num_batches_tracked)
    return dict(message=None)


def test_a_dead_peer_is_a_clear_error_not_a_hang(tmp_path):
    survivor, _ = run_ranks(tmp_path, 2, _lonely_rank)
    assert survivor["message"] is not None and "error" not in survivor
    assert "SyncBatchNorm: all_gather over the process group failed" in survivor["message"]
    assert survivor["seconds"] < GROUP_TIMEOUT_S + 5
    assert survivor["num_batches_tracked"] == 0  # the failed batch is not counted


def _too_few_values(rank, world):
    bn = fusedops.SyncBatchNorm(3)
    try:
        bn(torch.randn(1 - rank, 3))  # one value per channel over both processes
    except ValueError as e:
        return dict(message=str(e))
    return dict(message=None)


def test_one_value_over_all_processes_is_refused_everywhere(tmp_path):
    for r in run_ranks(tmp_path, 2, _too_few_values):
        assert r["message"] is not None and "more than 1 value per channel over all processes, got 1" in r["message"]


def test_without_a_process_group_it_is_batch_norm1d():
    torch.manual_seed(0)
    x = torch.randn(10, 5, requires_grad=True)
    sync, plain = fusedops.SyncBatchNorm(5, unbiased=True), fusedops.BatchNorm1d(5, unbiased=True)
    assert not dist.is_initialized()
    out = sync(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.state_dict(), plain.state_dict(), rtol=0, atol=0)
    sync.eval(), plain.eval()
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)


def test_convert_keeps_parameters_buffers_and_options():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.2),
                          nn.Sequential(fusedops.BatchNorm1d(4, eps=1e-3, unbiased=True, backend="cpp")))
    model[1].running_mean.fill_(0.5)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[2][0].weight
    converted = fusedops.convert_sync_batchnorm(model)
    assert converted is model
    assert type(model[1]) is fusedops.SyncBatchNorm and type(model[2][0]) is fusedops.SyncBatchNorm
    assert model[2][0].weight is weight  # the same parameters, so an optimizer built before still sees them
    assert (model[1].momentum, model[2][0].eps, model[2][0].unbiased, model[2][0].backend) == (0.2, 1e-3, True, "cpp")
    assert not model[1].training
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    single = fusedops.convert_sync_batchnorm(fusedops.BatchNorm1d(2))
    assert type(single) is fusedops.SyncBatchNorm


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
