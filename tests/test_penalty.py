"""Penalty: the first-order value-function penalty hypergradient, against closed forms.

Truth: ridge regression's hypergradient in closed form (tests/problems.py), the validation-optimal
hyperparameter of a scalar ridge found by a 1-D search (tests/test_optimizer.py), and finite differences.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchopt

import bilevel
from tests.problems import Ridge, roundtrip
from tests.test_optimizer import ScalarRidge


def _penalised_step(problem: Ridge, sigma: float) -> float:
    """1/λ_max of the Hessian of L_T + L_V/σ: the step that makes gradient descent on u converge."""
    Hv = problem.Xv.T @ problem.Xv / len(problem.Xv)
    return 1.0 / float(torch.linalg.eigvalsh(problem.hessian() + Hv / sigma)[-1])


def _relative_error(problem: Ridge, sigma: float, steps: int = 3000) -> float:
    strategy = bilevel.Penalty(penalty=sigma, steps=steps, optimizer=torchopt.sgd(_penalised_step(problem, sigma)))
    grads, info = bilevel.hypergradient(
        problem.train_loss, problem.val_loss, problem.params(), problem.hparams(), problem.train_batch,
        problem.val_batch, strategy,
    )  # fmt: skip
    assert info.strategy == "penalty" and info.hvps == 0 and info.gradients == 3 * steps + 3
    truth = problem.hypergradient()
    return float((Ridge.flat(grads) - truth).norm() / truth.norm())


def test_the_error_falls_as_one_over_sigma_and_vanishes_at_large_sigma():
    problem = Ridge.make()
    sigmas = [1e2, 3e2, 1e3]
    errors = [_relative_error(problem, s) for s in sigmas]
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (math.log(sigmas[-1]) - math.log(sigmas[0]))
    assert -1.1 < slope < -0.9, (errors, slope)  # O(1/σ), as the theory says
    assert _relative_error(problem, 1e7) < 1e-6


def test_the_twin_cancels_what_w_and_u_share_instead_of_multiplying_it_by_sigma():
    """From weights 10 % off w*, 10 SGD steps leave v and u short of their minimisers by the same error;
    the twin's bracket cancels it (its error does not grow with σ) where the plain bracket against w,
    written out here by hand, multiplies it by σ."""
    problem = Ridge.make()
    truth = problem.hypergradient()
    gen = torch.Generator().manual_seed(1)
    start = {
        k: v + 0.1 * v.norm() / v.numel() ** 0.5 * torch.randn(v.shape, generator=gen)
        for k, v in problem.params().items()
    }

    def twin_error(sigma: float) -> float:
        strategy = bilevel.Penalty(penalty=sigma, steps=10, optimizer=torchopt.sgd(_penalised_step(problem, sigma)))
        grads, _ = bilevel.hypergradient(
            problem.train_loss, problem.val_loss, start, problem.hparams(), problem.train_batch, problem.val_batch,
            strategy,
        )  # fmt: skip
        return float((Ridge.flat(grads) - truth).norm() / truth.norm())

    def plain_error(sigma: float) -> float:
        lr, h = _penalised_step(problem, sigma), problem.hparams()
        u = {k: v.clone() for k, v in start.items()}
        for _ in range(10):
            uu = {k: v.requires_grad_() for k, v in u.items()}
            loss = problem.train_loss(uu, h, problem.train_batch) + problem.val_loss(uu, h, problem.val_batch) / sigma
            grads = torch.autograd.grad(loss, list(uu.values()))
            u = {k: (v - lr * g).detach() for (k, v), g in zip(uu.items(), grads)}

        def d_lambda(loss, w, batch):
            hh = {"decay": {k: v.clone().requires_grad_() for k, v in h["decay"].items()}}
            value = loss(w, hh, batch)
            if not value.requires_grad:  # (this L_V has no direct λ term)
                return [None] * len(hh["decay"])
            return torch.autograd.grad(value, list(hh["decay"].values()), allow_unused=True)

        gv = d_lambda(problem.val_loss, u, problem.val_batch)
        gu, gw = (
            d_lambda(problem.train_loss, u, problem.train_batch),
            d_lambda(problem.train_loss, start, problem.train_batch),
        )
        est = [(0 if a is None else a) + sigma * (b - c) for a, b, c in zip(gv, gu, gw)]
        return float((torch.cat([t.reshape(-1) for t in est]) - truth).norm() / truth.norm())

    assert twin_error(1e6) < 1e-2 and twin_error(1e6) < 2 * twin_error(1e4)
    assert plain_error(1e6) > 10 * plain_error(1e4) and plain_error(1e6) > 100  # grows with σ


def test_an_optimiser_with_penalty_reaches_the_validation_optimal_hyperparameter():
    problem = ScalarRidge()
    opt = problem.optimizer(strategy=bilevel.Penalty(penalty=100.0, steps=20, growth=1.0))
    for _ in range(300 * opt.inner_steps):
        opt.step(*problem.batches)
    assert opt.hparams["log_l2"].item() == pytest.approx(problem.best_log_l2(), abs=2e-3)
    assert opt.skipped_outer_steps == 0


def _rbf_problem():
    """An RBF-kernel model through torch.cdist's exact path, which has no double backward in torch 2.13."""
    torch.manual_seed(0)
    X, y = torch.randn(60, 3), torch.randn(60)
    centres = torch.randn(4, 3)

    def features(p, x):
        return torch.exp(-(torch.cdist(x, p["centres"], compute_mode="donot_use_mm_for_euclid_dist") ** 2))

    def train_loss(p, h, b):
        return ((features(p, b[0]) @ p["w"] - b[1]) ** 2).mean() + bilevel.weight_decay(p, h)

    def val_loss(p, h, b):
        return ((features(p, b[0]) @ p["w"] - b[1]) ** 2).mean()

    params = {"centres": centres, "w": torch.zeros(4)}
    return train_loss, val_loss, params, bilevel.log_decay_like(params, 1e-2), (X[:30], y[:30]), (X[30:], y[30:])


