"""BilevelOptimizer: Algorithm 1 of the paper as a stateful object driven by ``step()``.

All mutable state of a bilevel run lives here (params, hparams, both torchopt states, counters,
the cached Neumann step size, the unroll window); the functional core it calls holds none.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import optree
import torch
import torchopt
from torch import Tensor

from bilevel import _tree
from bilevel._distributed import DataParallel
from bilevel._hypergradient import (
    HypergradInfo,
    Problem,
    check_strategy,
    check_unroll_distributed,
    ift_hypergradient,
    unrolled_hypergradient,
)
from bilevel._strategies import Neumann, Strategy, Unroll
from bilevel._tree import Leaves

_STATE_VERSION = 1


class NonFiniteError(FloatingPointError):
    """Raised in ``strict`` mode when an update would write NaN/Inf; the state is left unchanged.

    Weights, hyperparameters and both optimiser states keep their values from before the failing
    call; only the step counters record the attempt.

    Example:
        >>> import torch, bilevel
        >>> def loss(p, h, b):
        ...     return ((p["w"] - b) ** 2).sum() + (h["log_decay"].exp() * p["w"] ** 2).sum()
        >>> opt = bilevel.BilevelOptimizer(loss, loss, {"w": torch.zeros(2)},
        ...                                {"log_decay": torch.zeros(2)}, strict=True)
        >>> try:
        ...     opt.step(torch.tensor([1.0, float("nan")]), torch.ones(2))
        ... except bilevel.NonFiniteError:
        ...     print("skipped; weights still", opt.params["w"].tolist())
        skipped; weights still [0.0, 0.0]
    """


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one [`BilevelOptimizer.step`][bilevel.BilevelOptimizer.step] did.

    Tensors are 0-dim and cost no host sync until read.

    Attributes:
        loss: training loss L_T(w, λ) on the batch, before the inner update.
        inner_applied: bool tensor, False if the inner update was skipped as non-finite.
        hyper: the hyperstep's [`HypergradInfo`][bilevel.HypergradInfo] when one happened on this
            call, else None.
        outer_applied: whether the hyperstep's update was applied (None if no hyperstep).

    Example:
        >>> import torch, torchopt, bilevel
        >>> def loss(p, h, b):
        ...     return ((p["w"] - b) ** 2).sum() + (h["log_decay"].exp() * p["w"] ** 2).sum()
        >>> opt = bilevel.BilevelOptimizer(loss, loss, {"w": torch.zeros(2)},
        ...     {"log_decay": torch.zeros(2)}, inner=torchopt.sgd(0.1), inner_steps=2)
        >>> first, second = (opt.step(torch.ones(2), torch.ones(2)) for _ in range(2))
        >>> float(first.loss), bool(first.inner_applied), first.hyper
        (2.0, True, None)
        >>> second.hyper.strategy, second.outer_applied
        ('neumann', True)
    """

    loss: Tensor
    inner_applied: Tensor
    hyper: HypergradInfo | None = None
    outer_applied: bool | None = None


def _check_transformation(value: Any, name: str) -> None:
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise TypeError(
            f"`{name}` must be a torchopt GradientTransformation such as torchopt.adam(1e-4); got {value!r}."
        )


def _float_leaves(tree: Any) -> list[Tensor]:
    return [t for t in optree.tree_leaves(tree) if isinstance(t, Tensor) and t.is_floating_point()]


