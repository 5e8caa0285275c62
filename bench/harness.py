"""The benchmark harness: fusedops against PyTorch eager, torch.compile of the same eager code, the
chunked reference and the copy floor, on the same inputs in one run (`python bench/run.py`). What it
runs (shapes, dtypes, providers, the training step's variants) is declared in bench/cases.py.

Each case (operator, shape, variant, dtype) is timed in three modes (or those the operator names for
the variant at that shape: Operator.plan):
- forward: with grad enabled, as in training (it builds the graph; fusedops' cross-entropy computes
  its gradient here),
- backward: the graph's backward, timed alone (each run's forward is outside the timed region),
- forward+backward, whose peak extra memory is measured too.
Median and IQR come from torch.utils.benchmark.Timer on CPU (a call longer than a measurement's time
is a measurement by itself: linear cross-entropy's, seconds each, the median of 3), triton.testing.do_bench
on CUDA. The floor is a `copy_` of the input's bytes into an existing buffer: the least memory traffic of
a pass that reads the input and writes a tensor of its size (not run for linear cross-entropy, where one
pass is no yardstick). Where torch.compile ran, fusedops' speed-up
against it is given too; where the operator states targets (speed-up, memory), a table says which
hold. `train` times a training step of the makemore MLP, `resnet` one of a ResNet-18 (bench/resnet.py)
with torch's and with fusedops' batch norm. At the per-call shapes (and for the makemore step) the tables also give each
median minus the baseline's in µs: the cost per call over eager, where fixed costs dominate. Linear
cross-entropy's memory is judged against eager's peak in the same run, and its plot gives memory and time
against the vocabulary (plot_sweep). Results go to
<out>/{cross_entropy,batch_norm,batch_norm2d,linear_cross_entropy,train,resnet}.{md,csv,png}.
"""

import contextlib
import copy
import csv
import datetime
import math
import os
import platform
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F

from fusedops import reference
from fusedops.makemore import data
from fusedops.makemore import model as makemore

from . import resnet
from .cases import (
    BACKWARD,
    CCE,
    COMPILE,
    DTYPES,
    FLOOR,
    FORWARD,
    FWD_BWD,
    LAYOUTS,
    MODES,
    OPERATORS,
    RESNET,
    RESNET_QUICK_SIZE,
    RESNET_SIZE,
    RESNET_VARIANTS,
    STEP,
    TABLES,
    TRAIN,
    TRAIN_VARIANTS,
    hbm_gbps,
)

# The profiler (the CPU memory view below) logs two lines each time it starts unless told not to;
# it reads this when it first starts.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

OPS = tuple(TABLES)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
MIN_RUNS = 5  # measurements per median, at least
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# shapes: the Operator field naming the shapes to run
FULL = dict(
    shapes="shapes",
    dtypes=DTYPES,
    modes=MODES,
    skip=(),
    min_run_time=0.5,
    train_steps=1000,
    train_repeats=5,
    resnet=RESNET_SIZE,
    resnet_run_time=3.0,
)
# --quick compiles nothing: neither torch.compile nor cut-cross-entropy (its CPU path is torch.compile)
QUICK = dict(
    shapes="quick_shapes",
    dtypes=(torch.float32,),
    modes=(FWD_BWD,),
    skip=(COMPILE, CCE),
    min_run_time=0.05,
    train_steps=200,
    train_repeats=3,
    resnet=RESNET_QUICK_SIZE,
    resnet_run_time=0.2,
)


@dataclass
class Result:
    """One (op, shape, variant, dtype, mode, provider): times in ms; the comparisons are filled by add_ratios."""

    op: str
    shape: str
    variant: str  # "" where the operator has none
    dtype: str
    mode: str
    provider: str
    median_ms: float
    iqr_ms: float
    vs_eager: float = math.nan  # the baseline's median / this one: > 1 is faster than eager
    vs_compile: float = math.nan  # torch.compile's median / this one, where it ran
    over_eager_us: float = math.nan  # this median - the baseline's, in µs: the cost per call over eager
    vs_floor: float = math.nan  # this median / the copy floor's: how far from the bandwidth floor
    peak_mb: float = math.nan  # peak memory allocated during forward+backward (a step), beyond the inputs
    input_mb: float = math.nan
    compile_s: float = math.nan  # torch.compile: wall time of its first run (compiling; not timed)
    model_mb: float = math.nan  # forward+backward: the MB the fused kernels must move (the bandwidth model)


def shape_name(shape):
    return "x".join(map(str, shape))


def case_key(r):
    """What a row's comparisons are within: (shape, variant, dtype, mode)."""
    return r.shape, r.variant, r.dtype, r.mode


def provider_names(op, device):
    """The providers a case of `op` runs on the device (the copy floor first)."""
    if op in ("train", "resnet"):
        return list(TRAIN_VARIANTS if op == "train" else RESNET_VARIANTS)
    operator = OPERATORS[op]
    return [FLOOR] * operator.floor + [*operator.providers(operator.quick_shapes[0], device, operator.variants[0])]


# --- measuring ------------------------------------------------------------------------------------


def median_iqr(times):
    """(median, interquartile range) of a list of times."""
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return median, q3 - q1


