"""How the C++ library is built: its sources and flags, shared by setup.py and the first-use build
(fusedops/_ops.py). Imports nothing of fusedops, so that setup.py can load it on its own."""
import glob
import os

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
