"""Per-operator test tables, one module per operator, and what the tables share."""

BACKENDS = ("cpp", "triton")  # the kernels: C++ on CPU tensors, Triton (its interpreter without a GPU)


def operators():
    """{operator name: its table module}: every tests/cases/<operator>.py, which the contract tests run."""
    from . import batch_norm, cross_entropy, linear_cross_entropy

    return {module.OPERATOR: module for module in (cross_entropy, linear_cross_entropy, batch_norm)}
