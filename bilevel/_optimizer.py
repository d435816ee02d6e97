"""BilevelOptimizer: Algorithm 1 of the paper as a stateful object driven by ``step()``.

All mutable state of a run lives in one ``RunState`` (params, hparams, both torchopt states,
counters, and the state of the strategy's hypergradient family) that every step replaces as a whole;
the functional core it calls holds none. This module runs the loop — inner step, non-finite guard,
hyperstep, outer update, counters — and leaves the rest to its collaborators: the in-place inner update
(``_inplace``), the hypergradient families (``_ift``, ``_unroll``, ``_penalty``) and checkpoints
(``_checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import warnings
from collections.abc import Iterator
from typing import Any

import optree
import torch
import torchopt
from torch import Tensor

from bilevel import _random, _tree
from bilevel._check import DerivativeCheck, run_check
from bilevel._checkpoint import RunState, from_dict, to_dict
from bilevel._distributed import DataParallel
from bilevel._family import Family, Hyper
from bilevel._hvp import DerivativeError, ReverseHVP
from bilevel._hypergradient import (
    HypergradInfo,
    check_exact_fits,
    check_strategy,
    check_unroll_distributed,
)
from bilevel._ift import IFT
from bilevel._inner import InnerUpdate
from bilevel._nonfinite import NonFiniteError
from bilevel._penalty import AuxiliaryWeights
from bilevel._problem import Problem
from bilevel._strategies import Neumann, Penalty, Strategy, Unroll
from bilevel._transform import Transformation, check_transformation, float_leaves
from bilevel._tree import Leaves
from bilevel._unroll import UnrollWindow


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


class BilevelOptimizer:
    r"""Jointly optimise weights w and hyperparameters λ (Algorithm 1 of Lorraine et al., 2020).

    Each [`step`][bilevel.BilevelOptimizer.step] does one inner update
    \(w \leftarrow w + \mathrm{inner}(\nabla_w L_T)\); every ``inner_steps``-th one also an outer update
    \(\lambda \leftarrow \lambda + \mathrm{outer}(dL_V/d\lambda)\) with the strategy's hypergradient at the
    current w. An update that would write NaN/Inf is not applied, but counted and warned about (or
    raises [`NonFiniteError`][bilevel.NonFiniteError] with ``strict=True``); any exception leaves the
    optimiser as before the call ([Debugging](../debugging.md)).

    Args:
        train_loss: ``(params, hparams, batch) -> scalar``.
        val_loss: ``(params, hparams, batch) -> scalar``.
        params: initial weights (pytree of floating tensors); copied, never mutated.
        hparams: initial hyperparameters (pytree of floating tensors); copied, never mutated.
        inner: torchopt optimiser of the weights (``None``: ``adam(1e-4)``, the paper's); a dict of them
            by top-level key of ``params``; or ``hparams -> GradientTransformation`` to tune the
            optimiser's own hyperparameters with ``Unroll`` ([Your training loop](../loop.md)).
        outer: torchopt optimiser of the hyperparameters (``None``: ``rmsprop(1e-2)``, the paper's), or a
            dict of them by top-level key of ``hparams``.
        strategy: how hypergradients are computed ([choosing](../choosing.md)); ``None``: ``Neumann(5, "auto")``.
        inner_steps: N, the number of inner updates per hyperstep.
        strict: raise [`NonFiniteError`][bilevel.NonFiniteError] instead of skipping failed updates.
        distributed: ``DataParallel`` under ``torchrun``; each rank passes its own equal-sized shard.
        autocast: evaluate the losses under ``torch.autocast`` with this dtype.
        state: model state (e.g. [`FunctionalModule.state`][bilevel.FunctionalModule]); the losses then
            take it as a fourth argument and return ``(loss, new_state)``. Only inner steps change it.
        check: run [`check_derivatives`][bilevel.check_derivatives] once at the first hyperstep and warn
            with its problems (raise [`DerivativeError`][bilevel.DerivativeError] with ``strict``).
        seed: the losses' random numbers in ``step()`` derive from it and the step's index (``Unroll``
            replays dropout masks, runs resume bitwise); ``None``: drawn once at construction.

    Example:
        >>> import torch, bilevel
        >>> loss = lambda p, h, x: ((x @ p["w"] - 1) ** 2).mean() + bilevel.weight_decay(p, h)
        >>> opt = bilevel.BilevelOptimizer(loss, loss, {"w": torch.zeros(5)}, {"w": torch.zeros(5)})
        >>> for _ in range(20):
        ...     result = opt.step(torch.randn(32, 5), torch.randn(32, 5))
        >>> opt.hypersteps
        2
    """

    def __init__(
        self,
        train_loss: Any,
        val_loss: Any,
        params: Any,
        hparams: Any,
        *,
        inner: Any = None,
        outer: Any = None,
        strategy: Strategy | None = None,
        inner_steps: int = 10,
        strict: bool = False,
        distributed: DataParallel | None = None,
        autocast: torch.dtype | None = None,
        state: Any = None,
        seed: int | None = None,
        check: bool = False,
    ) -> None:
        strategy, inner, outer = _defaults(strategy, inner, outer)
        self.strategy = check_strategy(strategy)
        check_unroll_distributed(strategy, distributed)
        self._problem, w, h, s = Problem.create(
            train_loss, val_loss, params, hparams, state=state, autocast=autocast, distributed=distributed
        )
        _check_arguments(strategy, inner, outer, inner_steps, strict, seed, check, w)
        self.inner = Transformation(inner, self._problem.params_spec, w, self._problem.hparams(h), name="inner")
        _check_optimiser_hparams(self.inner, strategy, w, h, self._problem.hparams_spec, hparams)
        self.outer = Transformation(outer, self._problem.hparams_spec, h, name="outer")
        self.inner_steps, self.strict, self.check = int(inner_steps), strict, check
        self._family: Family = _family(self._problem, self.inner, strategy)
        self._update = InnerUpdate(self._problem, self.inner, w, strict=strict, unrolled=isinstance(strategy, Unroll))
        w, seed = tuple(t.clone() for t in w), _random.draw() if seed is None else int(seed)
        inner_state = self.inner.init(w)
        start = RunState.start(w, tuple(t.clone() for t in h), s, seed, inner_state, self.outer.init(h),
                               self._family.initial(w, inner_state))  # fmt: skip
        self._run: RunState = self._update.flattened(start)
        self._derivative_check: DerivativeCheck | None = None
        self._warned: dict[str, int] = {}  # warnings issued per kind (not state: a resumed run starts afresh)

    # ------------------------------------------------------------------------------ state
    @property
    def params(self) -> Any:
        """Current weights, with the structure of the ``params`` given at construction: a copy, which later
        steps never change (the optimiser updates its own buffers in place)."""
        return self._problem.params(tuple(t.clone() for t in self._run.w))

    @property
    def hparams(self) -> Any:
        """Current hyperparameters, with the structure of the ``hparams`` given at construction."""
        return self._problem.hparams(self._run.h)

    @property
    def state(self) -> Any:
        """Current model state (e.g. BatchNorm running statistics), with the structure of the ``state``
        given at construction; ``None`` without one. Only inner steps change it."""
        return self._problem.state(self._run.s)

    @property
    def seed(self) -> int:
        """The seed every random number of the run derives from (given, or drawn at construction)."""
        return self._run.seed

    @property
    def steps(self) -> int:
        """Inner steps taken so far (calls to ``step`` or ``inner_step``, applied or skipped)."""
        return self._run.steps

    @property
    def hypersteps(self) -> int:
        """Outer steps attempted so far (applied or skipped)."""
        return self._run.hypersteps

    @property
    def skipped_inner_steps(self) -> int:
        """Inner updates not applied because they were non-finite (reading it syncs the device)."""
        return int(self._run.skipped_inner)

    @property
    def skipped_outer_steps(self) -> int:
        """Outer updates not applied: non-finite, or a hypergradient that failed (see ``NonFiniteError``)."""
        return self._run.skipped_outer

    @property
    def derivative_check(self) -> DerivativeCheck | None:
        """What ``check=True`` measured at the first hyperstep (``None`` before it, or without ``check``)."""
        return self._derivative_check

    # ------------------------------------------------------------------------------ steps
    def step(self, train_batch: Any, val_batch: Any) -> StepResult:
        """One inner update on ``train_batch``; every ``inner_steps``-th call also one outer update.

        The outer update uses ``val_batch`` for L_V and ``train_batch`` for the Hessian and mixed
        terms. ``val_batch`` is not touched on the other calls. Batches may be ``MicroBatches``.
        """
        with self._atomic():
            loss, applied = self._inner(train_batch)
            if self._run.steps % self.inner_steps:
                return StepResult(loss, applied)
            info, outer_applied = self._outer(train_batch, val_batch, scheduled=True)
            return StepResult(loss, applied, info, outer_applied)

    def inner_step(self, train_batch: Any) -> Tensor:
        """One inner update of the weights; returns the training loss before it (0-dim tensor)."""
        with self._atomic():
            return self._inner(train_batch)[0]

    def outer_step(self, train_batch: Any, val_batch: Any) -> HypergradInfo:
        """One outer update of the hyperparameters at the current weights; returns its info."""
        with self._atomic():
            return self._outer(train_batch, val_batch)[0]

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        """All of a call or nothing: on any exception the (immutable) run state and the in-place buffers' roles
        are put back, so that a retry continues bitwise like an uninterrupted run."""
        run, warned, spare = self._run, dict(self._warned), self._update.spare()
        try:
            yield
        except BaseException:
            self._run, self._warned = run, warned
            self._update.restore(spare)
            raise

    def _inner(self, batch: Any) -> tuple[Tensor, Tensor]:
        self._run, loss, applied = self._update(self._run, batch, self._family)
        self._check_sync("params after an inner step")
        if not self._update.device_select and not bool(applied):
            self._report_inner_skips()
        return loss, applied

    def _outer(self, train_batch: Any, val_batch: Any, *, scheduled: bool = False) -> tuple[HypergradInfo, bool]:
        """The hyperstep. ``scheduled``: called by ``step()`` after its ``inner_steps`` inner steps."""
        self._report_inner_skips()
        run = self._run
        if self.check and run.hypersteps == 0 and self._derivative_check is None:
            self._derivative_check = _first_check(self._problem, self._family, run, self.strategy, self.strict,
                                                  train_batch, val_batch)  # fmt: skip
        hyper = self._family.hypergradient(run, train_batch, val_batch, scheduled)
        h, state, trouble = self._apply_outer(run, hyper)
        if trouble is not None and hyper.redo is not None:
            hyper = hyper.redo()  # e.g. a fresh estimate of a stale spectral radius: tried once
            h, state, trouble = self._apply_outer(run, hyper)
        skip = trouble is not None and trouble[2]
        if trouble is not None:
            kind, message = _verdict(trouble, run.hypersteps + 1, hyper.info, self.strict)
            self._warn(kind, message)
        family = self._family.after(run.family, hyper, not skip)
        if skip:
            self._run = run.replace(skipped_outer=run.skipped_outer + 1, hypersteps=run.hypersteps + 1, family=family)
        else:
            self._run = run.replace(
                h=h, outer_state=state, outer_started=True, hypersteps=run.hypersteps + 1, family=family
            )
            self._check_sync("hparams after a hyperstep")
        # the record handed out keeps no params-sized tensor: a user's history of infos stays small
        return dataclasses.replace(hyper.info, solution=None), not skip

    def _apply_outer(self, run: RunState, hyper: Hyper) -> tuple[Leaves, Any, tuple[str, str, bool] | None]:
        h, state = self.outer.apply(hyper.grads, run.outer_state, run.h, started=run.outer_started)
        return h, state, _trouble(self.strategy, hyper.info, [*hyper.grads, *h, *float_leaves(state), *hyper.written])

    def _warn(self, kind: str, message: str) -> None:
        """Warn on the 1st, 2nd, 4th, 8th, ... occurrence of ``kind`` (every one is in StepResult/info):
        a run that keeps failing reports it without flooding the log."""
        count = self._warned[kind] = self._warned.get(kind, 0) + 1
        if count & (count - 1) == 0:
            more = f" [{count} such hypersteps so far; the next warning comes at {2 * count}.]" if count > 1 else ""
            warnings.warn(message + more, RuntimeWarning, stacklevel=4)

    def _check_sync(self, what: str) -> None:
        if self._problem.parallel is not None and self._problem.parallel.check_sync:
            self._problem.parallel.assert_in_sync([*self._run.w, *self._run.h, *self._run.s], what)

    def _report_inner_skips(self) -> None:
        skipped = int(self._run.skipped_inner)  # (on an accelerator, the one sync per hyperstep)
        if skipped > self._run.skipped_inner_warned:
            new, self._run = skipped - self._run.skipped_inner_warned, self._run.replace(skipped_inner_warned=skipped)
            message = f"{new} inner update(s) skipped: non-finite loss, weights, model state or optimiser state"
            warnings.warn(f"{message} ({skipped} so far).", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bitwise, as copies: weights, hparams, model state, both optimiser
        states, counters, the seed and the strategy family's state, in plain containers and tensors
        (``torch.save`` it; ``torch.load`` reads it with ``weights_only=True``; see
        [Checkpointing](../checkpointing.md))."""
        return to_dict(self._run, self._family)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` into an optimiser built with the same losses, structures, strategy and
        torchopt optimisers. Everything is validated before anything is assigned, so a checkpoint that does
        not fit raises ``ValueError``/``TypeError`` and changes nothing; saved tensors are copied in."""
        self._run = self._update.flattened(from_dict(state, self._run, self._family))


def _defaults(strategy: Strategy | None, inner: Any, outer: Any) -> tuple[Strategy, Any, Any]:
    """``None`` arguments as documented: Neumann(5, "auto"), the paper's adam(1e-4) and rmsprop(1e-2)."""
    strategy = Neumann(steps=5, alpha="auto") if strategy is None else strategy
    return strategy, torchopt.adam(1e-4) if inner is None else inner, torchopt.rmsprop(1e-2) if outer is None else outer


def _first_check(
    problem: Problem, family: Family, run: RunState, strategy: Strategy, strict: bool, train: Any, val: Any
) -> DerivativeCheck:
    """``check=True``: check_derivatives at the first hyperstep; warn with its problems, or raise in strict mode."""
    hvp = getattr(strategy, "hvp", None) or ReverseHVP()
    result = run_check(problem, run.w, run.h, run.s, train, val, hvp, strategy, family.seeds(run), run.seed)
    if not result.ok:
        if strict:
            raise DerivativeError(f"check=True at hyperstep 1; nothing was changed (strict mode):\n{result}", result)
        warnings.warn(f"check=True at hyperstep 1 found problems:\n{result}", RuntimeWarning, stacklevel=5)
    return result


def _verdict(trouble: tuple[str, str, bool], n: int, info: HypergradInfo, strict: bool) -> tuple[str, str]:
    """The warning (kind, message) for hyperstep ``n``'s trouble; in strict mode, the NonFiniteError."""
    what, advice, skip = trouble
    where = f"(strategy {info.strategy}, {info.hvps} HVPs)"
    if strict:  # raised before any state changes: the hyperstep did not happen
        raise NonFiniteError(f"hyperstep {n}: {what} {where}; nothing was changed (strict mode).{advice}")
    if skip:
        return "skipped", f"hyperstep {n} skipped: {what} {where}; hparams and outer state left unchanged.{advice}"
    return "diverging", f"hyperstep {n}: {what} {where}; applied anyway (strict=True refuses it).{advice}"


def _family(problem: Problem, inner: Transformation, strategy: Strategy) -> Family:
    """The run-time bookkeeping of ``strategy``'s hypergradient family."""
    if isinstance(strategy, Unroll):
        return UnrollWindow(problem, inner, strategy)
    if isinstance(strategy, Penalty):
        return AuxiliaryWeights(problem, inner, strategy)
    return IFT(problem, inner, strategy)


def _check_arguments(
    strategy: Strategy, inner: Any, outer: Any, inner_steps: Any, strict: Any, seed: Any, check: Any, w: Leaves
) -> None:
    """The constructor's argument checks, each error naming the argument as the user wrote it."""
    if not isinstance(check, bool):
        raise TypeError(f"`check={check!r}`: must be True or False.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"`seed={seed!r}`: must be an int, or None to draw one from torch's global generator.")
    check_transformation(inner, "inner", factory=True)
    check_transformation(outer, "outer")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, numbers.Integral) or inner_steps < 1:
        raise ValueError(f"`inner_steps={inner_steps!r}`: must be an integer >= 1 (N in Algorithm 1).")
    if not isinstance(strict, bool):
        raise TypeError(f"`strict={strict!r}`: must be True or False.")
    if isinstance(strategy, Unroll):
        if strategy.steps > inner_steps:
            raise ValueError(
                f"`strategy=Unroll(steps={strategy.steps})` with `inner_steps={inner_steps}`: the optimiser can "
                f"unroll at most the inner_steps updates made since the last hyperstep (they are the ones "
                f"taken with the current hparams). Use steps <= inner_steps."
            )
        if strategy.optimizer is not None and strategy.optimizer is not inner:
            raise ValueError(
                "`strategy=Unroll(steps, optimizer=...)` in BilevelOptimizer: the optimiser differentiates "
                "through its own `inner` updates, so another optimizer would describe updates that never "
                f"happened. Pass Unroll(steps={strategy.steps})."
            )
    check_exact_fits(strategy, w)


def _check_optimiser_hparams(
    inner: Transformation, strategy: Strategy, w: Leaves, h: Leaves, spec: optree.PyTreeSpec, hparams: Any
) -> None:
    """Refuse an IFT strategy when the inner optimiser itself uses hyperparameters (they would get 0)."""
    used = inner.hparams_used(w, h, spec)
    if used and not isinstance(strategy, Unroll):
        names = ", ".join(_leaf_names(hparams)[i] for i in used)
        raise ValueError(
            f"`inner` uses the hyperparameters {names}, which act only through the inner optimiser: with "
            f"strategy={strategy.name!r} (the implicit function theorem) their hypergradient would be silently "
            f"zero — w*(λ) does not depend on a learning rate or momentum. Use strategy=bilevel.Unroll(K), which "
            f"differentiates through the optimiser's last K updates."
        )


def _trouble(strategy: Strategy, info: HypergradInfo, written: list[Tensor]) -> tuple[str, str, bool] | None:
    """What is wrong with a hyperstep, advice, and whether it must be skipped (else applied with a warning)."""
    neumann_fixed = isinstance(strategy, Neumann) and strategy.alpha != "auto"
    if info.failure is not None:
        return info.failure, "", True
    if not (_tree.sum_is_finite(written) or bool(_tree.all_finite(written))):  # cheap screen, then exact
        advice = " A diverging Neumann series is the usual cause: try a smaller alpha or alpha='auto'."
        return "non-finite hypergradient or update", advice * neumann_fixed, True
    if info.diverging is not None and info.growth is not None and bool(info.diverging):
        what = (
            f"diverging Neumann series: its terms grow with alternating sign, the last {float(info.growth):.3g}× "
            f"the first (α = {info.alpha:.3g} is too large for the Hessian's top eigenvalue), so the hypergradient "
            f"is wrong"
        )
        advice = (
            " Try a smaller alpha or alpha='auto'."
            if neumann_fixed
            else " The power iteration underestimated the spectral radius: raise Neumann(power_iters=...)."
        )
        return what, advice, False
    return None


def _leaf_names(tree: Any) -> list[str]:
    """``hparams['log_lr']``-style names of a tree's leaves, in flattening order."""
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return ["hparams" + "".join(f"[{key!r}]" for key in path) for path in paths]
