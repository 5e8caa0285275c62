"""The benchmark suite on tiny shapes: it runs, every provider appears in every mode, the ratios come
from the measured times, the files are written, the command line exits 0. No test asserts a speed."""
import csv
import io
import os
import subprocess
import sys

import pytest
import torch

from fusedops import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
QUIET = dict(min_run_time=0.01, log=io.StringIO())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and on a busy machine waiting for a second one dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ce_rows():
    """Every cross-entropy provider, torch.compile included (the suite's one compiled case here)."""
    return bench.run_op("ce", [(64, 100)], [torch.float32], CPU, **QUIET)


@pytest.fixture(scope="module")
def train_rows():
    return bench.run_train(os.path.join(ROOT, "names.txt"), CPU, steps=5, repeats=2, log=io.StringIO())


def check_rows(rows, providers, modes):
    """Every (mode, provider) once per case; times measured; ratios from those times."""
    assert sorted((r.mode, r.provider) for r in rows) == sorted((m, p) for m in modes for p in providers)
    by_key = {(r.shape, r.dtype, r.mode, r.provider): r for r in rows}
    for r in rows:
        case = (r.shape, r.dtype, r.mode)
        assert r.median_ms > 0 and r.iqr_ms >= 0
        assert r.vs_eager == pytest.approx(by_key[case + (bench.BASELINE[r.op],)].median_ms / r.median_ms)
        if bench.FLOOR in providers:
            assert r.vs_floor == pytest.approx(r.median_ms / by_key[case + (bench.FLOOR,)].median_ms)


def test_cross_entropy_every_provider_and_mode(ce_rows):
    providers = bench.provider_names("ce", CPU)
    assert {bench.FLOOR, bench.EAGER, bench.COMPILE, bench.REFERENCE, "fusedops cpp",
            "fusedops cpp in-place"} <= set(providers)
    check_rows(ce_rows, providers, bench.MODES)


def test_cross_entropy_memory_and_compile_time(ce_rows):
    """forward+backward allocates at least the gradient (N x V), except when it is written in place."""
    measured = [r for r in ce_rows if r.mode == bench.FWD_BWD and r.provider != bench.FLOOR]
    for r in measured:
        assert r.input_mb == pytest.approx(64 * 100 * 4 / 2**20)
        if r.provider.endswith("in-place"):
            assert 0 <= r.peak_mb < 0.1 * r.input_mb
        else:
            assert r.peak_mb >= r.input_mb
        assert (r.compile_s > 0) if r.provider == bench.COMPILE else (r.compile_s != r.compile_s)  # else NaN


def test_batch_norm_fp32_and_bf16():
    rows = bench.run_op("bn", [(16, 8)], [torch.float32, torch.bfloat16], CPU, skip=(bench.COMPILE,), **QUIET)
    for dtype in ("fp32", "bf16"):
        providers = [p for p in bench.provider_names("bn", CPU) if p != bench.COMPILE]
        check_rows([r for r in rows if r.dtype == dtype], providers, bench.MODES)
    assert all(r.peak_mb > 0 for r in rows if r.mode == bench.FWD_BWD and r.provider != bench.FLOOR)


def test_train_step(train_rows):
    check_rows(train_rows, bench.provider_names("train", CPU), [bench.STEP])


def test_results_files(ce_rows, train_rows, tmp_path):
    for op, rows in (("ce", ce_rows), ("train", train_rows)):
        md, csv_path, png = bench.write_results(rows, op, str(tmp_path), "about the machine")
        with open(md) as f:
            text = f.read()
        assert "about the machine" in text and all(r.provider in text for r in rows)
        with open(csv_path) as f:
            assert len(list(csv.DictReader(f))) == len(rows)
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Peak extra memory" in (tmp_path / "cross_entropy.md").read_text()


def test_command_line_quick(tmp_path):
    """python -m fusedops bench --quick, on batch norm alone (the cheapest op: the above cover the rest)."""
    out = tmp_path / "results"
    command = [sys.executable, "-m", "fusedops", "bench", "--quick", "--op", "bn", "--threads", "1",
               "--min-run-time", "0.01", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["batch_norm.csv", "batch_norm.md", "batch_norm.png"]
    assert "[bn 1/2]" in proc.stderr and "[bn 2/2]" in proc.stderr  # a progress line per case
