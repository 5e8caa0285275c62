"""Builds csrc/*.cpp into fusedops._C. Install with `pip install --no-build-isolation -e .`;
FUSEDOPS_NO_AVX2=1 builds without AVX2 vector code (see fusedops/_build.py)."""

import glob
import importlib.util
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# fusedops/_build.py holds the flags the lazy build uses too; load it without importing fusedops
_spec = importlib.util.spec_from_file_location("_build", os.path.join("fusedops", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

setup(
    name="fusedops",
    version="0.1.0",
    description="Fused cross-entropy and batch norm for PyTorch: C++ on CPU, Triton on CUDA",
    packages=find_packages(include=["fusedops", "fusedops.*"]),
    ext_modules=[
        CppExtension(
            "fusedops._C",
            [os.path.relpath(p) for p in _build.cpp_sources()],
            depends=[os.path.relpath(p) for p in glob.glob(os.path.join("csrc", "*.h"))],
            extra_compile_args=_build.cpp_flags(),
            extra_link_args=_build.CPP_LDFLAGS,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "tqdm", "matplotlib"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis"]},
)
