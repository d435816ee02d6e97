"""How a hypergradient is computed: small frozen configs validated at construction.

Pass one as ``strategy=`` to [`hypergradient`][bilevel.hypergradient] or
[`BilevelOptimizer`][bilevel.BilevelOptimizer].
The IFT strategies (Neumann, Identity, ConjugateGradient, Exact, Nystrom) differ only in how they
approximate H⁻¹v (Table 1 of Lorraine et al., 2020); Unroll differentiates through inner
optimisation steps instead, and Penalty needs first derivatives only (the value-function penalty).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal

import torch

from bilevel._hvp import HVP, ReverseHVP


def _bad(call: str, why: str) -> ValueError:
    return ValueError(f"`{call}`: {why}")


def _check_int(cls: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _bad(f"{cls}({name}={value!r})", f"{name} must be an integer >= {minimum}.")


def _check_float(cls: str, name: str, value: Any, *, positive: bool, hint: str = "") -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        as_float = float(value) if ok else math.nan
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        as_float = math.inf
    ok = ok and math.isfinite(as_float) and (as_float > 0 if positive else as_float >= 0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise _bad(f"{cls}({name}={value!r})", f"{name} must be a finite number {bound}.{hint}")


def _check_bool(cls: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{cls}({name}={value!r})`: {name} must be True or False.")


def _check_hvp(cls: str, value: Any) -> None:
    if not isinstance(value, HVP):
        raise TypeError(
            f"`{cls}(hvp={value!r})`: hvp must be bilevel.ReverseHVP(), "
            f"bilevel.ForwardOverReverseHVP() or bilevel.FiniteDifferenceHVP()."
        )


@dataclasses.dataclass(frozen=True)
class Neumann:
    r"""Truncated Neumann series for the inverse Hessian (Eq. 9 and Algorithm 3 of the paper).

    $$
    H^{-1} v \approx \alpha \sum_{j=0}^{\text{steps}-1} (I - \alpha H)^j v
    $$

    ``steps`` terms, using ``steps − 1`` Hessian-vector products (each term is the previous one
    times I − αH). Along an eigenvector of H with eigenvalue \(\mu_j\) the series applies
    \((1 - (1 - \alpha\mu_j)^{\text{steps}})/\mu_j\) instead of \(1/\mu_j\). It converges as
    ``steps`` grows iff \(0 < \alpha\mu_j < 2\) for every j, with error shrinking by
    \(\max_j |1 - \alpha\mu_j|\) per term at worst; that rate is best at
    \(\alpha = 2/(\mu_{\min} + \mu_{\max})\) and worse for any larger α.

    ``alpha="auto"`` sets \(\alpha = 1/\hat\rho\), where \(\hat\rho \le \max_j |\mu_j|\) is a
    power-iteration estimate of the spectral radius from ``power_iters`` products. For a positive
    semi-definite H this rules out a step too large for the top of the spectrum (every
    \(\alpha\mu_j\) stays near or below 1). It cannot help with negative eigenvalues: there
    \(|1 - \alpha\mu_j| > 1\) for every α > 0, and that component grows with ``steps`` whatever
    α is — keep the series short, damp, or train closer to a minimum.

    By the paper's Theorem 2, ``Neumann(steps=i, alpha=α)`` equals ``i`` plain gradient-descent steps
    of learning rate α unrolled from w* (``Unroll(i, torchopt.sgd(lr=α))``; not momentum or Adam).

    Step-count conventions:
        Other codes and the paper count differently. The same vector, written in each convention:

        | elsewhere | HVPs | here |
        | --- | --- | --- |
        | paper, Eq. 9 with i terms (no outer α) | i − 1 | ``Neumann(steps=i, alpha=α)`` / α |
        | paper, Algorithm 3 with i iterations (no outer α) | i | ``Neumann(steps=i+1, alpha=α)`` / α |
        | paper's official code, ``num_neumann_terms=K``, learning rate α | K | ``Neumann(steps=K+1, alpha=α)`` |
        | torchopt ``linear_solve.solve_inv(ns=True, maxiter=m, alpha=α)`` | m | ``Neumann(steps=m+1, alpha=α)`` |
        | torchopt ``solve_inv(ns=True, maxiter=m)`` (no ``alpha``) | m | ``Neumann(steps=m+1, alpha=1.0)`` |
        | ``Identity(alpha=α)`` | 0 | ``Neumann(steps=1, alpha=α)`` |

        So the paper's "3 Neumann" (3 HVPs in its Algorithm 3 and code) is ``Neumann(steps=4)``.
        ``tests/test_conventions.py`` checks every row.

    Args:
        steps: number of series terms (≥ 1), i.e. HVPs + 1; ``steps=1`` is
            [`Identity`][bilevel.Identity].
        alpha: step size α > 0, or ``"auto"``.
        hvp: how Hessian-vector products are computed (default [`ReverseHVP`][bilevel.ReverseHVP]).
        power_iters: products spent estimating the spectral radius when ``alpha="auto"``.
        refresh_every: with ``alpha="auto"`` in [`BilevelOptimizer`][bilevel.BilevelOptimizer], re-estimate
            the spectral radius on every ``refresh_every``-th hyperstep and reuse it in between. The
            default 10 spends ``power_iters / 10`` = 2 products per hyperstep on the estimate instead
            of 20 (with ``steps=5`` a fresh estimate every hyperstep cost 5× the series itself). The
            estimate is taken on one hyperstep's batch (and dropout masks), and the next batches'
            radii differ: 45.6–70.6 (×1.55) over 4 batches × 2 dropout seeds of a BatchNorm + dropout
            ResNet on digits at batch 64, where 20 and 100 power iterations agreed to 0.1 %. α = 1/ρ̂
            still converges on a batch whose radius is up to 2× the estimate; beyond, the series
            diverges, and a hyperstep that is non-finite or diverging (``info.diverging``) with a
            reused α is redone at once with a fresh estimate (``info.redone``): 1 of 60 hypersteps of
            that ResNet's 600-step run, against 0 with ``refresh_every=1`` at 3.75× the HVPs. Rule:
            keep the default while ``info.redone`` stays rare; if more than about one hyperstep in
            ten is redone, the batches' curvatures differ by more than 2×: use ``refresh_every=1``.
            The functional [`hypergradient`][bilevel.hypergradient] estimates it on every call.
        warm_start: in [`BilevelOptimizer`][bilevel.BilevelOptimizer], start from the previous
            hyperstep's solution x₀: the series is applied to the residual, x = x₀ + α Σ_j (I − αH)^j
            (v − Hx₀), i.e. ``steps`` Richardson iterations x ← x + α(v − Hx) from x₀, one HVP more
            than from zero. Consecutive hypersteps solve nearly the same system, so x₀ is already
            close (AmIGO, Arbel & Mairal 2022). The functional API takes x₀ as ``init=``.

    Example:
        >>> import bilevel
        >>> bilevel.Neumann(steps=20, alpha=0.01).name
        'neumann'

    References:
        Lorraine, Vicol & Duvenaud (2020), Eq. 9, Algorithm 3 and Theorem 2.
    """

    steps: int
    alpha: float | Literal["auto"]
    hvp: HVP = ReverseHVP()
    power_iters: int = 20
    refresh_every: int = 10
    warm_start: bool = False

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
        _check_bool("Neumann", "warm_start", self.warm_start)

    @property
    def name(self) -> str:
        return "neumann"


@dataclasses.dataclass(frozen=True)
class Identity:
    r"""H⁻¹ ≈ αI: the hypergradient ∂L_V/∂λ − α (∂²L_T/∂λ∂w) ∂L_V/∂w, with no HVP at all.

    $$
    \frac{dL_V}{d\lambda} \approx \frac{\partial L_V}{\partial\lambda}
      - \alpha \Big(\frac{\partial^2 L_T}{\partial w\,\partial\lambda^\top}\Big)^{\!\top}
        \frac{\partial L_V}{\partial w}
    $$

    Exactly ``Neumann(steps=1, alpha)`` (the "T1 − T2" method of Luketina et al., 2016). Only the
    mixed product needs second derivatives; ``hvp`` says how it is computed.

    Args:
        alpha: the scale α > 0 of the identity standing in for H⁻¹.
        hvp: how the mixed product is computed (default [`ReverseHVP`][bilevel.ReverseHVP]).

    Example:
        >>> import bilevel
        >>> bilevel.Identity(alpha=0.1).as_neumann()
        Neumann(steps=1, alpha=0.1, hvp=ReverseHVP(), power_iters=20, refresh_every=10, warm_start=False)

    References:
        Lorraine, Vicol & Duvenaud (2020), Table 1; Luketina et al. (2016), "Scalable
        gradient-based tuning of continuous regularization hyperparameters".
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
        """The equivalent one-term [`Neumann`][bilevel.Neumann] strategy."""
        return Neumann(steps=1, alpha=self.alpha, hvp=self.hvp)


