"""The registered ops (torch.ops.fusedops.*): loading their C++ library, registering their fake and
CUDA (Triton) kernels, and picking the kernels a call runs.

Each op has one schema (csrc/fusedops.cpp) and one kernel per device: C++ for CPU tensors, the
Triton launcher for CUDA tensors, which the dispatcher picks by the tensors' device. The C++
library is the one `pip install` built (`fusedops._C`); in a source checkout without it, the first
call builds it with ninja into torch's extension cache. Importing fusedops never compiles anything,
and `triton` is imported only by the `*_triton` modules, right before a launch.

backend="triton" on CPU tensors (under TRITON_INTERPRET=1, which is how the Triton kernels are
tested without a GPU) calls each op's CUDA kernel directly, as the dispatcher would for CUDA tensors.
"""

import os
import sys
import types

import torch

from ._build import CPP_LDFLAGS, cpp_flags, cpp_sources
from .errors import ArgumentValueError

BACKENDS = ("cpp", "triton")
_loaded = False
_registrations = []  # (op name, fake kernel, CUDA kernel), registered once the ops exist
_library = None  # the torch.library.Library holding the CUDA kernels
# every op's CUDA kernel by name, for backend="triton" on CPU tensors
triton_on_cpu = types.SimpleNamespace()


def register(name, fake, cuda):
    """Registers the fake kernel and the CUDA kernel (a Triton launcher) of fusedops::<name>."""
    _registrations.append((name, fake, cuda))
    setattr(triton_on_cpu, name, cuda)
    if _loaded:
        _register(name, fake, cuda)


def _register(name, fake, cuda):
    torch.library.register_fake(f"fusedops::{name}")(fake)
    if cuda is not None:
        _library.impl(name, cuda, "CUDA")


def load() -> bool:
    """Registers the ops as torch.ops.fusedops.*, building the C++ library first if needed."""
    global _loaded, _library
    if not _loaded:
        try:
            import fusedops._C  # noqa: F401  (its static initialisers register the ops)
        except ImportError:
            from torch.utils.cpp_extension import load as build

            print("fusedops: compiling the C++ CPU kernels (first use only)...", file=sys.stderr)
            build(
                name="fusedops_cpu",
                sources=cpp_sources(),
                extra_cflags=cpp_flags(),
                extra_ldflags=CPP_LDFLAGS,
                is_python_module=False,
            )
        _library = torch.library.Library("fusedops", "IMPL")
        for registration in _registrations:
            _register(*registration)
        _loaded = True
    return True


# torch.compile calls load once while tracing and keeps its result: what the decorator
# torch.compiler.assume_constant_result marks, set directly because the decorator would import
# torch._dynamo (and triton with it) when fusedops is imported.
load._dynamo_marked_constant = True


def kernels(backend, tensor):
    """The ops a call on `tensor` runs: torch.ops.fusedops (the dispatcher picks the kernel by device),
    or for backend="triton" on CPU tensors their CUDA kernels, called directly."""
    load()
    if backend == "triton" and tensor.device.type == "cpu":
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "backend='triton' on CPU tensors (Triton's interpreter) runs eagerly only; "
                "torch.compile traces the Triton kernels on CUDA tensors"
            )
        return triton_on_cpu
    return torch.ops.fusedops


def check_backend(backend, tensor, op=None):
    """backend is None, "cpp" (CPU tensors) or "triton" (CUDA tensors; CPU ones under TRITON_INTERPRET=1); op,
    when given, names the function in the messages."""
    if backend is None:
        return
    prefix = "" if op is None else f"{op}: "
    if backend not in BACKENDS:
        raise ArgumentValueError(f"{prefix}backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cpp" and tensor.device.type != "cpu":
        raise ArgumentValueError(f"{prefix}backend='cpp' runs on CPU tensors, got a tensor on {tensor.device}")
    if backend == "triton" and tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ArgumentValueError(
            f"{prefix}backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before triton is first imported)"
        )


def not_differentiable(op, name, what="requires_grad=True"):
    """The error for an input the op is not differentiable with respect to (class weights, running statistics)
    that requires grad or has a forward-mode tangent: raised, never a silently dropped derivative."""
    return ArgumentValueError(
        f"{op}: not differentiable with respect to {name}, which cannot have {what} (as in PyTorch); detach it"
    )


def check_no_grad(op, name, tensor):
    """PyTorch's rule: such an input must not require grad while grad mode is on."""
    if tensor is not None and tensor.requires_grad and torch.is_grad_enabled():
        raise not_differentiable(op, name)


def no_tangent(op, names, tangents):
    """For a jvp rule: raises where such an input has a tangent."""
    for name, tangent in zip(names, tangents):
        if tangent is not None:
            raise not_differentiable(op, name, "a forward-mode tangent")


def batched_first(t, dim, size):
    """For a vmap rule: the tensor with its mapped dimension first (expanded when it has none)."""
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def acc_dtype(dtype):
    """The dtype the kernels compute in: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fast_apply(function):
    """`function.apply` without the per-call cost of torch.autograd.Function.apply, which binds default
    arguments with inspect.signature on every call when setup_context is defined (tens of us at the
    notebooks' sizes). Every argument must be passed positionally. Under torch.func transforms the full
    apply runs; while torch.compile traces, that of a subclass without the custom jvp, which Dynamo
    refuses to trace (forward-mode AD is not traced anyway)."""
    base_apply = super(torch.autograd.Function, function).apply  # the C++ apply of _FunctionBase
    full_apply = function.apply
    traced = type(function.__name__, (function,), {"jvp": torch.autograd.Function.jvp})

    def apply(*args):
        if torch.compiler.is_compiling():
            return traced.apply(*args)
        if torch._C._are_functorch_transforms_active():
            return full_apply(*args)
        return base_apply(*args)

    return apply
