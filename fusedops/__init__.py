"""fusedops: fused cross-entropy and batch norm for PyTorch, C++ kernels on CPU, Triton on CUDA."""

from . import errors
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormFunction, batch_norm
from .convert import convert_batchnorm
from .cross_entropy import CrossEntropyFunction, CrossEntropyLoss, cross_entropy
from .linear_cross_entropy import LinearCrossEntropy, LinearCrossEntropyFunction, linear_cross_entropy
from .sync_batch_norm import SyncBatchNorm, SyncBatchNormFunction, convert_sync_batchnorm

__all__ = [
    "cross_entropy",
    "CrossEntropyLoss",
    "CrossEntropyFunction",
    "linear_cross_entropy",
    "LinearCrossEntropy",
    "LinearCrossEntropyFunction",
    "batch_norm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormFunction",
    "SyncBatchNorm",
    "SyncBatchNormFunction",
    "convert_sync_batchnorm",
    "convert_batchnorm",
    "errors",
]