@dataclasses.dataclass(frozen=True)
class ConjugateGradient:
    r"""Solve (H + δI) x = ∂L_V/∂w by conjugate gradients.

    $$
    x_k = \operatorname*{arg\,min}_{x \in \mathcal{K}_k}
      \tfrac12 x^\top (H + \delta I) x - x^\top b,
    \qquad \mathcal{K}_k = \operatorname{span}\{b, (H+\delta I) b, \dots, (H+\delta I)^{k-1} b\},
    $$

    with \(b = \partial L_V/\partial w\), one Hessian-vector product per iteration: \(x_k\) is the
    point of \(\mathcal{K}_k\) closest to the solution in the (H + δI)-norm. Stops when
    ‖r‖ ≤ tol·‖b‖ or after ``maxiter`` Hessian-vector products. Converges when H + δI is
    positive definite and every product uses the same matrix; ``damping`` δ > 0 regularises an
    indefinite or ill-conditioned Hessian (the solve then targets the damped system). Each
    iteration reads two scalars on the host (for the step length and the convergence test): on a
    GPU, two synchronisations per iteration.

    Args:
        maxiter: maximum number of CG iterations (one HVP each), ≥ 1.
        tol: relative residual tolerance ‖r‖/‖b‖, ≥ 0; ``None`` (default) chooses it for the params'
            dtype, max(1e-10, 100·eps): 1e-10 in float64, 1.2e-5 in float32 (a fixed 1e-10 is below what
            float32 round-off lets CG reach, so it would never report ``converged``).
        damping: δ ≥ 0 added to the Hessian's diagonal.
        hvp: how Hessian-vector products are computed.
        warm_start: in [`BilevelOptimizer`][bilevel.BilevelOptimizer], start CG from the previous
            hyperstep's solution instead of 0 (one extra HVP for its residual; the tolerance stays
            relative to ‖b‖, so a good start stops early). The functional API takes it as ``init=``.

    Example:
        >>> import bilevel
        >>> bilevel.ConjugateGradient(maxiter=50, damping=1e-3).name
        'cg'

    References:
        Hestenes & Stiefel (1952); used for hyperparameters by Pedregosa (2016, HOAG) and
        compared with Neumann in Lorraine, Vicol & Duvenaud (2020), Section 5.1.
    """

    maxiter: int
    tol: float | None = None
    damping: float = 0.0
    hvp: HVP = ReverseHVP()
    warm_start: bool = False

    def __post_init__(self) -> None:
        _check_int("ConjugateGradient", "maxiter", self.maxiter, 1)
        if self.tol is not None:
            _check_float("ConjugateGradient", "tol", self.tol, positive=False)
        _check_float("ConjugateGradient", "damping", self.damping, positive=False)
        _check_hvp("ConjugateGradient", self.hvp)
        _check_bool("ConjugateGradient", "warm_start", self.warm_start)

    @property
    def name(self) -> str:
        return "cg"

    def tolerance(self, dtype: torch.dtype) -> float:
        """``tol``, or the default for ``dtype``: max(1e-10, 100 · machine epsilon)."""
        return self.tol if self.tol is not None else max(1e-10, 100 * torch.finfo(dtype).eps)


