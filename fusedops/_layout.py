"""The memory-layout rule of batch norm's kernels: which (N, C, *) tensors they read as channels-last, and
the layout of what they write."""

import torch


def is_channels_last(t):
    """Whether the kernels read (N, C, *) `t` as channels-last (a (rows, C) matrix with C contiguous):
    stored so and not also contiguous. Every other tensor they read as contiguous (N, C, L) runs."""
    return t.dim() > 2 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()


def empty_like_input(t, dtype=None):
    """An empty tensor shaped like `t` in the layout the kernels write for input `t`: channels-last
    when `t` is, else contiguous (as torch's batch norm, which keeps the input's memory format)."""
    if t.numel() == 0:  # no element says which layout: its strides' (torch.empty_like's preserve_format)
        return torch.empty_like(t, dtype=dtype)
    if is_channels_last(t):
        return torch.empty_like(t.movedim(1, -1), dtype=dtype, memory_format=torch.contiguous_format).movedim(-1, 1)
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)
