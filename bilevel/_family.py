"""What a hypergradient family keeps between the hypersteps of a ``BilevelOptimizer``, and how it takes one.

A family is the run-time side of a group of strategies: the IFT solves (warm starts, the cached
spectral radius of ``alpha="auto"``), ``Unroll`` (the recorded window of inner steps) and ``Penalty``
(the auxiliary weights). Each keeps an immutable state object inside the optimiser's ``RunState``, so a
step that fails leaves it as it was, and serialises it for checkpoints. The optimiser itself only runs
the loop: inner step, guard, hyperstep, outer update, counters.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel import _random
from bilevel._checkpoint import RunState
from bilevel._hypergradient import HypergradInfo, Seeds
from bilevel._problem import Problem
from bilevel._strategies import Strategy
from bilevel._transform import Transformation
from bilevel._tree import Leaves


@dataclasses.dataclass(frozen=True)
class Hyper:
    """One attempt at a hyperstep's hypergradient.

    ``state`` is the family state to keep if the hyperstep is applied; ``redo`` a second attempt the
    family can make when this one is in trouble (IFT: a fresh spectral-radius estimate); ``written`` the
    family's own new tensors that the non-finite guard must check (Penalty: the auxiliary weights).
    """

    grads: list[Tensor]
    info: HypergradInfo
    state: Any
    redo: Callable[[], Hyper] | None = None
    written: tuple[Tensor, ...] = ()


class Family(abc.ABC):
    """The run-time bookkeeping of one hypergradient family (see the module docstring)."""

    keys: tuple[str, ...] = ()  # the entries it adds to a state_dict()

    def __init__(self, problem: Problem, inner: Transformation, strategy: Strategy) -> None:
        self.problem, self.inner, self.strategy = problem, inner, strategy

    def initial(self, w: Leaves, inner_state: Any) -> Any:
        """The family state of a new run."""
        return None

    def recorded(self, state: Any, run: RunState, batch: Any) -> Any:
        """The family state after an applied inner step that started from ``run`` on ``batch``."""
        return state

    @abc.abstractmethod
    def hypergradient(self, run: RunState, train_batch: Any, val_batch: Any, scheduled: bool) -> Hyper:
        """The hyperstep's hypergradient at ``run`` (``scheduled``: called by ``step()``)."""

    def after(self, state: Any, hyper: Hyper, applied: bool) -> Any:
        """The family state after the hyperstep, applied or skipped."""
        return hyper.state if applied else state

    def to_dict(self, state: Any) -> dict[str, Any]:
        """The family state as plain containers, numbers and tensors (its ``keys``)."""
        return {}

    def from_dict(self, saved: dict[str, Any], like: RunState) -> Any:
        """The family state a saved dict describes, validated against ``like`` (raise before building)."""
        return None

    def seeds(self, run: RunState) -> Seeds:
        """The random numbers of hyperstep ``run.hypersteps``: one seed for L_T, one for L_V."""
        return Seeds(
            _random.derive(run.seed, _random.TRAIN, run.hypersteps),
            _random.derive(run.seed, _random.VAL, run.hypersteps),
        )


def unavailable(h: Leaves, name: str, failure: str) -> tuple[list[Tensor], HypergradInfo]:
    """A hypergradient that could not even be attempted: NaN entries and the reason."""
    nan = torch.full((), math.nan, dtype=h[0].dtype, device=h[0].device)
    info = HypergradInfo(strategy=name, hvps=0, val_loss=nan, grad_norm=nan, failure=failure)
    return [torch.full_like(t, math.nan) for t in h], info
