"""Packaging: importing fusedops compiles and imports nothing heavy, and a source checkout without the built
extension builds it on first use."""

import os
import subprocess
import sys

from conftest import ROOT


def test_import_is_light():
    code = "import sys, fusedops; print('triton' in sys.modules, 'fusedops._C' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_lazy_build_without_avx2(tmp_path):
    """A source checkout without the installed extension builds it on first use (here without AVX2)."""
    code = (
        "import sys; sys.modules['fusedops._C'] = None\n"  # as if `pip install` never built it
        "import torch, torch.nn.functional as F, fusedops\n"
        "x, t = torch.randn(9, 70, requires_grad=True), torch.randint(0, 70, (9,))\n"
        "fusedops.cross_entropy(x, t, label_smoothing=0.1, backend='cpp').backward()\n"
        "y = x.detach().requires_grad_(); F.cross_entropy(y, t, label_smoothing=0.1).backward()\n"
        "torch.testing.assert_close(x.grad, y.grad); print('same gradient')\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), FUSEDOPS_NO_AVX2="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "same gradient"
    assert out.stderr.count("fusedops: compiling the C++ CPU kernels") == 1
    build_rules = (tmp_path / "fusedops_cpu" / "build.ninja").read_text()
    assert "-DCPU_CAPABILITY=DEFAULT" in build_rules and "-mavx2" not in build_rules
