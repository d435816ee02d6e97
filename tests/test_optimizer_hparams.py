"""Hyperparameters of the inner optimiser itself (learning rates, momentum), tuned through Unroll."""

from __future__ import annotations

import pytest
import torch
import torchopt

import bilevel
from tests.problems import central_difference, roundtrip


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)
    w_true = torch.randn(5, generator=g)
    y, yv = X @ w_true + 0.5 * torch.randn(40, generator=g), Xv @ w_true + 0.5 * torch.randn(40, generator=g)

    def train_loss(p, h, batch):
        X, y = batch
        return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.5 * (h["log_decay"].exp() * p["w"] ** 2).sum()

    def val_loss(p, h, batch):
        X, y = batch
        return 0.5 * ((X @ p["w"] - y) ** 2).mean()

    return train_loss, val_loss, (X, y), (Xv, yv)


def _sgd(h):
    """Per-layer style: one learning rate (log-parametrised) and a momentum (logit-parametrised)."""
    return torchopt.sgd(lr=h["log_lr"].exp(), momentum=torch.sigmoid(h["logit_momentum"]))


HPARAMS = {"log_lr": torch.tensor(-2.0), "logit_momentum": torch.tensor(0.0), "log_decay": torch.full((5,), -3.0)}


def test_learning_rate_and_momentum_hypergradients_match_finite_differences():
    """d L_V(w_K(λ))/dλ through K differentiable SGD-momentum steps whose rate and momentum are hparams."""
    train_loss, val_loss, train, val = _problem()
    params = {"w": torch.zeros(5)}
    hparams = {k: v.double() for k, v in HPARAMS.items()}
    K = 6
    grads, info = bilevel.hypergradient(
        train_loss, val_loss, params, hparams, train, val, strategy=bilevel.Unroll(steps=K, optimizer=_sgd)
    )

    def unrolled(log_lr, logit_momentum):  # the same K updates written by hand
        lr, mu = log_lr.exp(), torch.sigmoid(logit_momentum)
        w, buf = torch.zeros(5), torch.zeros(5)
        for k in range(K):
            g = torch.func.grad(train_loss)({"w": w}, hparams, train)["w"]
            buf = g if k == 0 else mu * buf + g  # torch.optim's convention: the first trace is the gradient
            w = w - lr * buf
        return val_loss({"w": w}, hparams, val)

    lr_fd = central_difference(lambda v: unrolled(v[0], hparams["logit_momentum"]), hparams["log_lr"].reshape(1))
    mu_fd = central_difference(lambda v: unrolled(hparams["log_lr"], v[0]), hparams["logit_momentum"].reshape(1))
    torch.testing.assert_close(grads["log_lr"].reshape(1), lr_fd, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(grads["logit_momentum"].reshape(1), mu_fd, rtol=1e-7, atol=1e-10)
    assert float(grads["log_lr"].abs()) > 1e-3 and float(grads["logit_momentum"].abs()) > 1e-4
    reference = unrolled(hparams["log_lr"], hparams["logit_momentum"])
    torch.testing.assert_close(info.val_loss, reference, rtol=0, atol=1e-12)


def _optimizer(strategy, **kwargs):
    train_loss, val_loss, _, _ = _problem()
    return bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        {"w": torch.zeros(5)},
        {k: v.double() for k, v in HPARAMS.items()},
        inner=_sgd,
        outer=torchopt.adam(0.05),
        strategy=strategy,
        inner_steps=4,
        seed=0,
        **kwargs,
    )


def test_the_optimiser_tunes_its_own_learning_rate_and_resumes_bitwise():
    _, _, train, val = _problem()
    opt = _optimizer(bilevel.Unroll(steps=4))
    start = {k: v.clone() for k, v in opt.hparams.items()}
    losses = []
    for _ in range(60):
        result = opt.step(train, val)
        if result.hyper is not None:
            losses.append(float(result.hyper.val_loss))
    assert opt.hparams["log_lr"] != start["log_lr"] and opt.hparams["logit_momentum"] != start["logit_momentum"]
    assert losses[-1] < 0.5 * losses[0]  # a larger learning rate trains faster in the short horizon
    first = _optimizer(bilevel.Unroll(steps=4))
    for _ in range(30):
        first.step(train, val)
    resumed = _optimizer(bilevel.Unroll(steps=4))
    resumed.load_state_dict(roundtrip(first.state_dict()))
    for _ in range(30):
        resumed.step(train, val)
    assert all(torch.equal(opt.hparams[k], resumed.hparams[k]) for k in start)
    assert torch.equal(opt.params["w"], resumed.params["w"])


@pytest.mark.parametrize("strategy", [bilevel.Neumann(5, 0.1), bilevel.ConjugateGradient(5), bilevel.Exact()])
def test_an_ift_strategy_with_optimiser_hyperparameters_is_refused(strategy):
    with pytest.raises(ValueError, match=r"hparams\['log_lr'\], hparams\['logit_momentum'\].*Unroll"):
        _optimizer(strategy)


def test_an_inner_factory_that_uses_no_hyperparameter_is_fine_with_ift():
    train_loss, val_loss, train, val = _problem()
    fixed = bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        {"w": torch.zeros(5)},
        {"log_decay": torch.full((5,), -3.0)},
        inner=lambda h: torchopt.sgd(0.1),  # a factory that ignores λ: nothing for the IFT to miss
        strategy=bilevel.ConjugateGradient(5),
        inner_steps=2,
    )
    for _ in range(4):
        fixed.step(train, val)
    assert fixed.hypersteps == 2
    with pytest.raises(TypeError, match=r"`inner\(hparams\)` must return a torchopt GradientTransformation"):
        bilevel.BilevelOptimizer(train_loss, val_loss, {"w": torch.zeros(5)}, {"d": torch.zeros(1)}, inner=lambda h: 3)
