"""fusedops: fused cross-entropy and batch norm for PyTorch, C++ kernels on CPU, Triton on CUDA."""

from . import errors
from .batch_norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormFunction,
    BatchNormOptions,
    batch_norm,
    batch_norm_backward,
    update_running_stats,
)
from .convert import convert_batchnorm
from .cross_entropy import CrossEntropyFunction, CrossEntropyLoss, CrossEntropyOptions, cross_entropy
from .linear_cross_entropy import (
    LinearCrossEntropy,
    LinearCrossEntropyFunction,
    LinearLossOptions,
    linear_cross_entropy,
)
from .sync_batch_norm import SyncBatchNorm, SyncBatchNormFunction, SyncBatchNormOptions, convert_sync_batchnorm

__all__ = [
    "cross_entropy",
    "CrossEntropyLoss",
    "CrossEntropyFunction",
    "CrossEntropyOptions",
    "linear_cross_entropy",
    "LinearCrossEntropy",
    "LinearCrossEntropyFunction",
    "LinearLossOptions",
    "batch_norm",
    "batch_norm_backward",
    "update_running_stats",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormFunction",
    "BatchNormOptions",
    "SyncBatchNorm",
    "SyncBatchNormFunction",
    "SyncBatchNormOptions",
    "convert_sync_batchnorm",
    "convert_batchnorm",
    "errors",
]
