"""Property-based: shapes (odd, prime, past a kernel block), dtypes, options, layouts and values drawn by
hypothesis; every operator's (cross-entropy, linear cross-entropy, batch norm) forward and backward against
PyTorch on the same inputs. The C++ kernels get the larger budget, the Triton ones (in the interpreter on CPU)
small shapes and a few examples."""

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedops

BUDGETS = {"cpp": 100, "triton": 20}
# the largest sizes drawn: V up to 300, past the C++ kernel's block of 64 classes
LIMITS = {"cpp": {"N": 70, "V": 300, "C": 40, "L": 7}, "triton": {"N": 6, "V": 40, "C": 6, "L": 3}}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# PyTorch runs in float64 on the same values, widened exactly (its own float32 can be the less accurate);
# the tolerance is that of the result's dtype
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


def fuzz(backend):
    return settings(
        max_examples=BUDGETS[backend],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def randn(shape, seed, dtype, scale=1.0, shift=0.0):
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (values * scale + shift).to(dtype)


def run(fn, x, others, grad_output):
    """fn(x * 1, *others) (x * 1: not a leaf, so in place is allowed) and its gradients w.r.t. x and
    every other tensor that is not None."""
    leaves = [x.detach().clone().requires_grad_()] + [
        None if t is None else t.detach().clone().requires_grad_() for t in others
    ]
    out = fn(leaves[0] * 1, *leaves[1:])
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_output)
    return [out.detach(), *grads]


def assert_matches(ours, theirs):
    for a, e in zip(ours, theirs, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a.double(), e, equal_nan=True, **TOLERANCES[a.dtype])


@st.composite
def cross_entropy_cases(draw, backend):
    limits = LIMITS[backend]
    spatial = draw(st.sampled_from([(), (), (), (draw(st.integers(1, 3)),)]))
    layout = "contiguous" if spatial else draw(st.sampled_from(["contiguous", "transposed"]))
    options = {
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.0, 1.0]) | st.floats(0, 1)),
        "ignore_index": draw(st.sampled_from([-100, 0])),
    }
    return {
        "N": draw(st.integers(1, limits["N"])),
        "V": draw(st.integers(1, limits["V"])),
        "spatial": spatial,
        "layout": layout,
        "options": options,
        "dtype": draw(st.sampled_from(DTYPES)),
        "inplace": not spatial and layout == "contiguous" and draw(st.booleans()),
        "scale": draw(st.sampled_from([1.0, 10.0, 100.0])),
        "ignored": draw(st.floats(0, 1)),
        "seed": draw(st.integers(0, 2**16)),
    }


def check_cross_entropy(backend, case):
    N, V, dtype, seed, options = case["N"], case["V"], case["dtype"], case["seed"], case["options"]
    logits = randn((N, *case["spatial"], V), seed, dtype, case["scale"]).movedim(-1, 1)
    if case["layout"] == "transposed":
        logits = logits.t().contiguous().t()
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (N, *case["spatial"]), generator=g)
    target[torch.rand(target.shape, generator=g) < case["ignored"]] = options["ignore_index"]
    grad_output = randn(target.shape if options["reduction"] == "none" else (), seed + 1, dtype)
    ours = run(
        lambda x: fusedops.cross_entropy(x, target, inplace_backward=case["inplace"], backend=backend, **options),
        logits,
        [],
        grad_output,
    )
    theirs = run(lambda x: F.cross_entropy(x, target, **options), logits.double(), [], grad_output.double())
    assert [t.dtype for t in ours] == [dtype, dtype]
    assert_matches(ours, theirs)


@st.composite
def linear_cross_entropy_cases(draw, backend):
    limits = LIMITS[backend]
    V = draw(st.integers(1, limits["V"]))
    options = {
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.0, 1.0]) | st.floats(0, 1)),
        "ignore_index": draw(st.sampled_from([-100, 0])),
    }
    return {
        "N": draw(st.integers(1, limits["N"])),
        "H": draw(st.integers(1, 9)),
        "V": V,
        "options": options,
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),  # bf16/fp16: matmul rounding, not ours
        "bias": draw(st.booleans()),
        "class_weight": draw(st.booleans()),
        "chunk_rows": draw(st.integers(1, limits["N"])),  # a chunk of logits: that many rows
        "ignored": draw(st.floats(0, 1)),
        "seed": draw(st.integers(0, 2**16)),
    }


