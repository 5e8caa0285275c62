"""The benchmark suite (bench/) on tiny shapes: it runs, every provider appears in every mode, the
ratios and µs differences come from the measured times, the files are written, `python bench/run.py`
exits 0 from any directory, and bench/gpu.sh refuses to run without a CUDA device. No test asserts a
speed."""
import csv
import io
import os
import subprocess
import sys

import pytest
import torch

from bench import cases
from bench import harness as bench

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
    """Every training variant but torch.compile's (compiling a training step takes most of a minute here)."""
    return bench.run_train(os.path.join(ROOT, "names.txt"), CPU, steps=5, repeats=2, skip=(cases.COMPILE,),
                           log=io.StringIO())


def check_rows(rows, providers, modes):
    """Every (mode, provider) once per case; times measured; ratios and µs differences from those times."""
    assert sorted((r.mode, r.provider) for r in rows) == sorted((m, p) for m in modes for p in providers)
    by_key = {(r.shape, r.dtype, r.mode, r.provider): r for r in rows}
    for r in rows:
        case = (r.shape, r.dtype, r.mode)
        assert r.median_ms > 0 and r.iqr_ms >= 0
        baseline = by_key[case + (cases.TABLES[r.op].baseline,)].median_ms
        assert r.vs_eager == pytest.approx(baseline / r.median_ms)
        assert r.over_eager_us == pytest.approx((r.median_ms - baseline) * 1e3)
        if cases.FLOOR in providers:
            assert r.vs_floor == pytest.approx(r.median_ms / by_key[case + (cases.FLOOR,)].median_ms)


def test_cases_declare_the_issue_shapes():
    """The per-operator tables: the shapes the performance targets name are in a full run, and the
    per-call shapes in both a full and a quick run."""
    ce, bn = cases.OPERATORS["ce"], cases.OPERATORS["bn"]
    assert {(32, 27), (4096, 1024), (1024, 32768), (8192, 8192)} <= set(ce.shapes)
    assert {(32, 64), (65536, 256)} <= set(bn.shapes)
    assert ce.per_call_shapes == ((32, 27),) and bn.per_call_shapes == ((32, 64),)
    for op in cases.OPERATORS.values():
        assert set(op.per_call_shapes) <= set(op.shapes) & set(op.quick_shapes)
        assert set(op.quick_shapes) <= set(op.shapes)
    assert "fusedops cpp in-place" in bench.provider_names("ce", CPU)
    assert {cases.TORCH_LAYERS, cases.COMPILE, "fusedops layers"} <= set(bench.provider_names("train", CPU))


def test_cross_entropy_every_provider_and_mode(ce_rows):
    providers = bench.provider_names("ce", CPU)
    assert {cases.FLOOR, cases.EAGER, cases.COMPILE, cases.REFERENCE, "fusedops cpp",
            "fusedops cpp in-place"} <= set(providers)
    check_rows(ce_rows, providers, bench.MODES)


def test_cross_entropy_memory_and_compile_time(ce_rows):
    """forward+backward allocates at least the gradient (N x V), except when it is written in place."""
    measured = [r for r in ce_rows if r.mode == bench.FWD_BWD and r.provider != cases.FLOOR]
    for r in measured:
        assert r.input_mb == pytest.approx(64 * 100 * 4 / 2**20)
        if r.provider.endswith("in-place"):
            assert 0 <= r.peak_mb < 0.1 * r.input_mb
        else:
            assert r.peak_mb >= r.input_mb
        assert (r.compile_s > 0) if r.provider == cases.COMPILE else (r.compile_s != r.compile_s)  # else NaN


def test_batch_norm_fp32_and_bf16_at_the_per_call_shape(tmp_path):
    """Batch norm at 32x64, where the table gives each provider's µs over eager beside its speed-up."""
    rows = bench.run_op("bn", [(32, 64)], [torch.float32, torch.bfloat16], CPU, skip=(cases.COMPILE,), **QUIET)
    for dtype in ("fp32", "bf16"):
        providers = [p for p in bench.provider_names("bn", CPU) if p != cases.COMPILE]
        check_rows([r for r in rows if r.dtype == dtype], providers, bench.MODES)
    assert all(r.peak_mb > 0 for r in rows if r.mode == bench.FWD_BWD and r.provider != cases.FLOOR)
    md, _, _ = bench.write_results(rows, "bn", str(tmp_path), "about the machine")
    fused = next(r for r in rows if r.provider == "fusedops cpp" and r.mode == bench.FWD_BWD and r.dtype == "fp32")
    with open(md) as f:
        line = next(line for line in f if line.startswith("| 32x64 | fp32 |"))
    assert f"({bench.fmt_ratio(fused.vs_eager)}, {fused.over_eager_us:+.3g} µs)" in line


def test_train_step(train_rows):
    check_rows(train_rows, [p for p in bench.provider_names("train", CPU) if p != cases.COMPILE], [bench.STEP])


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
    assert " µs" not in (tmp_path / "cross_entropy.md").read_text()  # 64x100 is no per-call shape
    assert all(f"{r.over_eager_us:+.3g} µs" in (tmp_path / "train.md").read_text()
               for r in train_rows if r.provider != cases.TORCH_LAYERS)


def test_command_line_quick(tmp_path):
    """python bench/run.py --quick from another directory, on batch norm alone (the cheapest op: the
    above cover the rest)."""
    out = tmp_path / "results"
    command = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--op", "bn", "--threads", "1",
               "--min-run-time", "0.01", "--out", str(out)]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["batch_norm.csv", "batch_norm.md", "batch_norm.png"]
    assert "[bn 1/2]" in proc.stderr and "[bn 2/2]" in proc.stderr  # a progress line per case
    assert "`python bench/run.py --op bn --quick --device cpu`" in (out / "batch_norm.md").read_text()


def test_default_out_dirs():
    """CPU results in bench/results, CUDA ones beside them in bench/results/cuda; --quick in quick/."""
    results = os.path.join(ROOT, "bench", "results")
    assert bench.default_out_dir(CPU) == results
    assert bench.default_out_dir(CPU, quick=True) == os.path.join(results, "quick")
    assert bench.default_out_dir(torch.device("cuda")) == os.path.join(results, "cuda")


def test_gpu_command_refuses_without_cuda(tmp_path):
    """bash bench/gpu.sh and bench/run.py --device cuda, with no CUDA device visible: a clear error
    and a failing exit status, before anything runs."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    gpu = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--quick"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert gpu.returncode == 1
    assert "bench/gpu.sh: no CUDA device" in gpu.stderr and "pytest" not in gpu.stdout
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--device", "cuda"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2 and "--device cuda: no CUDA device here" in run.stderr
