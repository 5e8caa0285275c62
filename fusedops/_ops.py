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

import functools
import sys
import types

import torch

from ._build import CPP_LDFLAGS, cpp_flags, cpp_sources

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
        _library.impl(name, on_tensor_device(cuda), "CUDA")


def on_tensor_device(launcher):
    """`launcher` run with its first argument's CUDA device current: Triton launches on the current device's
    stream, so a tensor on cuda:1 called while cuda:0 is current would otherwise run on the wrong device."""

    @functools.wraps(launcher)
    def launch(*args):
        with torch.cuda.device(args[0].device):
            return launcher(*args)

    return launch


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
