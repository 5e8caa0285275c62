"""The chunked reference: the hand-written backward against autograd, and the functional
cross-entropy and batch norm against PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from fusedops import reference

# the gradients the notebooks show as bit-exact; the rest are equal up to rounding
EXACT = (
    "logprobs",
    "probs",
    "counts_sum_inv",
    "counts_sum",
    "counts",
    "norm_logits",
    "logit_maxes",
    "logits",
    "h",
    "W2",
    "b2",
)
# exactly 0 (batch norm subtracts the batch mean, b1 with it): both sides are rounding noise
ZERO = ("b1",)


# the MLP: hand-written backward vs autograd


def test_first_loss_is_the_notebooks(notebook_batch):
    params, Xb, Yb = notebook_batch
    assert round(reference.forward(params, Xb, Yb)["loss"].item(), 4) == 3.3399  # seed 000's printed loss


@pytest.mark.parametrize("seed,batch_size", [(reference.SEED, 32), (1, 7), (2, 100), (3, 33)])
def test_hand_written_backward_matches_autograd(names_splits, seed, batch_size):
    params, Xb, Yb = reference.notebook_batch(*names_splits[0], batch_size, seed)
    acts = reference.forward(params, Xb, Yb)
    grads = reference.backward(params, acts, Xb, Yb)
    autograd = reference.autograd_grads(params, acts)
    assert set(grads) == set(reference.INTERMEDIATES) | set(reference.PARAMETERS)
    assert list(grads)[: len(EXACT)] == list(EXACT)
    for name, dt in grads.items():
        expected = autograd[name]
        assert dt.shape == expected.shape, name
        if name in ZERO:  # db1 = dhprebn summed over the batch: |rounding| <= n * eps * max |dhprebn|
            bound = batch_size * torch.finfo(dt.dtype).eps * grads["hprebn"].abs().max()
            assert dt.abs().max() <= bound and expected.abs().max() <= bound, (name, dt, expected, bound)
            continue
        assert torch.allclose(dt, expected), reference.format_row(reference.compare(name, dt, expected))
        if name in EXACT:
            assert torch.equal(dt, expected), reference.format_row(reference.compare(name, dt, expected))


def test_compare_row_format():
    row = reference.compare("probs", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    assert row == ("probs", False, False, 0.5)
    expected = "probs           | exact: False | approximate: False | maxdiff: 0.5"
    assert reference.format_row(row) == expected


# cross-entropy vs F.cross_entropy


def logits_and_target(n=16, V=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, V, generator=g)).to(dtype).requires_grad_()
    return logits, torch.randint(0, V, (n,), generator=g)


def loss_and_grad(fn, logits, target, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, target, **kwargs)
    loss.backward(torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=loss.dtype))
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
def test_cross_entropy_matches_torch(dtype, reduction, label_smoothing, ignored):
    logits, target = logits_and_target(dtype=dtype)
    if ignored == "some":
        target[::3] = -100
    elif ignored == "all":
        target[:] = -100
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    loss, grad = loss_and_grad(reference.cross_entropy, logits, target, **kwargs)
    expected_loss, expected_grad = loss_and_grad(F.cross_entropy, logits, target, **kwargs)
    assert loss.dtype == dtype and loss.shape == expected_loss.shape
    if ignored == "all" and reduction == "mean":
        assert loss.isnan() and expected_loss.isnan()
        return
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("targets", ["classes", "probabilities"])
def test_cross_entropy_weights_and_probability_targets_match_torch(reduction, label_smoothing, targets):
    logits, target = logits_and_target(dtype=torch.float64)
    if targets == "probabilities":
        target = torch.softmax(torch.randn_like(logits), 1)
    else:
        target[::3] = -100
    weight = torch.rand(logits.shape[1], dtype=torch.float64) + 0.5
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    loss, grad = loss_and_grad(lambda x, t, **kw: reference.cross_entropy(x, t, weight, **kw), logits, target, **kwargs)
    expected_loss, expected_grad = loss_and_grad(
        lambda x, t, **kw: F.cross_entropy(x, t, weight, **kw), logits, target, **kwargs
    )
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


def test_cross_entropy_other_ignore_index_and_int32_target():
    logits, target = logits_and_target()
    target[1::2] = 3
    kwargs = dict(ignore_index=3, label_smoothing=0.2)
    loss, grad = loss_and_grad(reference.cross_entropy, logits, target.int(), **kwargs)
    expected_loss, expected_grad = loss_and_grad(F.cross_entropy, logits, target, **kwargs)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_entropy_half_precision_computes_in_float32(dtype):
    logits, target = logits_and_target(dtype=dtype)
    loss, grad = loss_and_grad(reference.cross_entropy, logits, target, reduction="sum")
    expected_loss, expected_grad = loss_and_grad(F.cross_entropy, logits.float(), target, reduction="sum")
    assert loss.dtype == grad.dtype == dtype
    torch.testing.assert_close(loss, expected_loss.to(dtype))
    torch.testing.assert_close(grad, expected_grad.to(dtype))


def test_cross_entropy_equals_the_mlp_loss(notebook_batch):
    params, Xb, Yb = notebook_batch
    acts = reference.forward(params, Xb, Yb)
    assert torch.equal(reference.cross_entropy(acts["logits"], Yb), acts["loss"])


def test_cross_entropy_bad_arguments():
    logits, target = logits_and_target()
    with pytest.raises(ValueError, match="reduction"):
        reference.cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="target"):
        reference.cross_entropy(logits, torch.full_like(target, 11))
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        reference.cross_entropy(logits[0], target[0])


# batch norm vs F.batch_norm


@pytest.mark.parametrize("shape", [(32, 6), (8, 6, 5)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_matches_torch(shape, training, affine, dtype):
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(shape, generator=g, dtype=dtype) + 3).requires_grad_()
    C = shape[1]
    weight = torch.randn(C, generator=g, dtype=dtype).requires_grad_() if affine else None
    bias = torch.randn(C, generator=g, dtype=dtype).requires_grad_() if affine else None
    running_mean = torch.randn(C, generator=g, dtype=dtype)
    running_var = torch.rand(C, generator=g, dtype=dtype) + 0.5
    dy = torch.randn(shape, generator=g, dtype=dtype)
    outs = []
    for fn in (reference.batch_norm, F.batch_norm):
        stats = running_mean.clone(), running_var.clone()
        inputs = [t for t in (x, weight, bias) if t is not None]
        y = fn(x, *stats, weight, bias, training=training, momentum=0.3, eps=1e-4)
        outs.append((y, *stats, *torch.autograd.grad(y, inputs, dy)))
    for mine, theirs in zip(*outs):
        torch.testing.assert_close(mine, theirs)


def test_batch_norm_without_running_stats():
    x = torch.randn(10, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(
        reference.batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True)
    )
    with pytest.raises(ValueError, match="running_mean"):
        reference.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="more than 1 value"):
        reference.batch_norm(x[:1, :, :1], None, None, training=True)


def test_unbiased_batch_norm_is_the_notebooks(notebook_batch):
    params, Xb, Yb = notebook_batch
    acts = reference.forward(params, Xb, Yb)
    running_mean, running_var = torch.zeros(64), torch.ones(64)
    hpreact = reference.batch_norm(
        acts["hprebn"],
        running_mean,
        running_var,
        params["bngain"].view(-1),
        params["bnbias"].view(-1),
        training=True,
        momentum=0.001,
        unbiased=True,
    )
    assert torch.equal(hpreact, acts["hpreact"])
    torch.testing.assert_close(running_mean, 0.001 * acts["bnmeani"].view(-1))
    torch.testing.assert_close(running_var, 0.999 + 0.001 * acts["bnvar"].view(-1))
