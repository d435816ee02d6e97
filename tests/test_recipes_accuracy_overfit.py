"""Quick runs of the Section 5.1 and 5.2 recipes, checked against the paper's qualitative claims.

Each recipe is run in-process through its ``main([...])`` exactly as ``python recipes/x.py --quick``
would run it; the assertions read the results.json it writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bilevel
from tests.recipe_helpers import load_recipe, write_cifar_batch, write_idx

accuracy = load_recipe("hypergradient_accuracy")
overfit = load_recipe("overfit_validation")


def _read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------- hypergradient_accuracy (5.1)


def test_accuracy_the_core_runs_alone_on_tiny_data():
    """The page's code on a random 3-feature regression: w* to stationarity, then the curves."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, generator=gen), torch.randn(30, generator=gen)
    torch.manual_seed(0)
    model = accuracy.make_model("mlp", 3, 2)  # 3·2 + 2 + 2 + 1 = 11 weights
    params = {k: v.detach() for k, v in model.named_parameters()}
    hparams = {k: math.log(0.1) + torch.randn(v.shape, generator=gen) for k, v in params.items()}
    train_loss, val_loss = accuracy.make_losses(model)
    w, grad_norm = accuracy.solve_inner(train_loss, params, hparams, (x[:15], y[:15]))
    assert grad_norm < 1e-10 and set(w) == set(params)
    statuses = []
    steps = list(range(1, 13))
    curves = accuracy.accuracy_curves(
        train_loss, val_loss, w, hparams, (x[:15], y[:15]), (x[15:], y[15:]), steps, lambda **s: statuses.append(s)
    )
    assert [s["k"] for s in statuses] == steps
    assert len(curves["cosine"]["neumann"]) == len(curves["l2"]["cg"]) == 12
    assert len(curves["cosine"]["nystrom"]) == 11  # the rank stops at the number of weights
    # CG on 11 weights is exact after 11 iterations; Nyström at full rank applies (H + ρI)⁻¹.
    assert curves["cosine"]["cg"][10] > 1 - 1e-9 and curves["l2"]["cg"][10] < 1e-8 * curves["_exact_norm"]
    assert curves["cosine_identity"] == pytest.approx(curves["cosine"]["neumann"][0], abs=1e-12)
    assert curves["_alpha"] > 0 and curves["_nystrom_damping"] > 0


@pytest.fixture(scope="module")
def accuracy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hypergradient_accuracy")
    returned = accuracy.main(["--quick", "--device", "cpu", "--out", str(out)])
    return out, returned


