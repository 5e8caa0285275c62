"""fusedops: fused cross-entropy and batch norm for PyTorch, C++ kernels on CPU, Triton on CUDA."""
from .batch_norm import BatchNorm1d, batch_norm
from .cross_entropy import CrossEntropyLoss, cross_entropy
from .sync_batch_norm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["cross_entropy", "CrossEntropyLoss", "batch_norm", "BatchNorm1d", "SyncBatchNorm", "convert_sync_batchnorm"]
