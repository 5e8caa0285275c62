"""What the benchmark runs, declared once per table: for each operator its shapes (a full run's,
--quick's, and the per-call ones, where the table also gives the cost over eager in µs), its inputs
and its providers; for the makemore training step its variants. bench/harness.py runs them; a new
operator is one more entry in OPERATORS."""
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fusedops
from fusedops import reference
from fusedops.makemore import model as makemore

EAGER, COMPILE, REFERENCE, FLOOR = "eager", "torch.compile", "reference", "copy floor"
TORCH_LAYERS = "torch layers"
DTYPES = (torch.float32, torch.bfloat16)  # a full run's; --quick runs float32 only


@dataclass(frozen=True)
class Table:
    """One results file, <out>/<file>.{md,csv,png}: its title and the provider its ratios are against."""
    file: str
    title: str
    baseline: str


@dataclass(frozen=True)
class Operator(Table):
    shapes: tuple  # a full run's
    quick_shapes: tuple  # --quick's
    per_call_shapes: tuple  # where fixed costs dominate: the table also gives median - baseline's in µs
    inputs: Callable  # (shape, dtype, device) -> (x, other arguments, gradient of the output)
    providers: Callable  # (shape, device) -> {name: (function of (x, *other arguments), its parameters)}


def fusedops_backends(device):
    """The fused kernels native to the device (Triton's interpreter on CPU is no benchmark)."""
    return ("triton",) if device.type == "cuda" else ("cpp",)


def cross_entropy_inputs(shape, dtype, device):
    """Logits (N, V), target (N,); the loss is a scalar: its gradient is 1 (None)."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(shape, generator=g, device=device).to(dtype)
    return logits, (torch.randint(0, shape[1], shape[:1], generator=g, device=device),), None


def cross_entropy_providers(shape, device):
    """loss(logits, target) of every provider on the device. torch.compile's entry holds the eager
    code; the harness compiles it."""
    providers = {EAGER: F.cross_entropy, COMPILE: F.cross_entropy, REFERENCE: reference.cross_entropy}
    for b in fusedops_backends(device):
        providers[f"fusedops {b}"] = partial(fusedops.cross_entropy, backend=b)
        # writes the gradient over the logits: no N x V buffer
        providers[f"fusedops {b} in-place"] = partial(fusedops.cross_entropy, backend=b, inplace_backward=True)
    if device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
            providers["liger"] = LigerCrossEntropyLoss()  # also writes the gradient over the logits
        except ImportError:
            pass
    return {name: (fn, []) for name, fn in providers.items()}


def batch_norm_inputs(shape, dtype, device):
    """Input (N, C) and the gradient of the output."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    return x, (), torch.randn(shape, generator=g, device=device).to(dtype)


def batch_norm_providers(shape, device):
    """Every batch-norm provider on the device in training mode, each its own layer: fp32 parameters and
    fresh running statistics (bf16 input runs mixed, as under autocast); the biased variance, as
    nn.BatchNorm1d. The reference is the chunked function, on its own layer's tensors."""
    layer = partial(nn.BatchNorm1d, shape[1], device=device)
    layers = {EAGER: layer(), COMPILE: layer(), REFERENCE: layer()}
    for b in fusedops_backends(device):
        layers[f"fusedops {b}"] = fusedops.BatchNorm1d(shape[1], device=device, backend=b)
    providers = {name: (m, list(m.parameters())) for name, m in layers.items()}
    ref = layers[REFERENCE]
    providers[REFERENCE] = (partial(_reference_batch_norm, ref), providers[REFERENCE][1])
    return providers


def _reference_batch_norm(layer, x):
    return reference.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, True,
                                layer.momentum, layer.eps)


OPERATORS = {
    "ce": Operator("cross_entropy", "Cross-entropy", EAGER,
                   shapes=((32, 27), (4096, 1024), (1024, 32768), (8192, 8192)),
                   quick_shapes=((32, 27), (4096, 1024)), per_call_shapes=((32, 27),),
                   inputs=cross_entropy_inputs, providers=cross_entropy_providers),
    "bn": Operator("batch_norm", "Batch norm (training mode)", EAGER,
                   shapes=((32, 64), (16384, 256), (65536, 256)),
                   quick_shapes=((32, 64), (16384, 256)), per_call_shapes=((32, 64),),
                   inputs=batch_norm_inputs, providers=batch_norm_providers),
}


# --- the makemore training step (batch 32, SGD): its variants -----------------------------------------

TRAIN = Table("train", "makemore MLP training step", TORCH_LAYERS)


def torch_layers(vocab_size, generator):
    """The MLP in torch layers, nn.BatchNorm1d + F.cross_entropy: what fusedops layers replace. It
    normalises with the biased variance, the notebooks with the Bessel-corrected one: the same work."""
    model = makemore.MLP(vocab_size, layers="torch", generator=generator)
    bn = nn.BatchNorm1d(model.bn.num_features, momentum=model.bn.momentum)
    bn.load_state_dict(model.bn.state_dict())
    model.bn = bn
    return model, None


def reference_layers(vocab_size, generator):
    """The MLP of the demo's `--layers torch`: the notebooks' batch norm in torch ops (the chunked reference)."""
    return makemore.MLP(vocab_size, layers="torch", generator=generator), None


def fusedops_layers(vocab_size, generator):
    return makemore.MLP(vocab_size, layers="fusedops", generator=generator), None


def fusedops_manual_backward(vocab_size, generator):
    """No loss.backward(): every gradient by hand, the fused kernels for both layers."""
    return makemore.MLP(vocab_size, layers="fusedops", generator=generator), makemore.manual_step


# name -> (vocab size, generator) -> (model, step function: None is loss.backward()). torch.compile's
# entry is the torch layers; the harness compiles their loss (forward and cross-entropy, and so the backward).
TRAIN_VARIANTS = {TORCH_LAYERS: torch_layers, COMPILE: torch_layers, REFERENCE: reference_layers,
                  "fusedops layers": fusedops_layers, "fusedops manual backward": fusedops_manual_backward}

TABLES = {**OPERATORS, "train": TRAIN}  # --op's choices