@dataclasses.dataclass(frozen=True)
class Exact:
    r"""Dense Hessian from ``torch.func.hessian`` and a direct solve of (H + δI) x = ∂L_V/∂w.

    $$
    x = (H + \delta I)^{-1} \frac{\partial L_V}{\partial w}
    $$

    Costs O(P²) memory and O(P³) time for P parameters: for small problems and as the reference
    in tests and recipes.

    Args:
        damping: δ ≥ 0 added to the Hessian's diagonal before the solve.

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
class Nystrom:
    r"""Rank-k Nyström approximation of the Hessian, inverted by the Woodbury identity; no iterations.

    With a sketch \(\Omega \in \mathbb R^{P\times k}\) — ``k = rank`` random coordinates
    (``sketch="columns"``: \(\Omega\) selects k columns of H, as in Hataya & Yamada 2023) or a
    Gaussian matrix (``sketch="gaussian"``) — take \(C = H\Omega\) in **one batched call** of k
    Hessian-vector products and \(W = \Omega^\top C\). Then \(H_k = C W^{-1} C^\top \approx H\)
    and, with damping \(\rho > 0\),

    $$
    (H_k + \rho I)^{-1} v = \frac{1}{\rho}\Big(v - C\,(\rho W + C^\top C)^{-1} C^\top v\Big),
    $$

    a k×k solve. With k = P (every column) \(H_k = H\) and the result equals
    ``Exact(damping=ρ)``. Along directions the sketch misses the inverse acts as \(1/\rho\), so ρ
    should be of the order of the small eigenvalues of H that matter (e.g. the weight decay).

    When it wins: a Hessian with a few dominant eigendirections (the common case for networks) and a
    budget of k products that can run as one vectorised pass — k HVPs in one call cost far less than
    k sequential CG or Neumann products on small models and on accelerators. Memory: the k columns,
    O(kP). For a well-spread spectrum, or P where kP floats do not fit, CG or Neumann are better.

    Args:
        rank: k, the number of sketch columns (≥ 1, at most the number of parameters).
        damping: ρ > 0 added to the approximated Hessian.
        sketch: ``"columns"`` (k random coordinates, without replacement) or ``"gaussian"``.
        hvp: how Hessian-vector products are computed; [`ReverseHVP`][bilevel.ReverseHVP] computes
            the k products in one vectorised double-backward pass (``is_grads_batched``), the other
            modes one after the other.

    Example:
        >>> import bilevel
        >>> bilevel.Nystrom(rank=20, damping=1e-2).name
        'nystrom'

    References:
        Hataya & Yamada (2023), "Nyström method for accurate and scalable implicit differentiation",
        AISTATS; Williams & Seeger (2001) for the Nyström approximation.
    """

    rank: int
    damping: float = 1e-2
    sketch: Literal["columns", "gaussian"] = "columns"
    hvp: HVP = ReverseHVP()

    def __post_init__(self) -> None:
        _check_int("Nystrom", "rank", self.rank, 1)
        _check_float(
            "Nystrom", "damping", self.damping, positive=True, hint=" The Woodbury inverse needs ρ > 0, e.g. 1e-2."
        )
        if self.sketch not in ("columns", "gaussian"):
            raise _bad(f"Nystrom(sketch={self.sketch!r})", "sketch must be 'columns' or 'gaussian'.")
        _check_hvp("Nystrom", self.hvp)

    @property
    def name(self) -> str:
        return "nystrom"


@dataclasses.dataclass(frozen=True)
class Unroll:
    r"""Differentiate through ``steps`` inner optimiser updates (truncated unrolling).

    In [`hypergradient`][bilevel.hypergradient]: starting from ``params`` with a fresh state of
    ``optimizer``, run \(w_{k+1} = w_k + u(\nabla_w L_T(w_k, \lambda))\) for ``steps`` updates on
    ``train_batch``, then return \(d L_V(w_{\text{steps}}(\lambda), \lambda)/d\lambda\).
    In [`BilevelOptimizer`][bilevel.BilevelOptimizer]: backpropagate through its own last
    ``steps`` inner updates, made by its own ``inner`` optimiser (``optimizer`` must then be
    ``None``: a different one would describe updates that never happened).
    Memory grows linearly in ``steps`` (Table 2 of the paper).

    Args:
        steps: number of differentiable inner updates, ≥ 1.
        optimizer: a torchopt ``GradientTransformation`` such as ``torchopt.sgd(lr=0.1)``, or a callable
            ``hparams -> GradientTransformation`` to differentiate through the optimiser's own
            hyperparameters (``lambda h: torchopt.sgd(lr=h["log_lr"].exp())``); needed by the
            functional [`hypergradient`][bilevel.hypergradient], ``None`` in
            [`BilevelOptimizer`][bilevel.BilevelOptimizer] (it unrolls its own ``inner``).

    Example:
        >>> import bilevel, torchopt
        >>> bilevel.Unroll(steps=5, optimizer=torchopt.sgd(lr=0.1)).name
        'unroll'

    References:
        Maclaurin, Duvenaud & Adams (2015); Shaban et al. (2019) for truncation; Lorraine, Vicol
        & Duvenaud (2020), Section 4.2 and Theorem 2 (plain SGD unrolled from w* is the Neumann
        series: ``Unroll(i, torchopt.sgd(lr=α))`` from w* equals ``Neumann(steps=i, alpha=α)``).
    """

    steps: int
    optimizer: Any = None

    def __post_init__(self) -> None:
        _check_int("Unroll", "steps", self.steps, 1)
        transformation = self.optimizer
        looks_right = callable(transformation) and not isinstance(transformation, type)
        looks_right = looks_right or all(callable(getattr(transformation, n, None)) for n in ("init", "update"))
        if transformation is not None and not looks_right:
            raise TypeError(
                f"`Unroll(optimizer={self.optimizer!r})`: optimizer must be a torchopt "
                f"GradientTransformation, e.g. torchopt.sgd(lr=0.1) or torchopt.adam(1e-3)."
            )

    @property
    def name(self) -> str:
        return "unroll"


@dataclasses.dataclass(frozen=True)
class Penalty:
    r"""First-order hypergradients from the value-function penalty: no second derivative anywhere.

    The bilevel problem is the constrained one \(\min_{\lambda, u} L_V(u, \lambda)\) subject to
    \(L_T(u, \lambda) \le \min_v L_T(v, \lambda)\). Its penalty with weight σ,
    \(L_V(u, \lambda) + \sigma\,(L_T(u, \lambda) - L_T(w^*(\lambda), \lambda))\), has, at its minimiser
    \(u^*_\sigma = \arg\min_u L_T(u, \lambda) + L_V(u, \lambda)/\sigma\) and by the envelope theorem for
    \(\min_v L_T\), the gradient

    $$
    \frac{dL_V}{d\lambda} \approx \frac{\partial L_V}{\partial\lambda}(u, \lambda)
      + \sigma\Big(\frac{\partial L_T}{\partial\lambda}(u, \lambda)
      - \frac{\partial L_T}{\partial\lambda}(w, \lambda)\Big).
    $$

    With \(u = u^*_\sigma\) and \(w = w^*\): \(u^*_\sigma - w^* = -H^{-1}\partial L_V/\partial w\,/\sigma
    + O(1/\sigma^2)\), so the bracket times σ is \(-(\partial^2 L_T/\partial w\partial\lambda^\top)^\top
    H^{-1}\partial L_V/\partial w + O(1/\sigma)\): the IFT hypergradient up to an O(1/σ) bias.

    The bracket is a difference of nearly equal gradients multiplied by σ, so anything in u − w that is
    not the O(1/σ) displacement is amplified by σ: w not quite at w*, or u fitted to the hyperstep's
    batch while w was fitted to many (with mini-batches the plain estimate diverges once σ is large:
    on benchopt's quadratic with batches of 64 it does from σ = 10). Hence a twin: u and v take the
    same ``steps`` updates of the auxiliary optimiser on the same batches, u on
    \(L_T + L_V/\sigma\) and v on \(L_T\) alone, and the bracket is taken between them,
    \(\sigma(\partial L_T/\partial\lambda(u) - \partial L_T/\partial\lambda(v))\). Whatever the two
    share (the fit to the batch, w's distance to w*) cancels; what differs is the L_V/σ pull. For a
    quadratic L_T and SGD with rate η, \(\sigma(u - v)\) after K steps from the same start is
    \(-\eta\sum_{k<K}(I - \eta H)^k\,\partial L_V/\partial w\), K terms of the Neumann series,
    up to L_V's gradient changing along u's path (O(1/σ)); carried over hypersteps, the terms add up.
    Only gradients are taken (3·``steps`` + 3 per hypergradient), so it works with every model that
    trains with ``loss.backward()``: fused kernels without double backward, ``torch.compile``,
    ``weight_norm``, and models too large for an HVP's retained graph. What σ trades: a small σ biases
    the estimate (O(1/σ) from L_T's curvature changing between v and u); a large one makes the
    difference u − v small beside rounding (float32's 1e-7 relative, times σ) and its O(1/σ²)
    remainder slow to reach.

    Args:
        penalty: σ > 0.
        steps: auxiliary updates per hypergradient, ≥ 1.
        optimizer: the auxiliary optimiser (a torchopt ``GradientTransformation``), best linear in the
            gradient (SGD, momentum): Adam-like rules normalise the update, so the O(1/σ) pull of
            L_V/σ becomes a full-sized step and u − v stops scaling as 1/σ (only their fixed points are
            right). Required by the functional [`hypergradient`][bilevel.hypergradient]; in
            [`BilevelOptimizer`][bilevel.BilevelOptimizer] ``None`` uses the inner optimiser's
            configuration if it is linear (an adaptive one is refused; one given here that is not linear
            is warned about), with states of its own for u and v. There the difference u − v persists
            from hyperstep to hyperstep: each hyperstep starts v at the current weights and u at
            v + (u − v) of the last one.
        growth: in a ``BilevelOptimizer``, σ at hyperstep t is ``penalty · (1 + t) ** growth``: F²SA lets
            σ grow with the iteration so that the O(1/σ) bias vanishes while early hypersteps, far from a
            minimum, stay well conditioned. 0 keeps σ fixed.

    Example:
        >>> import bilevel, torchopt
        >>> bilevel.Penalty(penalty=100.0, steps=10, optimizer=torchopt.sgd(0.1)).name
        'penalty'

    References:
        Kwon, Kwon, Wright & Nowak (2023), "A fully first-order method for stochastic bilevel
        optimization" (F²SA), ICML; Pan et al. (2025), "ScaleBiO: scalable bilevel optimization for LLM
        data reweighting", ACL; Liu et al. (2022), BOME, NeurIPS.
    """

    penalty: float
    steps: int = 10
    optimizer: Any = None
    growth: float = 0.0

    def __post_init__(self) -> None:
        _check_float("Penalty", "penalty", self.penalty, positive=True, hint=" e.g. 100.0; see the docstring.")
        _check_int("Penalty", "steps", self.steps, 1)
        _check_float("Penalty", "growth", self.growth, positive=False)
        transformation = all(callable(getattr(self.optimizer, n, None)) for n in ("init", "update"))
        if self.optimizer is not None and not transformation:
            raise TypeError(
                f"`Penalty(optimizer={self.optimizer!r})`: optimizer must be a torchopt GradientTransformation, e.g. "
                f"torchopt.sgd(lr=0.1), or None in BilevelOptimizer (the inner optimiser's configuration)."
            )

    @property
    def name(self) -> str:
        return "penalty"

    def sigma(self, hyperstep: int) -> float:
        """σ at hyperstep ``hyperstep`` (0-based): ``penalty · (1 + hyperstep) ** growth``."""
        return float(self.penalty) * (1.0 + hyperstep) ** float(self.growth)


Strategy = Neumann | Identity | ConjugateGradient | Exact | Nystrom | Unroll | Penalty
"""Type of the ``strategy=`` argument: Neumann, Identity, ConjugateGradient, Exact, Nystrom, Unroll or Penalty."""
STRATEGIES = (Neumann, Identity, ConjugateGradient, Exact, Nystrom, Unroll, Penalty)
