import os

import pytest
import torch

from fusedops import reference
from fusedops.makemore import data

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loss_and_grad(fn, logits, target, grad_output=None, **kwargs):
    """fn(logits, target, **kwargs) and d(loss . grad_output)/dlogits on a fresh leaf."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, target, **kwargs)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), x.grad


def forward_and_grads(fn, x, params, grad_out):
    """fn(x, *params) and the gradients of <fn(x, *params), grad_out> w.r.t. x and every param,
    all on fresh leaves (None for a None param)."""
    x = x.detach().clone().requires_grad_()
    params = [None if p is None else p.detach().clone().requires_grad_() for p in params]
    y = fn(x, *params)
    leaves = [x] + [p for p in params if p is not None]
    grads = iter(torch.autograd.grad(y, leaves, grad_out))
    return y.detach(), [next(grads)] + [None if p is None else next(grads) for p in params]


def assert_all_close(actual, expected, **tol):
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, **tol)


def names_file():
    """names.txt as the main job finds it (data.locate: the working directory, the repository's root, the user's
    cache, else downloaded and checked against its sha256), so that a clone without the data beside it runs too."""
    return data.locate(progress=False)


@pytest.fixture(scope="session")
def names():
    """The words of names.txt."""
    return data.load_words(names_file())


@pytest.fixture(scope="session")
def names_splits(names):
    """names.txt's ((Xtr, Ytr), (Xval, Yval), (Xte, Yte)), as the notebooks split it."""
    return data.splits(names, data.Vocab(names))


@pytest.fixture
def notebook_batch(names_splits):
    """The notebooks' parameters and first minibatch of 32 (seed 2147483647)."""
    return reference.notebook_batch(*names_splits[0])