def test_accuracy_results_have_exactly_the_documented_keys(accuracy_run):
    out, returned = accuracy_run
    results = _read(out)
    assert set(results) == {"steps", "cosine", "l2", "cosine_identity"}
    assert set(results["cosine"]) == set(results["l2"]) == {"neumann", "cg", "nystrom"}
    n = len(results["steps"])
    assert results["steps"] == list(range(1, n + 1)) and n >= 10
    for curve in (*results["cosine"].values(), *results["l2"].values()):
        # Nyström's rank stops at the number of weights (49 in the quick run, more than its 30 steps)
        assert len(curve) == n and all(isinstance(v, float) for v in curve)
    assert json.loads(json.dumps(returned)) == results  # main() returns what it wrote
    for png in ("fig3_hypergradient_accuracy.png", "fig4_inverse_hessian.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_curves_rise_and_cg_reaches_exact(accuracy_run):
    results = _read(accuracy_run[0])
    neumann, cg = results["cosine"]["neumann"], results["cosine"]["cg"]
    # More Neumann terms / CG iterations point the hypergradient closer to the exact one.
    assert neumann[-1] > neumann[0] + 0.1
    assert cg[-1] > cg[0] + 0.1
    assert cg[-1] > 0.99 and max(cg) > 0.99
    # With α = 1/λ_max the Neumann error in H⁻¹v shrinks with every term; so does the distance.
    l2_neumann, l2_cg = results["l2"]["neumann"], results["l2"]["cg"]
    assert l2_neumann[-1] < l2_neumann[0]
    # CG on this 49-weight problem converges: its distance to Exact falls by orders of magnitude.
    assert l2_cg[-1] < 1e-3 * l2_cg[0]
    # Identity(α) is the one-term Neumann series with the same α.
    assert results["cosine_identity"] == pytest.approx(neumann[0], abs=1e-12)


def test_accuracy_bad_flags_are_clear(capsys):
    with pytest.raises(SystemExit) as exc:
        accuracy.main(["--quick", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.main(["--quick", "--model", "resnet"])
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        accuracy.main(["--quick", "--steps", "0"])
    assert "--steps 0" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", [accuracy, overfit], ids=["hypergradient_accuracy", "overfit_validation"])
def test_device_flag_is_validated(recipe, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="--device 'nonsense'"):
        recipe.main(["--quick", "--device", "nonsense", "--out", str(tmp_path)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        recipe.main(["--quick", "--device", "cuda", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------- overfit_validation (5.2)


@pytest.mark.parametrize("kind", ["linear", "bncnn"])
def test_overfit_the_core_runs_alone_on_tiny_data(kind):
    """tune_decays (the page's code) on 12 random 8×8 images of 3 classes: no dataset, no CLI run."""
    gen = torch.Generator().manual_seed(0)
    train = (torch.rand(12, 1, 8, 8, generator=gen), torch.arange(12) % 3)
    val = (torch.rand(12, 1, 8, 8, generator=gen), torch.arange(12) % 3)
    args = overfit.parse_args(["--steps", "6", "--inner-steps", "3", "--outer-lr", "0.1"])
    args.world = 1
    torch.manual_seed(0)
    fm = bilevel.FunctionalModule(overfit.make_model(kind, (1, 8, 8), 3))
    start = {k: v.clone() for k, v in fm.state.items()}
    results = []
    opt = overfit.tune_decays(fm, train, val, args, lambda opt, result: results.append(result))
    assert len(results) == 6 and opt.hypersteps == 2 and opt.skipped_outer_steps == 0
    hypers = [r.hyper for r in results if r.hyper is not None]
    assert len(hypers) == 2 and all(math.isfinite(float(h.val_loss)) for h in hypers)
    assert all(math.isfinite(float(r.loss)) for r in results)
    # one log-decay per weight, all started at --init-decay and moved by the hypergradient
    assert {k: v.shape for k, v in opt.hparams.items()} == {k: v.shape for k, v in fm.params.items()}
    moved = torch.cat([(h - math.log(args.init_decay)).abs().flatten() for h in opt.hparams.values()])
    assert float(moved.max()) > 1e-3
    if kind == "bncnn":  # the inner steps update BatchNorm's running statistics
        assert any(not torch.equal(opt.state[k], start[k]) for k in start if k.endswith("running_mean"))


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit_validation")
    returned = overfit.main(["--quick", "--device", "cpu", "--out", str(out)])
    return out, returned


def test_overfit_results_have_exactly_the_documented_keys(overfit_run):
    out, returned = overfit_run
    results = _read(out)
    assert set(results) == {"models"}
    assert set(results["models"]) == {"linear", "mlp", "cnn", "bncnn"}
    for summary in results["models"].values():
        assert set(summary) == {"train_acc", "val_acc", "test_acc", "n_hparams"}
    assert json.loads(json.dumps(returned)) == results
    # One decay per weight and bias of: Linear(64, 10); 64-64-10 MLP; the LeNet-style CNN.
    assert results["models"]["linear"]["n_hparams"] == 64 * 10 + 10
    assert results["models"]["mlp"]["n_hparams"] == 64 * 64 + 64 + 64 * 10 + 10
    cnn = (1 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (16 * 2 * 2 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert results["models"]["cnn"]["n_hparams"] == cnn
    assert results["models"]["bncnn"]["n_hparams"] == cnn + 2 * (6 + 16)  # + BatchNorm scales and shifts
    assert (out / "fig10_overfit_validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overfit_validation_accuracy_rises_and_test_stays_below(overfit_run):
    out, _ = overfit_run
    results = _read(out)
    history = json.loads((out / "history.json").read_text())
    for kind, summary in results["models"].items():
        val_err = history[kind]["val_err"]
        assert summary["val_acc"] == pytest.approx(1.0 - val_err[-1])
        assert val_err[-1] < val_err[0] - 0.5, kind  # from chance (~0.9 error) to a fitted model
        assert summary["test_acc"] < summary["val_acc"], kind  # the validation set is overfit
        assert summary["train_acc"] == 1.0, kind  # 50 training images are easy to fit


def test_overfit_gain_comes_from_the_hyperparameters(overfit_run, tmp_path):
    """Same run with the decays frozen (--outer-lr 0): validation accuracy ends lower."""
    tuned = _read(overfit_run[0])["models"]
    frozen = overfit.main(["--quick", "--models", "linear,mlp", "--outer-lr", "0", "--out", str(tmp_path)])["models"]
    for kind in ("linear", "mlp"):
        assert tuned[kind]["val_acc"] > frozen[kind]["val_acc"], kind


def test_overfit_bad_flags_are_clear(capsys, tmp_path):
    with pytest.raises(SystemExit):
        overfit.main(["--quick", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        overfit.main(["--quick", "--models", "linear,resnet"])
    assert "--models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        overfit.main(["--quick", "--dataset", "imagenet"])
    assert "--dataset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--data-dir"):
        overfit.main(["--quick", "--dataset", "mnist", "--out", str(tmp_path)])


def test_overfit_runs_on_mnist_idx_files(tmp_path):
    """--dataset mnist reads the four IDX files; 28×28 inputs give 7 850 decays for the linear model."""
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist"
    data.mkdir()
    for prefix, n in (("train", 120), ("t10k", 30)):
        labels = np.arange(n) % 10
        write_idx(data / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress=True)
        write_idx(data / f"{prefix}-labels-idx1-ubyte", labels, compress=True)
    out = tmp_path / "out"
    args = ["--dataset", "mnist", "--data-dir", str(data), "--models", "linear", "--steps", "20", "--out", str(out)]
    results = overfit.main(args)
    summary = results["models"]["linear"]
    assert summary["n_hparams"] == 28 * 28 * 10 + 10
    assert all(0.0 <= summary[k] <= 1.0 for k in ("train_acc", "val_acc", "test_acc"))
    history = json.loads((out / "history.json").read_text())
    assert len(history["linear"]["test_err"]) == 3  # initial point + hypersteps 1 and 2


def test_overfit_runs_on_cifar10_pickle_batches(tmp_path):
    """--dataset cifar10 reads the python pickle batches: 3×32×32 inputs, 30 730 decays for linear."""
    rng = np.random.default_rng(0)
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    for name, n in [*((f"data_batch_{i}", 20) for i in range(1, 6)), ("test_batch", 20)]:
        write_cifar_batch(data / name, rng.integers(0, 256, (n, 3 * 32 * 32)), list(np.arange(n) % 10))
    out = tmp_path / "out"
    args = [
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tmp_path),
        "--models",
        "linear",
        "--steps",
        "10",
        "--out",
        str(out),
    ]
    summary = overfit.main(args)["models"]["linear"]
    assert summary["n_hparams"] == 3 * 32 * 32 * 10 + 10
    assert (out / "fig10_overfit_validation.png").exists()


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)], ids=["digits", "mnist", "cifar10"])
def test_overfit_models_fit_every_dataset_shape(shape):
    x = torch.rand(4, *shape)
    for kind in ("linear", "mlp", "cnn"):
        assert overfit.make_model(kind, shape, 10)(x).shape == (4, 10)


def test_overfit_rejects_too_few_images_per_class(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    for prefix, n in (("train", 50), ("t10k", 10)):  # 5 per class: not enough for 5 train + 5 val
        write_idx(data / f"{prefix}-images-idx3-ubyte", np.zeros((n, 28, 28)), compress=True)
        write_idx(data / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress=True)
    with pytest.raises(ValueError, match="needs >= 10 training images"):
        overfit.main(["--dataset", "mnist", "--data-dir", str(data), "--out", str(tmp_path / "out")])
