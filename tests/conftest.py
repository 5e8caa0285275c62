import os

import pytest
import torch

from fusedops import data, reference

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def names():
    """The words of names.txt."""
    return data.load_words(os.path.join(ROOT, "names.txt"))


@pytest.fixture(scope="session")
def names_splits(names):
    """names.txt's ((Xtr, Ytr), (Xval, Yval), (Xte, Yte)), as the notebooks split it."""
    return data.splits(names, data.Vocab(names))


@pytest.fixture
def notebook_batch(names_splits):
    """The notebooks' parameters and first minibatch of 32 (seed 2147483647)."""
    return reference.notebook_batch(*names_splits[0])
