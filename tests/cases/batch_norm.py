"""Batch norm's test tables, declared once: bad inputs of the function and of the module, strided
layouts, and the samples of its registered ops (opcheck). The contract tests (test_bad_input.py,
test_ops.py) read them."""

import torch

import fusedops

NAN = float("nan")

OPERATOR = "batch_norm"
DIFFERENTIABLE = ("input", "weight", "bias")


def good_arguments():
    """fusedops.batch_norm's arguments of a good training call on (8, 4) input, with running statistics."""
    return {
        "input": torch.randn(8, 4),
        "running_mean": torch.randn(4),
        "running_var": torch.rand(4) + 0.5,
        "weight": torch.ones(4),
        "bias": torch.zeros(4),
        "training": True,
        "momentum": 0.1,
        "eps": 1e-5,
    }


def call(api="function", **arguments):
    """fusedops.batch_norm (the module's bad inputs are MODULE_BAD_INPUTS)."""
    return fusedops.batch_norm(**arguments)


# (what replaces the good arguments, the exception, a pattern naming the argument) of fusedops.batch_norm
BAD_INPUTS = {
    "one_value_per_channel": ({"input": torch.randn(1, 4)}, ValueError, "more than 1 value per channel .*input"),
    "one_value_per_channel_3d": ({"input": torch.randn(1, 4, 1)}, ValueError, "more than 1 value per channel"),
    "one_value_per_channel_4d": ({"input": torch.randn(1, 4, 1, 1)}, ValueError, "more than 1 value per channel"),
    "no_channels": (
        {"input": torch.randn(8, 0), "running_mean": None, "running_var": None, "weight": None, "bias": None},
        ValueError,
        r"input must have at least one channel, got shape \(8, 0\)",
    ),
    "1d_input": ({"input": torch.randn(4)}, ValueError, r"input must be \(N, C, \*\), got 1-D"),
    # stricter than PyTorch, which returns an empty tensor (README: semantics where fusedops decides)
    "1d_empty_input": ({"input": torch.randn(0)}, ValueError, r"input must be \(N, C, \*\), got 1-D"),
    "integer_input": ({"input": torch.ones(8, 4, dtype=torch.int64)}, TypeError, "input must be a float"),
    "bool_input": ({"input": torch.ones(8, 4, dtype=torch.bool)}, TypeError, "input must be a float"),
    "input_not_a_tensor": ({"input": [[0.0] * 4] * 8}, TypeError, "input must be a float"),
    "wrong_channels": (
        {"weight": torch.ones(5)},
        ValueError,
        r"weight has shape \(5,\) but input of shape \(8, 4\) needs \(4,\)",
    ),
    "weight_2d": ({"weight": torch.ones(1, 4)}, ValueError, r"weight has shape \(1, 4\)"),
    "wrong_running_mean": ({"running_mean": torch.zeros(3)}, ValueError, "running_mean has shape"),
    "running_var_dtype": (
        {"running_var": torch.ones(4, dtype=torch.float64)},
        TypeError,
        "running_var has dtype torch.float64 but input has torch.float32",
    ),
    "bias_dtype": ({"bias": torch.zeros(4, dtype=torch.float16)}, TypeError, "bias has dtype torch.float16"),
    "integer_weight": ({"weight": torch.ones(4, dtype=torch.int64)}, TypeError, "weight has dtype torch.int64"),
    "half_input_double_weight": (
        {"input": torch.randn(8, 4).half(), "weight": torch.ones(4).double()},
        TypeError,
        "weight has dtype torch.float64 but input has torch.float16",
    ),
    "weight_not_a_tensor": ({"weight": [1.0] * 4}, TypeError, "weight must be a tensor or None, got list"),
    "bias_device": ({"bias": torch.zeros(4, device="meta")}, ValueError, "bias is on meta but input is on cpu"),
    "running_mean_device": ({"running_mean": torch.zeros(4, device="meta")}, ValueError, "running_mean is on meta"),
    # as in PyTorch: not differentiable with respect to the running statistics (no silently dropped gradient)
    "running_mean_requires_grad": (
        {"running_mean": torch.zeros(4, requires_grad=True)},
        RuntimeError,
        "not differentiable with respect to running_mean",
    ),
    "running_var_requires_grad_eval": (
        {"running_var": torch.ones(4, requires_grad=True), "training": False},
        RuntimeError,
        "not differentiable with respect to running_var",
    ),
    "one_running_stat": ({"running_var": None}, ValueError, "running_mean and running_var must both be"),
    "eval_without_stats": (
        {"running_mean": None, "running_var": None, "training": False},
        ValueError,
        "training=False normalises with running_mean and running_var",
    ),
    "training_not_a_bool": ({"training": "yes"}, TypeError, "training must be a bool, got 'yes'"),
    "momentum_none": ({"momentum": None}, TypeError, "momentum must be a float, got None"),
    "momentum_string": ({"momentum": "0.1"}, TypeError, "momentum must be a float, got '0.1'"),
    "negative_momentum": ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\], got -0.1"),
    "momentum_above_1": ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\], got 1.5"),
    "momentum_nan": ({"momentum": NAN}, ValueError, r"momentum must be in \[0, 1\], got nan"),
    "negative_eps": ({"eps": -1.0}, ValueError, "eps must be a non-negative number, got -1.0"),
    "eps_nan": ({"eps": NAN}, ValueError, "eps must be a non-negative number, got nan"),
    "eps_string": ({"eps": "1e-5"}, TypeError, "eps must be a float, got '1e-5'"),
    "eps_zero_training": ({"eps": 0.0}, ValueError, "eps must be positive when training, got 0.0"),
    "eps_zero_4d_training": ({"input": torch.randn(2, 4, 3, 3), "eps": 0}, ValueError, "eps must be positive"),
    # fusedops' own arguments: torch has no residual or activation
    "residual_shape": (
        {"residual": torch.randn(8, 5)},
        ValueError,
        r"residual has shape \(8, 5\) but input of shape \(8, 4\) needs \(8, 4\)",
    ),
    "residual_broadcastable": ({"residual": torch.randn(1, 4)}, ValueError, r"residual has shape \(1, 4\)"),
    "residual_dtype": (
        {"residual": torch.randn(8, 4).double()},
        TypeError,
        "residual has dtype torch.float64 but input has torch.float32",
    ),
    "residual_device": (
        {"residual": torch.randn(8, 4, device="meta")},
        ValueError,
        "residual is on meta but input is on cpu",
    ),
    "residual_not_a_tensor": ({"residual": 1.0}, TypeError, "residual must be a tensor or None, got float"),
    "unknown_activation": (
        {"activation": "tanh"},
        ValueError,
        r"activation must be one of \[None, 'relu'\], got 'tanh'",
    ),
    "unknown_backend": ({"backend": "cuda"}, ValueError, "backend must be one of"),
}


