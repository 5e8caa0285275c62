"""The contract of every registered op, read from the per-operator tables in tests/cases/: opcheck
(schema, fake kernel, autograd registration, torch.compile) on the kernel of each device, and one schema
per kernel step (no twins per backend)."""

import cases
import pytest
import torch

import fusedops

# the operators with registered ops of their own (linear cross-entropy runs cross-entropy's)
OPERATORS = {name: module for name, module in cases.operators().items() if hasattr(module, "op_samples")}


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


def sampled_ops():
    """The ops the operator tables in tests/cases/ give samples of."""
    return {name for operator in OPERATORS.values() for name, _ in operator.op_samples()}


def test_one_schema_per_kernel_step():
    """The registered ops are the operators' kernel steps, each with samples in its operator's table, and no
    schema takes a backend flag."""
    ops = registered_ops()
    assert ops == sampled_ops()
    for name in ops:
        schema = getattr(torch.ops.fusedops, name).default._schema
        assert "triton" not in str(schema) and "backend" not in str(schema)


def test_every_op_has_a_kernel_per_device():
    """A C++ kernel for CPU tensors and a CUDA kernel (the Triton launcher, registered from Python) for each op but
    the device-independent update, which has one for all (CompositeExplicitAutograd)."""
    for name in registered_ops():
        keys = ("CompositeExplicitAutograd",) if name == "batch_norm_update_stats" else ("CPU", "CUDA")
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedops::{name}", key), (name, key)


def test_cuda_kernels_run_with_their_tensors_device_current(monkeypatch):
    """The registered CUDA kernels make the first tensor's device current around the launch (a device guard):
    Triton launches on the current device's stream. Recorded here with torch.cuda.device replaced."""
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *_):
            entered.append("exit")

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", Guard)
    launched = fusedops._ops.on_tensor_device(lambda t, k: (t.device, k))
    assert launched(OnSecondGpu(), 3) == (torch.device("cuda", 1), 3)
    assert entered == [torch.device("cuda", 1), "exit"]
