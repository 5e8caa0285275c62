"""Every layer in one model (BatchNorm2d with its fused residual and relu): training steps under
torch.compile(fullgraph=True, dynamic=True) as eager, in one graph; the ops called from two Python
threads at once give each thread its own results."""

import threading

import pytest
import torch
from torch import nn

import fusedops


class Model(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.input = nn.Linear(6, 16)
        self.bn2d = fusedops.BatchNorm2d(4, activation="relu", backend=backend)  # relu(bn(h) + h) on (n, 4, 2, 2)
        self.net = nn.Sequential(fusedops.BatchNorm1d(16, backend=backend), nn.Tanh(), nn.Linear(16, 9))
        self.loss = fusedops.CrossEntropyLoss(label_smoothing=0.1, inplace_backward=True, backend=backend)

    def forward(self, x, y):
        h = self.input(x).view(-1, 4, 2, 2)
        return self.loss(self.net(self.bn2d(h, h).flatten(1)), y)


def train(model, step, batches):
    """SGD steps of step(x, y) over the batches: the losses, then every parameter and buffer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = step(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses + [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("backend,compiler", [("cpp", "aot_eager"), ("cpp", "inductor")])  # Triton: test_cuda.py
def test_compiled_training_with_dynamic_shapes_is_one_graph_and_matches_eager(backend, compiler):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 6, generator=g), torch.randint(0, 9, (n,), generator=g)) for n in (8, 13, 21, 5)]
    torch.manual_seed(0)
    eager = Model(backend)
    torch.manual_seed(0)
    compiled = Model(backend)
    explanation = torch._dynamo.explain(compiled)(*batches[0])
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled.load_state_dict(eager.state_dict())  # explain ran a training-mode forward
    step = torch.compile(compiled, fullgraph=True, dynamic=True, backend=compiler)
    for ours, theirs in zip(train(compiled, step, batches), train(eager, eager, batches), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)  # fp32 sums in other orders


def test_two_threads_at_once():
    """Each thread runs cross-entropy and batch norm forward and backward on its own tensors, repeatedly;
    every result equals the one computed alone. (The C++ kernels: Triton's interpreter, the Triton backend
    on CPU tensors, keeps its launch state in globals and runs one launch at a time.)"""
    g = torch.Generator().manual_seed(1)
    rounds = 30
    work = [
        {
            "logits": torch.randn(n, v, generator=g),
            "target": torch.randint(0, v, (n,), generator=g),
            "x": torch.randn(n, c, generator=g),
            "dy": torch.randn(n, c, generator=g),
        }
        for n, v, c in [(256, 1000, 64), (97, 301, 13)]
    ]
    start = threading.Barrier(len(work))

    def run(w):
        logits = w["logits"].clone().requires_grad_()
        loss = fusedops.cross_entropy(logits, w["target"], backend="cpp")
        loss.backward()
        x = w["x"].clone().requires_grad_()
        y = fusedops.batch_norm(x, None, None, training=True, backend="cpp")
        y.backward(w["dy"])
        return [loss.detach(), logits.grad, y.detach(), x.grad]

    alone = [run(w) for w in work]
    results, errors = [[] for _ in work], []

    def thread_main(i):
        try:
            start.wait()
            for _ in range(rounds):
                results[i].append(run(work[i]))
        except Exception as e:  # noqa: BLE001  (handed to the test, which asserts on it)
            errors.append(e)

    threads = [threading.Thread(target=thread_main, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for expected, got in zip(alone, results, strict=True):
        assert len(got) == rounds
        for result in got:
            for a, e in zip(result, expected, strict=True):
                assert torch.equal(a, e)
