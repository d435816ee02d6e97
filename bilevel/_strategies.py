"""How a hypergradient is computed: small frozen configs validated at construction.

Pass one as ``strategy=`` to :func:`bilevel.hypergradient` or :class:`bilevel.BilevelOptimizer`.
The IFT strategies (Neumann, Identity, ConjugateGradient, Exact) differ only in how they
approximate H⁻¹v (Table 1 of Lorraine et al., 2020); Unroll differentiates through inner
optimisation steps instead.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Literal

from bilevel._hvp import HVP, ReverseHVP


def _bad(call: str, why: str) -> ValueError:
    return ValueError(f"`{call}`: {why}")


def _check_int(cls: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _bad(f"{cls}({name}={value!r})", f"{name} must be an integer >= {minimum}.")


def _check_float(cls: str, name: str, value: Any, *, positive: bool, hint: str = "") -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value
    ok = ok and (value > 0 if positive else value >= 0) and value != float("inf")
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise _bad(f"{cls}({name}={value!r})", f"{name} must be a finite number {bound}.{hint}")


def _check_hvp(cls: str, value: Any) -> None:
    if not isinstance(value, HVP):
        raise TypeError(
            f"`{cls}(hvp={value!r})`: hvp must be bilevel.ReverseHVP(), "
            f"bilevel.ForwardOverReverseHVP() or bilevel.FiniteDifferenceHVP()."
        )


@dataclasses.dataclass(frozen=True)
class Neumann:
    r"""Truncated Neumann series for the inverse Hessian (Algorithm 3 of the paper).

    .. math:: H^{-1} v \approx \alpha \sum_{j=0}^{\text{steps}-1} (I - \alpha H)^j v

    using ``steps − 1`` Hessian-vector products. The series converges when
    :math:`0 < \alpha\,\lambda_i(H) < 2` for every eigenvalue; ``alpha="auto"`` sets
    :math:`\alpha = 1/\hat\lambda_{\max}` from ``power_iters`` products of power iteration.
    By the paper's Theorem 2 this equals ``steps`` unrolled SGD steps of learning rate α
    started at w*.

    Args:
        steps: number of series terms (≥ 1); ``steps=1`` is :class:`Identity`.
        alpha: step size α > 0, or ``"auto"``.
        hvp: how Hessian-vector products are computed (default :class:`ReverseHVP`).
        power_iters: products spent estimating λ_max when ``alpha="auto"``.
        refresh_every: with ``alpha="auto"`` in :class:`BilevelOptimizer`, re-estimate λ_max on
            every ``refresh_every``-th hyperstep and reuse it in between. The functional
            :func:`hypergradient` estimates it on every call.

    Example:
        >>> import bilevel
        >>> bilevel.Neumann(steps=20, alpha=0.01).name
        'neumann'

    References:
        Lorraine, Vicol & Duvenaud (2020), Eq. 9 and Algorithm 3.
    """

    steps: int
    alpha: float | Literal["auto"]
    hvp: HVP = ReverseHVP()
    power_iters: int = 20
    refresh_every: int = 1

    def __post_init__(self) -> None:
        _check_int("Neumann", "steps", self.steps, 1)
        if self.alpha != "auto":
            _check_float(
                "Neumann",
                "alpha",
                self.alpha,
                positive=True,
                hint=" Try alpha='auto' or 1/λ_max of the training Hessian.",
            )
        _check_hvp("Neumann", self.hvp)
        _check_int("Neumann", "power_iters", self.power_iters, 1)
        _check_int("Neumann", "refresh_every", self.refresh_every, 1)

    @property
    def name(self) -> str:
        return "neumann"


@dataclasses.dataclass(frozen=True)
class Identity:
    r"""H⁻¹ ≈ αI: the hypergradient ∂L_V/∂λ − α (∂²L_T/∂λ∂w) ∂L_V/∂w, with no HVP at all.

    Exactly ``Neumann(steps=1, alpha)`` (the "T1 − T2" method of Luketina et al., 2016). Only the
    mixed product needs second derivatives; ``hvp`` says how it is computed.

    Example:
        >>> import bilevel
        >>> bilevel.Identity(alpha=0.1).as_neumann()
        Neumann(steps=1, alpha=0.1, hvp=ReverseHVP(), power_iters=20, refresh_every=1)
    """

    alpha: float = 1.0
    hvp: HVP = ReverseHVP()

    def __post_init__(self) -> None:
        _check_float("Identity", "alpha", self.alpha, positive=True)
        _check_hvp("Identity", self.hvp)

    @property
    def name(self) -> str:
        return "identity"

    def as_neumann(self) -> Neumann:
        """The equivalent one-term :class:`Neumann` strategy."""
        return Neumann(steps=1, alpha=self.alpha, hvp=self.hvp)


@dataclasses.dataclass(frozen=True)
class ConjugateGradient:
    r"""Solve (H + δI) x = ∂L_V/∂w by conjugate gradients.

    Stops when ‖r‖ ≤ tol·‖∂L_V/∂w‖ or after ``maxiter`` Hessian-vector products. Converges when
    H + δI is positive definite; ``damping`` δ > 0 regularises an indefinite or ill-conditioned
    Hessian (the solve then targets the damped system).

    Args:
        maxiter: maximum number of CG iterations (one HVP each), ≥ 1.
        tol: relative residual tolerance, ≥ 0.
        damping: δ ≥ 0 added to the Hessian's diagonal.
        hvp: how Hessian-vector products are computed.

    Example:
        >>> import bilevel
        >>> bilevel.ConjugateGradient(maxiter=50, damping=1e-3).name
        'cg'
    """

    maxiter: int
    tol: float = 1e-10
    damping: float = 0.0
    hvp: HVP = ReverseHVP()

    def __post_init__(self) -> None:
        _check_int("ConjugateGradient", "maxiter", self.maxiter, 1)
        _check_float("ConjugateGradient", "tol", self.tol, positive=False)
        _check_float("ConjugateGradient", "damping", self.damping, positive=False)
        _check_hvp("ConjugateGradient", self.hvp)

    @property
    def name(self) -> str:
        return "cg"


@dataclasses.dataclass(frozen=True)
class Exact:
    r"""Dense Hessian from ``torch.func.hessian`` and a direct solve of (H + δI) x = ∂L_V/∂w.

    Costs O(P²) memory and O(P³) time for P parameters: for small problems and as the reference
    in tests and recipes.

    Example:
        >>> import bilevel
        >>> bilevel.Exact().name
        'exact'
    """

    damping: float = 0.0

    def __post_init__(self) -> None:
        _check_float("Exact", "damping", self.damping, positive=False)

    @property
    def name(self) -> str:
        return "exact"


@dataclasses.dataclass(frozen=True)
class Unroll:
    r"""Differentiate through ``steps`` inner optimiser updates (truncated unrolling).

    In :func:`hypergradient`: starting from ``params`` with a fresh optimiser state, run
    :math:`w_{k+1} = w_k + u(\nabla_w L_T(w_k, \lambda))` for ``steps`` updates on
    ``train_batch``, then return :math:`d L_V(w_{\text{steps}}(\lambda), \lambda)/d\lambda`.
    In :class:`BilevelOptimizer`: backpropagate through its own last ``steps`` inner updates.
    Memory grows linearly in ``steps`` (Table 2 of the paper).

    Args:
        steps: number of differentiable inner updates, ≥ 1.
        optimizer: a torchopt ``GradientTransformation`` such as ``torchopt.sgd(lr=0.1)``.

    Example:
        >>> import bilevel, torchopt
        >>> bilevel.Unroll(steps=5, optimizer=torchopt.sgd(lr=0.1)).name
        'unroll'
    """

    steps: int
    optimizer: Any

    def __post_init__(self) -> None:
        _check_int("Unroll", "steps", self.steps, 1)
        if not (callable(getattr(self.optimizer, "init", None)) and callable(getattr(self.optimizer, "update", None))):
            raise TypeError(
                f"`Unroll(optimizer={self.optimizer!r})`: optimizer must be a torchopt "
                f"GradientTransformation, e.g. torchopt.sgd(lr=0.1) or torchopt.adam(1e-3)."
            )

    @property
    def name(self) -> str:
        return "unroll"


Strategy = Neumann | Identity | ConjugateGradient | Exact | Unroll
"""Type of the ``strategy=`` argument: Neumann, Identity, ConjugateGradient, Exact or Unroll."""
STRATEGIES = (Neumann, Identity, ConjugateGradient, Exact, Unroll)
