"""Cross-entropy over a vocabulary split across processes (gloo on 127.0.0.1), against one process with the
whole vocabulary (tests/cases' composite: torch's F.cross_entropy plus z-loss, soft-capping and lse).
Every case runs in one group of processes per number of ranks, which returns all its results at once; at
the end the last rank leaves, and the others meet a dead peer."""

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cases.cross_entropy import composite
from processes import GROUP_TIMEOUT_S, run_ok

import fusedops
from fusedops import vocab_parallel
from fusedops._math import REDUCTIONS

V, N, H = 11, 6, 4
SPLITS = {2: [(7, 4)], 3: [(3, 5, 3), (6, 0, 5)]}  # the shards' sizes, in rank order (0: a rank with no class)
OPTIONS = {
    "plain": dict(bias=False),
    "lse": dict(return_lse=True),
    "weight": dict(weight=True),
    "label_smoothing": dict(label_smoothing=0.2),
    "weight, label_smoothing": dict(weight=True, label_smoothing=0.3),
    "z_loss, softcap": dict(z_loss=0.05, softcap=2.0, return_lse=True),
    "ignore_index": dict(weight=True, label_smoothing=0.1, ignore_index=4, ignored=(1, 4)),  # a class ignored
    "all ignored": dict(weight=True, ignored=tuple(range(N))),
    "uint8 targets": dict(weight=True, uint8=True),
    "probabilities": dict(weight=True, label_smoothing=0.1, probabilities=True, return_lse=True),
    "everything": dict(weight=True, label_smoothing=0.2, z_loss=0.05, softcap=2.0, return_lse=True, ignored=(2,)),
}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
# one process's tolerance: sums over the shards add in another order
TOLERANCES = {"fp64": dict(rtol=1e-12, atol=1e-12), "fp32": dict(rtol=1e-5, atol=1e-6)}
# each tensor's dimension of the classes (None: the same on every rank)
SHARDED = {"logits": 1, "weight": 0, "bias": 0, "class_weight": 0, "target": 1, "input": None}


def _problem(name, dtype, linear):
    """The whole vocabulary's leaves (logits, or input, weight and bias; probability targets), target, class
    weight, loss options, and upstream gradients and Hessian directions: the same in every process."""
    options = OPTIONS[name]
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    leaves = dict(input=rand(N, H), weight=rand(V, H), bias=rand(V)) if linear else dict(logits=rand(N, V) * 3)
    if not options.get("bias", True):
        leaves.pop("bias", None)
    ignore_index = options.get("ignore_index", -100)
    if options.get("probabilities"):
        target = leaves["target"] = torch.softmax(rand(N, V), 1)
    else:
        target = torch.randint(0, V, (N,), generator=g)
        target[list(options.get("ignored", ()))] = ignore_index
        target = target.to(torch.uint8) if options.get("uint8") else target
    kwargs = dict(
        ignore_index=ignore_index,
        label_smoothing=options.get("label_smoothing", 0.0),
        z_loss=options.get("z_loss", 0.0),
        softcap=options.get("softcap"),
        return_lse=options.get("return_lse", False),
    )
    class_weight = torch.rand(V, generator=g, dtype=torch.float64).to(dtype) + 0.5 if options.get("weight") else None
    return dict(
        leaves=leaves,
        target=target,
        class_weight=class_weight,
        kwargs=kwargs,
        grad_loss=rand(N),
        grad_lse=rand(N),
        directions={key: rand(*t.shape) for key, t in leaves.items()},
    )


def _shard(t, key, cols):
    dim = SHARDED[key]
    return t if dim is None or t is None else t.narrow(dim, cols.start, cols.stop - cols.start)


def _losses(problem, leaves, cols, reduction, group):
    """(loss, lse or None) of this process's shard `cols` of the classes: split across `group`, or in one process
    over the whole vocabulary (group None: the composite of torch ops)."""
    kwargs, class_weight = problem["kwargs"], _shard(problem["class_weight"], "class_weight", cols)
    target = leaves.get("target", problem["target"])
    if group is None:
        logits = (
            leaves["logits"] if "logits" in leaves else F.linear(leaves["input"], leaves["weight"], leaves.get("bias"))
        )
        out = composite(logits, target, class_weight, reduction, **kwargs)
    elif "logits" in leaves:
        out = fusedops.cross_entropy(
            leaves["logits"], target, class_weight, reduction=reduction, **kwargs, process_group=group, vocab_size=V
        )
    else:
        out = fusedops.linear_cross_entropy(
            leaves["input"],
            leaves["weight"],
            target,
            leaves.get("bias"),
            class_weight=class_weight,
            reduction=reduction,
            **kwargs,
            process_group=group,
            vocab_size=V,
        )
    return out if kwargs["return_lse"] else (out, None)


