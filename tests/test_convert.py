import copy

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fusedops
from fusedops.errors import ArgumentTypeError, ArgumentValueError

TORCH_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FUSEDOPS_BATCH_NORMS = (fusedops.BatchNorm1d, fusedops.BatchNorm2d, fusedops.BatchNorm3d)


class BasicBlock(nn.Module):
    """ResNet's basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the shortcut a strided 1x1
    conv and bn where the shape changes. `spelling` picks how the relus and the add are written."""

    def __init__(self, cin, cout, stride, spelling):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.spelling = spelling

    def forward(self, x):
        if self.spelling == "module":  # torchvision's, the shortcut computed after bn2
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += x if self.downsample is None else self.downsample(x)
            return self.relu(out)
        identity = x if self.downsample is None else self.downsample(x)
        if self.spelling == "functional":
            out = F.relu(self.bn1(self.conv1(x)), inplace=True)
            return F.relu(identity + self.bn2(self.conv2(out)))
        out = self.bn1(self.conv1(x)).relu()
        return torch.relu(torch.add(self.bn2(self.conv2(out)), identity))


class ResNet(nn.Module):
    """stem conv-bn-relu, three basic blocks (the second downsamples), average pool, BatchNorm1d, linear."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.layers = nn.Sequential(
            BasicBlock(8, 8, 1, "functional"), BasicBlock(8, 16, 2, "module"), BasicBlock(16, 16, 1, "method")
        )
        self.head_bn, self.fc = nn.BatchNorm1d(16), nn.Linear(16, 10)
        self.to(dtype)

    def forward(self, x):
        x = self.layers(self.bn(self.conv(x)).relu_())
        return self.fc(self.head_bn(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


FP32 = {"rtol": 2e-4, "atol": 2e-5}  # fusedops' and torch's reductions round differently, over many layers
FUSED_CALLS, FUSED_RESIDUALS, BATCH_NORMS = 7, 3, 9  # the stem, 2 per block (1 with its residual); + downsample, head


def batch_norms(model):
    return {name: m for name, m in model.named_modules() if type(m) in TORCH_BATCH_NORMS}


def train(model, inputs, labels):
    """The losses and parameter gradients of SGD steps on `model`, one per input, by parameter name (a plain
    step, p -= 0.1 * grad: torch.optim's first step costs seconds of imports)."""
    losses, grads = [], []
    for x in inputs:
        loss = F.cross_entropy(model(x), labels)
        names, parameters = zip(*model.named_parameters())
        step = torch.autograd.grad(loss, parameters)
        losses.append(loss.detach())
        grads.append(dict(zip(names, step)))
        with torch.no_grad():
            torch._foreach_add_(parameters, step, alpha=-0.1)
    return losses, grads


def fused_calls(gm):
    """The calls of fused batch norms in GraphModule `gm`'s graph: (all, those with a residual)."""
    calls = [
        node
        for node in gm.graph.nodes
        if node.op == "call_module" and getattr(gm.get_submodule(node.target), "activation", None) == "relu"
    ]
    return len(calls), sum(len(node.args) == 2 for node in calls)


@pytest.mark.parametrize("fuse", [False, True], ids=["converted", "fused"])
@pytest.mark.parametrize(
    "dtype, memory_format",
    [
        (torch.float32, torch.contiguous_format),
        (torch.float32, torch.channels_last),
        (torch.float64, torch.contiguous_format),
    ],
    ids=["fp32", "fp32-channels_last", "fp64"],
)
def test_resnet_trains_as_torch(fuse, dtype, memory_format):
    torch.manual_seed(0)
    model = ResNet(dtype).to(memory_format=memory_format)
    reference = copy.deepcopy(model)
    converted = fusedops.convert_batchnorm(model, fuse_activations=fuse)
    inputs = [torch.randn(4, 3, 8, 8, dtype=dtype).to(memory_format=memory_format) for _ in range(3)]
    labels = torch.randint(10, (4,))
    tol = FP32 if dtype == torch.float32 else {}
    for got, expected in zip(train(converted, inputs, labels), train(reference, inputs, labels), strict=True):
        torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(dict(converted.named_buffers()), dict(reference.named_buffers()), **tol)
    x = torch.randn(4, 3, 8, 8, dtype=dtype).to(memory_format=memory_format)
    torch.testing.assert_close(converted.eval()(x), reference.eval()(x), **tol)


def test_every_batch_norm_converted_keeping_its_tensors_options_and_mode():
    model = ResNet()
    model.layers[1].bn2 = nn.BatchNorm2d(16, eps=1e-3, momentum=None, bias=False)
    model.layers[2].bn1 = nn.BatchNorm2d(16, affine=False, track_running_stats=False)
    model.layers[1].downsample[1].eval()
    torch_bns = batch_norms(model)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    tensors = {name: (*m.parameters(), *m.buffers()) for name, m in torch_bns.items()}
    converted = fusedops.convert_batchnorm(model)
    assert converted is model and not batch_norms(converted)
    for name, bn in torch_bns.items():
        new = converted.get_submodule(name)
        assert type(new) is FUSEDOPS_BATCH_NORMS[TORCH_BATCH_NORMS.index(type(bn))]
        assert all(a is b for a, b in zip((*new.parameters(), *new.buffers()), tensors[name], strict=True))
        for option in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, option) == getattr(bn, option)
        assert (new.bias is None) == (bn.bias is None) and new.activation is None
    assert list(converted.state_dict()) == list(state)
    torch.testing.assert_close(converted.state_dict(), state, rtol=0, atol=0)


