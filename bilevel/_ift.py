"""The run-time bookkeeping of the IFT strategies in a ``BilevelOptimizer``: warm starts and the cached
spectral radius of ``Neumann(alpha="auto")``.

Between hypersteps the optimiser keeps the last solve's solution (the start of the next one with
``warm_start=True``) and the step size α = 1/ρ̂ estimated by power iteration, reused for
``refresh_every`` hypersteps. A hyperstep that goes wrong with a reused α (non-finite, or a diverging
series) is redone once at once with a fresh estimate; a skipped hyperstep forgets its solution, since a
failed solve is no start for the next one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optree

from bilevel import _checkpoint
from bilevel._checkpoint import RunState
from bilevel._family import Family, Hyper
from bilevel._hypergradient import ift_hypergradient
from bilevel._strategies import Neumann, Penalty, Unroll
from bilevel._tree import Leaves


@dataclasses.dataclass(frozen=True)
class IFTState:
    solution: Leaves | None = None  # the last hyperstep's solve, for warm starts
    alpha: float | None = None  # the cached Neumann step size of alpha="auto"
    alpha_age: int = 0  # hypersteps since it was estimated


class IFT(Family):
    keys = ("solution", "alpha", "alpha_age")

    def initial(self, w: Leaves, inner_state: Any) -> IFTState:
        return IFTState()

    def hypergradient(self, run: RunState, train_batch: Any, val_batch: Any, scheduled: bool) -> Hyper:
        return self._attempt(run, train_batch, val_batch, reuse=True)

    def _attempt(self, run: RunState, train_batch: Any, val_batch: Any, *, reuse: bool) -> Hyper:
        state, strategy = run.family, self.strategy
        assert not isinstance(strategy, (Unroll, Penalty))  # (the other families)
        cached = False
        if isinstance(strategy, Neumann) and strategy.alpha == "auto" and state.alpha is not None:
            cached = reuse and state.alpha_age < strategy.refresh_every
            strategy = dataclasses.replace(strategy, alpha=state.alpha) if cached else strategy
        init = state.solution if getattr(strategy, "warm_start", False) else None
        grads, info = ift_hypergradient(
            self.problem, run.w, run.h, run.s, train_batch, val_batch, strategy, self.seeds(run), init=init
        )
        if not cached:
            return Hyper(grads, info, None)
        info = dataclasses.replace(info, alpha_source="reused", lambda_max=1.0 / state.alpha)

        def redo() -> Hyper:  # the reused α may have gone stale (the curvature grew): estimate it afresh
            again = self._attempt(run, train_batch, val_batch, reuse=False)
            return dataclasses.replace(
                again, info=dataclasses.replace(again.info, hvps=info.hvps + again.info.hvps, redone=True)
            )

        return Hyper(grads, info, None, redo)

    def after(self, state: IFTState, hyper: Hyper, applied: bool) -> IFTState:
        info = hyper.info
        fresh = info.alpha_source == "estimated" and info.failure is None and info.alpha is not None
        alpha, age = (info.alpha, 1) if fresh else (state.alpha, state.alpha_age + 1)
        if not applied:  # a failed solve is no start for the next one: warm starts begin again from 0
            return IFTState(None, alpha, age)
        solution = state.solution
        if getattr(self.strategy, "warm_start", False) and info.solution is not None:
            solution = tuple(optree.tree_leaves(info.solution))
        return IFTState(solution, alpha, age)

    def to_dict(self, state: IFTState) -> dict[str, Any]:
        solution = None if state.solution is None else list(state.solution)
        return {"solution": solution, "alpha": state.alpha, "alpha_age": state.alpha_age}

    def from_dict(self, saved: dict[str, Any], like: RunState) -> IFTState:
        if saved["solution"] is not None:
            _checkpoint.check_tensors(saved["solution"], like.w, "solution")
        alpha = saved["alpha"]
        if alpha is not None and not (isinstance(alpha, float) and alpha > 0 and alpha != float("inf")):
            raise ValueError(f"`state['alpha']` must be None or a finite float > 0, got {alpha!r}.")
        _checkpoint.check_count(saved["alpha_age"], "alpha_age")
        solution = None if saved["solution"] is None else tuple(saved["solution"])
        return IFTState(solution, alpha, saved["alpha_age"])
