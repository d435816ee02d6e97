"""The step-count conversion table (docs/theory.md §5, the `Neumann` docstring) checked numerically.

`Neumann(steps=s, alpha=α)` computes α Σ_{j=0}^{s−1} (I − αH)^j v with s − 1 Hessian-vector products.
Every other convention in the table is evaluated here independently — torchopt's own solver, and
the paper's Eq. 9, its Algorithm 3 and its official code's loop written out below — and compared in
float64 with our strategy at the converted step count.

Our side goes through the public API on a quadratic where the hypergradient *is* the solve:
L_T(w, λ) = ½ wᵀAw − λᵀw has ∂²L_T/∂w∂λᵀ = −I, and L_V(w) = bᵀw has ∂L_V/∂w = b and no direct term,
so dL_V/dλ = −(−I)ᵀ x = x, the strategy's approximation of A⁻¹b.
"""

from __future__ import annotations

import pytest
import torch
import torchopt

import bilevel

P = 6
ATOL = 1e-12


def spd_matrix() -> torch.Tensor:
    """A small symmetric positive-definite matrix with eigenvalues spread over [0.1, 1.9]."""
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(P, P, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.1, 1.9, P, dtype=torch.float64)) @ q.T


# Built at import, before conftest's float64 fixture runs: hence the explicit dtypes.
A = spd_matrix()
B = torch.linspace(1.0, -0.5, P, dtype=torch.float64)


def ours(strategy) -> tuple[torch.Tensor, int]:
    """x ≈ A⁻¹b from `bilevel.hypergradient`, and the HVPs it reports."""

    def train_loss(params, hparams, batch):
        w = params["w"]
        return 0.5 * w @ A @ w - hparams["lam"] @ w

    def val_loss(params, hparams, batch):
        return B @ params["w"]

    grads, info = bilevel.hypergradient(
        train_loss, val_loss, {"w": torch.zeros(P)}, {"lam": torch.zeros(P)}, None, None, strategy=strategy
    )
    return grads["lam"], info.hvps


def test_public_api_returns_the_solve_on_this_quadratic():
    x, _ = ours(bilevel.Exact())
    torch.testing.assert_close(x, torch.linalg.solve(A, B), rtol=0, atol=ATOL)


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_neumann_steps_is_terms_with_one_hvp_fewer(steps):
    alpha = 0.5
    x, hvps = ours(bilevel.Neumann(steps=steps, alpha=alpha))
    terms = sum(torch.linalg.matrix_power(torch.eye(P) - alpha * A, j) @ B for j in range(steps))
    torch.testing.assert_close(x, alpha * terms, rtol=0, atol=ATOL)
    assert hvps == steps - 1


@pytest.mark.parametrize("maxiter", [0, 1, 2, 5])
@pytest.mark.parametrize("alpha", [0.5, None])
def test_torchopt_solve_inv_ns_maxiter_m_is_neumann_steps_m_plus_1(maxiter, alpha):
    products = []

    def matvec(u):
        products.append(u)
        return A @ u

    kwargs = {} if alpha is None else {"alpha": alpha}
    solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=maxiter, **kwargs)
    theirs = solve(matvec, B)
    # torchopt's alpha=None means no scaling at all, i.e. α = 1 (the outer factor is then 1 too).
    x, hvps = ours(bilevel.Neumann(steps=maxiter + 1, alpha=1.0 if alpha is None else alpha))
    torch.testing.assert_close(x, theirs, rtol=0, atol=ATOL)
    assert len(products) == maxiter == hvps


def test_torchopt_dense_ns_inv_sums_one_term_fewer():
    """`torchopt.linalg.ns_inv(A, maxiter=m)` (a dense inverse) has m terms, not m + 1 like `ns`."""
    alpha, maxiter = 0.5, 4
    dense = torchopt.linalg.ns_inv(A, maxiter=maxiter, alpha=alpha)
    x, _ = ours(bilevel.Neumann(steps=maxiter, alpha=alpha))
    torch.testing.assert_close(dense @ B, x, rtol=0, atol=ATOL)


