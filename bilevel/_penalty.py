"""The run-time bookkeeping of ``Penalty`` in a ``BilevelOptimizer``: the auxiliary weights.

The auxiliary weights u and their twin v (see :class:`bilevel.Penalty`) start as copies of the weights,
with optimiser states of their own (by default the inner optimiser's configuration, so Adam's moments
of u are not w's). Each hyperstep re-anchors the pair at the current weights, v = w and
u = w + (u − v), so the difference carries over while both follow the model. The pair and its states
are part of the checkpoint, checked by the non-finite guard with everything else the hyperstep writes,
and, being updated from averaged gradients, identical on every data-parallel rank."""

from __future__ import annotations

import warnings
from typing import Any

from bilevel import _checkpoint
from bilevel._checkpoint import RunState
from bilevel._family import Family, Hyper
from bilevel._hypergradient import PenaltyRun, penalty_hypergradient
from bilevel._problem import Problem
from bilevel._strategies import Penalty
from bilevel._transform import Transformation, describe, float_leaves
from bilevel._tree import Leaves

_NOT_LINEAR = (
    "`strategy=Penalty(...)`: {what} normalises its update by the gradient (Adam, RMSProp and the like), "
    "so the auxiliary pair's O(1/σ) pull towards L_V becomes a full-sized step and u − v no longer scales as "
    "1/σ: over hypersteps the pair drifts and the hypergradient goes wrong (on the data-mixing recipe ‖u − v‖ "
    "grew from 1 to 65 and the mixture moved onto the harmful domain). Give the pair a rule linear in the "
    "gradient, e.g. Penalty(penalty, steps, optimizer=torchopt.sgd(lr)) or torchopt.sgd(lr, momentum=0.9), "
    "whatever the inner optimiser is."
)


class AuxiliaryWeights(Family):
    keys = ("aux", "aux_state", "aux_structure", "aux_twin", "aux_twin_state", "aux_twin_structure", "aux_started")

    def __init__(self, problem: Problem, inner: Transformation, strategy: Penalty) -> None:
        super().__init__(problem, inner, strategy)
        self.strategy: Penalty = strategy
        self.transformation = inner  # until initial() sees the weights (a given optimiser needs their layout)

    def initial(self, w: Leaves, inner_state: Any) -> PenaltyRun:
        if self.strategy.optimizer is not None:
            self.transformation = Transformation(self.strategy.optimizer, self.problem.params_spec, w)
        if not self.transformation.is_linear(w):
            if self.strategy.optimizer is None:
                raise ValueError(_NOT_LINEAR.format(what="the inner optimiser"))
            warnings.warn(_NOT_LINEAR.format(what="Penalty(optimizer=...)"), RuntimeWarning, stacklevel=4)
        return PenaltyRun.start(w, self.transformation)

    def hypergradient(self, run: RunState, train_batch: Any, val_batch: Any, scheduled: bool) -> Hyper:
        sigma = self.strategy.sigma(run.hypersteps)
        grads, info, aux = penalty_hypergradient(
            self.problem, run.w, run.h, run.s, train_batch, val_batch, run.family, self.transformation,
            self.strategy.steps, sigma, self.seeds(run),
        )  # fmt: skip
        written = (*aux.u, *float_leaves(aux.state), *aux.v, *float_leaves(aux.v_state))
        return Hyper(grads, info, aux, written=written)

    def to_dict(self, aux: PenaltyRun) -> dict[str, Any]:
        return {
            "aux": list(aux.u),
            "aux_state": _checkpoint.leaves(aux.state),
            "aux_structure": describe(aux.state),
            "aux_twin": list(aux.v),
            "aux_twin_state": _checkpoint.leaves(aux.v_state),
            "aux_twin_structure": describe(aux.v_state),
            "aux_started": aux.started,
        }

    def from_dict(self, saved: dict[str, Any], like: RunState) -> PenaltyRun:
        _checkpoint.check_tensors(saved["aux"], like.w, "aux")
        _checkpoint.check_tensors(saved["aux_twin"], like.w, "aux_twin")
        state = _checkpoint.optimizer_state(saved, "aux", like.family.state)
        v_state = _checkpoint.optimizer_state(saved, "aux_twin", like.family.v_state)
        _checkpoint.check_type(saved["aux_started"], bool, "aux_started")
        return PenaltyRun(tuple(saved["aux"]), state, tuple(saved["aux_twin"]), v_state, saved["aux_started"])
