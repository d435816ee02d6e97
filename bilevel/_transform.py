"""The torchopt boundary: validating a transformation, and the one piece of its state torchopt keeps
outside the state pytree.

torchopt's momentum (``torchopt.transform.trace``, used by ``sgd(momentum=...)``, nesterov and
``rmsprop(momentum=...)``) remembers in a closure variable ``first_call`` whether it has been called:
the first call sets the trace to the gradient (torch.optim's convention), later calls to
``momentum · trace + (1 − dampening) · gradient``. That flag is not in the state pytree, so a
transformation rebuilt to resume a run, or shared between two optimisers (as a default argument is),
would treat a restored trace as if it were the first call. The optimiser therefore sets the flag
itself before every update, from a bit it does keep in its state: whether an update has been applied.
Without this, resuming an SGD-momentum run diverges from the uninterrupted one at the first step.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import optree
import torchopt
from torch import Tensor

from bilevel._tree import Leaves

_FLAG = "first_call"


def check_transformation(value: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``value`` looks like a torchopt ``GradientTransformation``."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise TypeError(
            f"`{name}` must be a torchopt GradientTransformation such as torchopt.adam(1e-4); got {value!r}."
        )


def first_call_cells(transformation: Any) -> list[types.CellType]:
    """The closure cells holding torchopt's ``first_call`` flags anywhere inside ``transformation``.

    Walks the closures of its functions and, for chains, of every member transformation.
    """
    cells: list[types.CellType] = []
    seen: set[int] = set()
    todo: list[Any] = [transformation]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if name == _FLAG and isinstance(value, bool):
                    cells.append(cell)
                else:
                    todo.append(value)
        elif isinstance(obj, types.MethodType):
            todo += [obj.__func__, obj.__self__]
        elif isinstance(obj, (tuple, list)):
            todo += list(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
            todo += list(vars(obj).values())
    return cells


class Transformation:
    """A torchopt transformation whose ``first_call`` flags follow ``started`` instead of its history."""

    def __init__(self, transformation: Any) -> None:
        self.transformation = transformation
        self._cells = first_call_cells(transformation)

    def init(self, params: Any) -> Any:
        return self.transformation.init(params)

    def update(self, updates: Any, state: Any, *, params: Any, started: bool, inplace: bool = False) -> tuple[Any, Any]:
        """``transformation.update`` as if the state had seen ``started`` earlier updates (0 or some)."""
        for cell in self._cells:
            cell.cell_contents = not started
        return self.transformation.update(updates, state, params=params, inplace=inplace)

    def apply(
        self, spec: optree.PyTreeSpec, grads: Sequence[Tensor], state: Any, w: Sequence[Tensor], *, started: bool
    ) -> tuple[Leaves, Any]:
        """(w + update(grads), new state) on flat leaves; torchopt sees the trees of ``spec``, so masks
        and per-parameter options written against the user's structure apply. Out of place: the
        inputs stay valid (the optimiser commits the result only if it is finite; unrolling
        differentiates through it)."""
        params = optree.tree_unflatten(spec, list(w))
        updates, state = self.update(optree.tree_unflatten(spec, list(grads)), state, params=params, started=started)
        new = torchopt.apply_updates(params, updates, inplace=False)
        return tuple(optree.tree_leaves(new)), state


def describe(state: Any) -> str:
    """A short, stable text of a state pytree's structure (types and field names), for checkpoints."""
    return str(optree.tree_structure(state))


def leaf_kinds(leaves: list[Any]) -> list[str]:
    """``'tensor'`` or the Python type name of each leaf (optimiser states hold a few ints)."""
    return ["tensor" if isinstance(leaf, Tensor) else type(leaf).__name__ for leaf in leaves]


def float_leaves(tree: Any) -> list[Tensor]:
    """The floating-point tensors in a pytree (what a non-finite check must look at)."""
    return [t for t in optree.tree_leaves(tree) if isinstance(t, Tensor) and t.is_floating_point()]