def paper_eq9(H: torch.Tensor, alpha: float, i: int) -> torch.Tensor:
    """Eq. 9 of Lorraine et al. (2020): Σ_{j<i} (I − αH)^j, i terms and no factor α in front."""
    eye = torch.eye(len(H))
    return sum(torch.linalg.matrix_power(eye - alpha * H, j) for j in range(i))


def paper_algorithm3(hvp, v: torch.Tensor, alpha: float, i: int) -> torch.Tensor:
    """Algorithm 3 of Lorraine et al. (2020): p = v; for j = 1..i: v −= α H v; p += v; return p."""
    p = v.clone()
    for _ in range(i):
        v = v - alpha * hvp(v)
        p = p + v
    return p


def official_code(hvp, v: torch.Tensor, lr: float, num_neumann_terms: int) -> torch.Tensor:
    """The loop of the paper's official code, in outline: num_neumann_terms products, then × lr."""
    total, counter = v.clone(), v.clone()
    for _ in range(num_neumann_terms):
        counter = counter - lr * hvp(counter)
        total = total + counter
    return lr * total


@pytest.mark.parametrize("i", [1, 2, 3, 6])
def test_paper_eq9_with_i_terms_is_neumann_steps_i_over_alpha(i):
    alpha = 0.5
    x, hvps = ours(bilevel.Neumann(steps=i, alpha=alpha))
    torch.testing.assert_close(x / alpha, paper_eq9(A, alpha, i) @ B, rtol=0, atol=ATOL)
    assert hvps == i - 1


@pytest.mark.parametrize("i", [0, 1, 2, 3, 6])
def test_paper_algorithm3_with_i_hvps_is_neumann_steps_i_plus_1_over_alpha(i):
    alpha = 0.5
    products = []

    def hvp(u):
        products.append(u)
        return A @ u

    theirs = paper_algorithm3(hvp, B, alpha, i)
    x, hvps = ours(bilevel.Neumann(steps=i + 1, alpha=alpha))
    torch.testing.assert_close(x / alpha, theirs, rtol=0, atol=ATOL)
    assert len(products) == i == hvps


@pytest.mark.parametrize("k", [0, 1, 3])
def test_official_code_num_neumann_terms_k_is_neumann_steps_k_plus_1(k):
    lr = 0.5
    x, _ = ours(bilevel.Neumann(steps=k + 1, alpha=lr))
    torch.testing.assert_close(x, official_code(lambda u: A @ u, B, lr, k), rtol=0, atol=ATOL)


def test_identity_is_one_term():
    x, hvps = ours(bilevel.Identity(alpha=0.3))
    torch.testing.assert_close(x, 0.3 * B, rtol=0, atol=ATOL)
    assert hvps == 0


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_unrolled_sgd_from_w_star_is_neumann_with_as_many_terms(steps):
    """Theorem 2: i plain SGD steps of lr α unrolled from w* give Neumann(steps=i, alpha=α)."""
    alpha = 0.5

    def train_loss(params, hparams, batch):
        w = params["w"]
        return 0.5 * w @ A @ w - hparams["lam"] @ w

    def val_loss(params, hparams, batch):
        return B @ params["w"]

    lam = torch.linspace(-1.0, 1.0, P)
    w_star = {"w": torch.linalg.solve(A, lam)}  # ∇_w L_T = Aw − λ = 0
    problem = (train_loss, val_loss, w_star, {"lam": lam}, None, None)
    unrolled, _ = bilevel.hypergradient(*problem, strategy=bilevel.Unroll(steps, torchopt.sgd(lr=alpha)))
    neumann, _ = bilevel.hypergradient(*problem, strategy=bilevel.Neumann(steps=steps, alpha=alpha))
    torch.testing.assert_close(unrolled["lam"], neumann["lam"], rtol=0, atol=ATOL)