def measure(fn, device, min_run_time, min_runs=MIN_RUNS):
    """(median, IQR) in ms of calls to fn, over about min_run_time seconds (and min_runs measurements).
    On CPU, a call that takes min_run_time or more is a measurement by itself: min_runs calls, no more."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q1, median, q3 = do_bench(fn, rep=min_run_time * 1e3, quantiles=[0.25, 0.5, 0.75])
        return median, q3 - q1
    from torch.utils.benchmark import Timer

    start = time.perf_counter()
    fn()
    times = [time.perf_counter() - start]
    if times[0] >= min_run_time:  # slow calls: one call a measurement (Timer.timeit would add 2 warm-up calls)
        while len(times) < min_runs:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    else:
        # Timer runs on 1 thread unless told otherwise
        timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=min_run_time)
        times = list(m.times)
        while len(times) < min_runs:  # blocked_autorange may stop after one block
            times += timer.timeit(m.number_per_run).times
    median, iqr = median_iqr(times)
    return median * 1e3, iqr * 1e3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_backward(forward, backward, device, min_run_time, min_runs=MIN_RUNS):
    """(median, IQR) in ms of backward(forward()), timing only the backward: each run builds its graph
    outside the timed region, so the backward runs once per graph, as in training (a compiled backward
    refuses retain_graph). The gradients outlive the timed region, as they would feed the layer below."""
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_run_time:
        out = forward()
        sync(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            grads = backward(out)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t = time.perf_counter()
            grads = backward(out)
            times.append((time.perf_counter() - t) * 1e3)
        del out, grads
    return median_iqr(times)


def peak_extra_bytes(fn, device):
    """Peak of the bytes allocated while fn() runs, beyond those allocated before it.

    CUDA: the caching allocator's max_memory_allocated. CPU: with profile_memory, the profiler records
    every allocation (+bytes) and free (-bytes) of torch's CPU allocator with a timestamp; their
    running sum in time order is what fn holds at each moment, and its maximum is the peak. It counts
    tensor storage (all that the ops allocate), not Python objects.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def time_provider(fn, params, x, args, grad_out, device, modes, min_run_time, min_runs=MIN_RUNS):
    """(first forward+backward's seconds, its peak extra bytes, {mode: (median ms, IQR ms)}). The gradients
    are those of x, the parameters and the arguments that require grad."""
    x = x.detach().clone().requires_grad_()  # its own copy: the in-place providers overwrite it
    wrt = [x, *params, *(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)]

    def forward():
        return fn(x, *args)

    def backward(out):
        return torch.autograd.grad(out, wrt, grad_out)

    def forward_backward():
        return backward(forward())

    start = time.perf_counter()
    forward_backward()  # warm-up; torch.compile compiles here
    sync(device)
    first_s = time.perf_counter() - start
    peak = peak_extra_bytes(forward_backward, device)
    times = {}
    for mode in modes:
        if mode == BACKWARD:
            times[mode] = measure_backward(forward, backward, device, min_run_time, min_runs)
        else:
            times[mode] = measure(forward if mode == FORWARD else forward_backward, device, min_run_time, min_runs)
    return first_s, peak, times


def compiling(fn):
    """(torch.compile of fn, a context to run its first call in): each compile starts from scratch,
    forgetting earlier compiles in memory (reset) and on disk (an empty cache directory), so that its
    compile time is a first run's."""
    from torch._inductor.utils import fresh_cache

    torch.compiler.reset()
    return torch.compile(fn, dynamic=False), fresh_cache()


def run_case(op, shape, variant, dtype, device, *, modes=MODES, skip=(), min_run_time):
    """Result rows of one case: the copy floor (where the operator has one) and every provider (but those in
    `skip`) in every mode."""
    operator = OPERATORS[op]
    min_runs = operator.min_runs or MIN_RUNS
    x, args, grad_out = operator.inputs(shape, dtype, device, variant)
    case = dict(op=op, shape=shape_name(shape), variant=variant, dtype=DTYPE_NAMES[dtype])
    input_mb = x.numel() * x.element_size() / 2**20
    model_mb = operator.bytes_moved(shape, variant, dtype) / 2**20 if operator.bytes_moved else math.nan
    rows = []
    if operator.floor:
        copy_input = partial(torch.empty_like(x).copy_, x)  # into an existing buffer
        floor = measure(copy_input, device, min_run_time)
        del copy_input
        # one measurement, listed under every mode
        rows = [Result(**case, mode=mode, provider=FLOOR, median_ms=floor[0], iqr_ms=floor[1]) for mode in modes]
    for name, (fn, params) in operator.providers(shape, device, variant).items():
        if name in skip:
            continue
        fn, first_run = compiling(fn) if name == COMPILE else (fn, contextlib.nullcontext())
        with first_run:
            first_s, peak, times = time_provider(fn, params, x, args, grad_out, device, modes, min_run_time, min_runs)
        for mode, (median, iqr) in times.items():
            rows.append(
                Result(
                    **case,
                    mode=mode,
                    provider=name,
                    median_ms=median,
                    iqr_ms=iqr,
                    peak_mb=peak / 2**20 if mode == FWD_BWD else math.nan,
                    input_mb=input_mb,
                    model_mb=model_mb if mode == FWD_BWD else math.nan,
                    compile_s=first_s if name == COMPILE else math.nan,
                )
            )
    return rows


