"""Nyström low-rank inverse (Hataya & Yamada 2023): exact at full rank, better with rank, batched."""

from __future__ import annotations

import itertools

import pytest
import torch

import bilevel
from tests.problems import DIM, Logistic, Ridge


@pytest.mark.parametrize("sketch", ["columns", "gaussian"])
@pytest.mark.parametrize("make", [Ridge.make, Logistic.make], ids=["ridge", "logistic"])
def test_full_rank_nystrom_equals_exact_with_the_same_damping(make, sketch):
    problem = make()  # built inside the test: float64 (conftest)
    args = (problem.train_loss, problem.val_loss, problem.params(), problem.hparams(), *_batches(problem))
    size = sum(t.numel() for t in torch.utils._pytree.tree_leaves(problem.params()))
    exact, _ = bilevel.hypergradient(*args, strategy=bilevel.Exact(damping=1e-3))
    nystrom, info = bilevel.hypergradient(*args, strategy=bilevel.Nystrom(rank=size, damping=1e-3, sketch=sketch))
    got, want = _flat(nystrom), _flat(exact)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8 * float(want.abs().max()))
    assert info.strategy == "nystrom" and info.hvps == size and info.failure is None


def test_error_falls_with_rank_on_ridge_and_matches_the_dense_formula():
    """Nested column sets (one permutation, its first k entries) give H_k ⪯ H_{k+1} ⪯ H, hence
    (H_k + ρI)⁻¹ ⪰ (H_{k+1} + ρI)⁻¹ ⪰ (H + ρI)⁻¹: the energy error vᵀ(x_k − x*) can only fall with k."""
    p = Ridge.make()
    args = (p.train_loss, p.val_loss, p.params(), p.hparams(), p.train_batch, p.val_batch)
    rho = 0.05
    v = p.val_grad_w()
    x_star = torch.linalg.solve(p.hessian() + rho * torch.eye(DIM), v)
    errors = []
    for rank in range(1, DIM + 1):
        grads, info = bilevel.hypergradient(*args, strategy=bilevel.Nystrom(rank=rank, damping=rho), seed=0)
        x = Ridge.flat({"decay": info.solution})
        errors.append(float(v @ (x - x_star)))
        # the same columns, done densely: H_k = C W⁻¹ Cᵀ with C = H[:, J]
        picks = torch.randperm(DIM, generator=torch.Generator().manual_seed(_train_seed(0)))[:rank]
        C, W = p.hessian()[:, picks], p.hessian()[picks][:, picks]
        H_k = C @ torch.linalg.solve(W, C.T)
        dense = p.hypergradient(lambda u, H_k=H_k: torch.linalg.solve(H_k + rho * torch.eye(DIM), u))
        torch.testing.assert_close(Ridge.flat(grads), dense, rtol=0, atol=1e-10 * float(dense.abs().max()))
    assert errors[0] > 1.0 and errors[-1] < 1e-12, errors  # rank 1 is a real approximation
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors)), errors


def test_the_k_products_are_one_batched_call(monkeypatch):
    p = Ridge.make()
    calls = []
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    _, info = bilevel.hypergradient(
        p.train_loss, p.val_loss, p.params(), p.hparams(), p.train_batch, p.val_batch, bilevel.Nystrom(rank=5)
    )
    # ∇L_V, the linearisation ∇_w L_T, the 5 products in one batched pass, the mixed product
    assert info.hvps == 5 and calls == [False, False, True, False]


def test_nystrom_input_checks():
    for bad, match in [
        (lambda: bilevel.Nystrom(rank=0), r"Nystrom\(rank=0\)"),
        (lambda: bilevel.Nystrom(rank=3, damping=0.0), r"damping.*ρ > 0"),
        (lambda: bilevel.Nystrom(rank=3, sketch="svd"), "sketch must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
    p = Ridge.make()
    with pytest.raises(ValueError, match=r"rank must be at most the number of parameters \(7\)"):
        bilevel.hypergradient(
            p.train_loss, p.val_loss, p.params(), p.hparams(), p.train_batch, p.val_batch, bilevel.Nystrom(rank=8)
        )


def _batches(problem):
    if isinstance(problem, Ridge):
        return problem.train_batch, problem.val_batch
    return (problem.X, problem.y), (problem.Xv, problem.yv)


def _flat(grads):
    return torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_leaves(grads)])


def _train_seed(seed):
    from bilevel import _random

    return _random.derive(seed, _random.TRAIN)
