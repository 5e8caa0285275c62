import os
import traceback

import pytest
import torch
from cases import BACKENDS

from fusedops import reference
from fusedops.makemore import data

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen before triton is
# first imported. With a GPU this process keeps them compiled and collects tests/test_cuda.py alone, which runs
# them natively and runs every other test file in a second process that sees no GPU (under the interpreter).
NATIVE_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not NATIVE_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_ignore_collect(collection_path, config):
    """With a GPU (compiled Triton kernels), every test file but tests/test_cuda.py is left to its second process."""
    if NATIVE_CUDA and collection_path.name.startswith("test_") and collection_path.suffix == ".py":
        return collection_path.name != "test_cuda.py"
    return None


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The kernel a test runs on, each in turn: "cpp" and "triton"."""
    return request.param


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


# Tensor methods that read a value into Python (a host sync on CUDA)
READS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"]
# torch functions that make a tensor of Python values: a host-to-device copy (blocking) for a CUDA tensor
COPIES = ["tensor", "as_tensor"]


class HostReads:
    """The tensor reads and host-to-device copies made from Python inside `with host_reads:`, recorded (then
    done) as (method, where it was called from). A read with triton's interpreter on the stack is the kernel's
    own work (on a GPU, device work) and is not recorded; at triton 3.9 the interpreter makes none of these calls
    anyway."""

    def __init__(self):
        self.reads, self.watching = [], False

    def __enter__(self):
        self.watching = True

    def __exit__(self, *_):
        self.watching = False

    def install(self, setattr=setattr):
        """Replaces the methods of READS and the functions of COPIES by spies (with `setattr`: monkeypatch's
        undoes it after a test)."""
        for name in READS:
            setattr(torch.Tensor, name, self.spy(name, getattr(torch.Tensor, name)))
        for name in COPIES:
            setattr(torch, name, self.spy(name, getattr(torch, name)))

    def spy(self, name, method):
        def read(tensor, *args, **kwargs):
            if self.watching:
                stack = traceback.extract_stack()[:-1]
                if not any(frame.filename.startswith(triton_dir()) for frame in stack):
                    self.reads.append((name, "".join(traceback.format_list(stack[-3:]))))
            return method(tensor, *args, **kwargs)

        return read


@pytest.fixture
def host_reads(monkeypatch):
    """A HostReads spying on every tensor read of READS and every host-to-device copy of COPIES for the test's
    duration."""
    spy = HostReads()
    spy.install(monkeypatch.setattr)
    return spy


def triton_dir():
    """Where triton's own code lives (imported here, after TRITON_INTERPRET is chosen)."""
    import triton

    return os.path.dirname(triton.__file__) + os.sep