def _step(problem, cols, reduction, group, hessian=False):
    """The loss, lse and gradients of every leaf (of <loss, grad_loss> + <lse, grad_lse>) on the shard `cols`,
    or with hessian, the Hessian's products with the directions (their sum over the leaves)."""
    leaves = {key: _shard(t, key, cols).detach().clone().requires_grad_() for key, t in problem["leaves"].items()}
    loss, lse = _losses(problem, leaves, cols, reduction, group)
    objective = (loss * (problem["grad_loss"] if reduction == "none" else 1)).sum()
    if lse is not None:
        objective = objective + (lse.to(loss.dtype) * problem["grad_lse"]).sum()
    grads = torch.autograd.grad(objective, list(leaves.values()), create_graph=hessian)
    if hessian:
        directions = [_shard(problem["directions"][key], key, cols) for key in leaves]
        grads = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, directions)), list(leaves.values()))
    return dict(
        loss=loss.detach(), lse=None if lse is None else lse.detach().to(loss.dtype), grads=dict(zip(leaves, grads))
    )


def _columns(sizes, rank):
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def _cases(world):
    """(sizes, options, reduction, dtype, linear) of every case run with `world` ranks."""
    return [
        (sizes, name, reduction, dtype, linear)
        for sizes in SPLITS[world]
        for name in OPTIONS
        for reduction in REDUCTIONS
        for dtype in DTYPES
        for linear in (False, True)
    ]


class _Counted:
    """vocab_parallel's all_reduce, recording each call's (op, element count, dtype)."""

    def __init__(self):
        self.calls, self.all_reduce = [], vocab_parallel.all_reduce

    def __call__(self, tensor, group, name, op="sum"):
        self.calls.append((op, tensor.numel(), tensor.dtype))
        return self.all_reduce(tensor, group, name, op)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _collectives(cols, group):
    """The all-reduces of a forward, a backward and a double backward, fp32, the mean."""
    counted = vocab_parallel.all_reduce = _Counted()
    out = {}
    for name, linear in (("plain", False), ("weight", False), ("probabilities", False), ("plain", True)):
        problem = _problem(name, torch.float32, linear)
        _losses(problem, {key: _shard(t, key, cols) for key, t in problem["leaves"].items()}, cols, "mean", group)
        forward = counted.take()
        _step(problem, cols, "mean", group)
        step = counted.take()
        _step(problem, cols, "mean", group, hessian=True)
        out[name, linear] = dict(
            forward=forward, backward=step[len(forward) :], double_backward=sorted(counted.take()[len(step) :], key=str)
        )
    vocab_parallel.all_reduce = counted.all_reduce
    return out


def _errors(sizes, group):
    """What each bad call raises (the same on every rank), then that the group still works."""
    cols = _columns(sizes, dist.get_rank())
    logits, target = torch.randn(N, V)[:, cols], torch.randint(0, V, (N,))
    input, weight = torch.randn(N, H), torch.randn(V, H)[cols]
    calls = {
        "vocab_size": lambda: fusedops.cross_entropy(logits, target, process_group=group, vocab_size=V + 1),
        "target >= V": lambda: fusedops.cross_entropy(
            logits, target.index_fill(0, torch.tensor([3]), V), process_group=group
        ),
        "target < 0": lambda: fusedops.linear_cross_entropy(
            input, weight, target.index_fill(0, torch.tensor([5]), -1), process_group=group
        ),
        "inplace_backward": lambda: fusedops.cross_entropy(
            logits.requires_grad_(), target, process_group=group, inplace_backward=True
        ),
    }
    out = {}
    for key, call in calls.items():
        try:
            call()
            out[key] = None
        except Exception as e:  # noqa: BLE001  (compared by the test)
            out[key] = (type(e).__name__, str(e))
    module = fusedops.CrossEntropyLoss(process_group=group, vocab_size=V)
    out["after"] = module(logits, target), fusedops.cross_entropy(logits, target, process_group=group)
    head = fusedops.LinearCrossEntropy(H, cols.stop - cols.start, process_group=group, vocab_size=V)
    head.weight.data.copy_(weight)
    out["linear module"] = (
        head(input, target),
        fusedops.linear_cross_entropy(input, weight, target, process_group=group),
    )
    return out