def run_op(op, shapes, dtypes, device, *, modes=MODES, skip=(), min_run_time, log=sys.stderr):
    """Rows of every (shape, variant, dtype) case of `op` (a key of OPERATORS), each variant at the shapes
    the operator runs it at, in the modes of `modes` it has there (Operator.plan), in the dtypes of
    `dtypes` it runs there (Operator.dtypes), comparisons included; a progress line per case."""
    operator = OPERATORS[op]
    cases = [
        (shape, variant, dtype, case_modes)
        for shape in shapes
        for variant, variant_modes in operator.plan(shape).items()
        if (case_modes := [m for m in modes if m in variant_modes])
        for dtype in operator.dtypes(shape, dtypes)
    ]
    rows = []
    for i, (shape, variant, dtype, case_modes) in enumerate(cases, 1):
        start = time.perf_counter()
        case_rows = run_case(op, shape, variant, dtype, device, modes=case_modes, skip=skip, min_run_time=min_run_time)
        rows += case_rows
        shown = [r for r in case_rows if r.mode == case_modes[0]]
        print(
            f"[{op} {i}/{len(cases)}] {' '.join(filter(None, (shown[0].shape, shown[0].variant, shown[0].dtype)))} "
            f"{case_modes[0]}: "
            + ", ".join(f"{r.provider} {r.median_ms:.3g} ms" for r in shown)
            + f" ({time.perf_counter() - start:.0f} s)",
            file=log,
            flush=True,
        )
    return add_ratios(rows, OPERATORS[op].baseline)


# --- the makemore training step ---------------------------------------------------------------------


def run_train(data_path, device, *, steps, repeats, skip=(), log=sys.stderr):
    """ms per training step (batch 32, SGD) of the makemore MLP, for every variant of TRAIN_VARIANTS
    (but those in `skip`): median and IQR over `repeats` runs of `steps` steps, after a warm-up of
    up to 50 steps (where torch.compile compiles). data_path: as data.locate's source."""
    words = data.load_words(data.locate(data_path))
    vocab = data.Vocab(words)
    (X, Y), _, _ = data.splits(words, vocab)
    X, Y = X.to(device), Y.to(device)
    rows = []
    for name, build in TRAIN_VARIANTS.items():
        if name in skip:
            continue
        g = torch.Generator().manual_seed(reference.SEED)
        model, step_fn = build(len(vocab), g)
        model.to(device)
        train = partial(
            makemore.train, model, X, Y, batch_size=32, lr=0.1, generator=g, step_fn=step_fn, progress=False
        )  # -> (losses, seconds per step)
        first_run = contextlib.nullcontext()
        if name == COMPILE:
            model.loss, first_run = compiling(model.loss)
        start = time.perf_counter()
        with first_run:
            train(steps=min(steps, 50))  # warm-up
        first_s = time.perf_counter() - start
        median, iqr = median_iqr([train(steps=steps)[1] * 1e3 for _ in range(repeats)])
        rows.append(
            Result(
                "train",
                "batch 32",
                "",
                "fp32",
                STEP,
                name,
                median,
                iqr,
                compile_s=first_s if name == COMPILE else math.nan,
            )
        )
        print(f"[train] {name}: {median:.3g} ms per step", file=log, flush=True)
    return add_ratios(rows, TRAIN.baseline)


def run_resnet(device, *, batch, image_size, width, min_run_time, log=sys.stderr):
    """ms per training step (forward, cross-entropy, backward, SGD with momentum) of bench/resnet.py's
    ResNet at `width` on one batch of random images and labels, for every layout of LAYOUTS and variant
    of RESNET_VARIANTS, each from the same initial weights; and the peak extra memory of a step."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    labels = torch.randint(0, resnet.CLASSES, (batch,), generator=g).to(device)
    initial = resnet.ResNet(width)
    rows = []
    for layout, memory_format in LAYOUTS.items():
        x = images.to(device).contiguous(memory_format=memory_format)
        for name, convert in RESNET_VARIANTS.items():
            model = convert(copy.deepcopy(initial).to(device, memory_format=memory_format))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, optimizer=optimizer, x=x):
                optimizer.zero_grad()
                F.cross_entropy(model(x), labels).backward()
                optimizer.step()

            step()  # warm-up: the gradients' and momentum's buffers
            peak = peak_extra_bytes(step, device)
            median, iqr = measure(step, device, min_run_time)
            rows.append(
                Result(
                    "resnet",
                    f"batch {batch}, {image_size}x{image_size}",
                    layout,
                    "fp32",
                    STEP,
                    name,
                    median,
                    iqr,
                    peak_mb=peak / 2**20,
                    input_mb=x.numel() * x.element_size() / 2**20,
                )
            )
            print(f"[resnet] {layout} {name}: {median:.3g} ms per step", file=log, flush=True)
    return add_ratios(rows, RESNET.baseline)


def add_ratios(rows, baseline):
    """vs_eager: the baseline's median / each row's; over_eager_us: each row's - the baseline's, in µs;
    vs_compile: torch.compile's median / each row's; vs_floor: each row's / the copy floor's (within
    the same case_key)."""
    by_key = {case_key(r) + (r.provider,): r for r in rows}
    for r in rows:
        case = case_key(r)
        base = by_key[case + (baseline,)].median_ms
        r.vs_eager, r.over_eager_us = base / r.median_ms, (r.median_ms - base) * 1e3
        if case + (COMPILE,) in by_key:
            r.vs_compile = by_key[case + (COMPILE,)].median_ms / r.median_ms
        if case + (FLOOR,) in by_key:
            r.vs_floor = r.median_ms / by_key[case + (FLOOR,)].median_ms
    return rows


# --- results: markdown, CSV, plot ---------------------------------------------------------------------


def machine(device):
    """The device, threads, torch version and date, in one line."""
    if device.type == "cuda":
        import triton

        name = f"{torch.cuda.get_device_name(device)}, triton {triton.__version__}"
    else:
        name = platform.processor() or "CPU"
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        threads = torch.get_num_threads()
        name += f" ({torch.backends.cpu.get_cpu_capability()}), {threads} thread{'s' if threads > 1 else ''}"
    return f"{name}, torch {torch.__version__}, {datetime.date.today()}"


def load_average():
    """The 1-minute load average, as text ("?" where the system has none)."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def unique(items):
    return list(dict.fromkeys(items))


