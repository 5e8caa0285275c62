"""Helpers of the autograd Functions, and every use of PyTorch's private API in the library, so that a
PyTorch release that moves one is fixed here."""

import torch
from torch.nn.modules import batchnorm

TorchBatchNorm = batchnorm._BatchNorm  # the base of torch's BatchNorm*d, SyncBatchNorm and fusedops' layers


def functorch_active():
    """Whether a torch.func transform (grad, vmap, jvp, ...) is running."""
    return torch._C._are_functorch_transforms_active()


def legacy_reduction(size_average, reduce):
    """The reduction string of the deprecated size_average and reduce arguments, as torch's losses take them."""
    return torch.nn._reduction.legacy_get_string(size_average, reduce)


def assert_async(condition, message):
    """Raises `message` when the 0-d tensor `condition` is false, without reading it on the host."""
    torch._assert_async(condition, message)


def functional_all_reduce(tensor, op, group_name):
    """torch.distributed's functional all_reduce (traced by torch.compile), waited on."""
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(tensor, op, group_name))


def batched_first(t, dim, size):
    """For a vmap rule: the tensor with its mapped dimension first (expanded when it has none)."""
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def add_grads(a, b):
    """a + b, where None is a gradient not taken yet."""
    return b if a is None else a + b


def keeps_graph():
    """Whether the running backward pass keeps the graph (retain_graph): a saved tensor can be asked
    for again."""
    try:
        return torch._C._autograd._get_current_graph_task_keep_graph()
    except RuntimeError:  # not called by the autograd engine
        return True


def consumable(create_graph):
    """Whether backward may scale its saved gradients in place (cross_entropy_scale_grad) and hand them out:
    nothing can ask for them again (no create_graph, no retain_graph), and neither torch.compile nor a
    torch.func transform runs (they take the out-of-place product)."""
    return not (create_graph or torch.compiler.is_compiling() or functorch_active() or keeps_graph())


def fast_apply(function):
    """`function.apply` without the per-call cost of torch.autograd.Function.apply, which binds default
    arguments with inspect.signature on every call when setup_context is defined (tens of us at the
    notebooks' sizes). Every argument must be passed positionally. Under torch.func transforms the full
    apply runs; while torch.compile traces, that of a subclass without the custom jvp, which Dynamo
    refuses to trace (forward-mode AD is not traced anyway)."""
    base_apply = super(torch.autograd.Function, function).apply  # the C++ apply of _FunctionBase
    full_apply = function.apply
    traced = type(function.__name__, (function,), {"jvp": torch.autograd.Function.jvp})

    def apply(*args):
        if torch.compiler.is_compiling():
            return traced.apply(*args)
        if functorch_active():
            return full_apply(*args)
        return base_apply(*args)

    return apply
