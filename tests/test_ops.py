"""The contract of every registered op, read from the per-operator tables in tests/cases/: opcheck
(schema, fake kernel, autograd registration, torch.compile) on the kernel of each device, and one schema
per kernel step (no twins per backend)."""

import pytest
import torch
from cases import batch_norm, cross_entropy

import fusedops

OPERATORS = {"cross_entropy": cross_entropy, "batch_norm": batch_norm}


@pytest.mark.parametrize("operator", list(OPERATORS))
def test_opcheck(operator):
    fusedops._ops.load()
    checked = set()
    for name, args in OPERATORS[operator].op_samples():
        torch.library.opcheck(getattr(torch.ops.fusedops, name), args)
        checked.add(name)
    assert checked == {op for op in registered_ops() if op.startswith(operator)}  # every op of the operator


def registered_ops():
    fusedops._ops.load()
    return {
        schema.name.split("::")[1] for schema in torch._C._jit_get_all_schemas() if schema.name.startswith("fusedops::")
    }


def test_one_schema_per_kernel_step():
    ops = registered_ops()
    assert ops == {
        "cross_entropy_forward",
        "cross_entropy_forward_inplace",
        "cross_entropy_scale_grad",
        "batch_norm_forward",
        "batch_norm_backward",
        "batch_norm_stats",
        "batch_norm_backward_reduce",
        "batch_norm_backward_elemt",
        "batch_norm_update_stats",
    }
    for name in ops:  # no backend flag in a schema
        schema = getattr(torch.ops.fusedops, name).default._schema
        assert "triton" not in str(schema) and "backend" not in str(schema)


def test_cuda_kernels_are_the_triton_launchers():
    """Each op but the device-independent update has a CUDA kernel, registered from Python."""
    fusedops._ops.load()
    for name in registered_ops() - {"batch_norm_update_stats"}:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedops::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedops::{name}", "CPU"), name
        assert callable(getattr(fusedops._ops.triton_on_cpu, name))