def fmt_ms(ms):
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def fmt_ratio(ratio):
    return f"{ratio:.2f}×" if ratio < 100 else f"{ratio:.0f}×"


def per_call(op, shape):
    """Whether the tables give the µs over eager at this shape: the per-call shapes, and the makemore step."""
    return op == "train" or (op in OPERATORS and shape in {shape_name(s) for s in OPERATORS[op].per_call_shapes})


def fmt_cell(r, baseline):
    """Median ms, and against the baseline: the speed-up, and at per-call shapes the µs over it."""
    if r.provider == baseline:
        return fmt_ms(r.median_ms)
    over = f", {r.over_eager_us:+.3g} µs" if per_call(r.op, r.shape) else ""
    return f"{fmt_ms(r.median_ms)} ({fmt_ratio(r.vs_eager)}{over})"


def markdown(rows, op, about, notes=(), peak_gbps=None):
    """A table per mode (median ms and speed-up against the baseline, per case and provider; fusedops'
    against torch.compile and the copy floor where they ran), then the peak extra memory with
    torch.compile's compile time, then whether the operator's targets hold. notes: lines after `about`
    (the peers that did not run, and why). peak_gbps: the device's HBM bandwidth, for the bandwidth model's
    table."""
    baseline = TABLES[op].baseline
    vs_baseline = getattr(TABLES[op], "memory_vs_baseline", False)
    with_variant = any(r.variant for r in rows)
    providers = unique(r.provider for r in rows)
    by_key = {(r.shape, r.variant, r.dtype, r.mode, r.provider): r for r in rows}
    fused = [p for p in providers if p.startswith("fusedops")]
    compared = fused if COMPILE in providers else []
    floored = fused if FLOOR in providers else []
    modes = unique(r.mode for r in rows)
    spread = max(rows, key=lambda r: r.iqr_ms / r.median_ms)
    per_call_shapes = unique(r.shape for r in rows if per_call(op, r.shape))
    lines = [
        f"# {TABLES[op].title}",
        "",
        about,
        "",
        *notes,
        *([""] if notes else []),
        f"Median ms; in brackets the speed-up against {baseline} ({baseline}'s median / this one, "
        "> 1 is faster)"
        + (
            f" and, at {', '.join(per_call_shapes)}, where fixed costs dominate, this "
            f"median - {baseline}'s in µs (the cost per call over {baseline})."
            if per_call_shapes
            else "."
        ),
    ]
    if compared:
        lines += [f"`vs {COMPILE}`: {COMPILE}'s median / this one (> 1: faster than {COMPILE})."]
    if floored:
        lines += [
            f"{FLOOR}: a `copy_` of the input's bytes into an existing buffer (one measurement, shown "
            "under every mode); its speed-up is about the most one pass over the input could reach. "
            f"`/ {FLOOR}`: the median over the floor's."
        ]
    if FORWARD in modes or BACKWARD in modes:
        lines += [
            "forward runs with grad enabled, as in training"
            + (
                " (fusedops' cross-entropy computes its gradient there, so its backward only hands it over)"
                if op == "ce"
                else ""
            )
            + "; backward is timed alone, its forward outside the timed region."
        ]
    lines += [
        f"Spread (IQR / median): median {statistics.median(r.iqr_ms / r.median_ms for r in rows):.1%}, "
        f"largest {spread.iqr_ms / spread.median_ms:.1%} ({spread.provider}, "
        f"{' '.join(filter(None, (spread.shape, spread.variant, spread.dtype)))} {spread.mode}); each row's "
        "IQR is in the CSV.",
        "",
    ]

    def table(header, cells_of, cases):
        out = ["| " + " | ".join(["shape", *(["variant"] if with_variant else []), "dtype", *header]) + " |"]
        out += ["|" + " --- |" * (len(header) + 2 + with_variant)]
        out += ["| " + " | ".join([*(case if with_variant else case[::2]), *cells_of(case)]) + " |" for case in cases]
        return out + [""]

    def column(case, mode, providers, cell):
        return [cell(by_key[case + (mode, p)]) if case + (mode, p) in by_key else "" for p in providers]

    for mode in modes:

        def cells(case, mode=mode):
            return [
                *column(case, mode, providers, partial(fmt_cell, baseline=baseline)),
                *column(case, mode, compared, lambda result: fmt_ratio(result.vs_compile)),
                *column(case, mode, floored, lambda result: fmt_ratio(result.vs_floor)),
            ]

        timed = unique((r.shape, r.variant, r.dtype) for r in rows if r.mode == mode)
        lines += [f"## {mode}", ""] + table(
            [*providers, *(f"{p} vs {COMPILE}" for p in compared), *(f"{p} / {FLOOR}" for p in floored)], cells, timed
        )

    measured = [r for r in rows if not math.isnan(r.peak_mb)]
    if measured:
        mode = measured[0].mode
        memory_providers = unique(r.provider for r in measured)
        compiled = COMPILE in memory_providers

        def memory_cells(case):
            if vs_baseline:  # against the baseline's peak in the same case
                base = by_key[case + (mode, baseline)].peak_mb
                got = column(case, mode, memory_providers, lambda r: f"{r.peak_mb:.3g} ({r.peak_mb / base:.1%})")
            else:
                got = column(case, mode, memory_providers, lambda r: f"{r.peak_mb:.3g} ({r.peak_mb / r.input_mb:.2f}×)")
            input_mb = next(r.input_mb for r in measured if (r.shape, r.variant, r.dtype) == case)
            return [
                *[f"{input_mb:.3g}"] * (not vs_baseline),
                *got,
                *column(case, mode, [COMPILE] * compiled, lambda r: f"{r.compile_s:.1f}"),
            ]

        lines += [
            f"## Peak extra memory of {mode}" + (", and compile time" if compiled else ""),
            "",
            "MB allocated beyond the inputs (the gradients included); in brackets, "
            + (f"the fraction of {baseline}'s (same case, same run)." if vs_baseline else "× the input's size.")
            + (
                " Last column: the wall time of torch.compile's first forward+backward (tracing and code "
                "generation from an empty cache; not counted in the times above; the first case's includes "
                "the compiler's start-up)."
                if compiled
                else ""
            ),
            "",
        ]
        lines += table(
            [*["input MB"] * (not vs_baseline), *memory_providers, *([f"{COMPILE} s"] * compiled)],
            memory_cells,
            unique((r.shape, r.variant, r.dtype) for r in measured),
        )
    else:
        lines += [
            f"{COMPILE}: its first run (compiling from an empty cache; not counted above) took "
            f"{r.compile_s:.1f} s ({r.shape} {r.dtype})."
            for r in rows
            if not math.isnan(r.compile_s)
        ]
    return "\n".join(lines + bandwidth_lines(rows, fused, peak_gbps) + target_lines(op, rows, fused))


