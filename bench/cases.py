"""What the benchmark runs, declared once per table: for each operator its shapes (a full run's,
--quick's, and the per-call ones, where the table also gives the cost over eager in µs), its variants
(input layouts, fused forms, options) and which of them run at which shape in which modes, its inputs,
its providers and the targets fusedops should reach; for the training steps (the makemore MLP, a
ResNet-18) their variants. bench/harness.py runs them; a new operator is one more entry in OPERATORS."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

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
    """What a fusedops provider should reach in a case, against the peers of the same run
    (forward+backward): faster than torch.compile, and these."""

    vs_eager: float = None  # the least speed-up against eager (None: none stated)
    over_eager_us: float = None  # where fixed costs dominate: the most µs per call over eager (None: none stated)
    vs_floor: float = None  # the most time as a multiple of the copy floor's (None: none stated)
    memory_saved: float = 0.0  # the least (eager's peak extra memory - fusedops'), in input-sized tensors
    peak_memory: float = None  # the most peak extra memory, in input-sized tensors (None: none stated)
    peak_slack_mb: float = 0.0  # beyond peak_memory: MB of per-row values and the like
    peak_vs_eager: float = None  # the most peak extra memory, as a fraction of eager's in the same run
    faster_than_compile: bool = True  # False: its speed-up against torch.compile is shown, not judged
    peers: tuple = ()  # providers to beat in the same run: faster, and at most their peak extra memory


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
    variants_at: Callable = None  # shape -> {variant: its modes} run at that shape; None: every variant in `modes`
    targets: Callable = None  # (shape, variant, fusedops provider, dtype name) -> its Targets; None: no targets
    dtypes_at: Callable = None  # shape -> the dtypes (of the run's) run at it; None: every one of the run's
    floor: bool = True  # whether the copy floor runs (False where one pass over the input is no yardstick)
    min_runs: int = None  # measurements per median, at least (None: the harness's MIN_RUNS)
    memory_vs_baseline: bool = False  # peak memory as a fraction of the baseline's (tables, targets), not in inputs
    sweep_dim: int = None  # the shape's dimension plotted against (memory and time); None: speed-up bars
    notes: Callable = None  # device -> {provider: a line for the results' text}: what a peer is, or why it does not run
    # (shape, variant, dtype) -> the bytes a fused forward+backward must move at least (the bandwidth model);
    # None: no such floor (compute-bound)
    bytes_moved: Callable = None

    def plan(self, shape):
        """{variant: the modes it is timed in} at the shape."""
        return self.variants_at(shape) if self.variants_at else dict.fromkeys(self.variants, self.modes)

    def dtypes(self, shape, dtypes):
        """The dtypes of `dtypes` (the run's) that run at the shape."""
        return [d for d in dtypes if self.dtypes_at is None or d in self.dtypes_at(shape)]


def fusedops_backends(device):
    """The fused kernels native to the device (Triton's interpreter on CPU is no benchmark)."""
    return ("triton",) if device.type == "cuda" else ("cpp",)


# Cross-entropy: plain (class targets) and each option of fusedops.cross_entropy against the eager code it replaces
PLAIN, WEIGHTED, PROBABILITIES, Z_LOSS_SOFTCAP = "plain", "weighted", "probability targets", "z-loss + softcap"
CE_VARIANTS = (PLAIN, WEIGHTED, PROBABILITIES, Z_LOSS_SOFTCAP)
CE_PLAIN_ONLY = ((32, 27), (333, 3001), (1024, 32768), (8192, 8192))  # plain alone, in every mode
CE_LARGE_VOCABULARIES = ((2048, 50257), (512, 131072))  # GPT-2's and Llama 3's: plain and weighted, forward+backward
CE_REFERENCE_MAX = 4096 * 1024  # logits the chunked reference runs at, at most: beyond, a call takes 0.7 s or more
CE_OPTIONS_SHAPE = (4096, 1024)  # where the options' speed-up targets are stated
# the least speed-up against eager, forward+backward, by (shape, variant, dtype; None: every dtype, provider:
# "" both, "out of place" or "in place"); 2 threads. Everywhere else: faster than torch.compile.
CE_SPEEDUP = {
    ((4096, 1024), PLAIN, "fp32", ""): 3.0,
    ((4096, 1024), WEIGHTED, "fp32", ""): 2.5,
    ((4096, 1024), PROBABILITIES, "fp32", ""): 2.5,
    ((4096, 1024), Z_LOSS_SOFTCAP, None, ""): 3.0,
    ((333, 3001), PLAIN, "fp32", ""): 2.7,
    ((1024, 32768), PLAIN, "fp32", "out of place"): 8.0,
    ((2048, 50257), PLAIN, "fp32", "out of place"): 8.0,
    ((8192, 8192), PLAIN, "fp32", "in place"): 10.0,
}
CE_FLOOR = {((8192, 8192), "fp32", "in place"): 1.6}  # the most time as a multiple of the copy floor's
PER_CALL_US = 20.0  # at the notebooks' sizes: the most µs per forward+backward over eager
CE_PER_CALL = ((32, 27),)  # the notebooks' batch: fixed costs dominate
CE_PEAK, CE_PEAK_IN_PLACE = 1.1, 0.1  # the most peak extra memory in logits' sizes: the gradient; in place none
CE_ROW_BYTES = 16  # and beyond it, a row's loss and logsumexp (fp32) and the like: most of it at 32x27
SOFTCAP, Z_LOSS = 30.0, 1e-4


def cross_entropy_variants_at(shape):
    """{variant: its modes} at the shape: plain alone in every mode at CE_PLAIN_ONLY, plain and weighted
    forward+backward at CE_LARGE_VOCABULARIES; elsewhere (4096x1024) plain in every mode and each option
    forward+backward."""
    if shape in CE_PLAIN_ONLY:
        return {PLAIN: MODES}
    if shape in CE_LARGE_VOCABULARIES:
        return {PLAIN: (FWD_BWD,), WEIGHTED: (FWD_BWD,)}
    return {PLAIN: MODES, **dict.fromkeys(CE_VARIANTS[1:], (FWD_BWD,))}


def cross_entropy_inputs(shape, dtype, device, variant):
    """Logits (N, V) and the variant's other arguments: target (N,) class indices, and the weight (V,)
    uniform in [0.5, 1.5) (weighted), or instead the target (N, V) a softmax of random numbers
    (probability targets), in the logits' dtype; the loss is a scalar: its gradient is 1 (None)."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(shape, generator=g, device=device).to(dtype)
    if variant == PROBABILITIES:
        return logits, (torch.randn(shape, generator=g, device=device).softmax(-1).to(dtype),), None
    target = torch.randint(0, shape[1], shape[:1], generator=g, device=device)
    if variant == WEIGHTED:
        return logits, (target, (torch.rand(shape[1], generator=g, device=device) + 0.5).to(dtype)), None
    return logits, (target,), None


def z_loss_softcap_eager(logits, target):
    """Gemma 2's soft-capping, then cross-entropy plus PaLM's z-loss, in torch ops: the code that
    fusedops.cross_entropy(logits, target, z_loss=Z_LOSS, softcap=SOFTCAP) replaces."""
    y = SOFTCAP * torch.tanh(logits / SOFTCAP)  # y = c tanh(x / c)
    return F.cross_entropy(y, target) + Z_LOSS * (torch.logsumexp(y, -1) ** 2).mean()  # + z mean(lse^2)


def cross_entropy_providers(shape, device, variant):
    """loss(logits, *other arguments) of every provider of the variant on the device: the eager code,
    torch.compile's entry holding the same code (the harness compiles it), the chunked reference (plain
    only, as the notebooks, up to CE_REFERENCE_MAX logits) and fusedops (its gradient also written over
    the logits)."""
    options = dict(z_loss=Z_LOSS, softcap=SOFTCAP) if variant == Z_LOSS_SOFTCAP else {}
    eager = z_loss_softcap_eager if variant == Z_LOSS_SOFTCAP else F.cross_entropy
    providers = {EAGER: eager, COMPILE: eager}
    if variant == PLAIN and shape[0] * shape[1] <= CE_REFERENCE_MAX:
        providers[REFERENCE] = reference.cross_entropy
    for b in fusedops_backends(device):
        providers[f"fusedops {b}"] = partial(fusedops.cross_entropy, backend=b, **options)
        # writes the gradient over the logits: no N x V buffer
        providers[f"fusedops {b} in-place"] = partial(
            fusedops.cross_entropy, backend=b, inplace_backward=True, **options
        )
    if device.type == "cuda" and variant == PLAIN:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            providers["liger"] = LigerCrossEntropyLoss()  # also writes the gradient over the logits
        except ImportError:
            pass
    return {name: (fn, []) for name, fn in providers.items()}


def cross_entropy_targets(shape, variant, provider, dtype="fp32"):
    """Every case: faster than torch.compile, peak extra memory at most the gradient's (CE_PEAK; in place
    CE_PEAK_IN_PLACE) and CE_ROW_BYTES a row; CE_SPEEDUP against eager and CE_FLOOR where stated; at the
    per-call shapes, at most PER_CALL_US over eager."""
    in_place = provider.endswith("in-place")
    placement = "in place" if in_place else "out of place"
    speedup = next(
        (
            v
            for (s, var, d, p), v in CE_SPEEDUP.items()
            if (s, var) == (shape, variant) and d in (None, dtype) and p in ("", placement)
        ),
        None,
    )
    return Targets(
        speedup,
        over_eager_us=PER_CALL_US if shape in CE_PER_CALL else None,
        vs_floor=CE_FLOOR.get((shape, dtype, placement)),
        peak_memory=CE_PEAK_IN_PLACE if in_place else CE_PEAK,
        peak_slack_mb=CE_ROW_BYTES * shape[0] / 2**20,
    )


BN_PER_CALL = ((32, 64),)  # the notebooks' batch of hidden units
BN_SPEEDUP = {(16384, 256): 1.6, (65536, 256): 2.0, (8192, 1000): 1.5, (100000, 7): 1.6}  # fp32, against eager


def batch_norm_targets(shape, variant, provider, dtype="fp32"):
    """Faster than torch.compile; BN_SPEEDUP against eager in fp32; at the per-call shape, at most PER_CALL_US
    over eager."""
    return Targets(
        BN_SPEEDUP.get(shape) if dtype == "fp32" else None, over_eager_us=PER_CALL_US if shape in BN_PER_CALL else None
    )


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
    return reference.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, True, layer.momentum, layer.eps
    )


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


# Linear cross-entropy: F.cross_entropy(F.linear(x, W), y), the LM head's loss, against the fused form
# that never holds the N x V logits. Inputs: x (N, H), W (V, H), y (N,); gradients of x and W, no bias.
CCE, LIGER = "cut-cross-entropy", "liger"  # the peers: Apple's CCE (its torch_compile implementation), Liger-Kernel
TORCH_CHUNKED = "torch chunked"  # PyTorch's own: F.linear_cross_entropy(..., options=nn.LinearCrossEntropyOptions())
LCE_SHAPES = ((4096, 512, 50257), (8192, 768, 32000))  # (N, H, V) of the issue: GPT-2's vocabulary, Llama 2's
LCE_SWEEP_VOCABULARIES = (4096, 8192, 16384, 32000, 50257)  # at LCE_SWEEP_ROWS, fp32: memory and time against V
LCE_SWEEP_ROWS = (4096, 512)
LCE_SWEEP = tuple((*LCE_SWEEP_ROWS, v) for v in LCE_SWEEP_VOCABULARIES if (*LCE_SWEEP_ROWS, v) not in LCE_SHAPES)
LCE_QUICK = ((256, 64, 1000), (256, 64, 2000), (256, 64, 4000))  # --quick: a small sweep of V, milliseconds a call
LCE_PEAK_VS_EAGER = 0.15  # fusedops' peak extra memory of forward+backward, at most this fraction of eager's
LCE_MIN_RUNS = 3  # a forward+backward takes seconds on CPU: the median of 3 calls


def linear_cross_entropy_eager(x, weight, target):
    """The code fusedops.linear_cross_entropy replaces: the logits, then cross-entropy over them."""
    return F.cross_entropy(F.linear(x, weight), target)


def linear_cross_entropy_inputs(shape, dtype, device, variant):
    """x (N, H) ~ N(0, 1), W (V, H) ~ N(0, 1/H) (logits about N(0, 1)), in the dtype; W requires grad (the
    harness differentiates it, as x); y (N,) class indices. The loss is a scalar: its gradient is 1 (None)."""
    n, h, v = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype).requires_grad_()
    return x, (weight, torch.randint(0, v, (n,), generator=g, device=device)), None


@cache
def cut_cross_entropy():
    """(cut-cross-entropy's linear_cross_entropy with impl="torch_compile", its version) or (None, why not)."""
    try:
        import cut_cross_entropy as cce
    except Exception as e:  # noqa: BLE001 -- any failure to import it means the peer does not run
        return None, f"{type(e).__name__}: {e}"
    return partial(cce.linear_cross_entropy, impl="torch_compile"), getattr(cce, "__version__", "?")


@cache
def liger_fused_linear_cross_entropy():
    """(Liger-Kernel's fused linear cross-entropy as fn(x, W, y), "") or (None, why not)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    loss = LigerFusedLinearCrossEntropyLoss()
    return (lambda x, weight, target: loss(weight, x, target)), ""  # its order: (weight, input, target)


def torch_chunked():
    """PyTorch's chunked linear cross-entropy (2.13+: F.linear_cross_entropy with LinearCrossEntropyOptions(),
    its defaults picked per device and dtype), or None where this torch has none."""
    options = getattr(nn, "LinearCrossEntropyOptions", None)
    if options is None or not hasattr(F, "linear_cross_entropy"):
        return None
    return partial(F.linear_cross_entropy, options=options())


def linear_cross_entropy_providers(shape, device, variant):
    """loss(x, W, y) of every provider on the device: the eager code, torch.compile's entry holding the same
    code (the harness compiles it), PyTorch's own chunked path (where this torch has it), cut-cross-entropy's
    torch_compile implementation (where it imports; it compiles itself: `e @ c.T`, then cross-entropy over the
    logits in fp32; not at the sweep's extra shapes), Liger-Kernel's (CUDA, where installed) and fusedops with
    the device's kernel."""
    providers = {EAGER: linear_cross_entropy_eager, COMPILE: linear_cross_entropy_eager}
    if torch_chunked() is not None:
        providers[TORCH_CHUNKED] = torch_chunked()
    if shape not in LCE_SWEEP:
        cce, _ = cut_cross_entropy()
        if cce is not None:
            providers[CCE] = cce
        liger, _ = liger_fused_linear_cross_entropy()
        if device.type == "cuda" and liger is not None:
            providers[LIGER] = liger
    for b in fusedops_backends(device):
        providers[f"fusedops {b}"] = partial(fusedops.linear_cross_entropy, backend=b)
    return {name: (fn, []) for name, fn in providers.items()}


def linear_cross_entropy_notes(device):
    """{peer: what it is, or why it does not run}: cut-cross-entropy, and on CUDA Liger-Kernel."""
    cce, why = cut_cross_entropy()
    notes = {
        TORCH_CHUNKED: f"{TORCH_CHUNKED}: PyTorch's F.linear_cross_entropy with "
        "options=nn.LinearCrossEntropyOptions() (its chunked path; its defaults per device and "
        "dtype)."
        if torch_chunked() is not None
        else f"{TORCH_CHUNKED}: not run: torch {torch.__version__} has no chunked linear_cross_entropy.",
        CCE: f'{CCE} {why}: its `impl="torch_compile"`, the CPU path (torch.compile of `e @ c.T`, then '
        "cross-entropy over the logits cast to fp32; dynamic shapes), at the issue's shapes; its first "
        "call compiles (not timed)."
        if cce is not None
        else f"{CCE}: not run: it does not import ({why}).",
    }
    if device.type == "cuda":
        liger, why = liger_fused_linear_cross_entropy()
        notes[LIGER] = (
            f"{LIGER}: Liger-Kernel's LigerFusedLinearCrossEntropyLoss, at the issue's shapes."
            if liger is not None
            else f"{LIGER}: not run: it does not import ({why})."
        )
    return notes


def linear_cross_entropy_targets(shape, variant, provider, dtype="fp32"):
    """At the issue's shapes: faster than eager and than PyTorch's chunked path, peak extra memory at most
    LCE_PEAK_VS_EAGER of eager's and at most the chunked path's (forward+backward, the same run);
    torch.compile's speed-up shown, not judged. The sweep: none."""
    if shape in LCE_SHAPES:
        return Targets(1.0, peak_vs_eager=LCE_PEAK_VS_EAGER, faster_than_compile=False, peers=(TORCH_CHUNKED,))
    return Targets(faster_than_compile=False)


# --- the bandwidth model: the bytes a fused forward+backward must move, for GB/s and the share of HBM's --------

# nominal HBM bandwidth in GB/s by torch.cuda.get_device_name (NVIDIA's data sheets); others: GB/s alone
HBM_GBPS = {
    "H200": 4800,
    "H100 NVL": 3900,
    "H100 80GB HBM3": 3350,
    "H100 SXM": 3350,
    "H100 PCIe": 2000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100-SXM4-40GB": 1555,
    "A100-PCIE-40GB": 1555,
}


def hbm_gbps(device):
    """The device's nominal HBM bandwidth in GB/s, or None (a CPU, or a GPU not in HBM_GBPS)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in HBM_GBPS.items() if key in name), None)


def cross_entropy_bytes(shape, variant, dtype):
    """(N, V) logits: read once and G written once, in forward (backward's unit upstream gradient moves
    nothing); the targets (probabilities: N x V read once more) and the class weights."""
    N, V = shape
    b = dtype.itemsize
    return 2 * N * V * b + (N * V * b if variant == PROBABILITIES else N * 8) + (V * b if variant == WEIGHTED else 0)


def batch_norm_bytes(shape, variant, dtype):
    """Training batch norm of n values, residual and relu as the variant has them. Forward: x read for the
    statistics, read again and y written (+ the residual read); backward: dy and x read for the sums, read again
    and dx written (+ y read twice for relu's mask, + the residual's gradient written)."""
    n = math.prod(shape)
    form = bn2d_form(variant)[0] if variant else BN
    relu, residual = form in (BN_RELU, BN_ADD_RELU), form == BN_ADD_RELU
    return (3 * n + 5 * n + 2 * n * relu + 2 * n * residual) * dtype.itemsize


OPERATORS = {
    "ce": Operator(
        "cross_entropy",
        "Cross-entropy: plain, weighted, probability targets, z-loss + softcap",
        EAGER,
        shapes=(*CE_PER_CALL, (333, 3001), (4096, 1024), (1024, 32768), (8192, 8192), *CE_LARGE_VOCABULARIES),
        quick_shapes=(*CE_PER_CALL, (4096, 1024)),
        per_call_shapes=CE_PER_CALL,
        inputs=cross_entropy_inputs,
        providers=cross_entropy_providers,
        variants=CE_VARIANTS,
        variants_at=cross_entropy_variants_at,
        targets=cross_entropy_targets,
        bytes_moved=cross_entropy_bytes,
    ),
    "bn": Operator(
        "batch_norm",
        "Batch norm (training mode)",
        EAGER,
        shapes=(*BN_PER_CALL, *BN_SPEEDUP),
        quick_shapes=(*BN_PER_CALL, (16384, 256)),
        per_call_shapes=BN_PER_CALL,
        inputs=batch_norm_inputs,
        providers=batch_norm_providers,
        targets=batch_norm_targets,
        bytes_moved=batch_norm_bytes,
    ),
    "bn2d": Operator(
        "batch_norm2d",
        "BatchNorm2d at ResNet shapes (training mode): alone, + ReLU, + add + ReLU",
        EAGER,
        shapes=((32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7)),
        quick_shapes=((32, 512, 7, 7),),
        per_call_shapes=(),
        inputs=batch_norm2d_inputs,
        providers=batch_norm2d_providers,
        variants=BN2D_VARIANTS,
        modes=(FWD_BWD,),
        targets=lambda shape, variant, provider, dtype="fp32": BN2D_TARGETS[bn2d_form(variant)[0]],
        bytes_moved=batch_norm_bytes,
    ),
    "lce": Operator(
        "linear_cross_entropy",
        "Linear cross-entropy (the LM head's loss): forward+backward",
        EAGER,
        shapes=(*LCE_SHAPES, *LCE_SWEEP),
        quick_shapes=LCE_QUICK,
        per_call_shapes=(),
        inputs=linear_cross_entropy_inputs,
        providers=linear_cross_entropy_providers,
        modes=(FWD_BWD,),
        targets=linear_cross_entropy_targets,
        dtypes_at=lambda shape: (torch.float32,) if shape in LCE_SWEEP else DTYPES,
        floor=False,
        min_runs=LCE_MIN_RUNS,
        memory_vs_baseline=True,
        sweep_dim=2,
        notes=linear_cross_entropy_notes,
    ),
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
TRAIN_VARIANTS = {
    TORCH_LAYERS: torch_layers,
    COMPILE: torch_layers,
    REFERENCE: reference_layers,
    "fusedops layers": fusedops_layers,
    "fusedops manual backward": fusedops_manual_backward,
}


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
