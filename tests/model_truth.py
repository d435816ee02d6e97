"""Truth for hypergradients of real models, computed without the code under test.

Dense second derivatives come from plain double backward on flattened vectors, one unit vector at a
time (never ``torch.func.hessian`` or ``jacfwd(jacrev(·))``, which are wrong through train-mode
normalisation layers in torch 2.13), and each dense matrix is checked against central finite
differences of the first derivatives before it is trusted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

FlatLoss = Callable[[Tensor, Tensor], Tensor]  # (flat w, flat λ) -> scalar


def flatten(tree: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflatten(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for key, t in like.items():
        out[key] = flat[start : start + t.numel()].view_as(t)
        start += t.numel()
    return out


def _grad_w(loss: FlatLoss, w: Tensor, h: Tensor, *, graph: bool) -> tuple[Tensor, Tensor, Tensor]:
    w = w.detach().requires_grad_()
    h = h.detach().requires_grad_()
    (g,) = torch.autograd.grad(loss(w, h), w, create_graph=graph)
    return g, w, h


@dataclasses.dataclass
class Truth:
    """H = ∂²L_T/∂w∂wᵀ, M = ∂²L_T/∂w∂λᵀ (P × Q), and the two gradients of L_V, at one point."""

    H: Tensor
    M: Tensor
    val_w: Tensor
    val_h: Tensor

    def hypergradient(self, damping: float = 0.0) -> Tensor:
        """∂L_V/∂λ − Mᵀ (H + δI)⁻¹ ∂L_V/∂w."""
        A = self.H + damping * torch.eye(len(self.H), dtype=self.H.dtype)
        return self.val_h - self.M.T @ torch.linalg.solve(A, self.val_w)

    def neumann(self, steps: int, alpha: float) -> Tensor:
        """The hypergradient with H⁻¹ replaced by α Σ_{j<steps} (I − αH)^j, formed densely."""
        step = torch.eye(len(self.H), dtype=self.H.dtype) - alpha * self.H
        series = sum(torch.linalg.matrix_power(step, j) for j in range(steps))
        return self.val_h - self.M.T @ (alpha * series @ self.val_w)


def dense_truth(
    train: FlatLoss, val: FlatLoss, w: Tensor, h: Tensor, fd_step: float = 1e-5, fd_tolerance: float | None = 1e-6
) -> Truth:
    """Dense H and M by double backward, each checked against central differences of ∇_w L_T.

    The differences are of fourth order, (−g(x+2ε) + 8g(x+ε) − 8g(x−ε) + g(x−2ε)) / 12ε: error
    O(ε⁴) truncation + O(eps/ε) round-off. Normalising over two elements (group and instance norm here)
    has very large higher derivatives: the second-order stencil at ε = 1e-5 was 2e-5 off there, this
    one agrees to 1e-6 at ε = 1e-5 (and is 6e-2 off at ε = 1e-3).

    ``fd_tolerance=None`` skips the check, for losses evaluated in bf16 (whose gradients are too coarse
    for finite differences): the truth is then "the same double backward, one product at a time".
    """
    g, ww, hh = _grad_w(train, w, h, graph=True)
    eye_w = torch.eye(len(w), dtype=w.dtype)
    H = torch.stack([torch.autograd.grad(g, ww, e, retain_graph=True)[0] for e in eye_w], dim=1)
    rows = [torch.autograd.grad(g, hh, e, retain_graph=True, allow_unused=True)[0] for e in eye_w]
    M = torch.stack([torch.zeros_like(h) if r is None else r for r in rows])  # M[i, j] = ∂g_i/∂λ_j

    def grad_at(w_: Tensor, h_: Tensor) -> Tensor:
        return _grad_w(train, w_, h_, graph=False)[0]

    def stencil(f: Callable[[Tensor], Tensor], x: Tensor, e: Tensor) -> Tensor:
        d = fd_step * e
        return (-f(x + 2 * d) + 8 * f(x + d) - 8 * f(x - d) + f(x - 2 * d)) / (12 * fd_step)

    eye_h = torch.eye(len(h), dtype=h.dtype)
    checks = []
    if fd_tolerance is not None:
        fd_H = torch.stack([stencil(lambda x: grad_at(x, h), w, e) for e in eye_w], 1)
        fd_M = torch.stack([stencil(lambda x: grad_at(w, x), h, e) for e in eye_h], 1)
        checks = [("H", H, fd_H), ("M", M, fd_M)]
    for name, exact, fd in checks:
        error = float((exact - fd).norm() / exact.norm().clamp_min(1e-30))
        if error > fd_tolerance:  # the double-backward truth itself is wrong: no test may rely on it
            raise AssertionError(f"double-backward {name} disagrees with finite differences: {error:.2e}")
    ww, hh = w.detach().requires_grad_(), h.detach().requires_grad_()
    val_w, val_h = torch.autograd.grad(val(ww, hh), (ww, hh), allow_unused=True)
    return Truth(H, M, val_w, torch.zeros_like(h) if val_h is None else val_h)


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
