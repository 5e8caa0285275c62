"""Every Triton kernel compiled for sm_80 (A100) and sm_90 (H100) with no GPU present: the launchers run on
meta tensors with JITFunction.run recording each launch, then each distinct specialisation goes through
triton.compile for a GPUTarget (the real frontend, TTIR/TTGIR/LLVM passes and the ptxas of the triton wheel)
and `ptxas -v` for its registers and spills.

    python bench/compile_kernels.py [--quick] [--out DIR]

It fails (exit status 1, one line per failure) on a compile error, shared memory over the block limit, or a
grid dimension over its limit, and writes the table of registers, spills and shared memory to
bench/results/compile_kernels.md (--quick: the representative set that the test suite compiles, to
quick/ inside). The interpreter is never used here: TRITON_INTERPRET is cleared before triton is imported.
"""

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler: must happen before triton is imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from fusedops import batch_norm_triton, cross_entropy_triton  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# the most shared memory one block may use (CUDA C programming guide, compute capabilities table)
TARGETS = {"sm_80": (GPUTarget("cuda", 80, 32), 163 * 1024), "sm_90": (GPUTarget("cuda", 90, 32), 227 * 1024)}
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # x, y, z
MAX_V, MAX_C = 256000, 2048  # the largest vocabulary and channel count compiled
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
META = torch.device("meta")


@dataclass
class Launch:
    """One recorded launch: the kernel, its arguments as the launcher passed them, its grid, and the case."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    case: str


@dataclass
class Compiled:
    """A distinct specialisation and, per target, (registers, spilled bytes, stack bytes, shared bytes)."""

    launch: Launch
    signature: str
    per_target: dict = field(default_factory=dict)


def record(calls):
    """The launches of `calls` ((case, thunk) pairs running a launcher on meta tensors), none of them run."""
    launches, original, current = [], JITFunction.run, [""]

    def run(kernel, *args, grid, warmup, **kwargs):
        launches.append(Launch(kernel, args, kwargs, tuple(grid(kwargs) if callable(grid) else grid), current[0]))

    JITFunction.run = run
    try:
        for case, thunk in calls:
            current[0] = case
            thunk()
    finally:
        JITFunction.run = original
    return launches


def specialise(launch, target):
    """(options, signature, constexprs, attrs) of the launch for `target`, as JITFunction.run derives them."""
    kernel, backend = launch.kernel, make_backend(target)
    kwargs = dict(launch.kwargs, debug=launch.kwargs.get("debug", kernel.debug))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def ptxas_report(ptx, capability):
    """(registers, spilled bytes (stores + loads), stack frame bytes) from `ptxas -v`."""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={arch}", path, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr

    def number(pattern):
        return int(re.search(pattern, out).group(1))

    spills = number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads")
    return number(r"Used (\d+) registers"), spills, number(r"(\d+) bytes stack frame")


def compile_all(launches, log=sys.stderr):
    """Each distinct specialisation of `launches` compiled for every target: (compiled, failures)."""
    compiled, failures = {}, []
    for launch in launches:
        name = launch.kernel.fn.__name__
        for axis, (size, limit) in enumerate(zip(launch.grid, GRID_LIMITS)):
            if size > limit:
                failures.append(f"{name} ({launch.case}): grid dimension {axis} is {size}, over its limit of {limit}")
        for target_name, (target, shared_limit) in TARGETS.items():
            try:
                options, signature, constexprs, attrs = specialise(launch, target)
                key = (name, str(signature), str(constexprs), str(options.num_warps))
                entry = compiled.setdefault(key, Compiled(launch, describe(signature, constexprs, options)))
                if target_name in entry.per_target:
                    continue
                source = ASTSource(launch.kernel, signature, constexprs, attrs)
                kernel = triton.compile(source, target=target, options=options.__dict__)
                entry.per_target[target_name] = (*ptxas_report(kernel.asm["ptx"], target.arch), kernel.metadata.shared)
            except Exception as e:  # noqa: BLE001 -- a compile error is a result, reported with its case
                failures.append(f"{name} ({launch.case}) on {target_name}: {type(e).__name__}: {e}")
                continue
            if kernel.metadata.shared > shared_limit:
                failures.append(
                    f"{name} ({launch.case}) on {target_name}: {kernel.metadata.shared} bytes of shared memory, "
                    f"over the block limit of {shared_limit}"
                )
    print(f"compiled {len(compiled)} specialisations for {len(TARGETS)} targets", file=log)
    return list(compiled.values()), failures


def describe(signature, constexprs, options):
    """The specialisation in a few words: the pointers' dtypes, the constexpr flags set, the blocks, the warps."""
    pointers = sorted({v.lstrip("*") for v in signature.values() if v.startswith("*")})
    values = dict(zip([k for k, v in signature.items() if v == "constexpr"], constexprs.values()))
    flags = [k for k, v in values.items() if v is True]
    blocks = [f"{k}={v}" for k, v in values.items() if k.startswith("BLOCK")]
    return f"{'/'.join(pointers)}; {' '.join(flags) or '-'}; {' '.join(blocks)}; {options.num_warps} warps"