def bandwidth_lines(rows, fused, peak_gbps=None):
    """The bandwidth model's table: for each forward+backward case, the MB the fused kernels must move, and
    each fusedops provider's GB/s at that (and its share of the device's HBM bandwidth, when known), beside the
    copy floor's GB/s (it reads and writes the input)."""
    modelled = [r for r in rows if r.provider in fused and not math.isnan(r.model_mb)]
    if not modelled:
        return []
    floors = {case_key(r): r for r in rows if r.provider == FLOOR and r.mode == FWD_BWD}

    def gbps(mb, ms):
        return mb * 2**20 / 1e9 / (ms / 1e3)

    lines = [
        "",
        "## Bandwidth (the model)",
        "",
        "The bytes a fused forward+backward must move at least (bench/cases.py: `bytes_moved`), over each "
        "median, in GB/s"
        + (f"; in brackets the share of the device's {peak_gbps} GB/s of HBM bandwidth" if peak_gbps else "")
        + ". The copy floor moves twice the input (a read and a write).",
        "",
        "| shape | variant | dtype | model MB | "
        + " | ".join(f"{p} GB/s" for p in unique(r.provider for r in modelled))
        + f" | {FLOOR} GB/s |",
        "|" + " --- |" * (5 + len(unique(r.provider for r in modelled))),
    ]
    for key in unique(case_key(r) for r in modelled):
        cells = []
        for provider in unique(r.provider for r in modelled):
            r = next((r for r in modelled if case_key(r) == key and r.provider == provider), None)
            rate = None if r is None else gbps(r.model_mb, r.median_ms)
            share = f" ({rate / peak_gbps:.0%})" if rate is not None and peak_gbps else ""
            cells.append("" if rate is None else f"{rate:.3g}{share}")
        floor = floors.get(key)
        first = next(r for r in modelled if case_key(r) == key)
        cells.append("" if floor is None else f"{gbps(2 * first.input_mb, floor.median_ms):.3g}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {first.model_mb:.4g} | " + " | ".join(cells) + " |")
    return [*lines, ""]


