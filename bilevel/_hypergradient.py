"""The functional hypergradient: IFT assembly and the unrolled alternative.

For an inner problem w*(λ) = argmin_w L_T(w, λ) and an outer loss L_V(w, λ), the implicit
function theorem gives the total derivative

    dL_V/dλ = ∂L_V/∂λ − (∂²L_T/∂w∂λᵀ)ᵀ H⁻¹ ∂L_V/∂w,        H = ∂²L_T/∂w∂wᵀ,

evaluated at w = w*(λ). The data flow is one way: one gradient of L_V, an approximate
solve x ≈ H⁻¹ ∂L_V/∂w using Hessian-vector products, and one mixed vector-Jacobian product.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from bilevel import _linalg, _random, _tree
from bilevel._distributed import DataParallel, coefficients, parts
from bilevel._hvp import ReverseHVP, explained
from bilevel._problem import Loss, Problem, second_order
from bilevel._strategies import (
    STRATEGIES,
    ConjugateGradient,
    Exact,
    Identity,
    Neumann,
    Nystrom,
    Penalty,
    Strategy,
    Unroll,
)
from bilevel._transform import Transformation
from bilevel._tree import Leaves


@dataclasses.dataclass(frozen=True, repr=False)
class HypergradInfo:
    """What happened while computing one hypergradient.

    Tensors are returned as 0-dim tensors on the inputs' device so that reading the record costs
    no host synchronisation until you ask for a value (``float(info.val_loss)``). ``print(info)``
    shows the fields that are set, as numbers (no tensor or solution dumps);
    [`to_dict`][bilevel.HypergradInfo.to_dict] gives them as plain Python values for a logger.

    Attributes:
        strategy: the strategy's name (``"neumann"``, ``"identity"``, ``"cg"``, ``"exact"``,
            ``"nystrom"``, ``"unroll"``, ``"penalty"``).
        hvps: Hessian-vector products applied (power iteration and residual included; for
            ``Exact`` the P columns of the dense Hessian, for ``Nystrom`` its ``rank`` batched ones).
        power_hvps: how many of ``hvps`` estimated the spectral radius for ``alpha="auto"`` (0 when α
            was given, or reused from an earlier hyperstep by ``BilevelOptimizer``).
        val_loss: L_V at the given params and hparams (unrolled params for ``Unroll``).
        grad_norm: ‖dL_V/dλ‖, the Euclidean norm of the whole hypergradient (for progress bars
            and divergence checks; NaN/inf when the hypergradient is non-finite).
        residual: ‖(H + δI)x − ∂L_V/∂w‖ of the linear solve, or ``None`` where there is no solve
            (``Unroll``) or it was not requested (Neumann/Identity/Nyström: pass ``residual=True``;
            costs one HVP). For CG it is by default the residual carried by the CG recursion (free,
            but in float32 it can fall below the true residual); ``residual=True`` recomputes it.
        relative_residual: ``residual`` / ‖∂L_V/∂w‖, wherever ``residual`` is known: 1 is what x = 0
            achieves. Above 1 the solve may be worse than none: the hypergradient is refused (see
            ``failure``) when, besides, CG met negative curvature or the energy ½xᵀ(H + δI)x − xᵀ∂L_V/∂w
            is above x = 0's (always, for Neumann). CG's residual alone may exceed 1 on the way to the
            solution of a positive definite system, where it still improves on x = 0.
        iterations: CG iterations used (CG only).
        converged: whether CG met its tolerance (CG only).
        alpha: the Neumann step size used (resolved when ``alpha="auto"``).
        lambda_max: the spectral-radius estimate α came from (``alpha="auto"`` only): 1/α, freshly
            estimated by power iteration or, in a ``BilevelOptimizer``, reused from an earlier hyperstep.
        alpha_source: Neumann only: ``"given"`` (a fixed α), ``"estimated"`` (power iteration in this
            hyperstep) or ``"reused"`` (an estimate cached by ``BilevelOptimizer`` from an earlier one).
        redone: the hyperstep was computed twice: ``BilevelOptimizer`` found it diverging or non-finite
            with a reused α and redid it with a fresh estimate (``hvps`` counts both).
        penalty: ``Penalty`` only: σ used at this hypergradient.
        gradients: ``Penalty`` only: first-derivative evaluations spent (2 per auxiliary update + 3).
        gap: ``Penalty`` only: ‖u − w‖ of the auxiliary weights after their updates (≈ ‖H⁻¹∂L_V/∂w‖/σ
            at the minimiser: far larger means u is not there yet, far smaller that σ dwarfs L_V).
        warm_started: whether the initial guess (``init=``, or ``warm_start=True`` in a
            ``BilevelOptimizer``) was used: ``False`` when it was dropped for being worse than 0 (its
            residual exceeds ‖∂L_V/∂w‖; its one HVP was spent all the same), ``None`` without a guess. A
            bool for CG, a 0-dim bool tensor for Neumann (decided on the device).
        growth: Neumann only: ‖(I − αH)^{steps−1} v‖ / ‖v‖, the size of the series' last term
            relative to its first (v = ∂L_V/∂w). It is ≤ 1 whenever the series converges
            (0 ≤ αμ ≤ 2 for every eigenvalue μ of H); above 1 the series grows along some
            direction. Free: the solve computes the last term anyway.
        diverging: Neumann only, a bool tensor: the terms grow with alternating sign, the signature
            of α too large for the top of the spectrum (αμ_max > 2); the hypergradient is then
            wrong, often by orders of magnitude. Growth with ``diverging`` False comes from negative
            curvature (μ < 0: not at a minimum), which no α cures; see docs/debugging.md.
        solution: the solve's x ≈ (H + δI)⁻¹ ∂L_V/∂w, shaped like ``params`` (IFT strategies of the
            functional [`hypergradient`][bilevel.hypergradient]): pass it as ``init=`` to warm-start the
            next call's ``ConjugateGradient`` or ``Neumann``. ``None`` in the records a
            ``BilevelOptimizer`` returns, which keep no params-sized tensor (the optimiser keeps its
            warm start itself).
        failure: why the hypergradient could not be computed (its entries are then NaN), e.g. a
            singular Hessian for ``Exact``, a zero Hessian for ``alpha="auto"``, or a solve that ended
            worse than no solve (``relative_residual`` > 1); ``None`` when it was.
        notes: things that went differently from the plan without changing the numbers, e.g. batched
            Hessian-vector products that PyTorch could not vectorise and that were taken one by one.

    Example:
        >>> import torch, bilevel
        >>> def train_loss(p, h, b):
        ...     return ((p["w"] - b) ** 2).sum() + (h["log_decay"].exp() * p["w"] ** 2).sum()
        >>> def val_loss(p, h, b):
        ...     return ((p["w"] - b) ** 2).sum()
        >>> params = {"w": torch.full((2,), 0.5)}  # w* = b / (1 + e^λ) at λ = 0, where H = 4I
        >>> _, info = bilevel.hypergradient(train_loss, val_loss, params, {"log_decay": torch.zeros(2)},
        ...     torch.ones(2), torch.ones(2), strategy=bilevel.ConjugateGradient(maxiter=10))
        >>> info.strategy, info.hvps, info.iterations, info.converged, float(info.val_loss)
        ('cg', 1, 1, True, 0.5)
    """

    strategy: str
    hvps: int
    val_loss: Tensor
    grad_norm: Tensor
    residual: Tensor | None = None
    iterations: int | None = None
    converged: bool | None = None
    alpha: float | None = None
    lambda_max: float | None = None
    power_hvps: int = 0
    solution: Any = None
    growth: Tensor | None = None
    diverging: Tensor | None = None
    failure: str | None = None
    relative_residual: Tensor | None = None
    notes: tuple[str, ...] = ()
    alpha_source: str | None = None
    redone: bool = False
    warm_started: bool | Tensor | None = None
    penalty: float | None = None
    gradients: int = 0
    gap: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as plain Python values (floats, ints, bools, strings, ``None``, a list of notes),
        without ``solution``: ready for a JSON log line or ``SummaryWriter.add_scalars``. Reading the
        tensors synchronises the device once."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name == "solution":
                continue
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                value = value.item()
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    def __repr__(self) -> str:
        parts = []
        for name, value in self.to_dict().items():
            default = next(f.default for f in dataclasses.fields(self) if f.name == name)
            if value is None or (value == default and name not in ("strategy", "hvps")) or value == []:
                continue
            shown = f"{value:.4g}" if isinstance(value, float) else repr(value)
            parts.append(f"{name}={shown}")
        if self.solution is not None:
            size = sum(t.numel() for t in optree.tree_leaves(self.solution))
            parts.append(f"solution=<{size:,} values>")
        return f"HypergradInfo({', '.join(parts)})"


def check_unroll_distributed(strategy: Strategy, distributed: Any) -> None:
    if isinstance(strategy, Unroll) and distributed is not None:
        raise ValueError(
            "`strategy=Unroll(...)` with `distributed=DataParallel(...)` is not supported: differentiating through "
            "all-reduced inner updates needs collectives inside torch.func transforms. Use an IFT strategy "
            "(Neumann, ConjugateGradient, Exact) for data parallelism, or MicroBatches on one process."
        )


def check_strategy(strategy: Any) -> Strategy:
    if not isinstance(strategy, STRATEGIES):
        names = ", ".join(f"bilevel.{cls.__name__}" for cls in STRATEGIES)
        raise TypeError(f"`strategy` must be one of {names}; got {strategy!r}.")
    return strategy


def hypergradient(
    train_loss: Callable[..., Any],
    val_loss: Callable[..., Any],
    params: Any,
    hparams: Any,
    train_batch: Any,
    val_batch: Any,
    strategy: Strategy | None = None,
    *,
    state: Any = None,
    seed: int | None = None,
    init: Any = None,
    residual: bool = False,
    distributed: DataParallel | None = None,
    autocast: torch.dtype | None = None,
) -> tuple[Any, HypergradInfo]:
    r"""Total derivative of the validation loss with respect to the hyperparameters.

    $$
    \frac{dL_V}{d\lambda} = \frac{\partial L_V}{\partial\lambda}
      - \Big(\frac{\partial^2 L_T}{\partial w\,\partial\lambda^\top}\Big)^{\!\top}
        H^{-1} \frac{\partial L_V}{\partial w},
    \qquad H = \frac{\partial^2 L_T}{\partial w\,\partial w^\top},
    $$

    at ``params`` taken as w*(λ) (run the inner optimisation to near-stationarity first). The
    strategy chooses how H⁻¹v is approximated; with [`Unroll`][bilevel.Unroll] the derivative is instead
    taken through ``strategy.steps`` inner optimiser updates started at ``params``.

    Args:
        train_loss: ``(params, hparams, batch) -> scalar`` training loss L_T (with ``state``:
            ``(params, hparams, batch, state) -> (scalar, new_state)``).
        val_loss: ``(params, hparams, batch) -> scalar`` validation loss L_V (it may ignore hparams);
            with ``state`` likewise ``(..., state) -> (scalar, new_state)``.
        params: pytree (e.g. dict) of floating tensors, the inner parameters w.
        hparams: pytree of floating tensors, the hyperparameters λ.
        train_batch: passed to ``train_loss`` untouched.
        val_batch: passed to ``val_loss`` untouched.
        strategy: ``None`` (the default) is ``Neumann(steps=20, alpha="auto")``; or
            [`Neumann`][bilevel.Neumann], [`Identity`][bilevel.Identity],
            [`ConjugateGradient`][bilevel.ConjugateGradient], [`Exact`][bilevel.Exact],
            [`Nystrom`][bilevel.Nystrom], [`Unroll`][bilevel.Unroll] or [`Penalty`][bilevel.Penalty].
        state: model state (e.g. [`FunctionalModule.state`][bilevel.FunctionalModule], BatchNorm's
            running statistics) passed to both losses; the new states they return are discarded
            here — a hypergradient never changes the model state.
        seed: the random numbers the losses draw (dropout) are replayed from this seed, so every
            evaluation of L_T in this call — its gradient, every HVP of any ``hvp`` mode, every
            micro-batch, the mixed product — sees the same ones, and likewise every evaluation of
            L_V. ``None`` draws the seed from torch's global generator: one draw per call.
        init: initial guess for the linear solve (params-shaped; ``ConjugateGradient`` and
            ``Neumann`` with ``warm_start=True``), e.g. the previous call's ``info.solution``.
        residual: compute the true residual ‖(H + δI)x − ∂L_V/∂w‖ with one extra HVP (Neumann,
            Identity, and CG, whose free recursive residual can drift below it in float32).
        distributed: ``DataParallel`` to average every gradient and product over ranks, each
            rank passing its own equal-sized shard of the batches (not with ``Unroll``).
        autocast: ``torch.bfloat16`` / ``torch.float16`` to evaluate the losses under
            ``torch.autocast``; the linear solve and the hypergradient stay in the params' and
            hparams' dtypes.

    Either batch may be a ``MicroBatches`` list: losses, gradients and HVPs are then
    averaged over its micro-batches (gradient accumulation).

    Returns:
        ``(grads, info)``: ``grads`` has the structure, shapes, dtypes and devices of
        ``hparams``; ``info`` is a [`HypergradInfo`][bilevel.HypergradInfo].

    Example:
        >>> import torch, bilevel
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        >>> def train_loss(p, h, batch):
        ...     X, y = batch
        ...     return ((X @ p["w"] - y) ** 2).mean() + (h["log_l2"].exp() * p["w"] ** 2).sum()
        >>> def val_loss(p, h, batch):
        ...     X, y = batch
        ...     return ((X @ p["w"] - y) ** 2).mean()
        >>> params = {"w": torch.zeros(3, dtype=torch.float64)}
        >>> hparams = {"log_l2": torch.zeros(3, dtype=torch.float64)}
        >>> grads, info = bilevel.hypergradient(train_loss, val_loss, params, hparams,
        ...                                     (X, y), (X, y), strategy=bilevel.Exact())
        >>> grads["log_l2"].shape, info.strategy
        (torch.Size([3]), 'exact')

    References:
        Lorraine, Vicol & Duvenaud (2020), Eq. IFT, Algorithms 2 and 3, Table 1.
    """
    strategy = check_strategy(Neumann(steps=20, alpha="auto") if strategy is None else strategy)
    check_unroll_distributed(strategy, distributed)
    problem, w, h, s = Problem.create(
        train_loss, val_loss, params, hparams, state=state, autocast=autocast, distributed=distributed
    )
    # Private copies: a loss that writes into its inputs (caught and refused in Problem.evaluate) can then
    # never change the caller's tensors. One params-sized copy, small beside any hypergradient.
    w, h = tuple(t.clone() for t in w), tuple(t.clone() for t in h)
    base = _random.draw() if seed is None else _check_seed(seed)
    seeds = Seeds(_random.derive(base, _random.TRAIN), _random.derive(base, _random.VAL))
    if isinstance(strategy, Unroll):
        if strategy.optimizer is None:
            raise ValueError(
                "`Unroll(steps, optimizer=None)` in `hypergradient`: say which inner updates to differentiate "
                "through, e.g. Unroll(steps=5, optimizer=torchopt.sgd(lr=0.1)). (BilevelOptimizer unrolls its own "
                "inner optimiser and needs none.)"
            )
        transformation = Transformation(strategy.optimizer, problem.params_spec, hparams=problem.hparams(h))
        opt_state = transformation.init(w)
        # A fresh optimiser (started after its first update); the model state carries on from step to step.
        steps = [UnrollStep(k > 0, train_batch, s if k == 0 else None, seeds.train) for k in range(strategy.steps)]
        grads, info = unrolled_hypergradient(
            problem, w, opt_state, h, steps, val_batch, None, seeds.val, transformation
        )
    elif isinstance(strategy, Penalty):
        if strategy.optimizer is None:
            raise ValueError(
                "`Penalty(penalty, steps, optimizer=None)` in `hypergradient`: say how the auxiliary weights are "
                "updated, e.g. Penalty(penalty=100.0, steps=50, optimizer=torchopt.sgd(lr=0.1)). (BilevelOptimizer "
                "uses its inner optimiser's configuration and needs none.)"
            )
        transformation = Transformation(strategy.optimizer, problem.params_spec, w)
        aux = PenaltyRun.start(w, transformation)
        grads, info, _ = penalty_hypergradient(
            problem, w, h, s, train_batch, val_batch, aux, transformation, strategy.steps, strategy.penalty, seeds
        )
    else:
        check_exact_fits(strategy, w)
        x0 = None if init is None else _check_init(init, problem, w)
        grads, info = ift_hypergradient(
            problem, w, h, s, train_batch, val_batch, strategy, seeds, init=x0, residual=residual
        )
    if info.failure is not None:
        warnings.warn(f"hypergradient: {info.failure}", RuntimeWarning, stacklevel=2)
    for note in info.notes:
        warnings.warn(f"hypergradient: {note}", RuntimeWarning, stacklevel=2)
    return problem.hparams(grads), info


@dataclasses.dataclass(frozen=True)
class Seeds:
    """The seeds replayed for every evaluation of L_T and of L_V within one hypergradient."""

    train: int | None
    val: int | None


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed={seed!r}`: must be an int or None.")
    return int(seed)


def _check_init(init: Any, problem: Problem, w: Leaves) -> Leaves:
    leaves, spec = _tree.flatten(init, "init", floating=True)
    if spec != problem.params_spec or any(a.shape != b.shape for a, b in zip(leaves, w)):
        raise ValueError("`init` must have the structure and shapes of `params` (e.g. a previous info.solution).")
    return tuple(a.to(b.dtype) for a, b in zip(leaves, w))


def check_exact_fits(strategy: Strategy, w: Leaves) -> None:
    """Refuse ``Exact`` up front when its dense P×P Hessian alone exceeds the device's memory."""
    if not isinstance(strategy, Exact):
        return
    n = sum(t.numel() for t in w)
    need = n * n * w[0].element_size()
    device = w[0].device
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:  # no portable way to ask: let the allocator decide
        return
    if need > have:
        raise ValueError(
            f"`strategy=Exact()`: the dense Hessian of {n:,} parameters needs {need / 2**30:,.1f} GiB "
            f"({n:,}² × {w[0].element_size()} bytes), more than this {device.type} device's "
            f"{have / 2**30:,.1f} GiB. Use ConjugateGradient or Neumann, which never form it."
        )


