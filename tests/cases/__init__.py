"""Per-operator test tables, one module per operator, and what the tables share."""

BACKENDS = ("cpp", "triton")  # the kernels: C++ on CPU tensors, Triton (its interpreter without a GPU)
