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
from bilevel._family import Family
from bilevel._hvp import DerivativeError, ReverseHVP
from bilevel._hypergradient import (
    HypergradInfo,
    check_exact_fits,
    check_strategy,
    check_unroll_distributed,
)
from bilevel._ift import IFT
from bilevel._inplace import InPlaceUpdate
from bilevel._penalty import AuxiliaryWeights
from bilevel._problem import Problem
from bilevel._strategies import Neumann, Penalty, Strategy, Unroll
from bilevel._transform import Transformation, check_transformation, float_leaves
from bilevel._tree import Leaves
from bilevel._unroll import UnrollWindow


class NonFiniteError(FloatingPointError):
    """Raised in ``strict`` mode instead of skipping a failed update; nothing of that update is kept.

    An update fails when it would write NaN/Inf, or, for a hyperstep, when the hypergradient could
    not be computed (``info.failure``: a singular Hessian for ``Exact``, a zero Hessian for
    ``alpha="auto"``) or its Neumann series diverged (``info.diverging``). The exception is
    raised before anything changes: weights, hyperparameters, both optimiser states, the model
    state and every counter keep their values from before the call — as after any exception inside
    ``step()``, which is all or nothing (a ``step()`` whose hyperstep fails keeps no part of its inner
    update either).

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

    With ``strategy=Unroll(K)`` the hypergradient is instead obtained by differentiating through the
    optimiser's own last K inner updates, replayed from snapshots with each step's own random numbers;
    with ``strategy=Penalty(σ)`` from auxiliary weights that persist between hypersteps (first
    derivatives only).

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
        inner: torchopt optimiser for the weights; ``None`` is ``torchopt.adam(1e-4)``, the paper's. A dict
            of optimisers by top-level key of ``params`` gives each group its own rule and rate. Or a
            callable ``hparams -> GradientTransformation`` whose own hyperparameters are tuned, e.g.
            ``lambda h: torchopt.sgd(lr=h["log_lr"].exp())``: it is rebuilt from the current
            hyperparameters at every update, and ``strategy=Unroll(K)`` differentiates through them
            (an IFT strategy would give them a zero hypergradient and is refused). Transformations
            are called out of place, or in place on the optimiser's private buffers where a probe at
            construction finds that bitwise the same (``_inplace``); one rate per layer is a custom
            ``GradientTransformation`` scaling each leaf's update (the learning-rates recipe has one).
        outer: torchopt optimiser for the hyperparameters; ``None`` is ``torchopt.rmsprop(1e-2)``, the
            paper's. A dict of optimisers by top-level key of ``hparams`` gives each group its own
            rule and rate, e.g. ``{"decay": torchopt.adam(1e-2), "example_weights": torchopt.adam(1e-1)}``
            (checkpointed and resumed like a single optimiser).
        strategy: how hypergradients are computed (see [`hypergradient`][bilevel.hypergradient]);
            ``None`` is ``Neumann(steps=5, alpha="auto")``, the recommendation of
            [How to choose a strategy](../choosing.md).
        inner_steps: N, the number of inner updates per hyperstep.
        strict: raise [`NonFiniteError`][bilevel.NonFiniteError] instead of skipping non-finite
            updates.
        distributed: ``DataParallel`` to train data-parallel under ``torchrun``: every rank passes
            its own equal-sized shard and all ranks apply the same, full-batch updates.
        autocast: evaluate the losses under ``torch.autocast`` with this dtype (see
            [`hypergradient`][bilevel.hypergradient]).
        state: model state (e.g. [`FunctionalModule.state`][bilevel.FunctionalModule]: BatchNorm's
            running statistics). Both losses then take it as a fourth argument and return
            ``(loss, new_state)``; inner steps replace the state by the training loss's new state,
            hypergradient evaluations never change it (see [`state`][bilevel.BilevelOptimizer.state]).
        check: run [`check_derivatives`][bilevel.check_derivatives] once, at the first hyperstep (on its
            batches, at the weights reached by then), and warn with its problems, or raise
            [`DerivativeError`][bilevel.DerivativeError] with ``strict=True``; the result is kept in
            [`derivative_check`][bilevel.BilevelOptimizer.derivative_check]. Off by default (it costs
            about 15 HVPs and 15 gradients, once).
        seed: every random number the losses draw inside ``step()`` (dropout) derives from this seed
            and the step's index — so ``Unroll`` replays the masks each step used and a run resumes
            bitwise — and torch's global generator is left alone. ``None``: drawn once from the
            global generator at construction.

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
        strategy = Neumann(steps=5, alpha="auto") if strategy is None else strategy
        inner = torchopt.adam(1e-4) if inner is None else inner
        outer = torchopt.rmsprop(1e-2) if outer is None else outer
        self.strategy = check_strategy(strategy)
        check_unroll_distributed(strategy, distributed)
        self._problem, w, h, s = Problem.create(
            train_loss, val_loss, params, hparams, state=state, autocast=autocast, distributed=distributed
        )
        _check_arguments(strategy, inner, outer, inner_steps, strict, seed, check)
        check_exact_fits(strategy, w)
        self.inner = Transformation(inner, self._problem.params_spec, w, self._problem.hparams(h), name="inner")
        _check_optimiser_hparams(self.inner, strategy, w, h, self._problem.hparams_spec, hparams)
        self.outer = Transformation(outer, self._problem.hparams_spec, h, name="outer")
        self.inner_steps, self.strict, self.check = int(inner_steps), strict, check
        self._family: Family = _family(self._problem, self.inner, strategy)
        unrolled = isinstance(strategy, Unroll)
        # Accelerators select on the device instead of branching on a host bool (no sync per step); strict
        # mode must decide before changing anything, and Unroll records only applied steps: both branch.
        self._device_select = w[0].device.type != "cpu" and not strict and not unrolled
        self._inplace: InPlaceUpdate | None = None  # in-place updates into private buffers (see _inplace)
        if self.inner.flat is not None and not self._device_select and not unrolled:
            self._inplace = InPlaceUpdate(self.inner) if InPlaceUpdate.matches(self.inner, _tree.ravel(w)) else None
        w = tuple(t.clone() for t in w)
        inner_state = self.inner.init(w)
        self._run: RunState = self._flattened(
            RunState(
                w=w, h=tuple(t.clone() for t in h), s=s, seed=_random.draw() if seed is None else int(seed),
                inner_state=inner_state, outer_state=self.outer.init(h), inner_started=False, outer_started=False,
                steps=0, hypersteps=0, skipped_inner=torch.zeros((), dtype=torch.int64, device=w[0].device),
                skipped_inner_warned=0, skipped_outer=0, family=self._family.initial(w, inner_state),
            )
        )  # fmt: skip
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
        terms. ``val_batch`` is not touched on the other calls.
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
        """All of a call or nothing: on any exception (a bug in a loss, out of memory, KeyboardInterrupt,
        NonFiniteError) the optimiser is put back exactly as before the call, so that retrying it continues
        bitwise like an uninterrupted run. The run state is immutable and replaced as a whole, so restoring
        it (and which in-place buffers are spare) is an assignment."""
        run, warned = self._run, dict(self._warned)
        spare = None if self._inplace is None else self._inplace.spare
        try:
            yield
        except BaseException:
            self._run, self._warned = run, warned
            if self._inplace is not None:  # the buffers the call wrote into are the spare set again
                self._inplace.spare = spare
            raise

    def _flattened(self, run: RunState) -> RunState:
        """``run`` with its weights living in one vector when the inner update is flat (see Transformation)."""
        flat = self.inner.flat
        if flat is None:
            return run
        vector, state = flat.join(run.w), run.inner_state
        if self._inplace is not None:  # the current buffers must be private: copies, and a spare set
            vector, state = self._inplace.adopt(vector, state)
            return run.replace(w=self._inplace.views(vector), w_flat=vector, inner_state=state)
        return run.replace(w=flat.split(vector), w_flat=vector, inner_state=state)

    def _inner(self, batch: Any) -> tuple[Tensor, Tensor]:
        run, problem, flat = self._run, self._problem, self.inner.flat
        seed = _random.derive(run.seed, _random.INNER, run.steps)  # inner step k always draws the same numbers
        w_in = run.w if run.w_flat is None else (run.w_flat,)
        (grads,), loss, s = problem.value_and_grad(
            problem.train_loss, batch, w_in, run.h, (0,), run.s, seed, chain_state=True, flat=flat
        )
        vector: Tensor | None = None
        if flat is not None and run.w_flat is not None:
            if self._inplace is not None:
                vector, state = self._inplace.update(grads[0], run.inner_state, run.w_flat, started=run.inner_started)
                w: Leaves = self._inplace.views(vector)
            else:
                vector, state = self.inner.apply_flat(grads[0], run.inner_state, run.w_flat, started=run.inner_started)
                w = flat.split(vector)
        else:
            hparams = self._problem.hparams(run.h) if self.inner.factory is not None else None
            w, state = self.inner.apply(grads, run.inner_state, run.w, started=run.inner_started, hparams=hparams)
        written = [*(w if vector is None else [vector]), *float_leaves(state), *float_leaves(s)]
        if self._device_select:
            return self._select_on_device(loss, written, w, vector, state, s)
        # Host branch: a cheap sum screen (one host sync), and the exact check only when the screen fails.
        written.append(loss)
        applied = bool(_tree.sum_is_finite(written)) or bool(_tree.all_finite(written))
        if not applied and self.strict:  # raise before touching any state: the step did not happen
            raise NonFiniteError(
                f"inner step {run.steps + 1}: non-finite loss, weights, model state or optimiser state; "
                f"nothing was changed (strict mode)."
            )
        if applied:
            family = self._family.recorded(run.family, run, batch)
            self._run = run.replace(
                w=w, w_flat=vector, s=s, inner_state=state, inner_started=True, steps=run.steps + 1, family=family
            )
            if self._inplace is not None and run.w_flat is not None:
                self._inplace.commit(run.w_flat, run.inner_state)
            self._check_sync("params after an inner step")
        else:
            self._run = run.replace(steps=run.steps + 1, skipped_inner=run.skipped_inner + 1)
            self._report_inner_skips()
        return loss, torch.tensor(applied)

    def _select_on_device(
        self, loss: Tensor, written: list[Tensor], w: Leaves, vector: Tensor | None, state: Any, s: Leaves
    ) -> tuple[Tensor, Tensor]:
        """The inner step's guard on an accelerator: keep or refuse on the device, without a host sync."""
        run, flat = self._run, self.inner.flat
        ok = torch.isfinite(loss) & _tree.all_finite(written)
        if vector is not None and run.w_flat is not None and flat is not None:
            vector = torch.where(ok, vector, run.w_flat)
            w = flat.split(vector)
        else:
            w = _select(ok, w, run.w)
        self._run = run.replace(
            w=w,
            w_flat=vector,
            s=_select(ok, s, run.s),
            inner_state=optree.tree_map(
                lambda new, old: torch.where(ok, new, old) if isinstance(new, Tensor) else new, state, run.inner_state
            ),
            inner_started=run.inner_started or bool(ok),  # torchopt's momentum must know: one sync, until applied
            steps=run.steps + 1,
            skipped_inner=run.skipped_inner + (~ok).long(),
        )
        self._check_sync("params after an inner step")
        return loss, ok

    def _outer(self, train_batch: Any, val_batch: Any, *, scheduled: bool = False) -> tuple[HypergradInfo, bool]:
        """The hyperstep. ``scheduled``: called by ``step()`` after its ``inner_steps`` inner steps."""
        if self._device_select:
            self._report_inner_skips()
        run = self._run
        if self.check and run.hypersteps == 0 and self._derivative_check is None:
            self._first_check(train_batch, val_batch)
        hyper = self._family.hypergradient(run, train_batch, val_batch, scheduled)
        h, state = self.outer.apply(hyper.grads, run.outer_state, run.h, started=run.outer_started)
        trouble = _trouble(self.strategy, hyper.info, [*hyper.grads, *h, *float_leaves(state), *hyper.written])
        if trouble is not None and hyper.redo is not None:
            hyper = hyper.redo()  # e.g. a fresh estimate of a stale spectral radius: tried once
            h, state = self.outer.apply(hyper.grads, run.outer_state, run.h, started=run.outer_started)
            trouble = _trouble(self.strategy, hyper.info, [*hyper.grads, *h, *float_leaves(state), *hyper.written])
        info, skip = hyper.info, False
        if trouble is not None:
            what, advice, skip = trouble
            n, where = run.hypersteps + 1, f"(strategy {info.strategy}, {info.hvps} HVPs)"
            if self.strict:  # raised before any state changes: the hyperstep did not happen
                raise NonFiniteError(f"hyperstep {n}: {what} {where}; nothing was changed (strict mode).{advice}")
            if skip:
                message = f"hyperstep {n} skipped: {what} {where}; hparams and outer state left unchanged.{advice}"
            else:
                message = f"hyperstep {n}: {what} {where}; applied anyway (strict=True refuses it).{advice}"
            self._warn("skipped" if skip else "diverging", message)
        family = self._family.after(run.family, hyper, not skip)
        if skip:
            self._run = run.replace(skipped_outer=run.skipped_outer + 1, hypersteps=run.hypersteps + 1, family=family)
        else:
            self._run = run.replace(
                h=h, outer_state=state, outer_started=True, hypersteps=run.hypersteps + 1, family=family
            )
            self._check_sync("hparams after a hyperstep")
        # the record handed out keeps no params-sized tensor: a user's history of infos stays small
        return dataclasses.replace(info, solution=None), not skip

    def _first_check(self, train_batch: Any, val_batch: Any) -> None:
        run, strategy = self._run, self.strategy
        hvp = getattr(strategy, "hvp", None) or ReverseHVP()
        seeds = self._family.seeds(run)
        result = run_check(self._problem, run.w, run.h, run.s, train_batch, val_batch, hvp, strategy, seeds, run.seed)
        if not result.ok:
            if self.strict:
                message = f"check=True at hyperstep 1; nothing was changed (strict mode):\n{result}"
                raise DerivativeError(message, result)
            warnings.warn(f"check=True at hyperstep 1 found problems:\n{result}", RuntimeWarning, stacklevel=5)
        self._derivative_check = result

    def _warn(self, kind: str, message: str) -> None:
        """Warn on the 1st, 2nd, 4th, 8th, ... occurrence of ``kind`` (every one is in StepResult/info):
        a run that keeps failing reports it without flooding the log."""
        count = self._warned[kind] = self._warned.get(kind, 0) + 1
        if count & (count - 1) == 0:
            more = f" [{count} such hypersteps so far; the next warning comes at {2 * count}.]" if count > 1 else ""
            warnings.warn(message + more, RuntimeWarning, stacklevel=4)

    def _check_sync(self, what: str) -> None:
        parallel = self._problem.parallel
        if parallel is not None and parallel.check_sync:
            parallel.assert_in_sync([*self._run.w, *self._run.h, *self._run.s], what)

    def _report_inner_skips(self) -> None:
        skipped = int(self._run.skipped_inner)
        new = skipped - self._run.skipped_inner_warned
        if new <= 0:
            return
        self._run = self._run.replace(skipped_inner_warned=skipped)
        message = (
            f"{new} inner update(s) skipped: non-finite loss, weights, model state or optimiser state "
            f"({skipped} so far)."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bitwise, as copies: weights, hparams, model state, both optimiser
        states (and whether each has started, which torchopt's momentum needs), counters, the seed, and
        the strategy family's state (warm start and cached α, the unroll window, or the auxiliary
        weights). Save it with ``torch.save``.

        It holds only plain containers, numbers, strings and tensors, so ``torch.load(path)`` reads it
        with the default ``weights_only=True``, provided your batches (kept for ``Unroll``) are
        tensors or containers of them. The random numbers your losses draw inside ``step()`` derive
        from the run's ``seed`` (saved here) and the step's index, so dropout resumes bitwise.
        """
        return to_dict(self._run, self._family)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` into an optimiser built with the same losses, structures, strategy
        and torchopt optimisers.

        Everything is validated before anything is assigned — the kind and structure of both
        optimiser states, the shape, dtype and device of every tensor, the counters and the family's
        state — so a checkpoint that does not fit raises ``ValueError``/``TypeError`` and leaves the
        optimiser exactly as it was. The saved tensors are copied in, never adopted.
        """
        self._run = self._flattened(from_dict(state, self._run, self._family))


def _family(problem: Problem, inner: Transformation, strategy: Strategy) -> Family:
    """The run-time bookkeeping of ``strategy``'s hypergradient family."""
    if isinstance(strategy, Unroll):
        return UnrollWindow(problem, inner, strategy)
    if isinstance(strategy, Penalty):
        return AuxiliaryWeights(problem, inner, strategy)
    return IFT(problem, inner, strategy)


def _check_arguments(
    strategy: Strategy, inner: Any, outer: Any, inner_steps: Any, strict: Any, seed: Any, check: Any
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
    if not (bool(_tree.sum_is_finite(written)) or bool(_tree.all_finite(written))):  # cheap screen, then exact
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


def _select(ok: Tensor, new: Leaves, old: Leaves) -> Leaves:
    return tuple(torch.where(ok, a, b) for a, b in zip(new, old))
