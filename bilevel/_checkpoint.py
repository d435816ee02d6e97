"""Everything a ``BilevelOptimizer`` changes while it runs, and its round trip through a checkpoint.

``RunState`` holds the whole mutable state of a run; the optimiser replaces it as one object, so a
step or a load either happens completely or not at all. Its ``family`` entry belongs to the
hypergradient family of the strategy (``_ift``, ``_unroll``, ``_penalty``), which serialises and
validates it. ``to_dict`` turns a run into plain containers, numbers, strings and tensors (what
``torch.load(..., weights_only=True)`` reads); ``from_dict`` validates *everything* in a saved dict
against the running optimiser before building the new state, so a bad checkpoint raises without
changing anything.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from bilevel._transform import describe, leaf_kinds
from bilevel._tree import Leaves

VERSION = 3


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
    family: Any = None  # the hypergradient family's own state (warm starts, Unroll window, auxiliary weights)
    w_flat: Tensor | None = None  # the weights as one vector when the inner update is flat; w are its views

    def replace(self, **changes: Any) -> RunState:
        return dataclasses.replace(self, **changes)

    @classmethod
    def start(
        cls, w: Leaves, h: Leaves, s: Leaves, seed: int, inner_state: Any, outer_state: Any, family: Any
    ) -> RunState:
        """A run before its first step: nothing started, every counter at zero."""
        skipped = torch.zeros((), dtype=torch.int64, device=w[0].device)
        return cls(w, h, s, seed, inner_state, outer_state, False, False, 0, 0, skipped, 0, 0, family)


# ----------------------------------------------------------------------------------- saving


def leaves(tree: Any) -> list[Any]:
    """A state pytree's leaves, the form it is saved in."""
    return optree.tree_leaves(tree)


def to_dict(run: RunState, family: Any) -> dict[str, Any]:
    """``run`` as plain containers, numbers, strings and tensors (optimiser states as leaf lists): copies,
    which later steps never change (the optimiser writes its weights and inner state in place)."""
    return _copied(
        {
            "version": VERSION,
            "family": type(family).__name__,
            "params": list(run.w),
            "hparams": list(run.h),
            "state": list(run.s),
            "seed": run.seed,
            "inner_state": leaves(run.inner_state),
            "inner_structure": describe(run.inner_state),
            "outer_state": leaves(run.outer_state),
            "outer_structure": describe(run.outer_state),
            "inner_started": run.inner_started,
            "outer_started": run.outer_started,
            "steps": run.steps,
            "hypersteps": run.hypersteps,
            "skipped_inner": run.skipped_inner,
            "skipped_inner_warned": run.skipped_inner_warned,
            "skipped_outer": run.skipped_outer,
            **family.to_dict(run.family),
        }
    )


def _copied(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts and lists cloned (recorded batches are private copies already)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copied(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copied(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------- loading

_KEYS = (
    "family params hparams state seed inner_state inner_structure outer_state outer_structure inner_started "
    "outer_started steps hypersteps skipped_inner skipped_inner_warned skipped_outer"
).split()


def from_dict(saved: Any, like: RunState, family: Any) -> RunState:
    """Validate ``saved`` (a ``to_dict`` output, e.g. from ``torch.load``) against the running state
    ``like`` and its ``family`` and return the state it describes. Raises ``ValueError`` / ``TypeError``
    naming the first entry that does not fit, before anything is built."""
    if not isinstance(saved, dict):
        raise TypeError(f"`state` must be a dict from BilevelOptimizer.state_dict(), got {type(saved).__name__}.")
    if saved.get("version") != VERSION:
        raise ValueError(
            f"`state` is not a BilevelOptimizer.state_dict() of version {VERSION} (got version "
            f"{saved.get('version')!r}); checkpoints of earlier bilevel versions cannot be resumed by this one."
        )
    if "family" in saved and saved["family"] != type(family).__name__:
        raise ValueError(
            f"`state` was saved by an optimiser whose strategy keeps {saved['family']!r} state; this one keeps "
            f"{type(family).__name__!r}. Build the optimiser with the strategy of the run you resume."
        )
    missing = [key for key in (*_KEYS, *family.keys) if key not in saved]
    if missing:
        raise ValueError(f"`state` lacks the entries {missing}; it is not a complete BilevelOptimizer.state_dict().")
    check_tensors(saved["params"], like.w, "params")
    check_tensors(saved["hparams"], like.h, "hparams")
    check_tensors(saved["state"], like.s, "state")
    if isinstance(saved["seed"], bool) or not isinstance(saved["seed"], int):
        raise TypeError(f"`state['seed']` must be an int, got {saved['seed']!r}.")
    inner = optimizer_state(saved, "inner", like.inner_state)
    outer = optimizer_state(saved, "outer", like.outer_state)
    for key in ("inner_started", "outer_started"):
        check_type(saved[key], bool, key)
    for key in ("steps", "hypersteps", "skipped_inner_warned", "skipped_outer"):
        check_count(saved[key], key)
    check_tensors([saved["skipped_inner"]], [like.skipped_inner], "skipped_inner")
    family_state = family.from_dict(saved, like)
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
        family=family_state,
    )


def optimizer_state(saved: dict[str, Any], which: str, like: Any) -> Any:
    """Rebuild the saved torchopt state ``{which}_state`` (inner, outer, aux) into ``like``'s structure."""
    key = f"{which}_state"
    structure = describe(like)
    if saved[f"{which}_structure"] != structure:
        raise ValueError(
            f"`state['{key}']` was saved from another torchopt optimiser: its structure is "
            f"{saved[f'{which}_structure']}, this optimiser's `{which}` has {structure}. Build the optimiser with "
            f"the same `{which}` transformation as the run you resume."
        )
    return rebuild(saved[key], like, key)


def rebuild(saved_leaves: Any, like: Any, key: str) -> Any:
    """A saved list of leaves rebuilt into ``like``'s structure, each tensor checked against ``like``'s."""
    current = optree.tree_leaves(like)
    if not isinstance(saved_leaves, list) or leaf_kinds(saved_leaves) != leaf_kinds(current):
        raise ValueError(
            f"`state['{key}']` must be a list of leaves of kinds {leaf_kinds(current)}, "
            f"got {leaf_kinds(saved_leaves) if isinstance(saved_leaves, list) else type(saved_leaves).__name__}."
        )
    tensors = [(i, t) for i, t in enumerate(saved_leaves) if isinstance(t, Tensor)]
    check_tensors([t for _, t in tensors], [current[i] for i, _ in tensors], key)
    return optree.tree_unflatten(optree.tree_structure(like), saved_leaves)


def check_tensors(loaded: Any, current: Sequence[Tensor], key: str) -> None:
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


def check_type(value: Any, kind: type, key: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"`state['{key}']` must be a {kind.__name__}, got {value!r}.")


def check_count(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"`state['{key}']` must be an integer >= 0, got {value!r}.")