MEMORY_SLACK = 0.01  # of an input's size: per-channel statistics and the like, no activation-sized tensor
TARGET_COLUMNS = (
    "speed-up against eager",
    f"faster than {COMPILE}",
    "peak extra memory below eager's",
    "peak extra memory",
)
# an operator whose memory is judged against the baseline's (Operator.memory_vs_baseline): its last column
TARGET_COLUMNS_VS_EAGER = (*TARGET_COLUMNS[:2], "peak extra memory / eager's")
MARK = {True: "✓", False: "✗"}


def shape_of(name):
    """The shape of a shape_name."""
    return tuple(map(int, name.split("x")))


def target_cells(targets, r, eager, memory_vs_eager=False, peers=()):
    """fusedops' forward+backward row r against Targets, eager's row beside it: a cell per TARGET_COLUMNS
    (memory_vs_eager: TARGET_COLUMNS_VS_EAGER, its peak extra memory as a fraction of eager's instead of in
    input-sized tensors), then one per peer of targets.peers (its row in peers, or None where it did not run),
    and [holds] of each target judged (none stated, or one whose peer did not run, is not)."""
    cells, holds = _own_cells(targets, r, eager, memory_vs_eager)
    for peer in peers:
        if peer is None:
            cells.append("not run")
            continue
        faster, memory = peer.median_ms / r.median_ms, r.peak_mb / peer.peak_mb
        holds.append(faster > 1 and memory <= 1)
        cells.append(f"{fmt_ratio(faster)} faster, {memory:.0%} of its memory {MARK[holds[-1]]}")
    return cells, holds


def _own_cells(targets, r, eager, memory_vs_eager):
    """target_cells' cells and holds against eager and torch.compile."""
    holds = []
    if targets.vs_eager is None:
        speed = f"{fmt_ratio(r.vs_eager)} (no target)"
    else:
        holds.append(r.vs_eager >= targets.vs_eager)
        speed = f"{fmt_ratio(r.vs_eager)} {'≥' if holds[-1] else '<'} {fmt_ratio(targets.vs_eager)} {MARK[holds[-1]]}"
    if targets.over_eager_us is not None:  # the cost per call over eager
        holds.append(r.over_eager_us <= targets.over_eager_us)
        speed += (
            f"; {r.over_eager_us:+.1f} µs {'≤' if holds[-1] else '>'} +{targets.over_eager_us:g} µs {MARK[holds[-1]]}"
        )
    if targets.vs_floor is not None and not math.isnan(r.vs_floor):  # against one pass over the input
        holds.append(r.vs_floor <= targets.vs_floor)
        speed += f"; {r.vs_floor:.2f}× floor {'≤' if holds[-1] else '>'} {targets.vs_floor:g}× {MARK[holds[-1]]}"
    cells = [speed]
    if math.isnan(r.vs_compile):
        cells.append("not run")
    elif not targets.faster_than_compile:
        cells.append(f"{fmt_ratio(r.vs_compile)} (no target)")
    else:
        holds.append(r.vs_compile > 1)
        cells.append(f"{fmt_ratio(r.vs_compile)} {MARK[holds[-1]]}")
    if memory_vs_eager:
        fraction = r.peak_mb / eager.peak_mb  # fusedops' peak extra memory over eager's, both measured here
        cells.append(_at_most(holds, fraction, targets.peak_vs_eager, "{:.1%}", "{:.0%}"))
        return cells, holds
    saved = (eager.peak_mb - r.peak_mb) / r.input_mb  # eager's peak - fusedops', in input-sized tensors
    if targets.memory_saved:
        holds.append(saved >= targets.memory_saved - MEMORY_SLACK)
        cells.append(f"{saved:.2f} {'≥' if holds[-1] else '<'} {targets.memory_saved:g} input {MARK[holds[-1]]}")
    else:
        cells.append(f"{saved:.2f} input (no target)")
    peak = max(r.peak_mb - targets.peak_slack_mb, 0) / r.input_mb  # fusedops' peak beyond the slack, in inputs
    cells.append(_at_most(holds, peak, targets.peak_memory, "{:.2f}", "{:g} input", unit=" input"))
    return cells, holds


def _at_most(holds, value, target, value_format, target_format, unit=""):
    """A target cell for value <= target (None: no target), appending whether it holds to holds."""
    if target is None:
        return f"{value_format.format(value)}{unit} (no target)"
    holds.append(value <= target)
    sign = "≤" if holds[-1] else ">"
    return f"{value_format.format(value)} {sign} {target_format.format(target)} {MARK[holds[-1]]}"


