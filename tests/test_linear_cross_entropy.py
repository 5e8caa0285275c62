"""fusedops.linear_cross_entropy (and LinearCrossEntropy, LinearCrossEntropyFunction): the loss of
cross_entropy(F.linear(input, weight, bias), target, ...) computed over chunks of rows, never the whole N x V
logits. Against F.cross_entropy(F.linear(...)) for PyTorch's options and against the spec's composite (soft-capped
logits, + z_loss * lse^2) for the others: the loss, the lse and the gradients of the input, the weight and the bias,
for every option combination, in float64 (tight), float32 and bfloat16; chunk sizes that do not divide the rows;
autograd (gradcheck, double backward, torch.func, vmap); the module as an nn.Linear LM head; bad input; and
torch.compile. Small shapes throughout (the Triton kernels under the interpreter: tiny ones)."""

import pytest
import torch
import torch.nn.functional as F
from cases import linear_cross_entropy as lce_cases
from cases.cross_entropy import composite, softcapped
from conftest import assert_all_close
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import fusedops
from fusedops import errors

# PyTorch's own jacfwd/jacrev warn so on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
REDUCTIONS = ["mean", "sum", "none"]
TIGHT = dict(rtol=1e-9, atol=1e-12)  # float64 against float64: only the order of the sums differs
FP32 = dict(rtol=2e-5, atol=2e-6)  # float32 against float64
FUSEDOPS_ERRORS = (errors.ArgumentValueError, errors.ArgumentTypeError, errors.ArgumentIndexError)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def chunk(V, dtype, rows=3):
    """chunk_bytes for `rows` rows of logits per chunk (rows = chunk_bytes // (V * itemsize))."""
    return rows * V * torch.tensor([], dtype=dtype).element_size() + 1


def make(N, H, V, dtype=F64, bias=True, seed=0, scale=1.0):
    """input (N, H) (or N a shape: (..., H)), weight (V, H) and bias (V,) of the dtype; logits of spread ~ 2 * scale."""
    g = gen(seed)
    shape = (N,) if isinstance(N, int) else tuple(N)
    x = torch.randn(*shape, H, generator=g, dtype=F64)
    W = torch.randn(V, H, generator=g, dtype=F64) * (2 * scale / H**0.5)
    b = torch.randn(V, generator=g, dtype=F64) * 0.5 if bias else None
    return x.to(dtype), W.to(dtype), None if b is None else b.to(dtype)


def make_target(kind, shape, V, seed=1, ignore_index=-100, dtype=F64):
    """kind: "class" (every third ignored), "all_ignored" or "probs" (rows of class probabilities, some zero)."""
    g = gen(seed)
    if kind == "probs":
        logits = torch.randn(*shape, V, generator=g, dtype=F64) * 2
        logits[torch.rand(*shape, V, generator=g) < 0.2] = -float("inf")
        logits[..., 0] = 0.0
        return torch.softmax(logits, -1).to(dtype)
    target = torch.randint(0, V, shape, generator=g)
    if kind == "all_ignored":
        target.fill_(ignore_index)
    else:
        target.view(-1)[::3] = ignore_index
    return target


def class_weights(V, seed=2, dtype=F64):
    return (torch.rand(V, generator=gen(seed), dtype=F64) * 2 + 0.25).to(dtype)


def upstream(shape, dtype, seed):
    """An upstream gradient that is not all ones."""
    return (torch.rand(shape, generator=gen(seed), dtype=F64) + 0.5).to(dtype)


def fused(x, W, t, b=None, **kw):
    return fusedops.linear_cross_entropy(x, W, t, b, **kw)


