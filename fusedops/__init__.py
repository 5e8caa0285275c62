"""fusedops: fused cross-entropy and batch norm for PyTorch, C++ kernels on CPU, Triton on CUDA."""
from .cross_entropy import CrossEntropyLoss, cross_entropy

__all__ = ["cross_entropy", "CrossEntropyLoss"]