# --- what is compiled: the launchers' calls on meta tensors -------------------------------------------------


def cross_entropy_calls(quick):
    """cross_entropy_triton.forward and cross_entropy_scale_grad: every dtype; the benchmark's vocabularies and
    the largest; each option alone and all together (every combination but quick)."""
    vocabularies = (27, 1024, 3001, 50257, MAX_V) if quick else (27, 1024, 3001, 32768, 50257, 131072, MAX_V)
    flags = ("prob", "weight", "smooth", "z", "softcap", "mean")
    if quick:
        # none, all, and two that spilled once (the full set's finding)
        combos = [dict.fromkeys(flags, False), dict.fromkeys(flags, True)]
        combos += [
            {f: f in chosen for f in flags} for chosen in (("prob", "z", "mean"), ("weight", "smooth", "z", "softcap"))
        ]
    else:
        combos = [dict(zip(flags, values)) for values in itertools.product((False, True), repeat=len(flags))]
    calls = []
    # 8 rows: split across programs from V = 16384 (cross_entropy_triton.splits_for); 4096 rows: one program each
    for (dtype_name, dtype), V, combo, N in itertools.product(DTYPES.items(), vocabularies, combos, (8, 4096)):
        if (N == 4096 and V < 16384) or (quick and (V == MAX_V or N == 4096) and dtype != torch.float32):
            continue
        flags = "+".join(k for k, v in combo.items() if v) or "plain"
        calls.append((f"forward {dtype_name} {N}x{V} {flags}", _cross_entropy_forward(dtype, V, N=N, **combo)))
    for (dtype_name, dtype), V, per_row in itertools.product(DTYPES.items(), (27, 50257), (False, True)):
        grad = torch.empty(8, V, dtype=dtype, device=META)
        scale = torch.empty(
            8 if per_row else (), dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=META
        )
        calls.append(
            (
                f"scale_grad {dtype_name} V={V}",
                lambda g=grad, s=scale: cross_entropy_triton.cross_entropy_scale_grad(g, s),
            )
        )
    return calls


def _cross_entropy_forward(dtype, V, prob, weight, smooth, z, softcap, mean, N=8):
    logits = torch.empty(N, V, dtype=dtype, device=META)
    target = torch.empty(N, V, dtype=dtype, device=META) if prob else torch.empty(N, dtype=torch.long, device=META)
    w = torch.empty(V, dtype=dtype, device=META) if weight else None
    return lambda: cross_entropy_triton.forward(
        logits,
        target,
        w,
        torch.empty_like(logits),
        1 if mean else 2,
        -100,
        0.1 if smooth else 0.0,
        1e-4 if z else 0.0,
        30.0 if softcap else None,
    )