# (BatchNorm1d(4, ...) arguments, its input, the exception, a pattern naming the argument)
MODULE_BAD_INPUTS = {
    "one_value_per_channel": ({"momentum": None}, torch.randn(1, 4), ValueError, "more than 1 value per channel"),
    "4d_input": ({}, torch.randn(8, 4, 2, 2), ValueError, "2D or 3D"),
    # stricter than PyTorch, which accepts the empty batch of another dtype (the next one would fail)
    "empty_float64_batch": (
        {},
        torch.randn(0, 4, dtype=torch.float64),
        TypeError,
        "has dtype torch.float32 but input has torch.float64",
    ),
    "wrong_channels": ({}, torch.randn(8, 5), ValueError, r"has shape \(4,\) but input of shape \(8, 5\) needs \(5,\)"),
    "integer_input": ({}, torch.ones(8, 4, dtype=torch.int64), TypeError, "input must be a float"),
    "double_input_float_module": (
        {},
        torch.randn(8, 4).double(),
        TypeError,
        "running_mean has dtype torch.float32 but input has torch.float64",
    ),
    "negative_momentum": ({"momentum": -0.5}, torch.randn(8, 4), ValueError, r"momentum must be in \[0, 1\]"),
    "negative_eps": ({"eps": -1e-5}, torch.randn(8, 4), ValueError, "eps must be a non-negative number"),
    "no_running_stats_one_value": (
        {"track_running_stats": False},
        torch.randn(1, 4, 1),
        ValueError,
        "more than 1 value per channel",
    ),
}


