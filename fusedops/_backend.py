"""Which kernel runs a call: the C++ extension on CPU tensors, Triton on CUDA tensors.

The C++ extension is the one `pip install` built (`fusedops._C`); in a source checkout without
it, the first CPU call builds it with ninja into torch's extension cache. Importing fusedops never
compiles anything, and `triton` is imported only by the `*_triton` modules, right before a launch.
"""
import glob
import os
import sys

import torch

BACKENDS = ("cpp", "triton", "reference")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_cpp_loaded = False
_cpp_fakes = []  # (op name, fake kernel) of the C++ ops, registered once the ops exist


def cpp_sources():
    return sorted(glob.glob(os.path.join(_ROOT, "csrc", "*.cpp")))


def cpp_flags():
    """-O3 and OpenMP always; AVX2 vector code when the CPU has it, unless FUSEDOPS_NO_AVX2=1."""
    flags = ["-O3", "-fopenmp"]
    avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if avx2 and os.environ.get("FUSEDOPS_NO_AVX2", "0") != "1":
        return flags + ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags + ["-DCPU_CAPABILITY=DEFAULT"]


CPP_LDFLAGS = ["-fopenmp"]


def register_cpp_fake(qualname, fake):
    """torch.library.register_fake for a C++ op, deferred until the extension is loaded."""
    _cpp_fakes.append((qualname, fake))
    if _cpp_loaded:
        torch.library.register_fake(qualname)(fake)


def load_cpp() -> bool:
    """Registers the C++ ops as torch.ops.fusedops.*, building them first if needed."""
    global _cpp_loaded
    if not _cpp_loaded:
        try:
            import fusedops._C  # noqa: F401  (its static initialisers register the ops)
        except ImportError:
            from torch.utils.cpp_extension import load

            print("fusedops: compiling the C++ CPU kernels (first use only)...", file=sys.stderr)
            load(name="fusedops_cpu", sources=cpp_sources(), extra_cflags=cpp_flags(),
                 extra_ldflags=CPP_LDFLAGS, is_python_module=False)
        for qualname, fake in _cpp_fakes:
            torch.library.register_fake(qualname)(fake)
        _cpp_loaded = True
    return True


# torch.compile calls load_cpp once while tracing and keeps its result: what the decorator
# torch.compiler.assume_constant_result marks, set directly because the decorator would import
# torch._dynamo (and triton with it) when fusedops is imported.
load_cpp._dynamo_marked_constant = True


def acc_dtype(dtype):
    """The dtype the kernels compute in: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pick_backend(backend, tensor):
    """The backend for a call on `tensor`: `backend` if given, else Triton on CUDA, C++ on CPU."""
    if backend is None:
        backend = "triton" if tensor.is_cuda else "cpp"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "cpp" and tensor.device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors, got a tensor on {tensor.device}")
    if backend != "reference":
        load_cpp()  # the C++ ops, and the autograd of both backends
    if backend == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                         "(set before triton is first imported)")
    return backend