def _rank_cases(rank, world):
    """Every case of `world` ranks on this rank: its results, the Hessian products, torch.func's gradient, the
    collectives counted and the errors."""
    group = dist.group.WORLD
    out = dict(errors=_errors(SPLITS[world][0], group))
    for sizes, name, reduction, dtype, linear in _cases(world):
        out[sizes, name, reduction, dtype, linear] = _step(
            _problem(name, DTYPES[dtype], linear), _columns(sizes, rank), reduction, group
        )
    cols = _columns(SPLITS[world][0], rank)
    for linear in (False, True):
        out["hessian", linear] = _step(_problem("everything", torch.float64, linear), cols, "mean", group, True)
    if world == 2:  # (torch.func's first use imports torch._dynamo: seconds)
        problem = _problem("weight, label_smoothing", torch.float64, False)

        def loss(logits):
            return fusedops.cross_entropy(
                logits, problem["target"], problem["class_weight"][cols], label_smoothing=0.3, process_group=group
            )

        out["torch.func"] = torch.func.grad(loss)(problem["leaves"]["logits"][:, cols])
    out["collectives"] = _collectives(cols, group)
    if rank < world - 1:  # the last rank returns and its process exits: the others then need it
        out["dead peer"] = _without_the_last_rank(group)
    return out


def _without_the_last_rank(group):
    """The error of the split cross-entropy's first collective once the last rank has left, and its delay."""
    start = time.monotonic()
    try:
        fusedops.cross_entropy(torch.randn(N, 3), torch.zeros(N, dtype=torch.long), process_group=group)
    except RuntimeError as e:
        return dict(message=str(e), seconds=time.monotonic() - start)
    return dict(message=None)


def _assert_equal_to_one_process(results, key, sizes, problem, reduction, tol, hessian=False):
    """Every rank's loss, lse and gradients (or Hessian products) of case `key`: one process's, of its shard."""
    one = _step(problem, slice(0, V), reduction, None, hessian)
    expected = [
        dict(one, grads={name: _shard(grad, name, _columns(sizes, rank)) for name, grad in one["grads"].items()})
        for rank in range(len(results))
    ]
    torch.testing.assert_close(
        [result[key] for result in results], expected, **tol, equal_nan=True, msg=lambda message: f"{key}: {message}"
    )


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request, tmp_path_factory):
    """(world, every rank's results of _rank_cases): one group of processes for all the cases."""
    world = request.param
    return world, run_ok(tmp_path_factory.mktemp(f"ranks{world}"), world, _rank_cases)


def test_loss_lse_and_gradients_equal_one_process(ranks):
    """Loss (and lse) on every rank, the gradient of each rank's shard (logits, or weight rows, bias, and
    probability targets), input's whole gradient on every rank: one process's over the whole vocabulary, for
    every option, reduction and dtype, with and without the linear layer, shards of unequal and empty sizes."""
    world, results = ranks
    for key in _cases(world):
        sizes, name, reduction, dtype, linear = key
        _assert_equal_to_one_process(
            results, key, sizes, _problem(name, DTYPES[dtype], linear), reduction, TOLERANCES[dtype]
        )


def test_double_backward_and_torch_func(ranks):
    """The Hessian's products with a direction on every shard, of the cross-entropy and of the linear layer
    with it (their terms across the shards summed), and torch.func.grad: one process's."""
    world, results = ranks
    sizes = SPLITS[world][0]
    for linear in (False, True):
        _assert_equal_to_one_process(
            results,
            ("hessian", linear),
            sizes,
            _problem("everything", torch.float64, linear),
            "mean",
            TOLERANCES["fp64"],
            hessian=True,
        )
    if world == 2:
        problem = _problem("weight, label_smoothing", torch.float64, False)
        whole = _step(problem, slice(0, V), "mean", None)["grads"]["logits"]
        for rank, result in enumerate(results):
            torch.testing.assert_close(result["torch.func"], whole[:, _columns(sizes, rank)], **TOLERANCES["fp64"])


