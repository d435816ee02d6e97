"""Quick runs of the hyper-cleaning and learning-rate recipes, and checks of their helpers.

Each recipe is run in-process through its ``main([...])`` exactly as ``python recipes/x.py --quick``
would run it (once per module); the assertions read the results.json it writes. Each recipe's core
(the code its page shows) also runs alone on tiny synthetic data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.recipe_helpers import load_recipe, write_idx

cleaning = load_recipe("hypercleaning")
rates = load_recipe("learning_rates")
PNG = b"\x89PNG\r\n\x1a\n"


def _read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _quick_run(recipe, tmp_path_factory) -> tuple[Path, dict]:
    """``python recipes/NAME.py --quick`` in-process: its --out folder and what main() returned."""
    out = tmp_path_factory.mktemp(recipe.NAME)
    return out, recipe.main(["--quick", "--device", "cpu", "--out", str(out)])


@pytest.fixture(scope="module")
def cleaning_run(tmp_path_factory):
    return _quick_run(cleaning, tmp_path_factory)


@pytest.fixture(scope="module")
def rates_run(tmp_path_factory):
    return _quick_run(rates, tmp_path_factory)


@pytest.mark.parametrize("run", ["cleaning_run", "rates_run"])
def test_main_returns_what_it_wrote(run, request):
    out, returned = request.getfixturevalue(run)
    assert json.loads(json.dumps(returned)) == _read(out)


# ---------------------------------------------------------------------------------- hypercleaning


def test_cleaning_results_have_the_documented_keys(cleaning_run):
    out = cleaning_run[0]
    results = _read(out)
    assert {"test_acc", "detection", "strategies", "headline"} <= set(results)
    assert results["headline"] == {"model": "linear", "strategy": "neumann"}
    test_acc, detection = results["test_acc"], results["detection"]
    for key in ("unweighted", "cleaned", "oracle"):
        assert 0.0 <= test_acc[key] <= 1.0
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= detection[key] <= 1.0
    linear = test_acc["models"]["linear"]
    # The headline numbers are the first model's, first strategy's.
    assert test_acc["cleaned"] == linear["cleaned"]["neumann"] and test_acc["oracle"] == linear["oracle"]
    assert detection["f1"] == detection["models"]["linear"]["neumann"]["f1"]
    for kind in ("linear", "mlp"):
        assert set(results["strategies"][kind]) == {"neumann", "cg"}
        for summary in results["strategies"][kind].values():
            assert math.isfinite(summary["wall_time_s"]) and summary["hvps_per_hyperstep"] > 0
    assert results["n_hparams"] == results["sizes"]["train"]
    assert results["n_corrupted"] == round(0.5 * results["n_hparams"])
    for png in ("hypercleaning_weights.png", "hypercleaning_accuracy.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_cleaning_beats_unweighted_and_finds_the_corrupted_labels(cleaning_run):
    results = _read(cleaning_run[0])
    for kind, accs in results["test_acc"]["models"].items():
        for name, cleaned in accs["cleaned"].items():
            assert accs["unweighted"] < cleaned <= accs["oracle"] + 0.02, (kind, name)
            assert results["detection"]["models"][kind][name]["f1"] > 0.7, (kind, name)


def test_corruption_moves_an_exact_fraction_to_other_classes():
    y = torch.arange(1000) % 10
    noisy, corrupted = cleaning.corrupt_labels(y, 0.3, 10, torch.Generator().manual_seed(0))
    assert int(corrupted.sum()) == 300
    assert bool((noisy[corrupted] != y[corrupted]).all())  # never the true label
    assert torch.equal(noisy[~corrupted], y[~corrupted])
    assert set(((noisy[corrupted] - y[corrupted]) % 10).tolist()) == set(range(1, 10))  # every other class
    again = cleaning.corrupt_labels(y, 0.3, 10, torch.Generator().manual_seed(0))
    other = cleaning.corrupt_labels(y, 0.3, 10, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], noisy) and torch.equal(again[1], corrupted)
    assert not torch.equal(other[1], corrupted)
    assert int(cleaning.corrupt_labels(y, 0.0, 10, torch.Generator())[1].sum()) == 0
    assert int(cleaning.corrupt_labels(y[:7], 0.5, 10, torch.Generator())[1].sum()) == round(3.5)
    with pytest.raises(ValueError, match="fraction"):
        cleaning.corrupt_labels(y, 1.5, 10, torch.Generator())


def test_detection_scores_on_a_hand_made_example():
    weights = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.4])
    corrupted = torch.tensor([True, True, False, False, True])
    # flagged (< 0.5): examples 0, 2, 4; of those, 0 and 4 are corrupted; corrupted ones: 0, 1, 4
    scores = cleaning.detection_scores(weights, corrupted)
    assert scores == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "flagged": 3})
    nothing = cleaning.detection_scores(torch.ones(5), corrupted)
    assert nothing == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "flagged": 0}
    perfect = cleaning.detection_scores(torch.where(corrupted, 0.0, 1.0), corrupted)
    assert perfect["f1"] == 1.0


def test_cleaning_reads_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist"
    data.mkdir()
    for prefix, n in (("train", 100), ("t10k", 30)):
        write_idx(data / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress=True)
        write_idx(data / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress=True)
    out = tmp_path / "out"
    flags = ["--val-per-class", "2", "--n-train", "40", "--hypersteps", "2", "--inner-steps", "2"]
    results = cleaning.main(
        ["--dataset", "mnist", "--data-dir", str(data), "--models", "linear", *flags, "--out", str(out)]
    )
    assert results["sizes"] == {"train": 40, "val": 20, "test": 30}
    assert results["n_hparams"] == 40 and results["n_corrupted"] == 20
    assert set(results["test_acc"]["models"]["linear"]["cleaned"]) == {"neumann", "cg"}
    with pytest.raises(ValueError, match="--n-train 100"):
        cleaning.main(
            [
                "--dataset",
                "mnist",
                "--data-dir",
                str(data),
                "--val-per-class",
                "2",
                "--n-train",
                "100",
                "--out",
                str(out),
            ]
        )


def test_cleaning_too_many_validation_images_is_clear(tmp_path):
    with pytest.raises(ValueError, match="--val-per-class 500"):
        cleaning.main(["--quick", "--val-per-class", "500", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------- learning rates


def test_rates_results_have_the_documented_keys(rates_run):
    out = rates_run[0]
    results = _read(out)
    assert {"test_acc", "learning_rates"} <= set(results)
    assert set(results["test_acc"]) == {"tuned", "best_fixed", "grid"}
    assert set(results["test_acc"]["grid"]) == {"0.01", "0.1", "1"}
    best = results["best_fixed_lr"]
    assert results["test_acc"]["best_fixed"] == results["test_acc"]["grid"][f"{best:g}"]
    # chosen on validation accuracy, not on test
    assert results["val_acc"]["grid"][f"{best:g}"] == max(results["val_acc"]["grid"].values())
    trajectory = results["learning_rates"]
    assert set(trajectory["lr"]) == set(trajectory["momentum"]) == {"layer1", "layer2", "layer3"}
    n = results["steps"] // 10 + 1  # the start and one point per hyperstep (Unroll(10), 10 steps each)
    assert trajectory["step"] == list(range(0, results["steps"] + 1, 10)) and len(trajectory["step"]) == n
    for name in ("layer1", "layer2", "layer3"):
        assert len(trajectory["lr"][name]) == len(trajectory["momentum"][name]) == n
        assert trajectory["lr"][name][0] == pytest.approx(0.01) and trajectory["momentum"][name][0] == pytest.approx(
            0.9
        )
    for png in ("learning_rates_trajectory.png", "learning_rates_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_rates_are_tuned_upwards_from_a_small_start(rates_run):
    """From 0.01, far below the grid's best 0.1, the hypergradient raises every layer's rate."""
    results = _read(rates_run[0])
    for name, curve in results["learning_rates"]["lr"].items():
        assert curve[-1] > 2 * curve[0], name
    assert results["test_acc"]["tuned"] > results["test_acc"]["grid"]["0.01"]  # better than where it started
    assert results["test_acc"]["grid"]["1"] < 0.5  # lr 1 with momentum 0.9 diverges: the grid has a bad end


def test_per_layer_sgd_matches_torch_sgd_with_one_rate():
    """With every layer at the same rate and momentum, the transformation is torch.optim.SGD(momentum)."""
    gen = torch.Generator().manual_seed(0)
    params = {"a.weight": torch.randn(3, 2, generator=gen), "a.bias": torch.randn(3, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(3)]
    sgd = rates.per_layer_sgd(torch.tensor([0.1]), torch.tensor([0.9]), {"a.weight": 0, "a.bias": 0})
    state, ours = sgd.init(params), dict(params)
    reference = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_sgd = torch.optim.SGD(reference.values(), lr=0.1, momentum=0.9)
    for g in grads:
        updates, state = sgd.update(g, state)
        ours = {k: ours[k] + updates[k] for k in ours}
        for k, p in reference.items():
            p.grad = g[k].clone()
        torch_sgd.step()
    for k in params:
        torch.testing.assert_close(ours[k], reference[k].detach(), rtol=0, atol=1e-15)


BAD_FLAGS = [
    (cleaning, ["--models", "linear,resnet"], "--models"),
    (cleaning, ["--strategies", "neumann,exact"], "--strategies"),
    (cleaning, ["--corruption", "1.0"], "--corruption 1.0"),
    (cleaning, ["--cg-damping", "-1"], "--cg-damping -1"),
    (cleaning, ["--n-train", "0"], "--n-train 0"),
    (cleaning, ["--outer-lr", "nan"], "--outer-lr nan"),
    (cleaning, ["--dataset", "mnist"], "--data-dir"),
    (cleaning, ["--dataset", "imagenet"], "--dataset"),
    (rates, ["--grid", "0.1,abc"], "--grid"),
    (rates, ["--grid", "0,0.1"], "--grid"),
    (rates, ["--init-momentum", "1"], "--init-momentum 1"),
    (rates, ["--unroll", "0"], "--unroll 0"),
    (rates, ["--steps", "5", "--unroll", "10"], "--unroll 10"),
    (rates, ["--init-lr", "-0.1"], "--init-lr -0.1"),
]


@pytest.mark.parametrize(
    ("recipe", "flags", "message"), BAD_FLAGS, ids=[f"{r.NAME} {' '.join(f)}" for r, f, _ in BAD_FLAGS]
)
def test_bad_flags_are_clear(recipe, flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        recipe.main(["--quick", *flags, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("recipe", [cleaning, rates], ids=["hypercleaning", "learning_rates"])
def test_device_flag_is_validated(recipe, tmp_path):
    with pytest.raises(ValueError, match="--device 'nonsense'"):
        recipe.main(["--quick", "--device", "nonsense", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------- the cores alone


def _tiny_images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes of 2×2 "images": class c has its pixel c lit, plus a little noise."""
    y = torch.arange(n) % 3
    x = 0.1 * torch.randn(n, 1, 2, 2, generator=gen)
    x.view(n, 4)[torch.arange(n), y] += 1.0
    return x, y


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("strategy", ["neumann", "cg"])
def test_the_core_runs_alone_on_tiny_data_hypercleaning(kind, strategy):
    """learn_weights (the page's code) on a planted corruption: the weights of the flipped labels fall."""
    flags = ["--hypersteps", "15", "--inner-steps", "5", "--hidden", "4", "--inner-lr", "0.1", "--outer-lr", "0.3"]
    args = cleaning.parse_args(flags)
    args.classes = 3
    gen = torch.Generator().manual_seed(0)
    (x, y), val = _tiny_images(30, gen), _tiny_images(15, gen)
    noisy, corrupted = cleaning.corrupt_labels(y, 0.4, 3, gen)
    fm = cleaning.make_model(kind, args, x)
    shapes = {k: v.shape for k, v in fm.params.items()}
    seen = []
    for opt, result in cleaning.learn_weights(fm, (x, noisy), val, cleaning.strategy_for(strategy, 0.1), args):
        seen.append(opt.hypersteps)
        assert result.hyper is not None and math.isfinite(float(result.hyper.val_loss))
    assert seen == list(range(1, 16)) and opt.skipped_outer_steps == 0
    assert {k: v.shape for k, v in opt.params.items()} == shapes
    weights = torch.sigmoid(opt.hparams["logits"])
    assert weights.shape == (30,) and bool(torch.isfinite(weights).all())
    assert weights[corrupted].mean() < 0.5 < weights[~corrupted].mean()
    assert cleaning.detection_scores(weights, corrupted)["f1"] > 0.9