def test_penalty_works_where_second_derivatives_do_not_exist():
    train_loss, val_loss, params, hparams, train, val = _rbf_problem()
    with pytest.raises(bilevel.DerivativeError, match="_cdist_backward"):
        bilevel.hypergradient(train_loss, val_loss, params, hparams, train, val, bilevel.ConjugateGradient(5))
    opt = bilevel.BilevelOptimizer(
        train_loss, val_loss, params, hparams, inner=torchopt.adam(0.05), outer=torchopt.adam(0.05),
        strategy=bilevel.Penalty(penalty=30.0, steps=10, optimizer=torchopt.sgd(0.1)), inner_steps=10, seed=0,
    )  # fmt: skip
    for _ in range(200):
        opt.step(train, val)
    assert opt.hypersteps == 20 and opt.skipped_outer_steps == 0
    assert not torch.equal(opt.hparams["w"], hparams["w"])
    # At a trained w*, the estimate approaches the IFT hypergradient computed with first derivatives only
    # (CG on finite-difference HVPs, a different path) as O(1/σ).
    ws = {k: v.clone().requires_grad_() for k, v in params.items()}
    lbfgs = torch.optim.LBFGS(list(ws.values()), max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = train_loss(ws, hparams, train)
        loss.backward()
        return loss

    lbfgs.step(closure)
    w_star = {k: v.detach() for k, v in ws.items()}
    reference = bilevel.ConjugateGradient(200, tol=1e-12, hvp=bilevel.FiniteDifferenceHVP())
    truth, info = bilevel.hypergradient(train_loss, val_loss, w_star, hparams, train, val, reference)
    assert float(info.relative_residual) < 1e-10
    truth_flat = torch.cat([t.reshape(-1) for t in truth.values()])
    errors = []
    for sigma in (1e2, 1e3):
        strategy = bilevel.Penalty(penalty=sigma, steps=500, optimizer=torchopt.adam(1e-2))
        grads, _ = bilevel.hypergradient(train_loss, val_loss, w_star, hparams, train, val, strategy)
        flat = torch.cat([grads[k].reshape(-1) for k in truth])
        errors.append(float((flat - truth_flat).norm() / truth_flat.norm()))
    assert errors[1] < 0.03 and 5 < errors[0] / errors[1] < 20, errors  # 10× σ, ≈ 10× less bias


def test_an_auxiliary_rule_that_normalises_the_gradient_is_refused_as_default_and_warned_about_if_given():
    """Adam's update does not scale with the gradient, so the pair's O(1/σ) pull would be a full step."""
    problem = ScalarRidge()
    with pytest.raises(ValueError, match=r"the inner optimiser normalises its update.*optimizer=torchopt\.sgd"):
        problem.optimizer(strategy=bilevel.Penalty(penalty=10.0), inner=torchopt.adam(0.1))
    with pytest.warns(RuntimeWarning, match=r"Penalty\(optimizer=...\) normalises its update"):
        problem.optimizer(strategy=bilevel.Penalty(penalty=10.0, optimizer=torchopt.rmsprop(0.1)))
    problem.optimizer(strategy=bilevel.Penalty(penalty=10.0), inner=torchopt.sgd(0.1, momentum=0.9))  # linear: fine


def test_penalty_resumes_bitwise_mid_run_and_checkpoints_its_auxiliary_weights():
    problem = ScalarRidge()

    def make():
        strategy = bilevel.Penalty(penalty=50.0, steps=5, growth=0.5, optimizer=torchopt.sgd(0.3, momentum=0.5))
        return problem.optimizer(strategy=strategy, inner=torchopt.adam(0.1))

    straight, first = make(), make()
    for _ in range(70):
        straight.step(*problem.batches)
    for _ in range(30):  # mid-window: 30 = 1 hyperstep + 10 inner steps
        first.step(*problem.batches)
    state = first.state_dict()
    assert state["family"] == "AuxiliaryWeights" and state["aux_started"] is True
    assert not torch.equal(state["aux"][0], state["params"][0])  # u is its own sequence
    resumed = make()
    resumed.load_state_dict(roundtrip(state))
    for _ in range(40):
        resumed.step(*problem.batches)
    assert torch.equal(resumed.hparams["log_l2"], straight.hparams["log_l2"])
    assert torch.equal(resumed.state_dict()["aux"][0], straight.state_dict()["aux"][0])
    ift = problem.optimizer(strategy=bilevel.ConjugateGradient(5))
    with pytest.raises(ValueError, match=r"saved by an optimiser whose strategy keeps 'AuxiliaryWeights' state"):
        ift.load_state_dict(state)


def test_non_finite_auxiliary_weights_are_refused_and_strict_raises():
    problem = ScalarRidge()
    # an auxiliary step far too large for the penalised problem: u blows up to inf within the hyperstep
    strategy = bilevel.Penalty(penalty=10.0, steps=200, optimizer=torchopt.sgd(1e3))
    opt = problem.optimizer(strategy=strategy, inner_steps=2)
    with pytest.warns(RuntimeWarning, match="hyperstep 1 skipped: non-finite hypergradient or update"):
        for _ in range(2):
            opt.step(*problem.batches)
    assert opt.skipped_outer_steps == 1 and torch.equal(opt.hparams["log_l2"], torch.tensor(0.0))
    assert torch.isfinite(opt.state_dict()["aux"][0]).all()  # the old u was kept
    strict = problem.optimizer(strategy=strategy, inner_steps=2, strict=True)
    strict.step(*problem.batches)
    with pytest.raises(bilevel.NonFiniteError, match="hyperstep 1"):
        strict.step(*problem.batches)


def test_bad_penalty_arguments_are_named():
    with pytest.raises(ValueError, match=r"`Penalty\(penalty=0\)`: penalty must be a finite number > 0"):
        bilevel.Penalty(penalty=0)
    with pytest.raises(ValueError, match=r"`Penalty\(steps=0\)`"):
        bilevel.Penalty(penalty=1.0, steps=0)
    with pytest.raises(TypeError, match=r"`Penalty\(optimizer=0.1\)`"):
        bilevel.Penalty(penalty=1.0, optimizer=0.1)
    problem = Ridge.make()
    with pytest.raises(ValueError, match=r"`Penalty\(penalty, steps, optimizer=None\)` in `hypergradient`"):
        bilevel.hypergradient(
            problem.train_loss, problem.val_loss, problem.params(), problem.hparams(), problem.train_batch,
            problem.val_batch, bilevel.Penalty(penalty=10.0),
        )  # fmt: skip
