"""Bad input raises an exception that names the argument, before anything is written; edge input
(empty, non-finite, extreme, strided) gives PyTorch's numbers, or ones closer to float64."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_all_close, forward_and_grads, loss_and_grad

import fusedops

BACKENDS = ["cpp", "triton", "reference"]
# the kernels; the reference follows the notebooks' steps: log(probs) (-inf once a probability underflows),
# the variance in two plain passes, sums in whatever order torch takes for the layout
KERNELS = ["cpp", "triton"]
INF, NAN = float("inf"), float("nan")
EXACT_ON_KERNELS = {"cpp": {"rtol": 0, "atol": 0}, "triton": {"rtol": 0, "atol": 0}, "reference": {}}

# --- cross-entropy --------------------------------------------------------------------------------

# (what replaces the good logits (4, 5) / target / options, the exception, a pattern naming the argument)
CE_CASES = {
    "target_2d": ({"target": torch.zeros(4, 1, dtype=torch.long)}, ValueError, r"target has shape \(4, 1\)"),
    "target_length": ({"target": torch.zeros(3, dtype=torch.long)}, ValueError, r"target has shape \(3,\)"),
    "target_spatial_shape": ({"logits": torch.randn(4, 5, 3), "target": torch.zeros(4, 2, dtype=torch.long)},
                             ValueError, r"target has shape \(4, 2\) but logits of shape \(4, 5, 3\)"),
    "logits_0d": ({"logits": torch.tensor(1.0)}, ValueError, "logits must have at least one class"),
    "no_classes": ({"logits": torch.randn(4, 0)}, ValueError, "logits must have at least one class"),
    "no_rows_no_classes": ({"logits": torch.randn(0, 0), "target": torch.zeros(0, dtype=torch.long)}, ValueError,
                           "logits must have at least one class"),
    "float_target": ({"target": torch.zeros(4)}, TypeError, "target must be an int64 or int32 tensor"),
    "bool_target": ({"target": torch.zeros(4, dtype=torch.bool)}, TypeError, "target must be an int64 or int32"),
    "uint8_target": ({"target": torch.zeros(4, dtype=torch.uint8)}, TypeError, "target must be an int64 or int32"),
    "integer_logits": ({"logits": torch.ones(4, 5, dtype=torch.int64)}, TypeError,
                       "logits must be a floating-point tensor, got torch.int64"),
    "bool_logits": ({"logits": torch.ones(4, 5, dtype=torch.bool)}, TypeError, "logits must be a floating-point"),
    "complex_logits": ({"logits": torch.ones(4, 5, dtype=torch.complex64)}, TypeError, "logits must be a floating"),
    "logits_not_a_tensor": ({"logits": [[0.0] * 5] * 4}, TypeError, "logits must be a floating-point tensor"),
    "target_on_another_device": ({"target": torch.zeros(4, dtype=torch.long, device="meta")}, ValueError,
                                 "target is on meta but logits on cpu"),
    "target_equal_to_classes": ({"target": torch.tensor([0, 5, 1, -100])}, IndexError,
                                r"target\[1\] = 5 is out of range for 5 classes \(argument 'target'\)"),
    "target_negative": ({"target": torch.tensor([0, 1, -1, 2])}, IndexError, r"target\[2\] = -1 is out of range"),
    "target_below_ignore_index": ({"target": torch.tensor([-101, 1, 0, 2]).int()}, IndexError,
                                  r"target\[0\] = -101 is out of range"),
    "target_default_ignore_index_not_ignored": ({"target": torch.tensor([0, 1, 2, -100]), "ignore_index": 3},
                                                IndexError, r"target\[3\] = -100 is out of range"),
    "target_out_of_range_in_place": ({"target": torch.tensor([0, 7, 1, 2]), "inplace_backward": True}, IndexError,
                                     r"target\[1\] = 7 is out of range"),
    "target_out_of_range_spatial": ({"logits": torch.randn(2, 5, 3), "target": torch.tensor([[0, 1, 2], [3, 9, 4]])},
                                    IndexError, r"target\[4\] = 9 is out of range"),
    "unknown_reduction": ({"reduction": "avg"}, ValueError, "reduction must be one of .*, got 'avg'"),
    "reduction_none_object": ({"reduction": None}, ValueError, "reduction must be one of .*, got None"),
    "label_smoothing_above_1": ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\]"),
    "label_smoothing_negative": ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must be in \[0, 1\]"),
    "label_smoothing_nan": ({"label_smoothing": NAN}, ValueError, r"label_smoothing must be in \[0, 1\], got nan"),
    "label_smoothing_string": ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a float"),
    "ignore_index_float": ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int, got 1.5"),
    "unknown_backend": ({"backend": "cuda"}, ValueError, "backend must be one of"),
    "in_place_3d": ({"logits": torch.randn(4, 5, 3), "target": torch.zeros(4, 3, dtype=torch.long),
                     "inplace_backward": True}, ValueError, "inplace_backward=True needs 1-D or 2-D logits"),
    "in_place_transposed": ({"logits": torch.randn(5, 4).t(), "inplace_backward": True}, ValueError,
                            "inplace_backward=True needs logits with unit stride along the classes"),
    "in_place_overlapping_rows": ({"logits": torch.randn(1, 5).expand(4, 5), "inplace_backward": True}, ValueError,
                                  "inplace_backward=True needs logits with unit stride .* rows that do not overlap"),
}


def call_cross_entropy(api, logits, target, **options):
    """fusedops.cross_entropy, or the same through a CrossEntropyLoss built with the options."""
    if api == "function":
        return fusedops.cross_entropy(logits, target, **options)
    return fusedops.CrossEntropyLoss(**options)(logits, target)


@pytest.mark.parametrize("api", ["function", "module"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy_rejects(case, backend, api):
    replace, error, message = CE_CASES[case]
    kw = {"logits": torch.randn(4, 5), "target": torch.tensor([0, 4, -100, 2]), "backend": backend} | replace
    logits, target = kw.pop("logits"), kw.pop("target")
    if isinstance(logits, torch.Tensor) and logits.is_floating_point():
        saved = logits.clone()
        logits = logits.requires_grad_() if logits.is_leaf else logits  # so that in-place is really asked for
    with pytest.raises(error, match=message):
        call_cross_entropy(api, logits, target, **kw)
    if isinstance(logits, torch.Tensor) and logits.is_floating_point():
        assert torch.equal(logits.detach(), saved)  # nothing written, not even in place


def test_cross_entropy_ops_refuse_overlapping_rows():
    fusedops._backend.load_cpp()
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.fusedops.cross_entropy_forward_inplace(torch.zeros(1, 6).expand(4, 6),
                                                         torch.zeros(4, dtype=torch.long), 1, -100, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (2, 5, 0)])
def test_cross_entropy_empty_like_torch(backend, reduction, shape):
    logits, target = torch.randn(shape), torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
    loss, grad = loss_and_grad(partial(fusedops.cross_entropy, backend=backend), logits, target, reduction=reduction)
    loss_t, grad_t = loss_and_grad(F.cross_entropy, logits, target, reduction=reduction)
    torch.testing.assert_close(loss, loss_t, equal_nan=True)  # mean of nothing: nan, as PyTorch
    assert grad.shape == grad_t.shape == shape


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the interpreter's numpy on inf/NaN
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_non_finite_like_torch(backend, dtype):
    logits = torch.randn(7, 5)
    logits[0, 1] = NAN
    logits[1, 2] = INF
    logits[2, 3] = -INF  # not the target: a masked class, harmless
    logits[3, :] = -INF
    logits[4, 0] = -INF  # the target itself
    logits[5, 0], logits[5, 1] = INF, -INF
    logits = logits.to(dtype)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 4])
    for smoothing in (0.0, 0.1):
        kw = {"reduction": "none", "label_smoothing": smoothing}
        loss, grad = loss_and_grad(partial(fusedops.cross_entropy, backend=backend), logits, target, **kw)
        loss_t, grad_t = loss_and_grad(F.cross_entropy, logits.float(), target, **kw)
        torch.testing.assert_close(loss.float(), loss_t, equal_nan=True, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(grad.float(), grad_t, equal_nan=True, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4)])
def test_cross_entropy_extreme_logits_match_float64(backend, dtype, scale):
    """Logits at +-scale: the loss (up to 2*scale, past fp16's range for 6e4) and the gradient are those of
    float64 rounded to the dtype."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randint(-1, 2, (9, 7), generator=g) * scale).to(dtype)
    target = torch.randint(0, 7, (9,), generator=g)
    for reduction in ("none", "mean"):
        fused = partial(fusedops.cross_entropy, backend=backend)
        loss, grad = loss_and_grad(fused, logits, target, reduction=reduction)
        loss_64, grad_64 = loss_and_grad(F.cross_entropy, logits.double(), target, reduction=reduction)
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(loss, loss_64.to(dtype), rtol=ulp, atol=0)
        torch.testing.assert_close(grad, grad_64.to(dtype), rtol=ulp, atol=ulp / 9)
    if dtype == torch.float16:  # rows past fp16's range: PyTorch's fp16 mean overflows, the fp32 sum does not
        assert F.cross_entropy(logits, target).isinf() and loss.isfinite()


# (N, V) logits stored in other ways: each gives the numbers of its contiguous copy, bit for bit
CE_LAYOUTS = {
    "transposed": lambda: torch.randn(13, 6).t(),
    "column_slice": lambda: torch.randn(6, 20)[:, 3:16],
    "every_other_row": lambda: torch.randn(12, 13)[::2],
    "expanded_rows": lambda: torch.randn(1, 13).expand(6, 13),
    "expanded_columns": lambda: torch.randn(6, 1).expand(6, 13),
    "spatial_channels_last": lambda: torch.randn(2, 3, 13).permute(0, 2, 1),  # (N, V, d) with V innermost
    "one_row_strided": lambda: torch.randn(26)[::2],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(CE_LAYOUTS))
def test_cross_entropy_strided_equals_contiguous(backend, layout):
    torch.manual_seed(0)
    logits = CE_LAYOUTS[layout]()
    target = torch.randint(0, 13, logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ())
    results = []
    for x in (logits.detach().requires_grad_(), logits.contiguous().requires_grad_()):
        loss = fusedops.cross_entropy(x, target, reduction="none", label_smoothing=0.1, backend=backend)
        loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape))
        results.append((loss.detach(), x.grad))
    assert_all_close(results[0], results[1], **EXACT_ON_KERNELS[backend])


