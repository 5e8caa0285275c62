"""What the benchmark runs, declared once per table: for each operator its shapes (a full run's,
--quick's, and the per-call ones, where the table also gives the cost over eager in µs), its variants
(input layouts, fused forms), its inputs, its providers and the targets fusedops should reach; for the
training steps (the makemore MLP, a ResNet-18) their variants. bench/harness.py runs them; a new
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
FORWARD, BACKWARD, FWD_BWD, STEP = "forward", "backward", "forward+backward", "step"
MODES = (FWD_BWD, FORWARD, BACKWARD)
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class Table:
    """One results file, <out>/<file>.{md,csv,png}: its title and the provider its ratios are against."""
    file: str
    title: str
    baseline: str


@dataclass(frozen=True)
class Targets:
    """What fusedops should reach in a case, against the peers of the same run (forward+backward): faster
    than torch.compile, and these."""
    vs_eager: float  # the least speed-up against eager
    memory_saved: float = 0.0  # the least (eager's peak extra memory - fusedops'), in input-sized tensors


@dataclass(frozen=True)
class Operator(Table):
    shapes: tuple  # a full run's
    quick_shapes: tuple  # --quick's
    per_call_shapes: tuple  # where fixed costs dominate: the table also gives median - baseline's in µs
    inputs: Callable  # (shape, dtype, device, variant) -> (x, other arguments, gradient of the output);
    # the other arguments that require grad are differentiated, as x
    providers: Callable  # (shape, device, variant) -> {name: (function of (x, *other arguments), its parameters)}
    variants: tuple = ("",)  # each case runs once per variant (an input layout, a fused form); "": none
    modes: tuple = MODES  # those timed (of the run's)
    targets: Callable = None  # variant -> Targets of the fusedops providers, or None


def fusedops_backends(device):
    """The fused kernels native to the device (Triton's interpreter on CPU is no benchmark)."""
    return ("triton",) if device.type == "cuda" else ("cpp",)


def cross_entropy_inputs(shape, dtype, device, variant):
    """Logits (N, V), target (N,); the loss is a scalar: its gradient is 1 (None). No variants."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(shape, generator=g, device=device).to(dtype)
    return logits, (torch.randint(0, shape[1], shape[:1], generator=g, device=device),), None


def cross_entropy_providers(shape, device, variant):
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


def batch_norm_inputs(shape, dtype, device, variant):
    """Input (N, C) and the gradient of the output. No variants."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    return x, (), torch.randn(shape, generator=g, device=device).to(dtype)


def batch_norm_providers(shape, device, variant):
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


# BatchNorm2d at ResNet shapes, alone and with what follows it in a ResNet: variants "<form>, <layout>"
BN, BN_RELU, BN_ADD_RELU = "BN", "BN + ReLU", "BN + add + ReLU"
# fusedops' targets per form; the fused forms save eager's separate ReLU (and add) output
BN2D_TARGETS = {BN: Targets(1.5), BN_RELU: Targets(1.75, memory_saved=1), BN_ADD_RELU: Targets(1.75, memory_saved=1)}
BN2D_VARIANTS = tuple(f"{form}, {layout}" for form in BN2D_TARGETS for layout in LAYOUTS)


def bn2d_form(variant):
    """(form, layout) of a BN2D_VARIANTS entry."""
    form, layout = variant.split(", ")
    return form, layout


def batch_norm2d_inputs(shape, dtype, device, variant):
    """Input (N, C, H, W), the residual (BN + add + ReLU only; its gradient is taken too) and the gradient
    of the output, all in the variant's layout."""
    form, layout = bn2d_form(variant)
    g = torch.Generator(device=device).manual_seed(0)

    def tensor():
        return torch.randn(shape, generator=g, device=device).to(dtype).contiguous(memory_format=LAYOUTS[layout])

    x, grad_out = tensor(), tensor()
    return x, ((tensor().requires_grad_(),) if form == BN_ADD_RELU else ()), grad_out


def eager_form(bn, form):
    """The eager code of a form, as a ResNet writes it: bn(x), relu(bn(x)) or relu(bn(x) + residual)."""
    if form == BN:
        return bn
    if form == BN_RELU:
        return lambda x: F.relu(bn(x))
    return lambda x, residual: F.relu(bn(x) + residual)


def batch_norm2d_providers(shape, device, variant):
    """Eager (nn.BatchNorm2d, then F.relu, then +), torch.compile of the same code and fusedops'
    BatchNorm2d computing the whole form in one call (`activation="relu"`, `bn(x, residual)`), each its own
    layer in training mode: fp32 parameters (bf16 input runs mixed, as under autocast)."""
    form, _ = bn2d_form(variant)
    layers = {EAGER: nn.BatchNorm2d(shape[1], device=device), COMPILE: nn.BatchNorm2d(shape[1], device=device)}
    providers = {name: (eager_form(bn, form), list(bn.parameters())) for name, bn in layers.items()}
    for b in fusedops_backends(device):
        bn = fusedops.BatchNorm2d(shape[1], device=device, backend=b, activation=None if form == BN else "relu")
        providers[f"fusedops {b}"] = (bn, list(bn.parameters()))
    return providers


OPERATORS = {
    "ce": Operator("cross_entropy", "Cross-entropy", EAGER,
                   shapes=((32, 27), (4096, 1024), (1024, 32768), (8192, 8192)),
                   quick_shapes=((32, 27), (4096, 1024)), per_call_shapes=((32, 27),),
                   inputs=cross_entropy_inputs, providers=cross_entropy_providers),
    "bn": Operator("batch_norm", "Batch norm (training mode)", EAGER,
                   shapes=((32, 64), (16384, 256), (65536, 256)),
                   quick_shapes=((32, 64), (16384, 256)), per_call_shapes=((32, 64),),
                   inputs=batch_norm_inputs, providers=batch_norm_providers),
    "bn2d": Operator("batch_norm2d", "BatchNorm2d at ResNet shapes (training mode): alone, + ReLU, + add + ReLU",
                     EAGER, shapes=((32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7)),
                     quick_shapes=((32, 512, 7, 7),), per_call_shapes=(), inputs=batch_norm2d_inputs,
                     providers=batch_norm2d_providers, variants=BN2D_VARIANTS, modes=(FWD_BWD,),
                     targets=lambda variant: BN2D_TARGETS[bn2d_form(variant)[0]]),
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


# --- a ResNet-18-style training step (SGD): torch's batch norm against fusedops', converted ----------------

TORCH_BN = "torch BatchNorm2d"
RESNET = Table("resnet", "ResNet-18-style training step", TORCH_BN)
RESNET_SIZE = dict(batch=16, image_size=64, width=64)  # a full run's: ResNet-18's channels 64..512
RESNET_QUICK_SIZE = dict(batch=2, image_size=32, width=8)

# name -> (the model in torch layers, bench/resnet.py) -> the model trained; each variant runs in every
# layout of LAYOUTS. Fused: relu(bn(x)) and relu(bn(x) + identity) each one fusedops call.
RESNET_VARIANTS = {
    TORCH_BN: lambda model: model,
    "fusedops converted": fusedops.convert_batchnorm,
    "fusedops converted and fused": partial(fusedops.convert_batchnorm, fuse_activations=True),
}

TABLES = {**OPERATORS, "train": TRAIN, "resnet": RESNET}  # --op's choices