# (N, C) / (N, C, L) inputs stored in other ways: each gives the numbers of its contiguous copy, bit for bit
LAYOUTS = {
    "transposed": lambda: torch.randn(5, 12).t(),
    "channels_last": lambda: torch.randn(6, 3, 5).permute(0, 2, 1),
    "every_other_row": lambda: torch.randn(24, 5)[::2],
    "channel_slice": lambda: torch.randn(12, 9)[:, 2:7],
    "expanded_batch": lambda: torch.randn(1, 5, 3).expand(6, 5, 3),
    "expanded_length": lambda: torch.randn(6, 5, 1).expand(6, 5, 3),
}


def op_samples():
    """(op name, args) of every batch-norm op: ranks 2 to 5, contiguous and channels-last, affine or not,
    training and eval, dtypes, the fused residual and relu."""
    g = torch.Generator().manual_seed(10)
    f32 = torch.float32
    ops = torch.ops.fusedops
    # (shape, affine, training, input dtype, per-channel dtype, input stored channels-last, residual, relu)
    for shape, affine, training, dtype, pdtype, channels_last, residual, relu in [
        ((6, 5), True, True, f32, f32, False, False, False),
        ((4, 3, 2), False, True, f32, f32, False, False, False),
        ((5, 3), True, False, f32, f32, False, False, False),
        ((4, 3, 5), True, True, torch.float16, f32, True, False, False),
        ((7, 2), True, False, torch.bfloat16, torch.bfloat16, False, False, False),
        ((3, 4, 2), True, False, torch.float64, torch.float64, True, False, False),
        ((2, 3, 4, 5), True, True, f32, f32, False, True, True),
        ((2, 3, 4, 5), True, True, f32, f32, True, True, True),
        ((2, 4, 3, 2), False, False, torch.bfloat16, f32, True, False, True),
        ((2, 3, 2, 3, 2), True, True, f32, f32, False, True, False),
        ((2, 3, 2, 3, 2), True, True, torch.float64, torch.float64, True, False, True),
    ]:
        C = shape[1]
        x, dy = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
        if channels_last:
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        w, b = [torch.randn(C, generator=g).to(pdtype) for _ in range(2)] if affine else (None, None)
        rm, rv = (
            (None, None)
            if training
            else (torch.randn(C, generator=g).to(pdtype), (torch.rand(C, generator=g) + 0.5).to(pdtype))
        )
        r = torch.randn(shape, generator=g).to(dtype) if residual else None
        forward_args = (x, w, b, rm, rv, training, False, 1e-5, r, int(relu))
        yield "batch_norm_forward", forward_args
        out, mean, invstd, var = ops.batch_norm_forward(*forward_args)
        yield "batch_norm_backward", (dy, x, mean, invstd, w, training, True, out if relu else None, residual)
        if training:
            stats = ops.batch_norm_stats(x)
            yield "batch_norm_stats", (x,)
            yield "batch_norm_backward_reduce", (dy, x, stats[0])
            sums = ops.batch_norm_backward_reduce(dy, x, stats[0])
            count = torch.tensor([x.numel() // C], dtype=torch.float64)
            yield "batch_norm_backward_elemt", (dy, x, mean, invstd, w, *sums, count, True)
            yield (
                "batch_norm_update_stats",
                (
                    torch.zeros(C, dtype=pdtype),
                    torch.ones(C, dtype=pdtype),
                    torch.zeros((), dtype=torch.int64),
                    mean,
                    var,
                    None,
                ),
            )
