"""The run-time bookkeeping of ``Unroll`` in a ``BilevelOptimizer``: the recorded window of inner steps.

Every applied inner step is remembered — where it started (weights, optimiser and model state), a
private copy of its batch, and its index, which fixes its random numbers — for the last ``steps`` of
them. The hyperstep then replays them as differentiable updates (``unrolled_hypergradient``) and the
window starts afresh: the hyperparameters have changed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bilevel import _checkpoint, _random, _tree
from bilevel._checkpoint import RunState
from bilevel._family import Family, Hyper, unavailable
from bilevel._hypergradient import UnrollStep, unrolled_hypergradient
from bilevel._problem import Problem
from bilevel._strategies import Unroll
from bilevel._transform import Transformation
from bilevel._tree import Leaves


@dataclasses.dataclass(frozen=True)
class Record:
    """One applied inner step: where it started, on which batch (a private copy) and its index."""

    w: Leaves
    inner_state: Any
    inner_started: bool
    batch: Any
    s: Leaves
    step: int


class UnrollWindow(Family):
    keys = ("window",)

    def __init__(self, problem: Problem, inner: Transformation, strategy: Unroll) -> None:
        super().__init__(problem, inner, strategy)
        self.size = strategy.steps

    def initial(self, w: Leaves, inner_state: Any) -> tuple[Record, ...]:
        return ()

    def recorded(self, window: tuple[Record, ...], run: RunState, batch: Any) -> tuple[Record, ...]:
        record = Record(run.w, run.inner_state, run.inner_started, _tree.copy_batch(batch), run.s, run.steps)
        return (*window, record)[-self.size :]

    def hypergradient(self, run: RunState, train_batch: Any, val_batch: Any, scheduled: bool) -> Any:
        window = run.family
        if len(window) < self.size:
            needs = (
                f"Unroll(steps={self.size}) needs {self.size} applied inner steps since the last hyperstep to "
                f"differentiate through; only {len(window)} were applied"
            )
            if not scheduled:  # an explicit outer_step() too early is a usage error
                raise ValueError(f"`{needs}`.")
            # after step()'s inner_steps inner steps, only skipped (non-finite) ones make the window short
            failure = f"{needs} (the others were skipped as non-finite). Use inner_steps > steps to leave room."
            return Hyper(*unavailable(run.h, "unroll", failure), ())
        steps = [
            UnrollStep(r.inner_started, r.batch, r.s, _random.derive(run.seed, _random.INNER, r.step)) for r in window
        ]
        first = window[0]
        grads, info = unrolled_hypergradient(
            self.problem, first.w, first.inner_state, run.h, steps, val_batch, run.s, self.seeds(run).val, self.inner
        )
        return Hyper(grads, info, ())

    def after(self, state: Any, hyper: Hyper, applied: bool) -> tuple[Record, ...]:
        return ()  # the hyperparameters changed (or the window was used up): record afresh

    def to_dict(self, window: tuple[Record, ...]) -> dict[str, Any]:
        return {
            "window": [
                {
                    "params": list(r.w),
                    "inner_state": _checkpoint.leaves(r.inner_state),
                    "inner_started": r.inner_started,
                    "batch": r.batch,
                    "state": list(r.s),
                    "step": r.step,
                }
                for r in window
            ]
        }

    def from_dict(self, saved: dict[str, Any], like: RunState) -> tuple[Record, ...]:
        entries = saved["window"]
        if not isinstance(entries, list) or len(entries) > self.size:
            raise ValueError(
                f"`state['window']` must be a list of at most {self.size} recorded inner steps (the strategy's "
                f"Unroll steps), got {len(entries) if isinstance(entries, list) else type(entries).__name__}."
            )
        records = []
        for i, entry in enumerate(entries):
            keys = {"params", "inner_state", "inner_started", "batch", "state", "step"}
            if not isinstance(entry, dict) or set(entry) != keys:
                raise ValueError(f"`state['window'][{i}]` must be a dict with keys {sorted(keys)}.")
            _checkpoint.check_tensors(entry["params"], like.w, f"window'][{i}]['params")
            inner = _checkpoint.rebuild(entry["inner_state"], like.inner_state, f"window'][{i}]['inner_state")
            _checkpoint.check_type(entry["inner_started"], bool, f"window'][{i}]['inner_started")
            _checkpoint.check_tensors(entry["state"], like.s, f"window'][{i}]['state")
            _checkpoint.check_count(entry["step"], f"window'][{i}]['step")
            records.append(
                Record(tuple(entry["params"]), inner, entry["inner_started"], entry["batch"], tuple(entry["state"]),
                       entry["step"])
            )  # fmt: skip
        return tuple(records)