class BilevelOptimizer:
    r"""Jointly optimise weights w and hyperparameters λ (Algorithm 1 of Lorraine et al., 2020).

    Each [`step`][bilevel.BilevelOptimizer.step] does one inner update of the weights with the
    ``inner`` optimiser,

    $$
    w \leftarrow w + \mathrm{inner}\big(\nabla_w L_T(w, \lambda)\big),
    $$

    and on every ``inner_steps``-th call also one outer update of the hyperparameters with the
    hypergradient of [`bilevel.hypergradient`][bilevel.hypergradient] (current w taken as w*(λ)),

    $$
    \lambda \leftarrow \lambda + \mathrm{outer}\big(dL_V/d\lambda\big).
    $$

    With ``strategy=Unroll(K, ...)`` the hypergradient is instead obtained by differentiating
    through the optimiser's own last K inner updates (truncated backpropagation), recomputed from a
    snapshot at hyperstep time; ``Unroll.optimizer`` is not used here (the inner optimiser is).

    Numerical safety: an update whose result would contain NaN/Inf is not applied; params,
    hparams and both optimiser states keep their previous values. Skips are counted
    ([`skipped_inner_steps`][bilevel.BilevelOptimizer.skipped_inner_steps],
    [`skipped_outer_steps`][bilevel.BilevelOptimizer.skipped_outer_steps]) and warned about, or
    raise [`NonFiniteError`][bilevel.NonFiniteError] when ``strict=True``. On CPU the check is an ordinary branch; on
    accelerators the inner check is a device-side select (no host sync per step) and its warning is
    issued at the next hyperstep.

    Hyperparameter constraints are a matter of parametrisation: optimise ``log_weight_decay`` and
    use ``exp(log_weight_decay)`` in the loss, or a logit for a dropout rate, rather than projecting.

    Args:
        train_loss: ``(params, hparams, batch) -> scalar``.
        val_loss: ``(params, hparams, batch) -> scalar``.
        params: initial weights (pytree of floating tensors); copied, never mutated.
        hparams: initial hyperparameters (pytree of floating tensors); copied, never mutated.
        inner: torchopt optimiser for the weights (paper: Adam 1e-4).
        outer: torchopt optimiser for the hyperparameters (paper: RMSprop 1e-2).
        strategy: how hypergradients are computed (see [`hypergradient`][bilevel.hypergradient]).
        inner_steps: N, the number of inner updates per hyperstep.
        strict: raise [`NonFiniteError`][bilevel.NonFiniteError] instead of skipping non-finite
            updates.
        distributed: ``DataParallel`` to train data-parallel under ``torchrun``: every rank passes
            its own equal-sized shard and all ranks apply the same, full-batch updates.
        autocast: evaluate the losses under ``torch.autocast`` with this dtype (see
            [`hypergradient`][bilevel.hypergradient]).

    Batches may be ``MicroBatches`` for gradient accumulation.

    Example:
        >>> import torch, torchopt, bilevel
        >>> X, y = torch.randn(64, 5), torch.randn(64)
        >>> def train_loss(p, h, batch):
        ...     X, y = batch
        ...     return ((X @ p["w"] - y) ** 2).mean() + (h["log_l2"].exp() * p["w"] ** 2).sum()
        >>> def val_loss(p, h, batch):
        ...     X, y = batch
        ...     return ((X @ p["w"] - y) ** 2).mean()
        >>> opt = bilevel.BilevelOptimizer(
        ...     train_loss, val_loss, {"w": torch.zeros(5)}, {"log_l2": torch.zeros(5)},
        ...     inner=torchopt.sgd(0.1), outer=torchopt.adam(0.05),
        ...     strategy=bilevel.ConjugateGradient(maxiter=10), inner_steps=5)
        >>> for _ in range(20):
        ...     result = opt.step((X[:32], y[:32]), (X[32:], y[32:]))
        >>> opt.hypersteps
        4

    References:
        Lorraine, Vicol & Duvenaud (2020), Algorithm 1.
    """

    def __init__(
        self,
        train_loss: Any,
        val_loss: Any,
        params: Any,
        hparams: Any,
        *,
        inner: Any = torchopt.adam(1e-4),
        outer: Any = torchopt.rmsprop(1e-2),
        strategy: Strategy = Neumann(steps=5, alpha=1e-2),
        inner_steps: int = 10,
        strict: bool = False,
        distributed: DataParallel | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        check_unroll_distributed(check_strategy(strategy), distributed)
        self._problem, w, h = Problem.create(
            train_loss, val_loss, params, hparams, autocast=autocast, distributed=distributed
        )
        _check_transformation(inner, "inner")
        _check_transformation(outer, "outer")
        self.strategy = check_strategy(strategy)
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"`inner_steps={inner_steps!r}`: must be an integer >= 1 (N in Algorithm 1).")
        if isinstance(strategy, Unroll) and strategy.steps > inner_steps:
            raise ValueError(
                f"`strategy=Unroll(steps={strategy.steps})` with `inner_steps={inner_steps}`: the optimiser can "
                f"unroll at most the inner_steps updates made since the last hyperstep (they are the ones "
                f"taken with the current hparams). Use steps <= inner_steps."
            )
        self.inner, self.outer, self.inner_steps, self.strict = inner, outer, inner_steps, strict
        self._w: Leaves = tuple(t.clone() for t in w)
        self._h: Leaves = tuple(t.clone() for t in h)
        self._inner_state = inner.init(self._w)
        self._outer_state = outer.init(self._h)
        self._steps = 0
        self._hypersteps = 0
        self._skipped_inner = torch.zeros((), dtype=torch.int64, device=self._w[0].device)
        self._skipped_inner_warned = 0
        self._skipped_outer = 0
        self._alpha: float | None = None  # cached Neumann alpha when strategy.alpha == "auto"
        self._alpha_age = 0
        window = strategy.steps if isinstance(strategy, Unroll) else 0
        self._window: collections.deque[tuple[Leaves, Any, Any]] = collections.deque(maxlen=window)
        # Accelerators: select on device instead of branching on a host bool (no sync per step);
        # strict mode must decide before changing anything, so it always branches on the host.
        self._device_select = self._w[0].device.type != "cpu" and not strict

    # ------------------------------------------------------------------------------ state
    @property
    def params(self) -> Any:
        """Current weights, with the structure of the ``params`` given at construction."""
        return self._problem.params(self._w)

    @property
    def hparams(self) -> Any:
        """Current hyperparameters, with the structure of the ``hparams`` given at construction."""
        return self._problem.hparams(self._h)

    @property
    def steps(self) -> int:
        """Inner steps taken so far (calls to ``step`` or ``inner_step``)."""
        return self._steps

    @property
    def hypersteps(self) -> int:
        """Outer steps attempted so far (applied or skipped)."""
        return self._hypersteps

    @property
    def skipped_inner_steps(self) -> int:
        """Inner updates not applied because they were non-finite (reading it syncs the device)."""
        return int(self._skipped_inner)

    @property
    def skipped_outer_steps(self) -> int:
        """Outer updates not applied because the hypergradient or update was non-finite."""
        return self._skipped_outer

    # ------------------------------------------------------------------------------ steps
    def step(self, train_batch: Any, val_batch: Any) -> StepResult:
        """One inner update on ``train_batch``; every ``inner_steps``-th call also one outer update.

        The outer update uses ``val_batch`` for L_V and ``train_batch`` for the Hessian and mixed
        terms. ``val_batch`` is not touched on the other calls.
        """
        loss, applied = self._inner(train_batch)
        if self._steps % self.inner_steps:
            return StepResult(loss, applied)
        info, outer_applied = self._outer(train_batch, val_batch)
        return StepResult(loss, applied, info, outer_applied)

    def inner_step(self, train_batch: Any) -> Tensor:
        """One inner update of the weights; returns the training loss before it (0-dim tensor)."""
        return self._inner(train_batch)[0]

    def outer_step(self, train_batch: Any, val_batch: Any) -> HypergradInfo:
        """One outer update of the hyperparameters at the current weights; returns its info."""
        return self._outer(train_batch, val_batch)[0]

    def _inner(self, batch: Any) -> tuple[Tensor, Tensor]:
        (grads,), loss = self._problem.value_and_grad(self._problem.train_loss, batch, self._w, self._h, (0,))
        updates, state = self.inner.update(tuple(grads), self._inner_state, params=self._w, inplace=False)
        w = tuple(torchopt.apply_updates(self._w, updates, inplace=False))
        written = [*w, *_float_leaves(state)]
        if self._device_select:
            self._record(batch)
            ok = torch.isfinite(loss) & _tree.all_finite(written)
            self._w = tuple(torch.where(ok, new, old) for new, old in zip(w, self._w))
            self._inner_state = optree.tree_map(
                lambda new, old: torch.where(ok, new, old) if isinstance(new, Tensor) else new,
                state,
                self._inner_state,
            )
            self._skipped_inner += (~ok).long()
            self._check_sync("params after an inner step")
            return loss, ok
        # Host branch: a cheap sum screen, and the exact check only when the screen fails.
        loss_ok = bool(torch.isfinite(loss))
        applied = loss_ok and (bool(_tree.sum_is_finite(written)) or bool(_tree.all_finite(written)))
        if not applied and self.strict:  # raise before touching any state: the step did not happen
            raise NonFiniteError(
                f"inner step {self._steps + 1}: non-finite loss, weights or optimiser state; "
                f"the weights, optimiser state and step counter were left unchanged."
            )
        self._record(batch)
        if applied:
            self._w, self._inner_state = w, state
            self._check_sync("params after an inner step")
        else:
            self._skipped_inner += 1
            self._report_inner_skips()
        return loss, torch.tensor(applied)

    def _record(self, batch: Any) -> None:
        """Count the inner step and, for Unroll, remember where it started and on which batch."""
        if self._window.maxlen:
            self._window.append((self._w, self._inner_state, batch))
        self._steps += 1

    def _check_sync(self, what: str) -> None:
        parallel = self._problem.parallel
        if parallel is not None and parallel.check_sync:
            parallel.assert_in_sync([*self._w, *self._h], what)

    def _report_inner_skips(self) -> None:
        skipped = int(self._skipped_inner)
        new = skipped - self._skipped_inner_warned
        if new <= 0:
            return
        self._skipped_inner_warned = skipped
        message = f"{new} inner update(s) skipped: non-finite loss, weights or optimiser state ({skipped} so far)."
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _strategy_now(self) -> Strategy:
        strategy = self.strategy
        if isinstance(strategy, Neumann) and strategy.alpha == "auto" and self._alpha is not None:
            if self._alpha_age < strategy.refresh_every:
                return dataclasses.replace(strategy, alpha=self._alpha)
        return strategy

    def _outer(self, train_batch: Any, val_batch: Any) -> tuple[HypergradInfo, bool]:
        if self._device_select:
            self._report_inner_skips()
        strategy = self._strategy_now()
        if isinstance(strategy, Unroll):
            if len(self._window) < strategy.steps:
                raise ValueError(
                    f"`Unroll(steps={strategy.steps})` needs {strategy.steps} inner steps since the last "
                    f"hyperstep to differentiate through; only {len(self._window)} were taken."
                )
            w0, state0, _ = self._window[0]
            batches = [batch for _, _, batch in self._window]
            grads, info = unrolled_hypergradient(self._problem, w0, self._h, batches, val_batch, self.inner, state0)
        else:
            grads, info = ift_hypergradient(self._problem, self._w, self._h, train_batch, val_batch, strategy)

        updates, state = self.outer.update(tuple(grads), self._outer_state, params=self._h, inplace=False)
        h = tuple(torchopt.apply_updates(self._h, updates, inplace=False))
        finite = bool(_tree.all_finite([*grads, *h, *_float_leaves(state)]))
        if not finite:
            message = (
                f"hyperstep {self._hypersteps + 1}: non-finite hypergradient or update "
                f"(strategy {info.strategy}, {info.hvps} HVPs); hparams and outer state left unchanged."
            )
            if isinstance(strategy, Neumann) and strategy.alpha != "auto":
                message += " A diverging Neumann series is the usual cause: try a smaller alpha or alpha='auto'."
            if self.strict:  # raised before any state changes: the hyperstep did not happen
                raise NonFiniteError(message)
        self._hypersteps += 1
        self._window.clear()  # the recorded updates used the old hparams
        if not finite:
            self._skipped_outer += 1
            warnings.warn(message.replace(": non-finite", " skipped: non-finite", 1), RuntimeWarning, stacklevel=3)
            return info, False
        self._h, self._outer_state = h, state
        self._check_sync("hparams after a hyperstep")
        if isinstance(self.strategy, Neumann) and self.strategy.alpha == "auto":
            if info.lambda_max is not None:  # refreshed on this hyperstep
                self._alpha, self._alpha_age = info.alpha, 0
            self._alpha_age += 1
        return info, True

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bitwise: weights, hparams, both optimiser states, counters,
        the cached auto-alpha and the unroll window. Save it with ``torch.save``.

        It holds only plain containers, numbers and tensors (optimiser states as lists of their
        tensors), so ``torch.load(path)`` reads it with the default ``weights_only=True``, provided
        your batches (kept for ``Unroll``) are tensors or containers of them.

        The global torch RNG is not included: if your losses draw random numbers (dropout,
        augmentation noise), save ``torch.get_rng_state()`` alongside.
        """
        return {
            "version": _STATE_VERSION,
            "params": list(self._w),
            "hparams": list(self._h),
            "inner_state": optree.tree_leaves(self._inner_state),
            "outer_state": optree.tree_leaves(self._outer_state),
            "steps": self._steps,
            "hypersteps": self._hypersteps,
            "skipped_inner": self._skipped_inner.clone(),
            "skipped_inner_warned": self._skipped_inner_warned,
            "skipped_outer": self._skipped_outer,
            "alpha": self._alpha,
            "alpha_age": self._alpha_age,
            "window": [(list(w), optree.tree_leaves(st), batch) for w, st, batch in self._window],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` into an optimiser built with the same losses and structures."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"`state` is not a BilevelOptimizer.state_dict() of version {_STATE_VERSION} "
                f"(got version {state.get('version') if isinstance(state, dict) else type(state).__name__})."
            )
        for key, current in (("params", self._w), ("hparams", self._h)):
            _check_like(state[key], current, key)
        for key, current in (("inner_state", self._inner_state), ("outer_state", self._outer_state)):
            _check_like(state[key], optree.tree_leaves(current), key)
        inner_spec = optree.tree_structure(self._inner_state)
        self._w, self._h = tuple(state["params"]), tuple(state["hparams"])
        self._inner_state = optree.tree_unflatten(inner_spec, state["inner_state"])
        self._outer_state = optree.tree_unflatten(optree.tree_structure(self._outer_state), state["outer_state"])
        self._steps, self._hypersteps = state["steps"], state["hypersteps"]
        self._skipped_inner = state["skipped_inner"].clone()
        self._skipped_inner_warned = state["skipped_inner_warned"]
        self._skipped_outer = state["skipped_outer"]
        self._alpha, self._alpha_age = state["alpha"], state["alpha_age"]
        self._window.clear()
        for w, leaves, batch in state["window"]:
            self._window.append((tuple(w), optree.tree_unflatten(inner_spec, leaves), batch))


def _check_like(loaded: Sequence[Tensor], current: Sequence[Tensor], name: str) -> None:
    shapes = [tuple(t.shape) for t in loaded]
    expected = [tuple(t.shape) for t in current]
    if shapes != expected:
        raise ValueError(
            f"`state['{name}']` has tensors of shapes {shapes}; this optimiser's {name} has {expected}. "
            f"Was the state saved from an optimiser with other params, hparams or torchopt optimisers?"
        )
