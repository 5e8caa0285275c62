"""What the Triton modules share. It imports triton, so only the *_triton modules import it."""

import torch
import triton.language as tl

from ._math import acc_dtype


def tl_acc_dtype(dtype: torch.dtype):
    """The Triton dtype the kernels compute in for tensors of `dtype`: acc_dtype's (fp64 for fp64, else fp32)."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32