def batch_norm_calls(quick):
    """batch_norm_triton's five launchers: 2-D (N, C) up to the largest C, NCHW and channels-last at ResNet's
    shapes, every dtype, training and eval, with the residual and relu."""
    shapes = [
        ((32, 64), None),
        ((16384, 256), None),
        ((8192, MAX_C), None),
        ((100000, 7), None),
        ((32, 64, 56, 56), None),
        ((32, 64, 56, 56), torch.channels_last),
        ((32, 512, 7, 7), None),
        ((32, 512, 7, 7), torch.channels_last),
    ]
    if quick:
        shapes = [shapes[0], shapes[2], shapes[4], shapes[5]]
    calls = []
    for (dtype_name, dtype), (shape, layout) in itertools.product(DTYPES.items(), shapes):
        x = torch.empty(shape, dtype=dtype, device=META)
        x = x if layout is None else x.contiguous(memory_format=layout)
        C, acc = shape[1], torch.float64 if dtype == torch.float64 else torch.float32
        per_channel = torch.empty(C, dtype=acc, device=META)
        mean = torch.empty(C, dtype=torch.float64, device=META)
        name = f"{dtype_name} {'x'.join(map(str, shape))}{' channels_last' if layout else ''}"
        for training, fused in itertools.product((True, False), (False, True)):
            residual, activation = (torch.empty_like(x), 1) if fused else (None, 0)
            calls.append(
                (
                    f"forward {name} {'training' if training else 'eval'}{' +add+relu' if fused else ''}",
                    lambda x=x, p=per_channel, t=training, r=residual, a=activation: batch_norm_triton.forward(
                        x, p, p, p, p, t, False, 1e-5, r, a
                    ),
                )
            )
            output = torch.empty_like(x) if fused else None
            calls.append(
                (
                    f"backward {name} {'training' if training else 'eval'}{' relu' if fused else ''}",
                    lambda x=x, p=per_channel, m=mean, t=training, o=output: batch_norm_triton.backward(
                        torch.empty_like(x), x, m, p, p, t, False, o, o is not None
                    ),
                )
            )
        count = torch.empty(1, dtype=torch.float64, device=META)
        calls += [
            (f"stats {name}", lambda x=x: batch_norm_triton.stats(x)),
            (
                f"backward_reduce {name}",
                lambda x=x, m=mean: batch_norm_triton.backward_reduce(torch.empty_like(x), x, m),
            ),
            (
                f"backward_elemt {name}",
                lambda x=x, m=mean, p=per_channel, c=count: batch_norm_triton.backward_elemt(
                    torch.empty_like(x), x, m, p, p, p, p, c, False
                ),
            ),
        ]
    return calls


# --- the table ------------------------------------------------------------------------------------------------


def table(compiled, seconds):
    """The markdown table: one row per specialisation, registers, spilled bytes, stack and shared bytes per
    target."""
    spilling = [c for c in compiled if any(t[1] for t in c.per_target.values())]
    lines = [
        "# Triton kernels compiled for sm_80 and sm_90 (no GPU)",
        "",
        f"`python bench/compile_kernels.py`: {len(compiled)} specialisations (a kernel's pointer dtypes, flags, "
        f"blocks and warps, as its launcher's calls give them) for {' and '.join(TARGETS)}, triton "
        f"{triton.__version__}, {seconds:.0f} s. Registers per thread, spilled bytes (stores + loads) and stack "
        f"frame from `ptxas -v`; shared memory from the compiled kernel. {len(spilling)} specialisations spill"
        + (f": {', '.join(sorted({c.signature.split(';')[0] for c in spilling}))} pointers." if spilling else "."),
        "",
        "| kernel | specialisation (pointers; flags; blocks; warps) | first case | "
        + " | ".join(f"{t} regs | {t} spill | {t} stack | {t} shared" for t in TARGETS)
        + " |",
        "|" + " --- |" * (3 + 4 * len(TARGETS)),
    ]
    for c in sorted(compiled, key=lambda c: (c.launch.kernel.fn.__name__, c.signature)):
        cells = [" | ".join(map(str, c.per_target.get(t, ("-",) * 4))) for t in TARGETS]
        lines.append(f"| `{c.launch.kernel.fn.__name__}` | {c.signature} | {c.launch.case} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the representative set the test suite compiles")
    parser.add_argument("--out", default=None, help="(default: bench/results, quick/ inside with --quick)")
    args = parser.parse_args(argv)
    out = args.out or (os.path.join(RESULTS, "quick") if args.quick else RESULTS)
    start = time.perf_counter()
    launches = record(cross_entropy_calls(args.quick) + batch_norm_calls(args.quick))
    compiled, failures = compile_all(launches)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compile_kernels.md"), "w") as f:
        f.write(table(compiled, time.perf_counter() - start))
    for failure in failures:
        print(f"FAIL {failure}")
    print(
        f"{len(compiled)} specialisations compiled for {', '.join(TARGETS)}; {len(failures)} failures; "
        f"table: {os.path.join(out, 'compile_kernels.md')}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