def test_the_core_runs_alone_on_tiny_data_learning_rates():
    """tune_rates (the page's code) from a small start: a hyperstep every K steps raises every layer's rate."""
    flags = ["--steps", "40", "--unroll", "5", "--batch-size", "8", "--hidden", "4", "--init-lr", "0.003"]
    args = rates.parse_args(flags)
    args.classes = 3
    gen = torch.Generator().manual_seed(0)
    train, val = _tiny_images(48, gen), _tiny_images(15, gen)
    fm, names, layer_of = rates.make_model(args, train[0])
    assert names == ["layer1", "layer2", "layer3"] and set(layer_of) == set(fm.params)
    hyper = []
    for step, (opt, result) in enumerate(rates.tune_rates(fm, layer_of, train, val, args), start=1):
        assert opt.steps == step  # one yield per minibatch step
        if result.hyper is not None:
            hyper.append(step)
            assert math.isfinite(float(result.hyper.val_loss))
    assert step == 40 and hyper == list(range(5, 41, 5)) and opt.hypersteps == 8
    lrs, momenta = opt.hparams["log_lr"].exp(), torch.sigmoid(opt.hparams["logit_momentum"])
    assert lrs.shape == momenta.shape == (3,)
    assert bool((lrs > 0.003).all()) and bool(((0 < momenta) & (momenta < 1)).all())
    assert not torch.allclose(momenta, torch.full_like(momenta, 0.9))  # the momenta are tuned too