def oracle(
    x,
    W,
    t,
    b=None,
    *,
    class_weight=None,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
    chunk_bytes=None,
    backend=None,
    vocab_size=None,
):
    """F.cross_entropy(F.linear(x, W, b), t, ...) over the rows (..., V) -> (M, V); where PyTorch lacks the option
    (z_loss, softcap, lse), the spec's composite of torch ops. The loss (and lse) of "none" shaped x.shape[:-1]."""
    V = W.shape[0]
    logits = F.linear(x, W, b).reshape(-1, V)
    rows = t.reshape(-1, V) if t.is_floating_point() else t.reshape(-1).long()
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if z_loss or softcap is not None or return_lse:
        out = composite(logits, rows, class_weight, z_loss=z_loss, softcap=softcap, return_lse=return_lse, **kw)
    else:
        out = F.cross_entropy(logits, rows, class_weight, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    outs = tuple(o.reshape(x.shape[:-1]) if o.dim() else o for o in outs)
    return outs if return_lse else outs[0]


def results(fn, x, W, t, b=None, seed=9, target_grad=False, **kw):
    """fn(x, W, t, b, **kw)'s outputs (loss, or loss and lse) and the gradients of sum_i <output_i, u_i> (u_i not
    all ones) with respect to x, W and b (None where b is None), and t for target_grad, all on fresh leaves."""
    x, W = x.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_() if target_grad else t
    out = fn(x, W, t, b, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    scalar = sum((o * upstream(o.shape, o.dtype, seed + i)).sum() for i, o in enumerate(outs))
    leaves = [x, W] + ([b] if b is not None else []) + ([t] if target_grad else [])
    grads = list(torch.autograd.grad(scalar, leaves))
    if b is None:
        grads.insert(2, None)
    return [o.detach() for o in outs] + grads


def normalized_error(value, exact):
    return ((value.double() - exact.double()).abs().amax() / exact.double().abs().amax().clamp_min(1e-30)).item()


# --- every option combination, float64, several chunks ------------------------------------------------

# (target kind, ignore_index); probability targets take no ignore_index (torch's rule)
TARGET_KINDS = {
    "class": ("class", -100),
    "class_ignore_2": ("class", 2),
    "all_ignored": ("all_ignored", -100),
    "probs": ("probs", -100),
}
ZS = {"plain": (0.0, None), "z_loss_softcap": (0.01, 3.0)}


@pytest.mark.parametrize("zs", list(ZS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", list(TARGET_KINDS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_options_match_torch(reduction, kind, weighted, smoothing, bias, zs):
    """N=7 rows in chunks of 3 (3, 3, 1): the loss and the gradients of input, weight and bias."""
    N, H, V = 7, 5, 9
    z_loss, softcap = ZS[zs]
    target_kind, ignore_index = TARGET_KINDS[kind]
    x, W, b = make(N, H, V, bias=bias, scale=2.0)
    t = make_target(target_kind, (N,), V, ignore_index=ignore_index)
    kw = dict(
        class_weight=class_weights(V) if weighted else None,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    got = results(fused, x, W, t, b, chunk_bytes=chunk(V, F64), **kw)
    expected = results(oracle, x, W, t, b, **kw)
    assert got[0].shape == expected[0].shape and got[0].dtype == F64
    assert_all_close(got, expected, equal_nan=True, **TIGHT)  # every target ignored, mean: 0/0 as PyTorch
    if kind != "all_ignored":
        assert all(g.abs().amax() > 1e-3 for g in got[1:] if g is not None)
    if zs != "plain" and kind != "all_ignored":  # the options are not a no-op
        plain = oracle(x, W, t, b, **(kw | dict(z_loss=0.0, softcap=None)))
        assert (got[0] - plain).abs().amax() > 1e-4


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_every_target_ignored_as_torch(reduction, weighted):
    """mean: PyTorch's NaN (0/0); sum: 0; none: zeros; every gradient 0 (z-loss and soft-capping change none of it)."""
    N, H, V = 7, 5, 9
    x, W, b = make(N, H, V)
    t = torch.full((N,), -100)
    cw = class_weights(V) if weighted else None
    expected = results(oracle, x, W, t, b, class_weight=cw, reduction=reduction)
    assert expected[0].isnan().all() if reduction == "mean" else (expected[0] == 0).all()
    for extra in (dict(), dict(z_loss=0.1, softcap=2.0, label_smoothing=0.1)):
        got = results(fused, x, W, t, b, class_weight=cw, reduction=reduction, chunk_bytes=chunk(V, F64), **extra)
        assert_all_close(got[:1], expected[:1], equal_nan=True, rtol=0, atol=0)
        for g, e in zip(got[1:], expected[1:]):
            torch.testing.assert_close(e, torch.zeros_like(e), rtol=0, atol=0)
            torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=0)


@pytest.mark.parametrize("H", [5, 16])
@pytest.mark.parametrize("V", [1, 9, 37])
@pytest.mark.parametrize("N", [1, 7, 13])
def test_sizes_and_chunks_match_torch(N, H, V):
    """Odd sizes (one row, one class), chunks of 1 row, 3 rows (N not a multiple of it), one row short of
    everything, all rows at once, and the default; float64 to the oracle, the chunkings to each other."""
    x, W, b = make(N, H, V, seed=N * 100 + V)
    t = make_target("class", (N,), V, seed=H)
    if N == 1:
        t[0] = V - 1  # not ignored
    kw = dict(class_weight=class_weights(V), label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    expected = results(oracle, x, W, t, b, **kw)
    row_bytes = V * 8
    chunkings = {1, row_bytes, chunk(V, F64), max(1, N - 1) * row_bytes, N * row_bytes, 2**40, None}
    for chunk_bytes in sorted(chunkings, key=lambda c: -1 if c is None else c):
        extra = {} if chunk_bytes is None else dict(chunk_bytes=chunk_bytes)
        got = results(fused, x, W, t, b, **kw, **extra)
        assert_all_close(got, expected, **TIGHT)


def test_no_rows_as_torch():
    """N = 0: mean NaN (0/0), sum 0, none empty; the gradients zeros (of the weight and bias too)."""
    x, W, b = make(0, 5, 9)
    t = torch.zeros(0, dtype=torch.long)
    for reduction in REDUCTIONS:
        got = results(fused, x, W, t, b, reduction=reduction, chunk_bytes=chunk(9, F64))
        expected = results(oracle, x, W, t, b, reduction=reduction)
        assert_all_close(got, expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["class", "probs"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_leading_dimensions(reduction, kind):
    """(B, T, H) input (a permuted, non-contiguous one too) with (B, T) class targets or (B, T, V) probabilities:
    the loss of "none" and the lse shaped (B, T)."""
    B, T, H, V = 2, 5, 6, 11
    g = gen(3)
    x = torch.randn(T, B, H, generator=g, dtype=F64).transpose(0, 1)  # (B, T, H), not contiguous
    _, W, b = make(1, H, V)
    t = make_target(kind, (B, T), V)
    kw = dict(
        class_weight=class_weights(V),
        reduction=reduction,
        label_smoothing=0.1,
        z_loss=0.01,
        softcap=4.0,
        return_lse=True,
    )
    for x_ in (x, x.contiguous()):
        got = results(fused, x_, W, t, b, chunk_bytes=chunk(V, F64), **kw)
        expected = results(oracle, x_, W, t, b, **kw)
        assert got[1].shape == (B, T) and got[0].shape == ((B, T) if reduction == "none" else ())
        assert got[2].shape == x_.shape and got[3].shape == W.shape
        assert_all_close(got, expected, **TIGHT)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_lse(reduction, softcap):
    """lse = logsumexp of the (soft-capped) logits for every row, ignored ones too, shaped like the loss of "none",
    in the loss's dtype; the gradients of <loss, u> + <lse, v>."""
    N, H, V = 13, 5, 37
    x, W, b = make(N, H, V, scale=2.0)
    t = make_target("class", (N,), V)
    kw = dict(reduction=reduction, softcap=softcap, z_loss=0.01, return_lse=True)
    got = results(fused, x, W, t, b, chunk_bytes=chunk(V, F64), **kw)
    expected = results(oracle, x, W, t, b, **kw)
    assert got[1].shape == (N,) and got[1].dtype == F64
    torch.testing.assert_close(got[1], torch.logsumexp(softcapped(F.linear(x, W, b), softcap), 1), **TIGHT)
    assert_all_close(got, expected, **TIGHT)
    # float32: the lse float32
    loss, lse = fused(x.float(), W.float(), t, b.float(), chunk_bytes=chunk(V, F32), **kw)
    assert loss.dtype == lse.dtype == F32
    torch.testing.assert_close(lse, expected[1].float(), **FP32)


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.uint8])
def test_index_dtypes_same_as_int64(target_dtype):
    N, H, V = 7, 5, 9
    x, W, b = make(N, H, V)
    t = make_target("class", (N,), V, ignore_index=3)
    kw = dict(
        ignore_index=3, class_weight=class_weights(V), label_smoothing=0.1, reduction="none", chunk_bytes=chunk(V, F64)
    )
    assert_all_close(
        results(fused, x, W, t.to(target_dtype), b, **kw), results(fused, x, W, t, b, **kw), rtol=0, atol=0
    )


def test_class_weight_that_requires_grad_raises_as_torch():
    """The class weights take no derivative: one that requires grad raises, as PyTorch's cross_entropy does
    (never a gradient dropped in silence); detached, or under no_grad, it is a constant."""
    x, W, b = make(7, 5, 9)
    cw = class_weights(9).requires_grad_()
    x.requires_grad_()
    target = make_target("class", (7,), 9)
    with pytest.raises(RuntimeError, match="not differentiable with respect to class_weight"):
        fused(x, W, target, b, class_weight=cw, chunk_bytes=chunk(9, F64))
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        F.cross_entropy(F.linear(x, W, b), target, cw)
    fused(x, W, target, b, class_weight=cw.detach(), chunk_bytes=chunk(9, F64)).backward()
    assert cw.grad is None and x.grad is not None


def test_probability_target_gradient():
    """The gradient of the loss with respect to probability targets, as PyTorch's."""
    N, H, V = 7, 5, 9
    x, W, b = make(N, H, V)
    t = make_target("probs", (N,), V)
    for kw in (dict(), dict(class_weight=class_weights(V), label_smoothing=0.1, reduction="none")):
        got = results(fused, x, W, t, b, target_grad=True, chunk_bytes=chunk(V, F64), **kw)
        expected = results(oracle, x, W, t, b, target_grad=True, **kw)
        assert_all_close(got, expected, **TIGHT)


def test_logits_are_never_saved_whole():
    """Nothing the autograd graph saves holds N x V numbers (the point of the fusion: only chunks of the logits
    exist, and only during the call)."""
    N, H, V = 13, 4, 37
    x, W, b = make(N, H, V, dtype=F32)
    x.requires_grad_(), W.requires_grad_(), b.requires_grad_()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused(
            x, W, make_target("class", (N,), V), b, chunk_bytes=chunk(V, F32), label_smoothing=0.1, z_loss=0.01
        )
    loss.backward()
    assert saved, "nothing saved for backward"
    assert all(torch.Size(s).numel() < N * V for s in saved), saved


# --- float32 and bfloat16 -----------------------------------------------------------------------------

DTYPE_OPTIONS = {
    "mean_smoothing": dict(label_smoothing=0.1),
    "sum_weighted": dict(reduction="sum", class_weight=True),
    "none_z_loss_softcap": dict(reduction="none", z_loss=0.01, softcap=5.0, class_weight=True),
    "probs": dict(kind="probs", label_smoothing=0.1),
}


def dtype_case(option, dtype, N=13, H=16, V=37):
    kw = dict(DTYPE_OPTIONS[option])
    kind = kw.pop("kind", "class")
    x, W, b = make(N, H, V, dtype=dtype, scale=2.0, seed=5)
    t = make_target(kind, (N,), V, dtype=dtype)
    if kw.pop("class_weight", False):
        kw["class_weight"] = class_weights(V, dtype=dtype)
    return x, W, b, t, kw


def upcast(args, dtype):
    return [None if a is None else a.to(dtype) if a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("option", list(DTYPE_OPTIONS))
def test_float32_against_float64(option):
    x, W, b, t, kw = dtype_case(option, F32)
    expected = results(
        oracle,
        *upcast([x, W, t, b], F64),
        **{k: upcast([v], F64)[0] if k == "class_weight" else v for k, v in kw.items()},
    )
    for chunk_bytes in (1, chunk(37, F32), None):
        got = results(fused, x, W, t, b, **kw, **({} if chunk_bytes is None else dict(chunk_bytes=chunk_bytes)))
        assert all(g.dtype == F32 for g in got)
        assert_all_close(got, [e.float() for e in expected], **FP32)


@pytest.mark.parametrize("option", list(DTYPE_OPTIONS))
def test_bfloat16_as_accurate_as_torch(option):
    """bf16 input, weight and bias: the results bf16; against PyTorch's float32 on the same (rounded) numbers to
    bf16's rounding, and no further from float64 than PyTorch's own bf16 result (x2; the weight's gradient x4:
    each chunk's product G^T X is rounded to bf16 once before the fp32 sum), for chunks of 1 and 3 rows."""
    x, W, b, t, kw = dtype_case(option, BF16)
    kw64 = {k: upcast([v], F64)[0] if k == "class_weight" else v for k, v in kw.items()}
    kw32 = {k: upcast([v], F32)[0] if k == "class_weight" else v for k, v in kw.items()}
    exact = results(oracle, *upcast([x, W, t, b], F64), **kw64)
    fp32 = results(oracle, *upcast([x, W, t, b], F32), **kw32)
    theirs = results(oracle, x, W, t, b, **kw)  # PyTorch in bf16 (its logits rounded to bf16)
    eps = torch.finfo(BF16).eps
    for chunk_bytes in (1, chunk(37, BF16)):
        got = results(fused, x, W, t, b, chunk_bytes=chunk_bytes, **kw)
        for name, g, e32, e64, th in zip(["loss", "input", "weight", "bias"], got, fp32, exact, theirs):
            assert g.dtype == BF16, name
            assert normalized_error(g, e32) <= 2 * eps, (name, chunk_bytes, normalized_error(g, e32))
            ours, torchs = normalized_error(g, e64), normalized_error(th, e64)
            assert ours <= max((4 if name == "weight" else 2) * torchs, eps / 2), (name, chunk_bytes, ours, torchs)


# --- backend="triton" (the interpreter on CPU tensors) -----------------------------------------------

TRITON_OPTIONS = {
    "mean_weighted_smoothing": dict(class_weight=True, label_smoothing=0.1),
    "none_probs_z_loss_softcap_lse": dict(kind="probs", reduction="none", z_loss=0.01, softcap=3.0, return_lse=True),
}


@pytest.mark.parametrize("option", list(TRITON_OPTIONS))
def test_triton_backend(option):
    kw = dict(TRITON_OPTIONS[option])
    kind = kw.pop("kind", "class")
    N, H, V = 5, 4, 7
    x, W, b = make(N, H, V, dtype=F32, scale=2.0)
    t = make_target(kind, (N,), V, dtype=F32)
    if kw.pop("class_weight", False):
        kw["class_weight"] = class_weights(V, dtype=F32)
    got = results(fused, x, W, t, b, backend="triton", chunk_bytes=chunk(V, F32, rows=2), **kw)
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    expected = results(oracle, *upcast([x, W, t, b], F64), **kw64)
    assert_all_close(got, [e.float() for e in expected], **FP32)
    cpp = results(fused, x, W, t, b, backend="cpp", chunk_bytes=chunk(V, F32, rows=2), **kw)
    assert_all_close(got, cpp, rtol=1e-5, atol=1e-6)


# --- autograd ---------------------------------------------------------------------------------------

AUTOGRAD_OPTIONS = {
    "mean_smoothing": dict(label_smoothing=0.1),
    "none_weighted": dict(reduction="none", class_weight=True),
    "softcap_z_loss": dict(z_loss=0.05, softcap=2.0, reduction="sum"),
    "return_lse": dict(return_lse=True, softcap=2.0, label_smoothing=0.1),
}


def autograd_case(option, N=3, H=4, V=5):
    kw = dict(AUTOGRAD_OPTIONS[option])
    x, W, b = make(N, H, V, scale=2.0, seed=7)
    t = torch.tensor([1, -100, 4, 0, 2, 3][:N])
    if kw.pop("class_weight", False):
        kw["class_weight"] = class_weights(V)
    return x, W, b, t, kw


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("option", list(AUTOGRAD_OPTIONS))
def test_gradcheck_and_gradgradcheck(option):
    x, W, b, t, kw = autograd_case(option)
    kw["chunk_bytes"] = chunk(5, F64, rows=2)
    fn = lambda x, W, b: fused(x, W, t, b, **kw)
    leaves = [a.detach().clone().requires_grad_() for a in (x, W, b)]
    assert gradcheck(fn, leaves)
    assert gradgradcheck(fn, leaves)
    # the second derivative is that of the composite
    firsts, seconds = [], []
    for f in (fn, lambda x, W, b: oracle(x, W, t, b, **kw)):
        leaves = [a.detach().clone().requires_grad_() for a in (x, W, b)]
        outs = as_tuple(f(*leaves))
        scalar = sum((o * upstream(o.shape, F64, 11 + i)).sum() for i, o in enumerate(outs))
        gs = torch.autograd.grad(scalar, leaves, create_graph=True)
        inner = sum((g * upstream(g.shape, F64, 20 + i)).sum() for i, g in enumerate(gs))
        firsts.append([g.detach() for g in gs])
        seconds.append(torch.autograd.grad(inner, leaves))
    assert_all_close(firsts[0] + list(seconds[0]), firsts[1] + list(seconds[1]), **TIGHT)


def test_gradcheck_probability_targets():
    x, W, b = make(3, 4, 5, seed=8)
    t = make_target("probs", (3,), 5)
    fn = lambda x, W, b, t: fused(x, W, t, b, label_smoothing=0.1, chunk_bytes=1)
    assert gradcheck(fn, [a.detach().clone().requires_grad_() for a in (x, W, b, t)])


@pytest.mark.parametrize("option", ["mean_smoothing", "softcap_z_loss"])
def test_torch_func(option):
    """grad, vjp, jacrev, jvp and jacfwd with respect to input, weight and bias, as the composite's."""
    x, W, b, t, kw = autograd_case(option)
    f = lambda x, W, b: fused(x, W, t, b, chunk_bytes=chunk(5, F64, rows=2), **kw)
    o = lambda x, W, b: oracle(x, W, t, b, **kw)
    primals = (x, W, b)
    argnums = (0, 1, 2)
    torch.testing.assert_close(grad(f, argnums)(*primals), grad(o, argnums)(*primals), **TIGHT)
    out, pullback = vjp(f, *primals)
    out_o, pullback_o = vjp(o, *primals)
    cotangent = torch.tensor(1.7, dtype=F64)
    assert_all_close((out, *pullback(cotangent)), (out_o, *pullback_o(cotangent)), **TIGHT)
    torch.testing.assert_close(jacrev(f, argnums)(*primals), jacrev(o, argnums)(*primals), **TIGHT)
    tangents = tuple(upstream(p.shape, F64, 30 + i) - 1 for i, p in enumerate(primals))
    assert_all_close(jvp(f, primals, tangents), jvp(o, primals, tangents), **TIGHT)
    torch.testing.assert_close(jacfwd(f, argnums)(*primals), jacfwd(o, argnums)(*primals), **TIGHT)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vmap_over_a_batch_of_inputs(reduction):
    """vmap over (input, target) pairs, each its own call (mean over its own kept targets), and per-sample
    gradients of the weight and bias, against a loop."""
    S, N, H, V = 3, 4, 5, 9
    xs, W, b = make((S, N), H, V, seed=12)
    ts = make_target("class", (S, N), V)
    ts[2] = -100  # one sample with every target ignored
    kw = dict(reduction=reduction, label_smoothing=0.1, class_weight=class_weights(V), chunk_bytes=chunk(V, F64))
    f = lambda x, W, b, t: fused(x, W, t, b, **kw).nan_to_num().sum()
    o = lambda x, W, b, t: oracle(x, W, t, b, **kw).nan_to_num().sum()
    dims = (0, None, None, 0)
    torch.testing.assert_close(
        vmap(f, in_dims=dims)(xs, W, b, ts), torch.stack([o(x, W, b, t) for x, t in zip(xs, ts)]), **TIGHT
    )
    got = vmap(grad(f, (0, 1, 2)), in_dims=dims)(xs, W, b, ts)
    expected = [grad(o, (0, 1, 2))(x, W, b, t) for x, t in zip(xs, ts)]
    assert_all_close(got, [torch.stack(e) for e in zip(*expected)], **TIGHT)


# --- the module ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_module_holds_an_nn_linear(bias):
    """The parameters, their names, shapes and init, and state_dict of nn.Linear(in_features, num_classes, bias);
    either loads the other's state_dict; logits() is the linear's output and the loss F.cross_entropy's of it."""
    H, V = 6, 11
    torch.manual_seed(3)
    linear = torch.nn.Linear(H, V, bias=bias)
    torch.manual_seed(3)
    module = fusedops.LinearCrossEntropy(H, V, bias=bias)
    assert isinstance(module, torch.nn.Module)
    assert [(n, p.shape, p.dtype) for n, p in module.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in linear.named_parameters()
    ]
    assert list(module.state_dict()) == list(linear.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    assert list(module.buffers()) == []
    if not bias:
        assert module.bias is None
    # the same init: nn.Linear's (kaiming uniform; the bias uniform in +-1/sqrt(in_features)), the same draws
    bound = 1 / H**0.5
    assert module.weight.abs().max() <= bound and module.weight.std() > bound / 3
    if bias:
        assert module.bias.abs().max() <= bound
    assert_all_close(list(module.state_dict().values()), list(linear.state_dict().values()), rtol=0, atol=0)
    # load both ways
    other = torch.nn.Linear(H, V, bias=bias)
    module.load_state_dict(other.state_dict())
    linear.load_state_dict(module.state_dict())
    x = torch.randn(2, 7, H, generator=gen(4))
    t = make_target("class", (2, 7), V)
    torch.testing.assert_close(module.logits(x), other(x), rtol=0, atol=0)
    torch.testing.assert_close(module.logits(x), linear(x), rtol=0, atol=0)
    loss = module(x, t)
    expected = F.cross_entropy(other(x).reshape(-1, V), t.reshape(-1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(module.weight.grad, other.weight.grad)
    if bias:
        torch.testing.assert_close(module.bias.grad, other.bias.grad)


def test_module_default_has_no_bias():
    assert fusedops.LinearCrossEntropy(4, 6).bias is None
    assert list(fusedops.LinearCrossEntropy(4, 6).state_dict()) == ["weight"]


def test_module_device_and_dtype():
    module = fusedops.LinearCrossEntropy(4, 6, bias=True, dtype=F64)
    assert module.weight.dtype == module.bias.dtype == F64 and module.weight.shape == (6, 4)
    meta = fusedops.LinearCrossEntropy(4, 6, bias=True, device="meta", dtype=torch.float16)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in meta.parameters())
    # moves as a module
    assert module.float().weight.dtype == F32 and module.bias.dtype == F32


def test_module_passes_its_options_through():
    H, V, N = 5, 9, 7
    cw = class_weights(V, dtype=F32)
    options = dict(
        class_weight=cw,
        reduction="none",
        ignore_index=2,
        label_smoothing=0.1,
        z_loss=0.01,
        softcap=3.0,
        chunk_bytes=chunk(V, F32),
        backend="cpp",
    )
    module = fusedops.LinearCrossEntropy(H, V, bias=True, **options)
    assert dict(module.named_buffers()).keys() == {"class_weight"}
    torch.testing.assert_close(module.class_weight, cw, rtol=0, atol=0)
    x = torch.randn(N, H, generator=gen(5))
    t = make_target("class", (N,), V, ignore_index=2)
    loss = module(x, t)
    expected = fused(x, module.weight, t, module.bias, **options)
    assert loss.shape == (N,)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    torch.testing.assert_close(
        loss.double(), oracle(x.double(), module.weight.double(), t, module.bias.double(), **kw64), **FP32
    )
    plain = fusedops.LinearCrossEntropy(H, V, bias=True)
    plain.load_state_dict(module.state_dict(), strict=False)
    assert (plain(x, t) - loss.mean()).abs() > 1e-3
    # the class weights move with the module
    assert module.double().class_weight.dtype == F64
    torch.testing.assert_close(
        module(x.double(), t), oracle(x.double(), module.weight, t, module.bias, **kw64), **TIGHT
    )


def test_function_is_an_autograd_function():
    assert issubclass(fusedops.LinearCrossEntropyFunction, torch.autograd.Function)


# --- bad input ------------------------------------------------------------------------------------------


def snapshot(args):
    return {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


@pytest.mark.parametrize("case", list(lce_cases.TARGETS_OUT_OF_RANGE))
def test_rejects_targets_out_of_range(case):
    """An IndexError as cross_entropy's (and PyTorch's), naming the target, before anything is written."""
    replace, message = lce_cases.TARGETS_OUT_OF_RANGE[case]
    args = lce_cases.good_arguments() | replace
    if args["input"].shape[-1] != args["weight"].shape[-1]:
        args["weight"] = torch.randn(5, args["input"].shape[-1])
    x, W, b = (args[k].detach().requires_grad_() for k in ("input", "weight", "bias"))
    args |= dict(input=x, weight=W, bias=b)
    before = snapshot(args)
    torch_kw = {k: v for k, v in replace.items() if k == "ignore_index"}
    with pytest.raises(IndexError):
        F.cross_entropy(F.linear(x, W, b).reshape(-1, 5), args["target"].reshape(-1).long(), **torch_kw)
    for api in ("function", "module"):
        with pytest.raises(IndexError, match=message):
            lce_cases.call(api, **args)
    for name, value in before.items():
        assert torch.equal(args[name].detach(), value) and getattr(args[name], "grad", None) is None, name


def test_module_rejects_mismatched_hidden_size():
    module = fusedops.LinearCrossEntropy(3, 5)
    with pytest.raises(ValueError, match="^linear_cross_entropy: .*(input|weight)"):
        module(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]))


# --- torch.compile ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_lse", [False, True])
def test_compile_fullgraph_forward_backward_as_eager(return_lse):
    """One graph: the loss (+ the lse) and the gradients of input, weight and bias, as eager's; a second batch
    size."""
    torch._dynamo.reset()
    V = 9
    _, W, b = make(1, 5, V, dtype=F32, scale=2.0)
    kw = dict(
        class_weight=class_weights(V, dtype=F32),
        label_smoothing=0.1,
        z_loss=0.01,
        softcap=3.0,
        chunk_bytes=chunk(V, F32),
        return_lse=return_lse,
    )

    def step(x, W, t, b):
        out = fused(x * 2, W, t, b, **kw)
        return out[0] * 3 + out[1].sum() if return_lse else out * 3

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for N, seed in ((7, 13), (11, 14)):
        x, _, _ = make(N, 5, V, dtype=F32, seed=seed)
        t = make_target("class", (N,), V, seed=seed)
        got = results(lambda x, W, t, b: compiled(x, W, t, b), x, W, t, b)
        eager = results(lambda x, W, t, b: step(x, W, t, b), x, W, t, b)
        assert_all_close(got, eager, rtol=1e-5, atol=1e-6)