# --- batch norm -----------------------------------------------------------------------------------

# (what replaces the good arguments, the exception, a pattern naming the argument) of fusedops.batch_norm
BN_CASES = {
    "one_value_per_channel": ({"input": torch.randn(1, 4)}, ValueError, "more than 1 value per channel .*input"),
    "one_value_per_channel_3d": ({"input": torch.randn(1, 4, 1)}, ValueError, "more than 1 value per channel"),
    "empty_batch_training": ({"input": torch.randn(0, 4)}, ValueError, "more than 1 value per channel .*input"),
    "no_channels": ({"input": torch.randn(8, 0), "running_mean": None, "running_var": None, "weight": None,
                     "bias": None}, ValueError, r"input must have at least one channel, got shape \(8, 0\)"),
    "1d_input": ({"input": torch.randn(4)}, ValueError, "input must be .N, C. or .N, C, L., got 1-D"),
    "4d_input": ({"input": torch.randn(8, 4, 2, 2)}, ValueError, "input must be .N, C. or .N, C, L., got 4-D"),
    "integer_input": ({"input": torch.ones(8, 4, dtype=torch.int64)}, TypeError, "input must be a float"),
    "bool_input": ({"input": torch.ones(8, 4, dtype=torch.bool)}, TypeError, "input must be a float"),
    "input_not_a_tensor": ({"input": [[0.0] * 4] * 8}, TypeError, "input must be a float"),
    "wrong_channels": ({"weight": torch.ones(5)}, ValueError, r"weight has shape \(5,\) but input has 4 channels"),
    "weight_2d": ({"weight": torch.ones(1, 4)}, ValueError, r"weight has shape \(1, 4\)"),
    "wrong_running_mean": ({"running_mean": torch.zeros(3)}, ValueError, "running_mean has shape"),
    "running_var_dtype": ({"running_var": torch.ones(4, dtype=torch.float64)}, TypeError,
                          "running_var has dtype torch.float64 but input has torch.float32"),
    "bias_dtype": ({"bias": torch.zeros(4, dtype=torch.float16)}, TypeError, "bias has dtype torch.float16"),
    "integer_weight": ({"weight": torch.ones(4, dtype=torch.int64)}, TypeError, "weight has dtype torch.int64"),
    "half_input_double_weight": ({"input": torch.randn(8, 4).half(), "weight": torch.ones(4).double()}, TypeError,
                                 "weight has dtype torch.float64 but input has torch.float16"),
    "weight_not_a_tensor": ({"weight": [1.0] * 4}, TypeError, "weight must be a tensor or None, got list"),
    "bias_device": ({"bias": torch.zeros(4, device="meta")}, ValueError, "bias is on meta but input is on cpu"),
    "running_mean_device": ({"running_mean": torch.zeros(4, device="meta")}, ValueError, "running_mean is on meta"),
    "one_running_stat": ({"running_var": None}, ValueError, "running_mean and running_var must both be"),
    "eval_without_stats": ({"running_mean": None, "running_var": None, "training": False}, ValueError,
                           "training=False normalises with running_mean and running_var"),
    "training_not_a_bool": ({"training": "yes"}, TypeError, "training must be a bool, got 'yes'"),
    "momentum_none": ({"momentum": None}, TypeError, "momentum must be a float, got None"),
    "momentum_string": ({"momentum": "0.1"}, TypeError, "momentum must be a float, got '0.1'"),
    "negative_momentum": ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\], got -0.1"),
    "momentum_above_1": ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    "momentum_nan": ({"momentum": NAN}, ValueError, r"momentum must be in \[0, 1\], got nan"),
    "negative_eps": ({"eps": -1.0}, ValueError, "eps must be a non-negative number, got -1.0"),
    "eps_nan": ({"eps": NAN}, ValueError, "eps must be a non-negative number, got nan"),
    "eps_string": ({"eps": "1e-5"}, TypeError, "eps must be a float, got '1e-5'"),
    "unknown_backend": ({"backend": "cuda"}, ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BN_CASES))
