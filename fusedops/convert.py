"""One-call conversion of a model's batch norms to fusedops', optionally fusing the ReLU (and the residual
add before it) that follows each one into the batch norm's own elementwise pass:

    relu(bn(x))             -> bn(x)            with bn.activation = "relu"
    relu(bn(x) + identity)  -> bn(x, identity)  with bn.activation = "relu"
"""

import operator
from collections import Counter

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ._autograd import TorchBatchNorm
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, adopt_state
from .errors import ArgumentTypeError, ArgumentValueError

FUSEDOPS_CLASS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
RELUS = {
    ("call_function", F.relu),
    ("call_function", torch.relu),
    ("call_function", torch.relu_),  # F.relu_ too
    ("call_method", "relu"),
    ("call_method", "relu_"),
}
ADDS = {
    ("call_function", operator.add),
    ("call_function", torch.add),
    ("call_method", "add"),
}  # fx records `out += identity` as operator.add


def convert_batchnorm(model: nn.Module, fuse_activations: bool = False) -> nn.Module:
    """Every torch.nn BatchNorm1d/2d/3d in `model` replaced by fusedops' that keeps its parameters, buffers,
    options and mode (the very Parameter and buffer tensors, so an optimizer built before still applies).

    Args:
        model: the torch.nn.Module to convert.
        fuse_activations: False: converts `model` in place and returns it (a new module if `model` is itself
            a batch norm), as torch.nn.SyncBatchNorm.convert_sync_batchnorm.
            True: traces `model` with torch.fx and returns a torch.fx.GraphModule in which each batch norm
            whose output goes only into a ReLU, directly or through an add with another tensor (the identity
            of a residual block) that goes only into the ReLU, computes relu(bn(x) [+ identity]) in one call.
            The identity must then have the batch norm's shape and dtype (no broadcasting, no promotion), as
            in residual blocks. A batch norm module called more than once, or whose output has other uses,
            stays unfused (but converted). `model` itself is left as it is; the GraphModule shares its
            parameters and buffers. A model that torch.fx cannot trace raises.

    Returns:
        The converted model: `model` itself (or the new batch norm) without fusion, a torch.fx.GraphModule
        with it.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"convert_batchnorm: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fuse_activations, bool):
        raise ArgumentTypeError(f"convert_batchnorm: fuse_activations must be a bool, got {fuse_activations!r}")
    return _fused(model) if fuse_activations else _converted(model)


def _converted(module):
    """`module` with its torch batch norms, at any depth, replaced by fusedops' (in place)."""
    if type(module) in FUSEDOPS_CLASS:
        return _rebuilt(module, FUSEDOPS_CLASS[type(module)])
    for name, child in module.named_children():
        module.add_module(name, _converted(child))
    return module


def _rebuilt(module, cls, activation=None):
    """A `cls` batch norm with `module`'s options and mode, holding `module`'s own parameters and buffers."""
    new = cls(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        device="meta",
        bias=module.bias is not None,
        activation=activation,
        unbiased=getattr(module, "unbiased", False),
        backend=getattr(module, "backend", None),
    )
    return adopt_state(new, module)


class _Tracer(torch.fx.Tracer):
    """fx's tracer, with every batch norm (torch's or fusedops') a leaf: one call_module node each."""

    def is_leaf_module(self, m, module_qualified_name):
        return isinstance(m, TorchBatchNorm) or super().is_leaf_module(m, module_qualified_name)


def _fused(model):
    """The GraphModule of `model` with its batch norms converted and, where the graph allows, fused."""
    gm = _traced(model)
    calls = [node for node in gm.graph.nodes if node.op == "call_module"]
    called = Counter(node.target for node in calls)
    for bn in calls:
        module = gm.get_submodule(bn.target)
        cls = FUSEDOPS_CLASS.get(type(module), type(module))
        if cls not in FUSEDOPS_CLASS.values():
            continue
        fusable = called[bn.target] == 1 and getattr(module, "activation", None) is None
        fusion = _fusion(gm, bn) if fusable else None
        if fusion is not None:
            _fuse(gm.graph, bn, *fusion)
        if fusion is not None or cls is not type(module):  # a new module: `model`'s own stay as they are
            gm.set_submodule(bn.target, _rebuilt(module, cls, activation="relu" if fusion else None))
    gm.graph.lint()
    gm.recompile()
    return gm


def _traced(model):
    """`model` as a torch.fx.GraphModule, its batch norms leaves."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise ArgumentValueError(
            f"convert_batchnorm: fuse_activations=True needs a model that torch.fx can trace, and "
            f"{type(model).__name__} cannot be traced ({type(e).__name__}: {e}); convert_batchnorm(model) without "
            f"fusion still converts its batch norms"
        ) from e
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    for name, sub in gm.named_modules():  # the containers GraphModule makes afresh take the model's mode too
        sub.training = model.get_submodule(name).training
    return gm


def _fuse(graph, bn, relu, residual):
    """Rewrites relu(bn(x)) as bn(x), or relu(bn(x) + residual) as bn(x, residual) at the add's place, where
    the residual is read."""
    add = relu.args[0]  # bn itself when there is no residual
    relu.replace_all_uses_with(bn)
    graph.erase_node(relu)
    if residual is not None:
        add.prepend(bn)
        bn.args = (*bn.args, residual)
        graph.erase_node(add)


def _fusion(gm, bn):
    """(relu, residual) when the output of batch-norm call `bn` goes only into a ReLU, directly (residual
    None) or through an add with another node (the residual) that goes only into the ReLU; else None."""
    if len(bn.args) != 1 or bn.kwargs:
        return None
    user = _only_user(bn)
    if user is not None and _is_relu(gm, user, bn):
        return user, None
    residual = _other_addend(user, bn) if user is not None else None
    relu = _only_user(user) if residual is not None else None
    return (relu, residual) if relu is not None and _is_relu(gm, relu, user) else None


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu(gm, node, input):
    """Whether `node` is relu(input) in any spelling: F.relu (inplace or not), torch.relu, Tensor.relu, the
    in-place forms, or a call of an nn.ReLU module."""
    if node.op == "call_module":
        is_relu = type(gm.get_submodule(node.target)) is nn.ReLU
    else:  # F.relu's inplace flag, positional or keyword, is the only other argument any of them takes
        is_relu = (node.op, node.target) in RELUS and set(node.kwargs) <= {"inplace"}
    args = node.args
    return is_relu and len(args) >= 1 and args[0] is input and all(isinstance(a, bool) for a in args[1:])


def _other_addend(node, bn):
    """The other operand when `node` is bn + other (either order) of two nodes, no alpha; else None."""
    if (node.op, node.target) not in ADDS or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    other = b if a is bn else a if b is bn else None
    return other if isinstance(other, torch.fx.Node) and other is not bn else None
