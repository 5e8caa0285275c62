"""The main job: the notebooks' MLP trained with fusedops layers, by the command line and by parts."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import names_file

from fusedops import reference
from fusedops.makemore import cli
from fusedops.makemore import model as makemore
from fusedops.makemore.data import Vocab


@pytest.fixture(scope="module")
def small_split(names_splits):
    (Xtr, Ytr), _, _ = names_splits
    return Xtr[:5000], Ytr[:5000]


def twin_models(**kwargs):
    """Two models with the notebooks' initialisation from the same seed."""
    return [makemore.MLP(generator=torch.Generator().manual_seed(reference.SEED), **kwargs) for _ in range(2)]


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fusedops", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_short_run_end_to_end(tmp_path, names):
    (tmp_path / "names.txt").write_text("\n".join(names[:3000]) + "\n")
    out = run_cli("train", "--data", "names.txt", "--steps", "400", "--out", "run", "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    run = report["runs"]["fusedops"]
    losses = run["losses"]
    assert len(losses) == 400 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50 - 0.3  # it learns
    assert all(math.isfinite(run[k]) for k in ("train", "val", "test", "ms_per_step"))
    assert len(run["samples"]) == 20 and f"{run['val']:.4f}" in out.stdout


def test_manual_backward_gradients_equal_autograd(small_split):
    X, Y = small_split
    manual, auto = twin_models()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ix = torch.randint(0, len(X), (32,), generator=g)
        loss_m, grads_m = makemore.manual_step(manual, X[ix], Y[ix])
        loss_a, grads_a = makemore.autograd_step(auto, X[ix], Y[ix])
        torch.testing.assert_close(loss_m, loss_a)
        for (name, _), gm, ga in zip(auto.named_parameters(), grads_m, grads_a):
            torch.testing.assert_close(gm, ga, msg=name)
        for model, grads in ((manual, grads_m), (auto, grads_a)):
            with torch.no_grad():
                torch._foreach_add_(list(model.parameters()), grads, alpha=-0.1)
    for name, buffer in auto.bn.named_buffers():
        torch.testing.assert_close(getattr(manual.bn, name), buffer, msg=name)


def test_manual_backward_needs_fusedops_layers(small_split, tmp_path):
    X, Y = small_split
    model = makemore.MLP(layers="torch")
    with pytest.raises(ValueError, match="fusedops layers"):
        makemore.manual_step(model, X[:32], Y[:32])
    out = run_cli("train", "--layers", "torch", "--manual-backward", "--steps", "1", cwd=tmp_path)
    assert out.returncode != 0 and "needs --layers fusedops" in out.stderr


def test_fusedops_and_torch_layers_give_the_same_losses(small_split):
    X, Y = small_split
    runs = {}
    for layers in makemore.LAYERS:
        g = torch.Generator().manual_seed(reference.SEED)
        model = makemore.MLP(layers=layers, generator=g)
        runs[layers], _ = makemore.train(model, X, Y, steps=100, batch_size=32, lr=0.1, generator=g, progress=False)
    assert max(abs(a - b) for a, b in zip(runs["fusedops"], runs["torch"])) < 1e-4


def test_sampling_is_deterministic_and_in_the_vocabulary(names_splits):
    vocab = Vocab([chr(c) for c in range(ord("a"), ord("z") + 1)])
    model = makemore.MLP(generator=torch.Generator().manual_seed(1))
    first = makemore.sample(model, vocab.itos, count=10, seed=5)
    assert first == makemore.sample(model, vocab.itos, count=10, seed=5)
    assert first != makemore.sample(model, vocab.itos, count=10, seed=6)
    assert all(set(name) <= set(vocab.itos[1:]) for name in first)


@pytest.mark.parametrize(
    "content,message", [(None, "cannot read the data file"), ("anna\nbob.by\n", "'bob.by' contains '.'")]
)
def test_bad_data_is_a_clear_error(tmp_path, content, message):
    if content is not None:
        (tmp_path / "words.txt").write_text(content)
    out = run_cli("train", "--data", "words.txt", "--steps", "1", cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_check_compares_the_fused_gradients_with_the_hand_written_ones(capsys):
    assert cli.main(["check", "--data", names_file()]) == 0
    rows = {line.split("|")[0].strip(): line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(reference.INTERMEDIATES) | set(reference.PARAMETERS) | {"fused dlogits", "fused dhprebn"}
    for name in ("fused dlogits", "fused dhprebn"):
        assert "approximate: True" in rows[name]
        assert float(rows[name].split("maxdiff:")[1]) < 1e-6


def test_backends_are_cpp_and_triton(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--backend", "triton"]).backend == "triton"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--backend", "reference"])
    assert "invalid choice: 'reference'" in capsys.readouterr().err
