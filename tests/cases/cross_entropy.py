"""The cross-entropy's test tables, declared once: bad inputs, targets out of range, strided layouts,
and the samples of its registered ops (opcheck). The contract tests (test_bad_input.py, test_ops.py)
read them, and the oracle of the options PyTorch lacks (z-loss, soft-capping, the logsumexp output)."""

import torch
import torch.nn.functional as F

import fusedops

NAN = float("nan")


def softcapped(x, softcap):
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def composite(
    x,
    target,
    weight=None,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    """The spec's math in torch ops: F.cross_entropy of y = softcap * tanh(x / softcap), plus z_loss * lse^2
    for each kept row, summed, or averaged over the kept rows' count (unweighted, a per-token term; the row
    count for probability targets); with return_lse, also lse = logsumexp(y) in the loss's dtype."""
    y = softcapped(x, softcap)
    lse = torch.logsumexp(y, 1 if x.dim() > 1 else 0)
    loss = F.cross_entropy(
        y, target, weight, reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    if z_loss:  # a per-token term: the mean's is over the kept rows, unweighted
        kept = torch.ones_like(lse, dtype=torch.bool) if target.is_floating_point() else target != ignore_index
        rows = torch.where(kept, z_loss * lse.square(), 0)
        loss = loss + {"none": rows, "sum": rows.sum(), "mean": rows.sum() / kept.sum()}[reduction]
    return (loss, lse.to(loss.dtype)) if return_lse else loss


OPERATOR = "cross_entropy"
DIFFERENTIABLE = ("input",)  # made to require grad: an in-place gradient is really asked for


def good_arguments():
    """fusedops.cross_entropy's arguments of a good call: logits (4, 5), a target with an ignored row."""
    return {"input": torch.randn(4, 5), "target": torch.tensor([0, 4, -100, 2])}


def call(api="function", *, input, target, **options):
    """fusedops.cross_entropy, or the same through a CrossEntropyLoss built with the options."""
    if api == "function":
        return fusedops.cross_entropy(input, target, **options)
    return fusedops.CrossEntropyLoss(**options)(input, target)


# (what replaces the good arguments, the exception, a pattern naming the argument)
BAD_INPUTS = {
    "target_2d": ({"target": torch.zeros(4, 1, dtype=torch.long)}, ValueError, r"target has shape \(4, 1\)"),
    "target_length": ({"target": torch.zeros(3, dtype=torch.long)}, ValueError, r"target has shape \(3,\)"),
    "target_spatial_shape": (
        {"input": torch.randn(4, 5, 3), "target": torch.zeros(4, 2, dtype=torch.long)},
        ValueError,
        r"target has shape \(4, 2\) but logits of shape \(4, 5, 3\)",
    ),
    "logits_0d": ({"input": torch.tensor(1.0)}, ValueError, "logits must have at least one class"),
    "no_classes": ({"input": torch.randn(4, 0)}, ValueError, "logits must have at least one class"),
    "no_rows_no_classes": (
        {"input": torch.randn(0, 0), "target": torch.zeros(0, dtype=torch.long)},
        ValueError,
        "logits must have at least one class",
    ),
    # a float target is one of class probabilities, shaped like the logits
    "float_target": ({"target": torch.zeros(4)}, ValueError, r"target has shape \(4,\) but logits of shape \(4, 5\)"),
    "probability_target_wrong_shape": (
        {"target": torch.full((4, 4), 0.25)},
        ValueError,
        r"target has shape \(4, 4\) but logits of shape \(4, 5\)",
    ),
    "probability_target_wrong_dtype": (
        {"target": torch.full((4, 5), 0.2, dtype=torch.float64)},
        TypeError,
        "probability target must have the logits' dtype torch.float32, got torch.float64",
    ),
    "probability_target_with_ignore_index": (
        {"target": torch.full((4, 5), 0.2), "ignore_index": 3},
        ValueError,
        "ignore_index=3 is not supported with class-probability targets",
    ),
    "bool_target": ({"target": torch.zeros(4, dtype=torch.bool)}, TypeError, "target must be class indices"),
    "int16_target": ({"target": torch.zeros(4, dtype=torch.int16)}, TypeError, "target must be class indices"),
    "complex_target": (
        {"target": torch.zeros(4, 5, dtype=torch.complex64)},
        TypeError,
        "target must be class indices .* got torch.complex64",
    ),
    "target_not_a_tensor": ({"target": [0, 4, 1, 2]}, TypeError, "target must be a tensor"),
    "weight_wrong_size": (
        {"weight": torch.ones(4)},
        ValueError,
        r"weight has shape \(4,\) but logits of shape \(4, 5\) needs \(5,\)",
    ),
    "weight_2d": (
        {"weight": torch.ones(1, 5)},
        ValueError,
        r"weight has shape \(1, 5\) but logits of shape \(4, 5\) needs \(5,\)",
    ),
    "weight_wrong_dtype": (
        {"weight": torch.ones(5, dtype=torch.float64)},
        TypeError,
        "weight has dtype torch.float64 but logits has torch.float32",
    ),
    "weight_on_another_device": (
        {"weight": torch.ones(5, device="meta")},
        ValueError,
        "weight is on meta but logits is on cpu",
    ),
    "weight_not_a_tensor": ({"weight": [1.0] * 5}, TypeError, "weight must be a tensor or None"),
    # as in PyTorch: the loss is not differentiable with respect to the class weights (no silently dropped gradient)
    "weight_requires_grad": (
        {"weight": torch.ones(5, requires_grad=True)},
        RuntimeError,
        "not differentiable with respect to weight, which cannot have requires_grad=True",
    ),
    "softcap_zero": ({"softcap": 0.0}, ValueError, "softcap must be a finite number > 0"),
    "softcap_negative": ({"softcap": -30.0}, ValueError, "softcap must be a finite number > 0"),
    "softcap_nan": ({"softcap": NAN}, ValueError, "softcap must be a finite number > 0.*got nan"),
    "softcap_inf": ({"softcap": float("inf")}, ValueError, "softcap must be a finite number > 0.*got inf"),
    "softcap_string": ({"softcap": "30"}, TypeError, "softcap must be a float"),
    "softcap_tensor": ({"softcap": torch.tensor(30.0)}, TypeError, "softcap must be a float"),
    "z_loss_negative": ({"z_loss": -1e-4}, ValueError, "z_loss must be a finite number >= 0"),
    "z_loss_nan": ({"z_loss": NAN}, ValueError, "z_loss must be a finite number >= 0.*got nan"),
    "z_loss_inf": ({"z_loss": float("inf")}, ValueError, "z_loss must be a finite number >= 0.*got inf"),
    "z_loss_none": ({"z_loss": None}, TypeError, "z_loss must be a float"),
    "return_lse_int": ({"return_lse": 1}, TypeError, "return_lse must be a bool, got 1"),
    "return_lse_string": ({"return_lse": "yes"}, TypeError, "return_lse must be a bool"),
    "integer_logits": (
        {"input": torch.ones(4, 5, dtype=torch.int64)},
        TypeError,
        "logits must be a floating-point tensor, got torch.int64",
    ),
    "bool_logits": ({"input": torch.ones(4, 5, dtype=torch.bool)}, TypeError, "logits must be a floating-point"),
    "complex_logits": ({"input": torch.ones(4, 5, dtype=torch.complex64)}, TypeError, "logits must be a floating"),
    "logits_not_a_tensor": ({"input": [[0.0] * 5] * 4}, TypeError, "logits must be a floating-point tensor"),
    "target_on_another_device": (
        {"target": torch.zeros(4, dtype=torch.long, device="meta")},
        ValueError,
        "target is on meta but logits is on cpu",
    ),
    "unknown_reduction": ({"reduction": "avg"}, ValueError, "reduction must be one of .*, got 'avg'"),
    "reduction_none_object": ({"reduction": None}, ValueError, "reduction must be one of .*, got None"),
    "label_smoothing_above_1": ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\]"),
    "label_smoothing_negative": ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must be in \[0, 1\]"),
    "label_smoothing_nan": ({"label_smoothing": NAN}, ValueError, r"label_smoothing must be in \[0, 1\], got nan"),
    "label_smoothing_string": ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a float"),
    "ignore_index_float": ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int, got 1.5"),
    "unknown_backend": ({"backend": "cuda"}, ValueError, "backend must be one of"),
    "in_place_3d": (
        {"input": torch.randn(4, 5, 3), "target": torch.zeros(4, 3, dtype=torch.long), "inplace_backward": True},
        ValueError,
        "inplace_backward=True needs 1-D or 2-D logits",
    ),
    "in_place_transposed": (
        {"input": torch.randn(5, 4).t(), "inplace_backward": True},
        ValueError,
        "inplace_backward=True needs logits with unit stride along the classes",
    ),
    "in_place_overlapping_rows": (
        {"input": torch.randn(1, 5).expand(4, 5), "inplace_backward": True},
        ValueError,
        "inplace_backward=True needs logits with unit stride .* rows that do not overlap",
    ),
}


# (N, V) logits stored in other ways: each gives the numbers of its contiguous copy, bit for bit
LAYOUTS = {
    "transposed": lambda: torch.randn(13, 6).t(),
    "column_slice": lambda: torch.randn(6, 20)[:, 3:16],
    "every_other_row": lambda: torch.randn(12, 13)[::2],
    "expanded_rows": lambda: torch.randn(1, 13).expand(6, 13),
    "expanded_columns": lambda: torch.randn(6, 1).expand(6, 13),
    "spatial_channels_last": lambda: torch.randn(2, 3, 13).permute(0, 2, 1),  # (N, V, d) with V innermost
    "one_row_strided": lambda: torch.randn(26)[::2],
}

# targets out of range: (what replaces the good target / options, a pattern naming the argument). The
# C++ kernel raises IndexError before it writes anything; the Triton kernel asserts on the device (no
# host read), and where asserts are compiled out (the interpreter) gives that row a NaN loss and gradient.
TARGETS_OUT_OF_RANGE = {
    "target_equal_to_classes": (
        {"target": torch.tensor([0, 5, 1, -100])},
        r"target\[1\] = 5 is out of range for 5 classes \(argument 'target'\)",
    ),
    "target_negative": ({"target": torch.tensor([0, 1, -1, 2])}, r"target\[2\] = -1 is out of range"),
    "target_below_ignore_index": (
        {"target": torch.tensor([-101, 1, 0, 2]).int()},
        r"target\[0\] = -101 is out of range",
    ),
    "target_default_ignore_index_not_ignored": (
        {"target": torch.tensor([0, 1, 2, -100]), "ignore_index": 3},
        r"target\[3\] = -100 is out of range",
    ),
    "target_out_of_range_in_place": (
        {"target": torch.tensor([0, 7, 1, 2]), "inplace_backward": True},
        r"target\[1\] = 7 is out of range",
    ),
    "target_uint8_out_of_range": (
        {"target": torch.tensor([0, 1, 255, 2], dtype=torch.uint8)},
        r"target\[2\] = 255 is out of range",
    ),
    "target_out_of_range_weighted": (
        {"target": torch.tensor([0, 1, 2, 5]), "weight": torch.ones(5)},
        r"target\[3\] = 5 is out of range",
    ),
    "target_out_of_range_spatial": (
        {"input": torch.randn(2, 5, 3), "target": torch.tensor([[0, 1, 2], [3, 9, 4]])},
        r"target\[4\] = 9 is out of range",
    ),
}


def op_samples():
    """(op name, args) of every cross-entropy op: dtypes, reductions, ignored rows, label smoothing, sizes, class
    weights, probability targets, z-loss, soft-capping, index dtypes."""
    g = torch.Generator().manual_seed(0)
    f32, i64 = torch.float32, torch.int64
    # (N, V, reduction, label smoothing, dtype, target: an index dtype or "probs", weighted, z_loss, softcap)
    for N, V, reduction, smoothing, dtype, kind, weighted, z_loss, softcap in [
        (6, 9, 1, 0.1, f32, i64, False, 0.0, None),
        (1, 1, 0, 0.0, f32, i64, False, 0.0, None),
        (5, 300, 2, 0.0, f32, i64, True, 0.0, None),
        (0, 4, 2, 0.0, f32, i64, False, 0.0, None),
        (7, 70, 0, 0.2, torch.float16, torch.int32, True, 1e-4, None),
        (3, 65, 1, 0.0, torch.bfloat16, i64, False, 0.0, 30.0),
        (4, 33, 1, 0.3, torch.float64, torch.int32, True, 1e-3, 5.0),
        (6, 17, 1, 0.0, f32, torch.uint8, True, 0.0, None),
        (5, 17, 0, 0.1, f32, "probs", True, 1e-2, 3.0),
        (4, 10, 1, 0.0, torch.bfloat16, "probs", False, 0.0, None),
        (0, 6, 2, 0.0, f32, "probs", True, 0.0, None),
    ]:
        logits = torch.randn(N, V, generator=g).to(dtype)
        if kind == "probs":
            target = torch.softmax(torch.randn(N, V, generator=g), 1).to(dtype)
        else:
            target = torch.randint(0, V, (N,), generator=g, dtype=kind)
            target[::2] = -100 if kind != torch.uint8 else 3
        weight = (torch.rand(V, generator=g) + 0.5).to(dtype) if weighted else None
        ignore_index = 3 if kind == torch.uint8 else -100
        args = (target, weight, reduction, ignore_index, smoothing, z_loss, softcap)
        yield "cross_entropy_forward", (logits, *args)
        yield "cross_entropy_forward_inplace", (logits.clone(), *args)
    # backward's scaling: a 0-d factor (1: nothing done), one per row, a row-strided gradient, no element
    for grad, scale in [
        (torch.randn(5, 7, generator=g), torch.tensor(1.0)),
        (torch.randn(5, 7, generator=g).to(torch.bfloat16), torch.tensor(0.25)),
        (torch.randn(4, 9, generator=g, dtype=torch.float64), torch.rand(4, generator=g)),
        (torch.randn(6, 11, generator=g)[:, :7], torch.rand(6, generator=g)),
        (torch.randn(0, 3), torch.tensor(2.0)),
    ]:
        yield "cross_entropy_scale_grad", (grad, scale)
