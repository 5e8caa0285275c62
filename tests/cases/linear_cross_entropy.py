"""linear_cross_entropy's test tables: bad inputs (each raised before anything is written, a fusedops.errors
class, the message starting "linear_cross_entropy: " and naming the argument) and targets out of range.
The good call: input (4, 3), weight (5, 3), target [0, 4, -100, 2], bias (5,), all float32 on the CPU."""

import torch

import fusedops
from fusedops import errors

VE, TE, IE = errors.ArgumentValueError, errors.ArgumentTypeError, errors.ArgumentIndexError


OPERATOR = "linear_cross_entropy"
DIFFERENTIABLE = ("input", "weight", "bias")


def call(api="function", *, input, weight, target, bias, **options):
    """fusedops.linear_cross_entropy, or the same through a LinearCrossEntropy holding weight and bias."""
    if api == "function":
        return fusedops.linear_cross_entropy(input, weight, target, bias, **options)
    module = fusedops.LinearCrossEntropy(weight.shape[-1], weight.shape[0], bias=bias is not None, **options)
    module.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    module.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
    return module(input, target)


def good_arguments():
    g = torch.Generator().manual_seed(0)
    return {
        "input": torch.randn(4, 3, generator=g),
        "weight": torch.randn(5, 3, generator=g),
        "target": torch.tensor([0, 4, -100, 2]),
        "bias": torch.randn(5, generator=g),
    }


# (what replaces the good arguments / options, the exception, a pattern the message must match)
BAD_INPUTS = {
    # the linear layer
    "hidden_size_mismatch": ({"input": torch.randn(4, 2)}, VE, r"input|weight"),
    "hidden_size_mismatch_3d": (
        {"input": torch.randn(2, 2, 4), "target": torch.zeros(2, 2, dtype=torch.long)},
        VE,
        r"input|weight",
    ),
    "weight_1d": ({"weight": torch.randn(5)}, VE, r"weight"),
    "weight_3d": ({"weight": torch.randn(1, 5, 3)}, VE, r"weight"),
    "weight_float64": ({"weight": torch.randn(5, 3, dtype=torch.float64)}, TE, r"weight.*float64|float64.*weight"),
    "weight_bfloat16": ({"weight": torch.randn(5, 3).bfloat16()}, TE, r"weight"),
    "weight_on_meta": ({"weight": torch.randn(5, 3, device="meta")}, VE, r"weight.*meta|meta.*weight"),
    "weight_not_a_tensor": ({"weight": [[0.0] * 3] * 5}, TE, r"weight"),
    "bias_wrong_length": ({"bias": torch.randn(4)}, VE, r"bias"),
    "bias_2d": ({"bias": torch.randn(1, 5)}, VE, r"bias"),
    "bias_float64": ({"bias": torch.randn(5, dtype=torch.float64)}, TE, r"bias"),
    "bias_on_meta": ({"bias": torch.randn(5, device="meta")}, VE, r"bias.*meta|meta.*bias"),
    "integer_input": (
        {"input": torch.ones(4, 3, dtype=torch.long), "weight": torch.ones(5, 3, dtype=torch.long), "bias": None},
        TE,
        r"input",
    ),
    # the target
    "target_length": ({"target": torch.zeros(3, dtype=torch.long)}, VE, r"target"),
    "target_2d_for_2d_input": ({"target": torch.zeros(4, 1, dtype=torch.long)}, VE, r"target"),
    "target_shape_3d_input": (
        {"input": torch.randn(2, 2, 3), "target": torch.zeros(4, dtype=torch.long)},
        VE,
        r"target",
    ),
    "probability_target_wrong_shape": ({"target": torch.full((4, 4), 0.25)}, VE, r"target"),
    "probability_target_wrong_dtype": ({"target": torch.full((4, 5), 0.2, dtype=torch.float64)}, TE, r"target"),
    "probability_target_with_ignore_index": (
        {"target": torch.full((4, 5), 0.2), "ignore_index": 3},
        VE,
        r"ignore_index",
    ),
    "bool_target": ({"target": torch.zeros(4, dtype=torch.bool)}, TE, r"target"),
    "target_on_meta": ({"target": torch.zeros(4, dtype=torch.long, device="meta")}, VE, r"target"),
    # the class weights
    "class_weight_wrong_length": ({"class_weight": torch.ones(4)}, VE, r"class_weight"),
    "class_weight_float64": ({"class_weight": torch.ones(5, dtype=torch.float64)}, TE, r"class_weight"),
    "class_weight_on_meta": ({"class_weight": torch.ones(5, device="meta")}, VE, r"class_weight"),
    "class_weight_requires_grad": (
        {"class_weight": torch.ones(5, requires_grad=True)},
        VE,
        r"not differentiable with respect to class_weight",
    ),
    # the loss's options (cross_entropy's checks)
    "unknown_reduction": ({"reduction": "avg"}, VE, r"reduction"),
    "label_smoothing_above_1": ({"label_smoothing": 1.5}, VE, r"label_smoothing"),
    "z_loss_negative": ({"z_loss": -1e-4}, VE, r"z_loss"),
    "softcap_zero": ({"softcap": 0.0}, VE, r"softcap"),
    "ignore_index_float": ({"ignore_index": 1.5}, TE, r"ignore_index"),
    "return_lse_int": ({"return_lse": 1}, TE, r"return_lse"),
    "unknown_backend": ({"backend": "cuda"}, VE, r"backend"),
    # the chunks
    "chunk_bytes_zero": ({"chunk_bytes": 0}, VE, r"chunk_bytes"),
    "chunk_bytes_negative": ({"chunk_bytes": -1}, VE, r"chunk_bytes"),
    "chunk_bytes_float": ({"chunk_bytes": 1.5}, TE, r"chunk_bytes"),
    "chunk_bytes_string": ({"chunk_bytes": "128MB"}, TE, r"chunk_bytes"),
    "chunk_bytes_none": ({"chunk_bytes": None}, TE, r"chunk_bytes"),
    # the vocabulary size of one process is the weight's rows
    "vocab_size_mismatch": ({"vocab_size": 6}, VE, r"vocab_size"),
}

# targets out of range (what replaces the good target / options, a pattern naming the argument): IndexError
# (fusedops.errors.ArgumentIndexError), as cross_entropy's C++ kernel raises, before anything is written
TARGETS_OUT_OF_RANGE = {
    "target_equal_to_classes": ({"target": torch.tensor([0, 5, 1, -100])}, r"target.*5.*out of range"),
    "target_negative": ({"target": torch.tensor([0, 1, -1, 2])}, r"target.*-1.*out of range"),
    "target_default_ignore_index_not_ignored": (
        {"target": torch.tensor([0, 1, 2, -100]), "ignore_index": 3},
        r"target.*-100.*out of range",
    ),
    "target_uint8_out_of_range": (
        {"target": torch.tensor([0, 1, 255, 2], dtype=torch.uint8)},
        r"target.*255.*out of range",
    ),
    "target_out_of_range_3d": (
        {"input": torch.randn(2, 2, 3), "target": torch.tensor([[0, 1], [9, 4]])},
        r"target.*9.*out of range",
    ),
}
