"""Everything a ``BilevelOptimizer`` changes while it runs, and its round trip through a checkpoint.

``RunState`` holds the whole mutable state of a run; the optimiser replaces it as one object, so a
step or a load either happens completely or not at all. ``to_dict`` turns it into plain containers,
numbers, strings and tensors (what ``torch.load(..., weights_only=True)`` reads); ``from_dict``
validates *everything* in a saved dict against the running optimiser before building the new state,
so a bad checkpoint raises without changing anything.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import optree
from torch import Tensor

from bilevel._transform import describe, leaf_kinds
from bilevel._tree import Leaves

VERSION = 2


@dataclasses.dataclass(frozen=True)
class Record:
    """One applied inner step remembered for ``Unroll``: where it started (weights, optimiser and model
    state), on which batch (a private copy) and its index (which fixes its random numbers)."""

    w: Leaves
    inner_state: Any
    inner_started: bool
    batch: Any
    s: Leaves
    step: int


@dataclasses.dataclass(frozen=True)
class RunState:
    """The mutable state of a bilevel run (replaced as a whole, never edited in place)."""

    w: Leaves
    h: Leaves
    s: Leaves  # the model state (e.g. BatchNorm running statistics); () without one
    seed: int  # every random number of the run derives from it
    inner_state: Any
    outer_state: Any
    inner_started: bool  # has an inner update been applied? (torchopt's momentum first-call flag)
    outer_started: bool
    steps: int
    hypersteps: int
    skipped_inner: Tensor  # a device tensor: the accelerator path counts skips without a host sync
    skipped_inner_warned: int
    skipped_outer: int
    alpha: float | None  # the cached Neumann step size of alpha="auto"
    alpha_age: int  # hypersteps since it was estimated
    solution: Leaves | None = None  # the last hyperstep's linear-solve solution (warm starts)
    window: tuple[Record, ...] = ()
    w_flat: Tensor | None = None  # the weights as one vector when the inner update is flat; w are its views

    def replace(self, **changes: Any) -> RunState:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------- saving


def to_dict(run: RunState) -> dict[str, Any]:
    """``run`` as plain containers, numbers, strings and tensors (optimiser states as leaf lists): copies,
    which later steps never change (the optimiser writes its weights and inner state in place)."""
    return _copied(_as_dict(run))


def _copied(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts and lists cloned (recorded batches are private copies already)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copied(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copied(v) for v in obj]
    return obj


def _as_dict(run: RunState) -> dict[str, Any]:
    return {
        "version": VERSION,
        "params": list(run.w),
        "hparams": list(run.h),
        "state": list(run.s),
        "seed": run.seed,
        "inner_state": optree.tree_leaves(run.inner_state),
        "inner_structure": describe(run.inner_state),
        "outer_state": optree.tree_leaves(run.outer_state),
        "outer_structure": describe(run.outer_state),
        "inner_started": run.inner_started,
        "outer_started": run.outer_started,
        "steps": run.steps,
        "hypersteps": run.hypersteps,
        "skipped_inner": run.skipped_inner.clone(),
        "skipped_inner_warned": run.skipped_inner_warned,
        "skipped_outer": run.skipped_outer,
        "alpha": run.alpha,
        "alpha_age": run.alpha_age,
        "solution": None if run.solution is None else list(run.solution),
        "window": [
            {
                "params": list(r.w),
                "inner_state": optree.tree_leaves(r.inner_state),
                "inner_started": r.inner_started,
                "batch": r.batch,
                "state": list(r.s),
                "step": r.step,
            }
            for r in run.window
        ],
    }


# ---------------------------------------------------------------------------------- loading

_KEYS = (
    "params hparams state seed inner_state inner_structure outer_state outer_structure inner_started outer_started "
    "steps hypersteps skipped_inner skipped_inner_warned skipped_outer alpha alpha_age solution window"
).split()


def from_dict(saved: Any, like: RunState, window_size: int) -> RunState:
    """Validate ``saved`` (a ``to_dict`` output, e.g. from ``torch.load``) against the running state
    ``like`` and return the state it describes. Raises ``ValueError`` / ``TypeError`` naming the
    first entry that does not fit, before anything is built."""
    if not isinstance(saved, dict):
        raise TypeError(f"`state` must be a dict from BilevelOptimizer.state_dict(), got {type(saved).__name__}.")
    if saved.get("version") != VERSION:
        raise ValueError(
            f"`state` is not a BilevelOptimizer.state_dict() of version {VERSION} (got version "
            f"{saved.get('version')!r}); checkpoints of bilevel 0.1 (version 1) cannot be resumed by this version."
        )
    missing = [key for key in _KEYS if key not in saved]
    if missing:
        raise ValueError(f"`state` lacks the entries {missing}; it is not a complete BilevelOptimizer.state_dict().")
    _check_tensors(saved["params"], like.w, "params")
    _check_tensors(saved["hparams"], like.h, "hparams")
    _check_tensors(saved["state"], like.s, "state")
    if isinstance(saved["seed"], bool) or not isinstance(saved["seed"], int):
        raise TypeError(f"`state['seed']` must be an int, got {saved['seed']!r}.")
    if saved["solution"] is not None:
        _check_tensors(saved["solution"], like.w, "solution")
    inner = _optimizer_state(saved, "inner", like.inner_state)
    outer = _optimizer_state(saved, "outer", like.outer_state)
    for key in ("inner_started", "outer_started"):
        _check_type(saved[key], bool, key)
    for key in ("steps", "hypersteps", "skipped_inner_warned", "skipped_outer", "alpha_age"):
        _check_count(saved[key], key)
    _check_tensors([saved["skipped_inner"]], [like.skipped_inner], "skipped_inner")
    alpha = saved["alpha"]
    if alpha is not None and not (isinstance(alpha, float) and alpha > 0 and alpha != float("inf")):
        raise ValueError(f"`state['alpha']` must be None or a finite float > 0, got {alpha!r}.")
    window = _window(saved["window"], like, window_size)
    return RunState(
        w=tuple(saved["params"]),
        h=tuple(saved["hparams"]),
        s=tuple(saved["state"]),
        seed=saved["seed"],
        inner_state=inner,
        outer_state=outer,
        inner_started=saved["inner_started"],
        outer_started=saved["outer_started"],
        steps=saved["steps"],
        hypersteps=saved["hypersteps"],
        skipped_inner=saved["skipped_inner"].clone(),
        skipped_inner_warned=saved["skipped_inner_warned"],
        skipped_outer=saved["skipped_outer"],
        alpha=alpha,
        alpha_age=saved["alpha_age"],
        solution=None if saved["solution"] is None else tuple(saved["solution"]),
        window=window,
    )


def _optimizer_state(saved: dict[str, Any], which: str, like: Any) -> Any:
    """Rebuild the saved torchopt state of the ``inner``/``outer`` optimiser into ``like``'s structure."""
    key = f"{which}_state"
    structure = describe(like)
    if saved[f"{which}_structure"] != structure:
        raise ValueError(
            f"`state['{key}']` was saved from another torchopt optimiser: its structure is "
            f"{saved[f'{which}_structure']}, this optimiser's `{which}` has {structure}. Build the optimiser with "
            f"the same `{which}` transformation as the run you resume."
        )
    return _rebuild(saved[key], like, key)