def check_linear_cross_entropy(backend, case):
    N, H, V, dtype, seed, options = case["N"], case["H"], case["V"], case["dtype"], case["seed"], case["options"]
    x, W = randn((N, H), seed, dtype), randn((V, H), seed + 1, dtype)
    b = randn(V, seed + 2, dtype) if case["bias"] else None
    class_weight = randn(V, seed + 3, torch.float64).abs().add(0.5).to(dtype) if case["class_weight"] else None
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (N,), generator=g)
    target[torch.rand(N, generator=g) < case["ignored"]] = options["ignore_index"]
    grad_output = randn((N,) if options["reduction"] == "none" else (), seed + 4, dtype)
    chunk_bytes = case["chunk_rows"] * V * dtype.itemsize
    ours = run(
        lambda x, W, b: fusedops.linear_cross_entropy(
            x, W, target, b, class_weight=class_weight, chunk_bytes=chunk_bytes, backend=backend, **options
        ),
        x,
        [W, b],
        grad_output,
    )
    weight = None if class_weight is None else class_weight.double()
    theirs = run(
        lambda x, W, b: F.cross_entropy(F.linear(x, W, b), target, weight, **options),
        x.double(),
        [W.double(), None if b is None else b.double()],
        grad_output.double(),
    )
    assert [t.dtype for t in ours] == [dtype] * len(ours)
    assert_matches(ours, theirs)


@st.composite
def batch_norm_cases(draw, backend):
    limits = LIMITS[backend]
    L = draw(st.sampled_from([None, None, draw(st.integers(1, limits["L"]))]))
    dtype = draw(st.sampled_from(DTYPES))
    half = dtype in (torch.float16, torch.bfloat16)
    return {
        "N": draw(st.integers(2 if L in (None, 1) else 1, limits["N"])),
        "C": draw(st.integers(1, limits["C"])),
        "L": L,
        "dtype": dtype,
        "param_dtype": draw(st.sampled_from([dtype, torch.float32])) if half else dtype,
        "training": draw(st.booleans()),
        "affine": draw(st.booleans()),
        "running": draw(st.booleans()),
        "momentum": draw(st.floats(0, 1)),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.5])),
        "layout": draw(st.sampled_from(["contiguous", "channels_last"])),
        "scale": draw(st.sampled_from([1e-2, 1.0, 30.0])),
        "shift": draw(st.sampled_from([0.0, 3.0, -50.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


def check_batch_norm(backend, case):
    C, dtype, pdtype, seed = case["C"], case["dtype"], case["param_dtype"], case["seed"]
    shape = (case["N"], C) if case["L"] is None else (case["N"], C, case["L"])
    x = randn(shape, seed, dtype, case["scale"], case["shift"])
    if case["layout"] == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    dy = randn(shape, seed + 1, dtype)
    params = [randn(C, seed + 2, pdtype), randn(C, seed + 3, pdtype)] if case["affine"] else [None, None]
    has_stats = case["running"] or not case["training"]
    stats = [randn(C, seed + 4, pdtype), randn(C, seed + 5, torch.float64).abs().add(0.5).to(pdtype)]
    options = {"training": case["training"], "momentum": case["momentum"], "eps": case["eps"]}
    ours_stats = [t.clone() for t in stats] if has_stats else [None, None]
    theirs_stats = [t.double() for t in stats] if has_stats else [None, None]
    ours = run(lambda x, w, b: fusedops.batch_norm(x, *ours_stats, w, b, backend=backend, **options), x, params, dy)
    theirs = run(
        lambda x, w, b: F.batch_norm(x, *theirs_stats, w, b, **options),
        x.double(),
        [None if p is None else p.double() for p in params],
        dy.double(),
    )
    assert [t.dtype for t in ours] == [dtype, dtype] + [pdtype] * (2 if case["affine"] else 0)
    assert_matches(ours + (ours_stats if has_stats else []), theirs + (theirs_stats if has_stats else []))


def test_cross_entropy_matches_torch(backend):
    given(cross_entropy_cases(backend))(fuzz(backend)(lambda case: check_cross_entropy(backend, case)))()


def test_linear_cross_entropy_matches_torch(backend):
    given(linear_cross_entropy_cases(backend))(fuzz(backend)(lambda case: check_linear_cross_entropy(backend, case)))()


def test_batch_norm_matches_torch(backend):
    given(batch_norm_cases(backend))(fuzz(backend)(lambda case: check_batch_norm(backend, case)))()