def target_lines(op, rows, fused):
    """The targets' table, a row per case and fusedops provider, and how many targets hold; nothing where
    the operator states no targets."""
    operator = OPERATORS.get(op)
    if operator is None or operator.targets is None:
        return []
    by_key = {case_key(r) + (r.provider,): r for r in rows}
    vs_eager = operator.memory_vs_baseline
    with_variant = any(r.variant for r in rows)
    table, holds = [], []
    judged = [
        (r, operator.targets(shape_of(r.shape), r.variant, r.provider, r.dtype))
        for r in rows
        if r.provider in fused and r.mode == FWD_BWD
    ]
    peer_names = unique(peer for _, targets in judged for peer in targets.peers)
    for r, targets in judged:
        peers = [by_key.get(case_key(r) + (peer,)) if peer in targets.peers else None for peer in peer_names]
        cells, held = target_cells(targets, r, by_key[case_key(r) + (operator.baseline,)], vs_eager, peers)
        if not targets.peers:  # a case without peer targets: nothing to judge in their columns
            cells[len(cells) - len(peer_names) :] = ["(no target)"] * len(peer_names)
        table.append("| " + " | ".join([r.shape, *[r.variant] * with_variant, r.dtype, r.provider, *cells]) + " |")
        holds += held
    header = [
        "shape",
        *["variant"] * with_variant,
        "dtype",
        "provider",
        *(TARGET_COLUMNS_VS_EAGER if vs_eager else TARGET_COLUMNS),
        *(f"against {peer} (faster, at most its memory)" for peer in peer_names),
    ]
    memory = (
        "Memory: fusedops' peak extra memory as a fraction of eager's, both measured in this run."
        if vs_eager
        else f"Memory: eager's peak extra memory minus fusedops', in input-sized tensors (with a slack of "
        f"{MEMORY_SLACK:g} input for per-channel tensors); then fusedops' own peak extra memory, in "
        "input-sized tensors, beyond the slack its target allows for per-row values."
    )
    return [
        "## Targets (forward+backward)",
        "",
        f"{sum(holds)} of {len(holds)} hold (✓; ✗: missed). {memory}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *table,
    ]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep_of(rows, dim):
    """The sweep in rows: the rows of the dtype and shape but its dimension `dim` that the most values of
    that dimension share (fp32 first), and those values in increasing order."""
    groups = {}
    for r in rows:
        shape = shape_of(r.shape)
        groups.setdefault((r.dtype != "fp32", r.dtype, shape[:dim] + shape[dim + 1 :]), set()).add(shape[dim])
    key, values = min(groups.items(), key=lambda item: (-len(item[1]), item[0]))

    def in_sweep(r):
        shape = shape_of(r.shape)
        return (r.dtype != "fp32", r.dtype, shape[:dim] + shape[dim + 1 :]) == key

    return [r for r in rows if in_sweep(r)], sorted(values)


