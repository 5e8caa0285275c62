"""Running a function in a group of processes over gloo on 127.0.0.1, for the tests of the ops split
across processes."""

import datetime
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60  # a whole group of processes, start to end
GROUP_TIMEOUT_S = 10  # a collective waiting on a peer that never comes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir, fn, args):
    """One process: joins the group, runs fn(rank, world, *args), saves its result or its error."""
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        )
        result = fn(rank, world, *args)
    except Exception as e:  # noqa: BLE001  (handed to the test, which asserts on it)
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # no teardown: a peer may be gone


def run_ranks(tmp_path, world, fn, *args, timeout=TIMEOUT_S):
    """fn in `world` processes; their results, in rank order (None for a process that saved none)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(tmp_path), fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        p.kill()
    assert not alive, f"ranks {alive} still running after {timeout} s"
    paths = [tmp_path / f"rank{r}.pt" for r in range(world)]
    return [torch.load(p) if p.exists() else None for p in paths]


def run_ok(tmp_path, world, fn, *args, **kwargs):
    """run_ranks, asserting that no process failed."""
    results = run_ranks(tmp_path, world, fn, *args, **kwargs)
    for r in results:
        assert r is not None and "error" not in r, r and r.get("traceback")
    return results
