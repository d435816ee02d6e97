"""The problem zoo: bilevel problems whose truth comes from outside the code under test.

* Ridge regression with per-coordinate log-penalties: w*(λ), H, the mixed partials and the
  hypergradient in closed form; params and hparams are nested, multi-tensor pytrees.
* Logistic regression with per-weight log-penalties: the inner problem is solved by Newton's
  method to machine precision; truth is finite differences of λ ↦ L_V(w*(λ), λ).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable

import torch
from torch import Tensor


def _split(flat: Tensor) -> dict[str, Tensor]:
    """Vector of 7 → a two-leaf dict (a 3-vector and a 2×2 matrix): exercises pytrees."""
    return {"a": flat[:3], "b": flat[3:].reshape(2, 2)}


def _join(tree: dict[str, Tensor]) -> Tensor:
    return torch.cat([tree["a"].reshape(-1), tree["b"].reshape(-1)])


DIM = 7


@dataclasses.dataclass
class Ridge:
    """L_T = ½ mean (Xw − y)² + ½ Σ_i e^{λ_i} w_i²;  L_V = ½ mean (X_v w − y_v)² + ½ c ‖λ‖².

    With c > 0 the validation loss has a direct term ∂L_V/∂λ = c λ.
    """

    X: Tensor
    y: Tensor
    Xv: Tensor
    yv: Tensor
    lam: Tensor
    direct: float = 0.0

    @classmethod
    def make(cls, n: int = 40, direct: float = 0.0, seed: int = 0) -> Ridge:
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, DIM, generator=g)
        w_true = torch.randn(DIM, generator=g)
        y = X @ w_true + 0.3 * torch.randn(n, generator=g)
        Xv = torch.randn(n, DIM, generator=g)
        yv = Xv @ w_true + 0.3 * torch.randn(n, generator=g)
        lam = 0.5 * torch.randn(DIM, generator=g) - 1.0
        return cls(X, y, Xv, yv, lam, direct)

    # ---- the losses, as users write them -------------------------------------------------
    def train_loss(self, params: dict, hparams: dict, batch: tuple[Tensor, Tensor]) -> Tensor:
        X, y = batch
        w = _join(params)
        lam = _join(hparams["decay"])
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()

    def val_loss(self, params: dict, hparams: dict, batch: tuple[Tensor, Tensor]) -> Tensor:
        X, y = batch
        out = 0.5 * ((X @ _join(params) - y) ** 2).mean()
        if self.direct:
            out = out + 0.5 * self.direct * (_join(hparams["decay"]) ** 2).sum()
        return out

    @property
    def train_batch(self) -> tuple[Tensor, Tensor]:
        return self.X, self.y

    @property
    def val_batch(self) -> tuple[Tensor, Tensor]:
        return self.Xv, self.yv

    # ---- closed forms --------------------------------------------------------------------
    def hessian(self, lam: Tensor | None = None) -> Tensor:
        lam = self.lam if lam is None else lam
        return self.X.T @ self.X / len(self.X) + torch.diag(lam.exp())

    def w_star(self, lam: Tensor | None = None) -> Tensor:
        lam = self.lam if lam is None else lam
        return torch.linalg.solve(self.hessian(lam), self.X.T @ self.y / len(self.X))

    def outer(self, lam: Tensor) -> Tensor:
        """λ ↦ L_V(w*(λ), λ) in closed form."""
        w = self.w_star(lam)
        return 0.5 * ((self.Xv @ w - self.yv) ** 2).mean() + 0.5 * self.direct * (lam**2).sum()

    def val_grad_w(self) -> Tensor:
        w = self.w_star()
        return self.Xv.T @ (self.Xv @ w - self.yv) / len(self.Xv)

    def mixed(self) -> Tensor:
        """∂²L_T/∂w∂λᵀ = diag(e^λ ⊙ w*)."""
        return torch.diag(self.lam.exp() * self.w_star())

    def hypergradient(self, inverse_times: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """direct − Mᵀ A v, with A = H⁻¹ by default or any approximation of it."""
        apply = inverse_times or (lambda v: torch.linalg.solve(self.hessian(), v))
        return self.direct * self.lam - self.mixed().T @ apply(self.val_grad_w())

    def neumann_hypergradient(self, steps: int, alpha: float) -> Tensor:
        """The truncated series α Σ_{j<steps} (I − αH)^j, formed densely."""
        H = self.hessian()
        step = torch.eye(DIM) - alpha * H
        series = sum(torch.linalg.matrix_power(step, j) for j in range(steps))
        return self.hypergradient(lambda v: alpha * series @ v)

    # ---- user-facing trees ---------------------------------------------------------------
    def params(self) -> dict[str, Tensor]:
        return _split(self.w_star())

    def hparams(self) -> dict[str, dict[str, Tensor]]:
        return {"decay": _split(self.lam)}

    @staticmethod
    def flat(hparams_tree: dict) -> Tensor:
        return _join(hparams_tree["decay"])


@dataclasses.dataclass
class Logistic:
    """Binary logistic regression with per-weight log-penalties (a non-quadratic inner loss)."""

    X: Tensor
    y: Tensor
    Xv: Tensor
    yv: Tensor
    lam: Tensor

    @classmethod
    def make(cls, n: int = 60, d: int = 5, seed: int = 1) -> Logistic:
        g = torch.Generator().manual_seed(seed)
        w_true = torch.randn(d, generator=g)
        X = torch.randn(n, d, generator=g)
        Xv = torch.randn(n, d, generator=g)
        y = (torch.rand(n, generator=g) < torch.sigmoid(X @ w_true)).double()
        yv = (torch.rand(n, generator=g) < torch.sigmoid(Xv @ w_true)).double()
        lam = 0.5 * torch.randn(d, generator=g) - 2.0
        return cls(X, y, Xv, yv, lam)

    @staticmethod
    def _nll(w: Tensor, X: Tensor, y: Tensor) -> Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y)

    def train_loss(self, params: dict, hparams: dict, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self._nll(params["w"], *batch) + 0.5 * (hparams["log_l2"].exp() * params["w"] ** 2).sum()

    def val_loss(self, params: dict, hparams: dict, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self._nll(params["w"], *batch)

    def w_star(self, lam: Tensor | None = None) -> Tensor:
        """Newton's method on the strictly convex training loss, to machine precision."""
        lam = self.lam if lam is None else lam
        w = torch.zeros(self.X.shape[1])
        for _ in range(50):
            p = torch.sigmoid(self.X @ w)
            grad = self.X.T @ (p - self.y) / len(self.y) + lam.exp() * w
            H = (self.X.T * (p * (1 - p))) @ self.X / len(self.y) + torch.diag(lam.exp())
            w = w - torch.linalg.solve(H, grad)
        return w

    def outer(self, lam: Tensor) -> Tensor:
        return self._nll(self.w_star(lam), self.Xv, self.yv)

    def params(self) -> dict[str, Tensor]:
        return {"w": self.w_star()}

    def hparams(self) -> dict[str, Tensor]:
        return {"log_l2": self.lam.clone()}


def central_difference(f: Callable[[Tensor], Tensor], x: Tensor, step: float = 1e-5) -> Tensor:
    """∂f/∂x_i ≈ (f(x + h e_i) − f(x − h e_i)) / 2h; error O(h²) + O(ε/h) ≈ 1e-10 at h = 1e-5."""
    out = torch.empty_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = step
        out[i] = (f(x + e) - f(x - e)) / (2 * step)
    return out


def roundtrip(state: dict) -> dict:
    """``state`` as a checkpoint file gives it back: through ``torch.save`` and ``torch.load(weights_only=True)``
    (plain tensors and containers only), sharing no tensor with the original."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)