def test_the_fused_graph_has_the_fused_calls_and_the_model_is_left_as_it_is():
    model = ResNet()
    model.layers[1].downsample[1].eval()
    model.bn = fusedops.BatchNorm2d(8)  # fusedops' fuse too
    state = model.state_dict(keep_vars=True)
    gm = fusedops.convert_batchnorm(model, fuse_activations=True)
    assert isinstance(gm, torch.fx.GraphModule)
    assert fused_calls(gm) == (FUSED_CALLS, FUSED_RESIDUALS)
    assert gm.bn.activation == "relu" and model.bn.activation is None and gm.bn.weight is model.bn.weight
    assert not batch_norms(gm) and sum(isinstance(m, FUSEDOPS_BATCH_NORMS) for m in gm.modules()) == BATCH_NORMS
    relus = [
        node
        for node in gm.graph.nodes
        if node.target in (F.relu, torch.relu, torch.relu_, "relu", "relu_")
        or node.op == "call_module"
        and type(gm.get_submodule(node.target)) is nn.ReLU
    ]
    assert not relus  # every one fused
    assert len(batch_norms(model)) == BATCH_NORMS - 1  # the model keeps torch's, sharing their tensors with gm
    assert gm.state_dict().keys() == state.keys()
    assert all(t is state[name] for name, t in gm.state_dict(keep_vars=True).items())
    assert all(m.training == model.get_submodule(name).training for name, m in gm.named_modules())
    assert not gm.get_submodule("layers.1.downsample.1").training


class Unfusable(nn.Module):
    """Batch norms each of whose calls feeds something besides one relu, or feeds it not through a plain add."""

    def __init__(self):
        super().__init__()
        self.twice, self.two_users, self.add_used_twice, self.alpha, self.scalar, self.doubled = (
            nn.BatchNorm2d(4) for _ in range(6)
        )
        self.already_fused = fusedops.BatchNorm2d(4, activation="relu")

    def forward(self, x):
        a = torch.relu(self.twice(x)) + torch.relu(self.twice(x * 2))  # the module is called twice
        b = self.two_users(x)
        b = torch.relu(b) + b  # the output has another user
        c = self.add_used_twice(x) + a
        c = torch.relu(c) * c  # the add has another user
        d = torch.relu(torch.add(self.alpha(x), a, alpha=2))
        e = torch.relu(self.scalar(x) + 1.0)
        f = self.doubled(x)
        f = F.relu(f + f)  # no other addend
        return a + b + c + d + e + F.relu(f) + torch.relu(self.already_fused(x))