def _rebuild(leaves: Any, like: Any, key: str) -> Any:
    current = optree.tree_leaves(like)
    if not isinstance(leaves, list) or leaf_kinds(leaves) != leaf_kinds(current):
        raise ValueError(
            f"`state['{key}']` must be a list of leaves of kinds {leaf_kinds(current)}, "
            f"got {leaf_kinds(leaves) if isinstance(leaves, list) else type(leaves).__name__}."
        )
    tensors = [(i, t) for i, t in enumerate(leaves) if isinstance(t, Tensor)]
    _check_tensors([t for _, t in tensors], [current[i] for i, _ in tensors], key)
    return optree.tree_unflatten(optree.tree_structure(like), leaves)


def _window(saved: Any, like: RunState, size: int) -> tuple[Record, ...]:
    if not isinstance(saved, list) or len(saved) > size:
        raise ValueError(
            f"`state['window']` must be a list of at most {size} recorded inner steps (the strategy's Unroll "
            f"steps), got {len(saved) if isinstance(saved, list) else type(saved).__name__}."
        )
    records = []
    for i, entry in enumerate(saved):
        keys = {"params", "inner_state", "inner_started", "batch", "state", "step"}
        if not isinstance(entry, dict) or set(entry) != keys:
            raise ValueError(f"`state['window'][{i}]` must be a dict with keys {sorted(keys)}.")
        _check_tensors(entry["params"], like.w, f"window'][{i}]['params")
        inner = _rebuild(entry["inner_state"], like.inner_state, f"window'][{i}]['inner_state")
        _check_type(entry["inner_started"], bool, f"window'][{i}]['inner_started")
        _check_tensors(entry["state"], like.s, f"window'][{i}]['state")
        _check_count(entry["step"], f"window'][{i}]['step")
        records.append(
            Record(
                tuple(entry["params"]),
                inner,
                entry["inner_started"],
                entry["batch"],
                tuple(entry["state"]),
                entry["step"],
            )
        )
    return tuple(records)


def _check_tensors(loaded: Any, current: Sequence[Tensor], key: str) -> None:
    """Same number of tensors, each of the same shape, dtype and device (never meta)."""
    if not isinstance(loaded, (list, tuple)) or not all(isinstance(t, Tensor) for t in loaded):
        raise TypeError(f"`state['{key}']` must be a list of tensors.")
    got = [(tuple(t.shape), t.dtype, t.device) for t in loaded]
    want = [(tuple(t.shape), t.dtype, t.device) for t in current]
    if [g[0] for g in got] != [w[0] for w in want]:
        raise ValueError(
            f"`state['{key}']` has tensors of shapes {[g[0] for g in got]}; this optimiser's {key} has "
            f"{[w[0] for w in want]}. Was the state saved from an optimiser with other params, hparams or "
            f"torchopt optimisers?"
        )
    for i, ((_, dtype, device), (_, dtype_now, device_now)) in enumerate(zip(got, want)):
        if device.type == "meta":
            raise ValueError(f"`state['{key}'][{i}]` is a meta tensor (no data); it cannot be resumed from.")
        if dtype != dtype_now:
            raise ValueError(
                f"`state['{key}'][{i}]` has dtype {dtype}, this optimiser's has {dtype_now}; build the optimiser "
                f"with the dtype of the run you resume (a silent cast would change the numbers)."
            )
        if device != device_now:
            raise ValueError(
                f"`state['{key}'][{i}]` is on {device}, this optimiser's is on {device_now}; load with "
                f"torch.load(path, map_location='{device_now}') to move the checkpoint."
            )


def _check_type(value: Any, kind: type, key: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"`state['{key}']` must be a {kind.__name__}, got {value!r}.")


def _check_count(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"`state['{key}']` must be an integer >= 0, got {value!r}.")
