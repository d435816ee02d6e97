"""benchopt's simulated quadratic (benchmarks/quadratic.py) against its definition.

Truth: the spectra the generator is asked for, autograd's Hessian of the stored losses (not the dense
matrices the module builds), z*(x) from a Newton step on those autograd derivatives, and central finite
differences of h(x) = mean_i f_i(z*(x), x).
"""

from __future__ import annotations

import math

import torch

from tests.recipe_helpers import load_benchmark

quadratic = load_benchmark("quadratic")

N, D, MU, L, L_CROSS = 512, 20, 0.1, 1.0, 0.1


def _problem() -> quadratic.Problem:
    return quadratic.Problem.make(n=N, d=D, mu=MU, L=L, L_cross=L_CROSS, seed=0)


def _geometric(low: float, high: float, count: int) -> torch.Tensor:
    return torch.tensor([low * (high / low) ** (k / (count - 1)) for k in range(count)], dtype=torch.float64)


def _hessian(fn, z: torch.Tensor) -> torch.Tensor:
    """Rows of the Hessian by double backward, one basis vector at a time."""
    z = z.detach().requires_grad_()
    (g,) = torch.autograd.grad(fn(z), z, create_graph=True)
    return torch.stack([torch.autograd.grad(g[i], z, retain_graph=True)[0] for i in range(len(z))])


def test_the_mean_inner_hessian_has_the_spectrum_asked_for():
    gen = torch.Generator().manual_seed(0)
    S = quadratic._sqrt_spectrum(D, MU, L, gen)
    torch.testing.assert_close(torch.linalg.eigvalsh(S @ S), _geometric(MU, L, D), rtol=1e-12, atol=1e-14)
    S0 = quadratic._sqrt_spectrum(D, MU, L, gen, zero=True)  # the outer variable's: one zero eigenvalue
    expected = torch.cat([torch.zeros(1, dtype=torch.float64), _geometric(MU, L, D - 1)])
    torch.testing.assert_close(torch.linalg.eigvalsh(S0 @ S0), expected, rtol=1e-12, atol=1e-14)
    # The problem's own mean Hessian, by autograd on the stored losses: E[A_i] = S², so the n-sample mean
    # lies within the Marchenko-Pastur band [μ(1 − √(d/n))², L(1 + √(d/n))²] of that spectrum.
    problem = _problem()
    x = torch.randn(D, dtype=torch.float64, generator=gen)
    H = _hessian(lambda z: problem.train_loss({"z": z}, {"x": x}, slice(0, N)), torch.zeros(D, dtype=torch.float64))
    torch.testing.assert_close(H, problem.g.dense[0], rtol=1e-12, atol=1e-13)
    eig = torch.linalg.eigvalsh(H)
    r = math.sqrt(D / N)
    assert MU * (1 - r) ** 2 <= float(eig[0]) and float(eig[-1]) <= L * (1 + r) ** 2, eig
    # and the cross term's mean has singular values geometric in [μ, L_cross] up to the same sampling factor
    sv = torch.linalg.svdvals(problem.g.dense[2])
    assert MU * (1 - r) ** 2 <= float(sv[-1]) and float(sv[0]) <= L_CROSS * (1 + r) ** 2, sv


def test_the_exact_hypergradient_matches_finite_differences_of_h():
    problem = _problem()
    full = slice(0, N)

    def z_star(x: torch.Tensor) -> torch.Tensor:  # one Newton step from 0 is exact for a quadratic
        zero = torch.zeros(D, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(problem.train_loss({"z": zero}, {"x": x}, full), zero)
        H = _hessian(lambda z: problem.train_loss({"z": z}, {"x": x}, full), zero)
        return -torch.linalg.solve(H, g)

    def h(x: torch.Tensor) -> float:
        return float(problem.val_loss({"z": z_star(x)}, {"x": x}, full))

    x = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eps = 1e-4  # h is quadratic: central differences are exact up to rounding
    fd = torch.tensor([(h(x + eps * e) - h(x - eps * e)) / (2 * eps) for e in torch.eye(D, dtype=torch.float64)])
    torch.testing.assert_close(problem.grad_h(x), fd, rtol=1e-7, atol=1e-9)
    # ∇²h by differences of the exact ∇h (linear in x), and the convexity the generator insists on
    cols = [(problem.grad_h(x + e) - problem.grad_h(x - e)) / 2 for e in torch.eye(D, dtype=torch.float64)]
    torch.testing.assert_close(problem.value_hessian(), torch.stack(cols, 1), rtol=1e-9, atol=1e-11)
    assert float(torch.linalg.eigvalsh(problem.value_hessian())[0]) >= 1e-12
    assert problem.metric(x) == float(problem.grad_h(x).norm() ** 2)


def test_a_run_logs_the_metric_and_counts_every_strategy_can_be_compared_by():
    problem = quadratic.Problem.make(n=64, d=16, seed=1)
    for name in quadratic.STRATEGIES:
        trace = quadratic.run(problem, name, hypersteps=2, inner_steps=10, batch=16, seed=0)
        assert len(trace["metric"]) == len(trace["seconds"]) == len(trace["oracles"]) == 3
        assert trace["oracles"][0] == 0 < trace["oracles"][1] < trace["oracles"][2]
        assert trace["metric"][0] == problem.metric(torch.zeros(16, dtype=torch.float64))