def test_unfusable_calls_stay_unfused_and_compute_the_same():
    torch.manual_seed(0)
    model = Unfusable()
    reference = copy.deepcopy(model)
    gm = fusedops.convert_batchnorm(model, fuse_activations=True)
    assert fused_calls(gm) == (1, 0) and gm.already_fused is model.already_fused  # the one fused before
    assert not batch_norms(gm)
    x = torch.randn(3, 4, 5, 5)
    out, expected = gm(x.requires_grad_()), reference(x)
    torch.testing.assert_close(out, expected, **FP32)
    grad, expected_grad = torch.autograd.grad(out.square().sum(), x), torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad, expected_grad, **FP32)


class Residual(nn.Module):
    """relu(bn(x) + x) and relu(bn2(x)) for any batch norm class."""

    def __init__(self, cls, channels):
        super().__init__()
        self.bn, self.bn2 = cls(channels), cls(channels)

    def forward(self, x):
        return F.relu(self.bn(x) + x) * F.relu(self.bn2(x))


@pytest.mark.parametrize("fuse", [False, True], ids=["converted", "fused"])
@pytest.mark.parametrize(
    "cls, shape, memory_format",
    [
        (nn.BatchNorm1d, (4, 6), torch.contiguous_format),
        (nn.BatchNorm1d, (4, 6, 5), torch.contiguous_format),
        (nn.BatchNorm3d, (2, 6, 3, 4, 4), torch.contiguous_format),
        (nn.BatchNorm3d, (2, 6, 3, 4, 4), torch.channels_last_3d),
    ],
    ids=["1d-NC", "1d-NCL", "3d", "3d-channels_last"],
)
def test_batchnorm1d_and_3d(fuse, cls, shape, memory_format):
    torch.manual_seed(0)
    model = Residual(cls, shape[1])
    reference = copy.deepcopy(model)
    converted = fusedops.convert_batchnorm(model, fuse_activations=fuse)
    assert type(converted.bn) is FUSEDOPS_BATCH_NORMS[TORCH_BATCH_NORMS.index(cls)]
    if fuse:
        assert fused_calls(converted) == (2, 1)
    x = torch.randn(shape).to(memory_format=memory_format).requires_grad_()
    for training in (True, False):
        out, expected = converted.train(training)(x), reference.train(training)(x)
        torch.testing.assert_close(out, expected, **FP32)
        names, parameters = zip(*converted.named_parameters())
        grads = torch.autograd.grad(out.sum(), [x, *parameters])
        expected_grads = torch.autograd.grad(expected.sum(), [x, *map(reference.get_parameter, names)])
        torch.testing.assert_close(grads, expected_grads, **FP32)
    torch.testing.assert_close(dict(converted.named_buffers()), dict(reference.named_buffers()), **FP32)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        x = self.bn(x)
        return torch.relu(x) if x.sum() > 0 else x  # control flow on a value: fx cannot trace it


def test_an_untraceable_model_gets_a_clear_error_and_converts_without_fusion():
    model = Untraceable()
    reference = copy.deepcopy(model)
    with pytest.raises(ArgumentValueError, match="torch.fx.*cannot be traced.*without fusion") as error:
        fusedops.convert_batchnorm(model, fuse_activations=True)
    assert isinstance(error.value.__cause__, torch.fx.proxy.TraceError)
    assert type(model.bn) is nn.BatchNorm2d  # left as it was
    converted = fusedops.convert_batchnorm(model)
    assert type(converted.bn) is fusedops.BatchNorm2d
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(converted(x), reference(x))


def test_a_batch_norm_itself_is_returned_converted_and_others_are_kept():
    bn = nn.BatchNorm2d(5).eval()
    converted = fusedops.convert_batchnorm(bn)
    assert type(converted) is fusedops.BatchNorm2d and not converted.training and converted.weight is bn.weight
    model = nn.Sequential(nn.SyncBatchNorm(5), fusedops.BatchNorm1d(5), nn.LazyBatchNorm1d())
    children = list(model)
    assert list(fusedops.convert_batchnorm(model)) == children  # not torch's BatchNorm1d/2d/3d: kept


def test_bad_arguments():
    with pytest.raises(ArgumentTypeError, match="model must be a torch.nn.Module"):
        fusedops.convert_batchnorm(lambda x: x)
    with pytest.raises(ArgumentTypeError, match="fuse_activations must be a bool"):
        fusedops.convert_batchnorm(ResNet(), fuse_activations="relu")