def test_batch_norm_rejects_and_leaves_the_running_stats_untouched(backend, case):
    replace, error, message = BN_CASES[case]
    running_mean, running_var = torch.randn(4), torch.rand(4) + 0.5
    saved = running_mean.clone(), running_var.clone()
    args = {"input": torch.randn(8, 4), "running_mean": running_mean, "running_var": running_var,
            "weight": torch.ones(4), "bias": torch.zeros(4), "training": True, "momentum": 0.1, "eps": 1e-5,
            "backend": backend}
    args.update(replace)
    with pytest.raises(error, match=message):
        fusedops.batch_norm(**args)
    assert_all_close([running_mean, running_var], list(saved), rtol=0, atol=0)


# (BatchNorm1d(4, ...) arguments, its input, the exception, a pattern naming the argument)
MODULE_CASES = {
    "one_value_per_channel": ({"momentum": None}, torch.randn(1, 4), ValueError, "more than 1 value per channel"),
    "4d_input": ({}, torch.randn(8, 4, 2, 2), ValueError, "2D or 3D"),
    "wrong_channels": ({}, torch.randn(8, 5), ValueError, r"has shape \(4,\) but input has 5 channels"),
    "integer_input": ({}, torch.ones(8, 4, dtype=torch.int64), TypeError, "input must be a float"),
    "double_input_float_module": ({}, torch.randn(8, 4).double(), TypeError,
                                  "running_mean has dtype torch.float32 but input has torch.float64"),
    "negative_momentum": ({"momentum": -0.5}, torch.randn(8, 4), ValueError, r"momentum must be in \[0, 1\]"),
    "negative_eps": ({"eps": -1e-5}, torch.randn(8, 4), ValueError, "eps must be a non-negative number"),
    "no_running_stats_one_value": ({"track_running_stats": False}, torch.randn(1, 4, 1), ValueError,
                                   "more than 1 value per channel"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_rejects_bad_input_before_counting_it(backend, case):
    kwargs, input, error, message = MODULE_CASES[case]
    module = fusedops.BatchNorm1d(4, backend=backend, **kwargs)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error, match=message):
        module(input)
    assert_all_close(list(module.state_dict().values()), list(saved.values()), rtol=0, atol=0)


def test_batch_norm_ops_check_their_arguments():
    fusedops._backend.load_cpp()
    with pytest.raises(ValueError, match="input must be .N, C. or .N, C, L."):
        torch.ops.fusedops.batch_norm_forward(torch.randn(4), None, None, None, None, True, False, 1e-5)
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.fusedops.batch_norm_forward(torch.randn(4, 3), torch.ones(2), None, None, None, True, False, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.ops.fusedops.batch_norm_forward(torch.randn(1, 3), None, None, None, None, True, False, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4), (3, 4, 0)])
def test_batch_norm_empty_eval_like_torch(backend, shape):
    running = torch.randn(4), torch.rand(4) + 0.5
    w, b = torch.randn(4), torch.randn(4)
    x, dy = torch.randn(shape), torch.randn(shape)
    y, grads = forward_and_grads(lambda x, w, b: fusedops.batch_norm(x, *running, w, b, backend=backend), x, [w, b], dy)
    y_t, grads_t = forward_and_grads(lambda x, w, b: F.batch_norm(x, *running, w, b), x, [w, b], dy)
    assert_all_close([y] + grads, [y_t] + grads_t)


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the interpreter's numpy on inf/NaN
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_batch_norm_non_finite_like_torch(backend, training, value):
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(6, 3, 2, generator=g), torch.randn(6, 3, 2, generator=g)
    x[2, 0, 1] = value  # channel 0: its statistics (training) or only that output (eval)
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    running = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    results = {}
    for name, fn in [("ours", lambda *a: fusedops.batch_norm(*a, backend=backend)), ("torch", F.batch_norm)]:
        stats = [t.clone() for t in running]
        call = lambda x, w, b: fn(x, *stats, w, b, training, 0.1, 1e-5)  # noqa: B023
        y, (dx, dw, db) = forward_and_grads(call, x, [w, b], dy)
        results[name] = [y, dx, dw, db, *stats]
    assert_all_close(results["ours"], results["torch"], equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("mean,std", [(1e3, 1e-2), (1e4, 1e-3)])
def test_batch_norm_large_mean_small_std_match_float64(backend, mean, std):
    """The statistics of an input far from 0 relative to its spread: output and gradients as float64's."""
    g = torch.Generator().manual_seed(9)
    x, dy = mean + std * torch.randn(256, 8, generator=g), torch.randn(256, 8, generator=g)
    w, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    y, grads = forward_and_grads(lambda x, w, b: fusedops.batch_norm(x, None, None, w, b, True, backend=backend),
                                 x, [w, b], dy)
    y64, grads64 = forward_and_grads(lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                                     x.double(), [w.double(), b.double()], dy.double())
    for ours, exact in zip([y] + grads, [y64] + grads64):
        assert (ours - exact).abs().max() <= 1e-3 * exact.abs().max()  # torch.nn.functional: ~6e-3 at 1e3


# (N, C) / (N, C, L) inputs stored in other ways: each gives the numbers of its contiguous copy, bit for bit
BN_LAYOUTS = {
    "transposed": lambda: torch.randn(5, 12).t(),
    "channels_last": lambda: torch.randn(6, 3, 5).permute(0, 2, 1),
    "every_other_row": lambda: torch.randn(24, 5)[::2],
    "channel_slice": lambda: torch.randn(12, 9)[:, 2:7],
    "expanded_batch": lambda: torch.randn(1, 5, 3).expand(6, 5, 3),
    "expanded_length": lambda: torch.randn(6, 5, 1).expand(6, 5, 3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", list(BN_LAYOUTS))
def test_batch_norm_strided_equals_contiguous(backend, training, layout):
    torch.manual_seed(0)
    x = BN_LAYOUTS[layout]()
    dy, w, b = torch.randn(x.shape), torch.randn(5), torch.randn(5)
    results = []
    for stored in (x, x.contiguous()):
        leaves = [t.detach().requires_grad_() for t in (stored, w, b)]  # the input as it is stored
        running = [torch.zeros(5), torch.ones(5)]
        y = fusedops.batch_norm(leaves[0], *running, *leaves[1:], training, backend=backend)
        results.append([y.detach(), *torch.autograd.grad(y, leaves, dy), *running])
    assert_all_close(results[0], results[1], **EXACT_ON_KERNELS[backend])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_strided_per_channel_tensors_equal_contiguous(backend, training):
    """weight, bias and running statistics every other element of a longer tensor, bit for bit as contiguous."""
    torch.manual_seed(0)
    x, dy = torch.randn(8, 5), torch.randn(8, 5)
    values = [torch.randn(5), torch.randn(5), torch.randn(5), torch.rand(5) + 0.5]
    results = []
    for layout in (lambda t: torch.empty(10)[::2].copy_(t), torch.clone):
        w, b, *running = (layout(t) for t in values)
        leaves = [t.requires_grad_() for t in (x.clone(), w, b)]
        y = fusedops.batch_norm(leaves[0], *running, *leaves[1:], training, backend=backend)
        results.append([y.detach(), *torch.autograd.grad(y, leaves, dy), *running])
    assert running[0].stride() == (1,) and results[0][-1].stride() == (2,)
    assert_all_close(results[0], results[1], **EXACT_ON_KERNELS[backend])