def ift_hypergradient(
    problem: Problem,
    w: Leaves,
    h: Leaves,
    s: Leaves,
    train_batch: Any,
    val_batch: Any,
    strategy: Neumann | Identity | ConjugateGradient | Exact | Nystrom,
    seeds: Seeds,
    *,
    init: Leaves | None = None,
    residual: bool = False,
) -> tuple[list[Tensor], HypergradInfo]:
    """IFT hypergradient on flat leaves; see :func:`hypergradient`.

    ``s`` is the model state both losses see; ``init`` an initial guess for CG or a warm-started
    Neumann series. A hypergradient that cannot be computed (a zero or non-finite spectral radius for
    ``alpha="auto"``, a singular Hessian for ``Exact``) comes back as NaN with ``info.failure``
    saying why; callers decide whether to skip, warn or raise.
    """
    (gw, gh), val, _ = problem.value_and_grad(problem.val_loss, val_batch, w, h, (0, 1), s, seeds.val)
    name = strategy.name
    if isinstance(strategy, Identity):
        strategy = strategy.as_neumann()
    if init is not None and name not in ("neumann", "cg"):
        raise ValueError(f"`init` is an initial guess for ConjugateGradient and Neumann; {name} has no use for one.")
    hvp = ReverseHVP() if isinstance(strategy, Exact) else strategy.hvp
    op = problem.operator(hvp, train_batch, w, h, s, seeds.train)
    extra: dict[str, Any] = {}
    failure: str | None = None
    energy: Tensor | None = None  # ½ xᵀ(H + δI)x − bᵀx where (H + δI)x is known; 0 at x = 0
    indefinite = False  # the solve itself saw that H + δI is not positive definite

    if isinstance(strategy, Neumann):
        alpha = strategy.alpha
        if alpha == "auto":
            radius = float(_linalg.power_iteration(op.hvp, w, strategy.power_iters))
            extra.update(lambda_max=radius, power_hvps=strategy.power_iters, alpha_source="estimated")
            if not (math.isfinite(radius) and radius > 0):
                failure = (
                    f"alpha='auto' found a spectral radius of {radius} for the training Hessian "
                    f"({'zero curvature along every direction tried' if radius == 0 else 'non-finite products'}), "
                    f"so α = 1/radius is undefined. "
                    + (
                        "With a locally linear loss (hinge, L1, dead ReLUs) H⁻¹ does not exist: add curvature "
                        "(weight decay) or use ConjugateGradient(damping=...) or Identity(alpha)."
                        if radius == 0
                        else "Check the training loss for NaN/Inf at these weights."
                    )
                )
                return _failed(h, name, op.hvps, val, failure, extra)
            alpha = 1.0 / radius
        series = _linalg.neumann(op.hvp, gw, strategy.steps, alpha, x0=init)
        x = series.x
        extra.update(alpha=alpha, growth=series.growth, diverging=series.diverging, warm_started=series.warm)
        extra.setdefault("alpha_source", "given")
        if residual:
            hx = op.hvp(x)
            extra["residual"], energy = _tree.norm(_tree.add(hx, gw, -1.0)), _energy(x, hx, gw)
    elif isinstance(strategy, ConjugateGradient):
        tol = strategy.tolerance(gw[0].dtype)
        cg = _linalg.conjugate_gradient(op.hvp, gw, strategy.maxiter, tol, strategy.damping, x0=init)
        x = cg.x
        extra.update(residual=cg.residual, iterations=cg.iterations, converged=cg.converged, warm_started=cg.warm)
        energy = cg.energy
        # CG's residual may exceed ‖b‖ on the way to the solution of a positive definite system, where it
        # still improves on x = 0 in the (H + δI)-norm; only evidence against definiteness makes it bad
        indefinite = cg.negative_curvature
        if residual:  # the recursion's residual drifts from the true one in low precision: recompute
            hx = _tree.add(op.hvp(x), x, strategy.damping) if strategy.damping else op.hvp(x)
            extra["residual"], energy = _tree.norm(_tree.add(hx, gw, -1.0)), _energy(x, hx, gw)
    elif isinstance(strategy, Nystrom):
        sketch = _nystrom_sketch(strategy, w, seeds.train)
        columns = op.hvp_batched(_tree.unravel_batched(sketch, w))  # C = HΩ: k products, one call
        flat_c = _tree.ravel_batched(columns, sketch.dtype)
        try:
            b = _tree.ravel([t.to(sketch.dtype) for t in gw])
            flat_x = _linalg.nystrom_solve(sketch, flat_c, b, strategy.damping)
        except torch.linalg.LinAlgError as err:
            failure = (
                f"Nystrom(rank={strategy.rank}): the k×k Woodbury system is singular ({err}); raise damping or "
                f"lower rank."
            )
            return _failed(h, name, op.hvps, val, failure, extra)
        x = _tree.unravel(flat_x, w)
        if residual:
            hx = _tree.add(op.hvp(x), x, strategy.damping)
            extra["residual"], energy = _tree.norm(_tree.add(hx, gw, -1.0)), _energy(x, hx, gw)
    else:  # Exact
        hessian = dense_hessian(op, w)
        b = _tree.ravel([t.to(hessian.dtype) for t in gw])
        try:
            flat_x, extra["residual"] = _linalg.dense_solve(hessian, b, strategy.damping)
        except torch.linalg.LinAlgError as err:
            failure = (
                f"Exact(damping={strategy.damping}): the training Hessian (+ damping) is singular ({err}). "
                f"Add damping, e.g. Exact(damping=1e-6), or use ConjugateGradient(damping=...)."
            )
            return _failed(h, name, op.hvps, val, failure, extra)
        x = _tree.unravel(flat_x, w)

    notes = tuple(op.notes)
    if "residual" in extra:
        b_norm = _tree.norm(gw)
        extra["relative_residual"] = torch.where(b_norm > 0, extra["residual"] / b_norm, extra["residual"] * 0)
        ratio = float(extra["relative_residual"])
        # Worse than x = 0 in the residual norm, and either in the energy φ(x) = ½xᵀ(H + δI)x − bᵀx too
        # (φ(0) = 0; φ's excess over its minimum is the (H + δI)-norm of the error when H + δI is positive
        # definite, and exact CG never raises it above 0 there) or on a system the solve found indefinite.
        # A Neumann series on a positive definite H with 0 < αμ < 2 always has ‖r‖ ≤ ‖b‖, so for it a
        # residual above ‖b‖ is enough. What is refused: solves of indefinite systems, CG that lost its
        # orthogonality to round-off, Nyström solutions that overshoot along directions the sample missed.
        worse = ratio > 1 and (
            isinstance(strategy, Neumann) or indefinite or (energy is not None and float(energy) > 0)
        )
        if worse:
            failure = (
                f"the linear solve ended worse than no solve: relative residual ‖(H + δI)x − ∂L_V/∂w‖ / ‖∂L_V/∂w‖ = "
                f"{ratio:.3g} > 1 (x = 0 has 1)"
                + (f", energy ½xᵀ(H + δI)x − xᵀ∂L_V/∂w = {float(energy):.3g}" if energy is not None else "")
                + (", negative curvature met by CG" if indefinite else "")
                + ", so the hypergradient would be wrong. Usual causes: a "
                "training Hessian that is not positive definite here (the weights are not near a minimum of "
                "train_loss), or products too inexact for the iterations run (bf16 autocast, finite "
                "differences). Remedies: damping (e.g. ConjugateGradient(damping=...)), more inner steps "
                "before each hyperstep, fewer iterations; bilevel.check_derivatives(...) measures the curvature "
                "and the products."
            )
            return _failed(h, name, op.hvps, val, failure, extra, notes)
    grads = _tree.add(gh, op.mixed_vjp(x), -1.0)
    info = HypergradInfo(
        strategy=name,
        hvps=op.hvps,
        val_loss=val,
        grad_norm=_tree.norm(grads),
        solution=problem.params(x),
        notes=notes,
        **extra,
    )
    return grads, info


