"""Warm-started linear solves: consecutive hypersteps solve nearly the same system, so the previous
solution is a good first guess (AmIGO, Arbel & Mairal 2022). Truth: the exact solve in closed form."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchopt

import bilevel
from tests.problems import Ridge, roundtrip


class RidgeRun:
    """Per-coordinate-decay ridge (convex): train on random minibatches, hypersteps every few steps."""

    def __init__(self, n: int = 200):
        self.problem = Ridge.make(n=n)
        g = torch.Generator().manual_seed(4)
        self.batches = [torch.randint(0, n, (64,), generator=g) for _ in range(200)]

    def optimizer(self, strategy, outer_lr=0.05, **kwargs):
        p = self.problem
        return bilevel.BilevelOptimizer(
            p.train_loss,
            p.val_loss,
            p.params(),
            p.hparams(),
            inner=torchopt.sgd(0.05),
            outer=torchopt.adam(outer_lr),
            strategy=strategy,
            inner_steps=5,
            seed=0,
            **kwargs,
        )

    def step(self, opt, k):
        idx = self.batches[k % len(self.batches)]
        return opt.step((self.problem.X[idx], self.problem.y[idx]), self.problem.val_batch)


class WideRidge:
    """Ridge regression with 100 features of decaying scale (condition number ~10³) and one log-decay per
    feature: CG needs tens of iterations, so where it starts matters."""

    def __init__(self, n: int = 400, d: int = 100):
        g = torch.Generator().manual_seed(7)
        scale = torch.linspace(1.0, 0.05, d)
        self.X, self.Xv = torch.randn(n, d, generator=g) * scale, torch.randn(n, d, generator=g) * scale
        w_true = torch.randn(d, generator=g)
        self.y = self.X @ w_true + 0.1 * torch.randn(n, generator=g)
        self.yv = self.Xv @ w_true + 0.1 * torch.randn(n, generator=g)
        self.d = d

    @staticmethod
    def train_loss(p, h, batch):
        X, y = batch
        return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.5 * (h["log_decay"].exp() * p["w"] ** 2).sum()

    @staticmethod
    def val_loss(p, h, batch):
        X, y = batch
        return 0.5 * ((X @ p["w"] - y) ** 2).mean()


def test_warm_started_cg_reaches_the_same_accuracy_with_fewer_hvps():
    problem = WideRidge()
    hvps = {}
    for warm in (False, True):
        opt = bilevel.BilevelOptimizer(
            problem.train_loss,
            problem.val_loss,
            {"w": torch.zeros(problem.d)},
            {"log_decay": torch.full((problem.d,), -6.0)},
            inner=torchopt.adam(0.05),
            outer=torchopt.adam(0.01),
            strategy=bilevel.ConjugateGradient(maxiter=300, tol=1e-6, warm_start=warm),
            inner_steps=10,
            seed=0,
        )
        infos = []
        for _ in range(30 * 10):
            result = opt.step((problem.X, problem.y), (problem.Xv, problem.yv))
            if result.hyper is not None:
                infos.append(result.hyper)
        assert all(info.converged for info in infos)  # both meet ‖r‖ ≤ 1e-6 ‖b‖ on every hyperstep
        hvps[warm] = [info.hvps for info in infos[1:]]  # the first hyperstep has nothing to start from
    # Measured: 2 098 vs 2 577 HVPs in all, 57 vs 87 per hyperstep at the end. The saving is what the
    # previous solution's residual on the new system buys (~1e-2‖b‖ after 10 Adam steps): ~2 of 6 decades.
    assert sum(hvps[True]) < 0.85 * sum(hvps[False]), hvps
    assert sum(hvps[True][-5:]) < 0.75 * sum(hvps[False][-5:]), hvps


def test_warm_started_neumann_keeps_iterating_across_hypersteps():
    """With weights and λ held fixed the system never changes: the warm-started series continues
    Richardson's iteration where the last hyperstep stopped, so its error shrinks by the same factor
    every hyperstep; the cold series restarts from zero and stays at its truncation error."""
    p = Ridge.make()
    H = p.hessian()
    v = p.val_grad_w()
    mu = torch.linalg.eigvalsh(H)
    alpha = float(2 / (mu[0] + mu[-1]))  # the best fixed step: rate (κ − 1)/(κ + 1) per product
    errors = {}
    for warm in (False, True):
        opt = bilevel.BilevelOptimizer(
            p.train_loss,
            p.val_loss,
            p.params(),
            p.hparams(),
            inner=torchopt.sgd(0.0),
            outer=torchopt.sgd(0.0),
            strategy=bilevel.Neumann(steps=3, alpha=alpha, warm_start=warm),
            inner_steps=1,
        )
        errors[warm] = []
        for _ in range(15):
            opt.step(p.train_batch, p.val_batch)
            if warm:  # the solution the optimiser carries to the next hyperstep
                x = torch.cat([t.reshape(-1) for t in opt.state_dict()["solution"]])
            else:  # not kept without warm starts: the same cold series, computed on its own
                strategy = bilevel.Neumann(steps=3, alpha=alpha)
                args = (p.train_loss, p.val_loss, p.params(), p.hparams(), p.train_batch, p.val_batch)
                x = Ridge.flat({"decay": bilevel.hypergradient(*args, strategy=strategy)[1].solution})
            errors[warm].append(float((x - torch.linalg.solve(H, v)).norm() / torch.linalg.solve(H, v).norm()))
    rate = float((mu[-1] - mu[0]) / (mu[-1] + mu[0]))
    assert errors[False][-1] == pytest.approx(errors[False][0], rel=1e-10)  # cold: the same answer each time
    warm = errors[True]
    assert all(b <= rate**3 * a * (1 + 1e-9) for a, b in itertools.pairwise(warm[:6]))  # 3 Richardson steps each
    assert warm[-1] < 1e-12 < errors[False][-1]


def test_functional_init_and_solution_round_trip():
    p = Ridge.make()
    args = (p.train_loss, p.val_loss, p.params(), p.hparams(), p.train_batch, p.val_batch)
    exact, info = bilevel.hypergradient(*args, strategy=bilevel.Exact())
    _, cold_info = bilevel.hypergradient(*args, strategy=bilevel.ConjugateGradient(maxiter=50, tol=1e-10))
    warm, warm_info = bilevel.hypergradient(
        *args, strategy=bilevel.ConjugateGradient(maxiter=50, tol=1e-10), init=info.solution
    )
    assert warm_info.hvps == 1 and warm_info.iterations == 0 and cold_info.hvps > 5  # already solved
    torch.testing.assert_close(Ridge.flat(warm), Ridge.flat(exact), rtol=0, atol=1e-12)
    # Neumann from the exact solution stays there: x₀ + α Σ (I − αH)^j (v − Hx₀) with v − Hx₀ = 0.
    neumann, _ = bilevel.hypergradient(*args, strategy=bilevel.Neumann(steps=3, alpha=0.1), init=info.solution)
    torch.testing.assert_close(Ridge.flat(neumann), Ridge.flat(exact), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="`init` is an initial guess for ConjugateGradient and Neumann; exact"):
        bilevel.hypergradient(*args, strategy=bilevel.Exact(), init=info.solution)
    with pytest.raises(ValueError, match="structure and shapes of `params`"):
        bilevel.hypergradient(*args, strategy=bilevel.ConjugateGradient(5), init={"w": torch.zeros(7)})


@pytest.mark.parametrize(
    "strategy",
    [bilevel.ConjugateGradient(maxiter=4, warm_start=True), bilevel.Neumann(steps=3, alpha=0.2, warm_start=True)],
    ids=["cg", "neumann"],
)
def test_resume_with_warm_start_is_bitwise(strategy):
    run = RidgeRun()
    straight = run.optimizer(strategy)
    for k in range(40):
        run.step(straight, k)
    first = run.optimizer(strategy)
    for k in range(22):
        run.step(first, k)
    resumed = run.optimizer(strategy)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert resumed.state_dict()["solution"] is not None
    for k in range(22, 40):
        run.step(resumed, k)
    assert torch.equal(Ridge.flat(straight.hparams), Ridge.flat(resumed.hparams))
    assert torch.equal(Ridge.flat({"decay": straight.params}), Ridge.flat({"decay": resumed.params}))
