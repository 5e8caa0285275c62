"""The cross-entropy's test tables, declared once: bad inputs, targets out of range, strided layouts,
and the samples of its registered ops (opcheck). The contract tests (test_bad_input.py, test_ops.py)
read them."""
import torch

NAN = float("nan")

# (what replaces the good logits (4, 5) / target / options, the exception, a pattern naming the argument)
BAD_INPUTS = {
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
    "target_equal_to_classes": ({"target": torch.tensor([0, 5, 1, -100])},
                                r"target\[1\] = 5 is out of range for 5 classes \(argument 'target'\)"),
    "target_negative": ({"target": torch.tensor([0, 1, -1, 2])}, r"target\[2\] = -1 is out of range"),
    "target_below_ignore_index": ({"target": torch.tensor([-101, 1, 0, 2]).int()},
                                  r"target\[0\] = -101 is out of range"),
    "target_default_ignore_index_not_ignored": ({"target": torch.tensor([0, 1, 2, -100]), "ignore_index": 3},
                                                r"target\[3\] = -100 is out of range"),
    "target_out_of_range_in_place": ({"target": torch.tensor([0, 7, 1, 2]), "inplace_backward": True},
                                     r"target\[1\] = 7 is out of range"),
    "target_out_of_range_spatial": ({"logits": torch.randn(2, 5, 3), "target": torch.tensor([[0, 1, 2], [3, 9, 4]])},
                                    r"target\[4\] = 9 is out of range"),
}


def op_samples():
    """(op name, args) of every cross-entropy op: dtypes, reductions, ignored rows, label smoothing, sizes."""
    g = torch.Generator().manual_seed(0)
    f32, i64 = torch.float32, torch.int64
    for N, V, reduction, smoothing, dtype, index_dtype in [
            (6, 9, 1, 0.1, f32, i64), (1, 1, 0, 0.0, f32, i64), (5, 300, 2, 0.0, f32, i64), (0, 4, 2, 0.0, f32, i64),
            (7, 70, 0, 0.2, torch.float16, torch.int32), (3, 65, 1, 0.0, torch.bfloat16, i64),
            (4, 33, 1, 0.3, torch.float64, torch.int32)]:
        target = torch.randint(0, V, (N,), generator=g, dtype=index_dtype)
        target[::2] = -100
        logits = torch.randn(N, V, generator=g).to(dtype)
        args = (target, reduction, -100, smoothing)
        yield "cross_entropy_forward", (logits, *args)
        yield "cross_entropy_forward_inplace", (logits.clone(), *args)
