"""How the C++ library is built: its sources and flags, shared by setup.py and the first-use build
(fusedops/_ops.py). Imports nothing of fusedops, so that setup.py can load it on its own."""

import glob
import os

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpp_sources():
    return sorted(glob.glob(os.path.join(_ROOT, "csrc", "*.cpp")))


def cpp_flags():
    """-O3 and OpenMP always; the widest vector code the CPU has, as ATen's own kernels pick it: AVX-512 (16 fp32
    lanes; FUSEDOPS_NO_AVX512=1 stops at AVX2), AVX2 (8 lanes; FUSEDOPS_NO_AVX2=1 builds neither)."""
    flags = ["-O3", "-fopenmp"]
    capability = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("FUSEDOPS_NO_AVX2", "0") == "1" or capability not in ("AVX2", "AVX512"):
        return flags + ["-DCPU_CAPABILITY=DEFAULT"]
    if capability == "AVX512" and os.environ.get("FUSEDOPS_NO_AVX512", "0") != "1":
        return flags + [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-mf16c",
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
        ]
    return flags + ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


CPP_LDFLAGS = ["-fopenmp"]