def plot_sweep(rows, op, path, about):
    """Two panels against the operator's sweep_dim (the vocabulary V), log-log: the peak extra memory of
    forward+backward and its median time, a line per provider measured at every point of the sweep
    (sweep_of), and under the memory, dashed, the fraction of the baseline's that fusedops' target allows."""
    import matplotlib.ticker

    plt = pyplot()
    operator = OPERATORS[op]
    dim = operator.sweep_dim
    sweep, values = sweep_of([r for r in rows if r.mode == FWD_BWD], dim)
    by_value = {}
    for r in sweep:
        by_value.setdefault(r.provider, {})[shape_of(r.shape)[dim]] = r
    providers = [p for p in unique(r.provider for r in sweep) if len(by_value[p]) == len(values)]
    fig, (memory, timing) = plt.subplots(1, 2, figsize=(12, 4.8))
    for p in providers:
        points = [by_value[p][v] for v in values]
        memory.plot(values, [r.peak_mb for r in points], marker="o", label=p)
        timing.plot(values, [r.median_ms for r in points], marker="o", label=p)
    fractions = {
        operator.targets(shape_of(r.shape), r.variant, r.provider, r.dtype).peak_vs_eager
        for r in sweep
        if operator.targets and r.provider.startswith("fusedops")
    } - {None}
    if fractions and operator.baseline in providers:
        fraction = min(fractions)
        memory.plot(
            values,
            [fraction * by_value[operator.baseline][v].peak_mb for v in values],
            color="black",
            linewidth=0.8,
            linestyle="--",
            label=f"{fraction:.0%} of {operator.baseline}'s (fusedops' target)",
        )
    shape = shape_of(sweep[0].shape)
    names = "NHV" if len(shape) == 3 else [f"dim {i}" for i in range(len(shape))]
    fixed = ", ".join(f"{names[i]}={n}" for i, n in enumerate(shape) if i != dim)
    for ax, label in ((memory, "peak extra memory (MB)"), (timing, "median time (ms)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # labels a decade apart at most
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel(names[dim])
        ax.set_ylabel(label)
        ax.grid(True, which="both", linewidth=0.3)
        ax.set_title(
            f"forward+backward: {label.split(' (')[0]} against {names[dim]} ({fixed}, {sweep[0].dtype})",
            fontsize="medium",
        )
    memory.legend(fontsize="small", loc="upper left")
    fig.suptitle(textwrap.fill(f"{TABLES[op].title}. {about}", 180), fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(rows, op, path, about):
    """Speed-up against the baseline per case, one bar per provider, one panel per mode and variant (log
    scale, the cases timed in it), the operator's speed-up target of each case as a dashed line over it.
    An operator with a sweep_dim: plot_sweep instead."""
    import matplotlib.ticker

    if getattr(TABLES[op], "sweep_dim", None) is not None:
        return plot_sweep(rows, op, path, about)
    plt = pyplot()
    baseline = TABLES[op].baseline
    targets = getattr(TABLES[op], "targets", None)
    panels = unique((r.mode, r.variant) for r in rows)
    providers = [p for p in unique(r.provider for r in rows) if p != baseline]
    fused = [p for p in providers if p.startswith("fusedops")]
    speedup = {(r.shape, r.dtype, r.mode, r.variant, r.provider): r.vs_eager for r in rows}
    width = 0.8 / len(providers)
    most_cases = max(len(unique((r.shape, r.dtype) for r in rows if (r.mode, r.variant) == panel)) for panel in panels)
    fig_width = max(7.0, 1.3 * most_cases + 4)
    fig, axes = plt.subplots(len(panels), 1, figsize=(fig_width, 3.2 * len(panels) + 0.6), squeeze=False)
    for ax, (mode, variant) in zip(axes[:, 0], panels):
        cases = unique((r.shape, r.dtype) for r in rows if (r.mode, r.variant) == (mode, variant))
        for j, p in enumerate(providers):
            xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(cases))]
            ax.bar(xs, [speedup.get(case + (mode, variant, p), math.nan) for case in cases], width, label=p)
        ax.axhline(1, color="black", linewidth=0.8)
        if targets is not None and fused:
            for i, (shape, _) in enumerate(cases):
                target = targets(shape_of(shape), variant, fused[0]).vs_eager
                if target is not None:
                    ax.hlines(target, i - 0.45, i + 0.45, color="black", linewidth=0.8, linestyle="--", label="target")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(range(len(cases)), [f"{shape}\n{dtype}" for shape, dtype in cases])
        ax.set_ylabel(f"speed-up against {baseline}")
        ax.set_title(f"{variant or TABLES[op].title}: {mode}", fontsize="medium")
    legend = {}  # label -> handle, over every panel (a provider or the target may be in some only)
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    axes[0, 0].legend(legend.values(), legend.keys(), fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(textwrap.fill(about, int(fig_width * 15)), fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the suptitle's lines
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(rows, op, out_dir, about, notes=(), peak_gbps=None):
    """Writes <out_dir>/<name>.md (the notes after `about`), .csv and .png; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, TABLES[op].file)
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Result)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    with open(base + ".md", "w") as f:
        f.write(markdown(rows, op, about, notes, peak_gbps) + "\n")
    plot(rows, op, base + ".png", about)
    return [base + ext for ext in (".md", ".csv", ".png")]


def default_out_dir(device, quick=False):
    """bench/results for CPU, bench/results/cuda for CUDA; a quick/ folder inside for --quick."""
    out = os.path.join(RESULTS, *(("cuda",) if device.type == "cuda" else ()))
    return os.path.join(out, "quick") if quick else out


def run(ops=OPS, *, out_dir=None, quick=False, device=None, min_run_time=None, data_path=None, log=sys.stderr):
    """Runs the suite for `ops` (keys of cases.TABLES) on the device (default: CUDA if there is one)
    and writes its results to out_dir (default: default_out_dir); returns {op: rows}."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = out_dir or default_out_dir(device, quick)
    cfg = QUICK if quick else FULL
    bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
    dtypes = [d for d in cfg["dtypes"] if d != torch.bfloat16 or bf16]
    results = {}
    for op in ops:
        load_before = load_average()
        notes = []
        if op == "train":
            rows = run_train(
                data_path, device, steps=cfg["train_steps"], repeats=cfg["train_repeats"], skip=cfg["skip"], log=log
            )
            settings = f"median of {cfg['train_repeats']} runs of {cfg['train_steps']} steps"
        elif op == "resnet":
            run_time = cfg["resnet_run_time"] if min_run_time is None else min_run_time
            rows = run_resnet(device, **cfg["resnet"], min_run_time=run_time, log=log)
            settings = f"width {cfg['resnet']['width']}, SGD with momentum, {run_time:g} s per measurement"
        else:
            operator = OPERATORS[op]
            run_time = cfg["min_run_time"] if min_run_time is None else min_run_time
            rows = run_op(
                op,
                getattr(operator, cfg["shapes"]),
                dtypes,
                device,
                modes=cfg["modes"],
                skip=cfg["skip"],
                min_run_time=run_time,
                log=log,
            )
            settings = f"{run_time:g} s per measurement"
            if operator.min_runs:
                settings += (
                    f" (a call longer than that is a measurement by itself), the median of at least {operator.min_runs}"
                )
            # (a peer that does not import says so, whatever the settings)
            notes = [
                f"{name}: not run (--quick compiles nothing)."
                if name in cfg["skip"] and "not run" not in note
                else note
                for name, note in (operator.notes(device) if operator.notes else {}).items()
            ]
        # others' work on the machine skews the times (the run itself adds about its threads): say how busy it was
        about = (
            f"{machine(device)}, load average {load_before} → {load_average()} (start → end); "
            f"`python bench/run.py --op {op}{' --quick' if quick else ''} --device {device.type}`, {settings}."
        )
        written = write_results(rows, op, out_dir, about, notes, hbm_gbps(device))
        print("wrote " + ", ".join(written), file=log, flush=True)
        results[op] = rows
    return results