def test_two_collectives_per_forward_none_in_backward(ranks):
    """As fusedops/vocab_parallel.py says: forward, an all_reduce MAX of N + R fp64 values and an all_reduce SUM
    of 3N values (4N for the weighted mean of class indices); backward none but the linear input's gradient
    (N x H); double backward one more all_reduce SUM."""
    world, results = ranks
    maximum = ("max", N + world, torch.float64)
    sums = {rows: ("sum", rows * N, torch.float32) for rows in (3, 4)}
    linear_input = ("sum", N * H, torch.float32)
    for result in results:
        counted = result["collectives"]
        assert counted["plain", False] == dict(forward=[maximum, sums[3]], backward=[], double_backward=[sums[3]])
        assert counted["weight", False] == dict(forward=[maximum, sums[4]], backward=[], double_backward=[sums[4]])
        assert counted["probabilities", False] == dict(
            forward=[maximum, sums[3]], backward=[], double_backward=[sums[3]]
        )
        assert counted["plain", True] == dict(
            forward=[maximum, sums[3]],
            backward=[linear_input],
            double_backward=sorted([sums[3], linear_input], key=str),
        )


def test_bad_arguments_raise_on_every_rank(ranks):
    """vocab_size that the shards do not add up to, a target out of range of all the shards, inplace_backward
    with a split: the same error on every rank, and the group works on."""
    world, results = ranks
    sizes = SPLITS[world][0]
    expected = {
        "vocab_size": (
            "ArgumentValueError",
            f"cross_entropy: vocab_size=12 but the {world} shards' sizes {list(sizes)} add up to 11",
        ),
        "target >= V": (
            "ArgumentIndexError",
            f"cross_entropy: target[3] = 11 is out of range for the 11 classes of the shards of sizes "
            f"{list(sizes)} (argument 'target')",
        ),
        "target < 0": (
            "ArgumentIndexError",
            f"linear_cross_entropy: target[5] = -1 is out of range for the 11 classes of the shards of "
            f"sizes {list(sizes)} (argument 'target')",
        ),
        "inplace_backward": (
            "ArgumentValueError",
            "cross_entropy: inplace_backward=True cannot be used with a process_group that splits "
            "the classes (the gradient comes from autograd there)",
        ),
    }
    for result in results:
        errors = result["errors"]
        assert {key: errors[key] for key in expected} == expected
        module_loss, loss = errors["after"]
        torch.testing.assert_close(module_loss, loss)
        torch.testing.assert_close(*errors["linear module"])
        torch.testing.assert_close(loss, results[0]["errors"]["after"][1])


def test_a_dead_peer_is_a_clear_error_not_a_hang(ranks):
    """Once the last rank's process has exited, the others' next call raises an error that says so, within the
    group's timeout."""
    world, results = ranks
    for result in results[:-1]:
        dead_peer = result["dead peer"]
        assert dead_peer["message"].startswith(
            "cross_entropy: all_reduce over the process group failed: a peer "
            "process may have exited or stalled past the group's timeout"
        )
        assert dead_peer["seconds"] < GROUP_TIMEOUT_S + 5


def test_one_process_is_the_plain_call():
    """Without an initialised process group, the plain call: vocab_size checked against the logits' classes,
    no empty logits."""
    assert not dist.is_initialized()
    logits, target = torch.randn(N, V), torch.randint(0, V, (N,))
    plain = fusedops.cross_entropy(logits, target)
    torch.testing.assert_close(
        fusedops.cross_entropy(logits, target, process_group=object(), vocab_size=V), plain, rtol=0, atol=0
    )
    with pytest.raises(
        fusedops.errors.ArgumentValueError,
        match="cross_entropy: vocab_size=12 but the logits have 11 classes, not split across processes",
    ):
        fusedops.cross_entropy(logits, target, vocab_size=V + 1)
    with pytest.raises(fusedops.errors.ArgumentTypeError, match="cross_entropy: vocab_size must be an int or None"):
        fusedops.cross_entropy(logits, target, vocab_size=11.0)
    with pytest.raises(fusedops.errors.ArgumentEmptyError, match="at least one class when the classes are not split"):
        fusedops.cross_entropy(logits[:, :0], target, process_group=object())