def _energy(x: Sequence[Tensor], hx: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """φ(x) = ½⟨x, (H + δI)x⟩ − ⟨b, x⟩ from a computed product (H + δI)x."""
    return 0.5 * _tree.vdot(x, hx) - _tree.vdot(b, x)


def dense_columns(op: Any, w: Leaves, indices: Tensor) -> Tensor:
    """Columns H e_j of ∂²L_T/∂w∂wᵀ for the flat indices j in ``indices``, as the rows of a (k × P) matrix
    in the widest params dtype: batched double-backward products with unit vectors (``op.hvp_batched``,
    counts k HVPs).

    Not ``torch.func.hessian`` / ``jacfwd(jacrev(·))``: in torch 2.13 those nested transforms give wrong
    second derivatives through train-mode batch_norm, layer_norm and instance_norm with respect to
    weights before the layer (pytorch#198017, #196699, #196700: ``Exact`` was 16 % to 12× off on our
    test models, with no error). Products of plain double backward are right there, and averaging over
    micro-batches and ranks comes with the operator. ``check_derivatives(strategy=Exact())`` compares
    these columns with single products.
    """
    size, dtype = sum(t.numel() for t in w), _tree.widest_dtype(w)
    rows = torch.zeros(len(indices), size, dtype=dtype, device=w[0].device)
    rows[torch.arange(len(indices), device=rows.device), indices.to(rows.device)] = 1.0
    return _tree.ravel_batched(op.hvp_batched(_tree.unravel_batched(rows, w)), dtype)


def dense_hessian(op: Any, w: Leaves) -> Tensor:
    """∂²L_T/∂w∂wᵀ as a dense P×P matrix over the concatenated params, from :func:`dense_columns` taken
    ``chunk`` at a time (counts P HVPs). Row i of the stacked products is H eᵢ; H is symmetric."""
    size = sum(t.numel() for t in w)
    chunk = max(1, min(256, 2**22 // size))  # at most 4M entries of unit vectors per batched call
    blocks = [dense_columns(op, w, torch.arange(s, min(s + chunk, size))) for s in range(0, size, chunk)]
    return torch.cat(blocks).T


def _nystrom_sketch(strategy: Nystrom, w: Leaves, seed: int | None) -> Tensor:
    """Ωᵀ (k × P): k distinct unit coordinate vectors, or k Gaussian vectors; random but replayable."""
    size = sum(t.numel() for t in w)
    if strategy.rank > size:
        raise ValueError(f"`Nystrom(rank={strategy.rank})`: rank must be at most the number of parameters ({size}).")
    device, dtype = w[0].device, _tree.widest_dtype(w)
    gen = torch.Generator(device=device).manual_seed(0 if seed is None else seed)
    if strategy.sketch == "gaussian":
        return torch.randn(strategy.rank, size, generator=gen, device=device, dtype=dtype)
    picks = torch.randperm(size, generator=gen, device=device)[: strategy.rank]
    sketch = torch.zeros(strategy.rank, size, device=device, dtype=dtype)
    sketch[torch.arange(strategy.rank, device=device), picks] = 1.0
    return sketch


def _failed(
    h: Leaves, name: str, hvps: int, val: Tensor, failure: str, extra: dict[str, Any], notes: tuple[str, ...] = ()
) -> tuple[list[Tensor], HypergradInfo]:
    grads = [torch.full_like(t, math.nan) for t in h]
    nan = torch.full_like(val, math.nan)
    info = HypergradInfo(strategy=name, hvps=hvps, val_loss=val, grad_norm=nan, failure=failure, notes=notes, **extra)
    return grads, info


@dataclasses.dataclass(frozen=True)
class PenaltyRun:
    """The auxiliary weights of :class:`Penalty`: u, its twin v, their optimiser states, whether started."""

    u: Leaves
    state: Any
    v: Leaves
    v_state: Any
    started: bool

    @classmethod
    def start(cls, w: Leaves, transformation: Transformation) -> PenaltyRun:
        """u = v = w, fresh optimiser states."""
        return cls(tuple(t.clone() for t in w), transformation.init(w), tuple(t.clone() for t in w),
                   transformation.init(w), False)  # fmt: skip


def penalty_hypergradient(
    problem: Problem,
    w: Leaves,
    h: Leaves,
    s: Leaves,
    train_batch: Any,
    val_batch: Any,
    aux: PenaltyRun,
    transformation: Transformation,
    steps: int,
    sigma: float,
    seeds: Seeds,
) -> tuple[list[Tensor], HypergradInfo, PenaltyRun]:
    r"""The value-function penalty hypergradient (see :class:`Penalty`), first derivatives only.

    u starts at w + (u − v) of ``aux`` and its twin v at w; ``steps`` updates on the same batches, u on
    L_T + L_V/σ and v on L_T alone; then ∂L_V/∂λ(u) + σ(∂L_T/∂λ(u) − ∂L_T/∂λ(v)). Returns the
    hypergradient, its record and the new auxiliary state (the caller keeps it or not).
    """
    u: Leaves = tuple(_tree.add(w, _tree.add(aux.u, aux.v, -1.0), 1.0))  # re-anchored at the current weights
    v, u_state, v_state, started = tuple(w), aux.state, aux.v_state, aux.started
    for _ in range(steps):
        (g_t,), _, _ = problem.value_and_grad(problem.train_loss, train_batch, u, h, (0,), s, seeds.train)
        (g_v,), _, _ = problem.value_and_grad(problem.val_loss, val_batch, u, h, (0,), s, seeds.val)
        (g_w,), _, _ = problem.value_and_grad(problem.train_loss, train_batch, v, h, (0,), s, seeds.train)
        u, u_state = transformation.apply(_tree.add(g_t, g_v, 1.0 / sigma), u_state, u, started=started)
        v, v_state = transformation.apply(g_w, v_state, v, started=started)
        started = True
    # (w and λ both: a loss that does not depend on λ still has a graph through the weights)
    (_, gv_h), val, _ = problem.value_and_grad(problem.val_loss, val_batch, u, h, (0, 1), s, seeds.val)
    (_, gt_u), _, _ = problem.value_and_grad(problem.train_loss, train_batch, u, h, (0, 1), s, seeds.train)
    (_, gt_v), _, _ = problem.value_and_grad(problem.train_loss, train_batch, v, h, (0, 1), s, seeds.train)
    grads = _tree.add(gv_h, _tree.add(gt_u, gt_v, -1.0), sigma)  # ∂L_V/∂λ(u) + σ (∂L_T/∂λ(u) − ∂L_T/∂λ(v))
    info = HypergradInfo(
        strategy="penalty",
        hvps=0,
        val_loss=val,
        grad_norm=_tree.norm(grads),
        penalty=sigma,
        gradients=3 * steps + 3,
        gap=_tree.norm(_tree.add(u, v, -1.0)),
    )
    return grads, info, PenaltyRun(tuple(u), u_state, tuple(v), v_state, started)


@dataclasses.dataclass(frozen=True)
class UnrollStep:
    """One inner update to differentiate through: whether the optimiser had started (torchopt's
    momentum treats its first call differently), the batch, the model state it saw (``None``: the
    previous step's new state) and the seed of its random numbers."""

    started: bool
    batch: Any
    state: Leaves | None
    seed: int | None


def unrolled_hypergradient(
    problem: Problem,
    w: Leaves,
    opt_state: Any,
    h: Leaves,
    steps: Sequence[UnrollStep],
    val_batch: Any,
    val_state: Leaves | None,
    val_seed: int | None,
    transformation: Transformation,
) -> tuple[list[Tensor], HypergradInfo]:
    r"""d L_V(w_K(λ), λ)/dλ through K = len(steps) differentiable torchopt updates.

    w₀ = ``w`` with optimiser state ``opt_state``, both held fixed (∂w₀/∂λ = 0);
    w_{k+1} = w_k + update(∇_w L_T(w_k, λ; batch_k)) with the model state and random numbers of
    ``steps[k]``; L_V is evaluated at w_K with ``val_state`` (``None``: the state after the last step).

    Built on plain autograd (``create_graph=True`` through the loop, one backward at the end) rather
    than nested ``torch.func.grad``: on an MLP (784-512-256-10, batch 512, SGD) the nested transforms
    held 2.1× (K=20) to 2.3× (K=5) the peak memory of the same loop under autograd.
    """

    def mean_over_parts(loss: Loss, batch: Any, s: Leaves, seed: int | None) -> tuple[Tensor, Leaves]:
        total, state = None, s
        coefs, scale = coefficients(batch)
        for piece, coef in zip(parts(batch), coefs):
            value, state = problem.evaluate(loss, piece, ww, hh, state if loss is problem.train_loss else s, seed)
            value = value if coef == 1.0 else coef * value
            total = value if total is None else total + value
        assert total is not None
        return total * scale if scale != 1.0 else total, state

    model_state: Leaves = ()
    with torch.enable_grad(), second_order(), explained("Unroll (backpropagation through the inner updates)"):
        hh = tuple(t.detach().requires_grad_() for t in h)
        ww = tuple(t.detach().requires_grad_() for t in w)
        for step in steps:
            model_state = model_state if step.state is None else step.state
            loss, model_state = mean_over_parts(problem.train_loss, step.batch, model_state, step.seed)
            inner_grads = torch.autograd.grad(loss, ww, create_graph=True)
            hparams = problem.hparams(hh) if transformation.factory is not None else None
            ww, opt_state = transformation.apply(inner_grads, opt_state, ww, started=step.started, hparams=hparams)
        final_state = model_state if val_state is None else val_state
        val, _ = mean_over_parts(problem.val_loss, val_batch, final_state, val_seed)
        found = torch.autograd.grad(val, hh, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(found, h)]
    hvps = max(len(steps) - 1, 0)  # the first update's w-derivative is zero (w₀ is fixed)
    info = HypergradInfo(strategy="unroll", hvps=hvps, val_loss=val.detach(), grad_norm=_tree.norm(grads))
    return grads, info
