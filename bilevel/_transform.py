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
import torch
import torchopt
from torch import Tensor

from bilevel._tree import Flat, Leaves

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
    """A torchopt transformation applied to flat leaves, with two things torchopt leaves to us.

    - Its ``first_call`` flags follow ``started`` (whether an update was applied) instead of its
      call history (see the module docstring).
    - Its layout. torchopt's updates run a Python function per leaf and per operation, which on a
      small model costs more than the forward and backward passes (an Adam update measured ~3×
      ``torch.optim.Adam(foreach=True)``). Most transformations are elementwise, and then updating the
      concatenation of all leaves as one tensor gives the very same numbers with one operation each.
      Whether this transformation is such is not guessed from its type: ``probe`` runs two updates of
      random gradients both ways and compares them bitwise. Masks, per-parameter options and global
      norms change the result or fail on one vector, so they keep the per-leaf layout, in which torchopt
      sees the user's own tree (masks written against it apply).
    """

    def __init__(self, transformation: Any, spec: optree.PyTreeSpec, like: Leaves | None = None) -> None:
        self.transformation, self.spec = transformation, spec
        self._cells = first_call_cells(transformation)
        self.flat: Flat | None = None
        if like is not None and Flat.fits(like) and self._flat_equivalent(like):
            self.flat = Flat(like)

    def init(self, w: Sequence[Tensor]) -> Any:
        if self.flat is not None:
            return self.transformation.init((self.flat.join(w),))
        return self.transformation.init(optree.tree_unflatten(self.spec, list(w)))

    def _update(self, updates: Any, state: Any, params: Any, started: bool) -> tuple[Any, Any]:
        """``transformation.update`` as if the state had seen ``started`` earlier updates (0 or some)."""
        for cell in self._cells:
            cell.cell_contents = not started
        return self.transformation.update(updates, state, params=params, inplace=False)

    def apply(self, grads: Sequence[Tensor], state: Any, w: Sequence[Tensor], *, started: bool) -> tuple[Leaves, Any]:
        """(w + update(grads), new state) on leaves. Out of place and differentiable: the inputs stay valid
        (the optimiser commits a result only if it is finite; unrolling differentiates through it)."""
        if self.flat is not None:
            new, state = self.apply_flat(self.flat.join(grads), state, self.flat.join(w), started=started)
            return self.flat.split(new), state
        params = optree.tree_unflatten(self.spec, list(w))
        updates, state = self._update(optree.tree_unflatten(self.spec, list(grads)), state, params, started)
        new = torchopt.apply_updates(params, updates, inplace=False)
        return tuple(optree.tree_leaves(new)), state

    def apply_flat(self, grad: Tensor, state: Any, w: Tensor, *, started: bool) -> tuple[Tensor, Any]:
        """:meth:`apply` on the concatenated vector (flat layout only)."""
        (update,), state = self._update((grad,), state, (w,), started)
        return w + update, state

    def _flat_equivalent(self, like: Leaves) -> bool:
        """Two updates of random gradients, per leaf and on the concatenation: bitwise the same?"""
        gen = torch.Generator(device=like[0].device).manual_seed(0)
        grads = [[torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in like] for _ in range(2)]
        flat = Flat(like)
        try:
            w, state = tuple(like), self.transformation.init(optree.tree_unflatten(self.spec, list(like)))
            v, flat_state = flat.join(like), self.transformation.init((flat.join(like),))
            for k, g in enumerate(grads):
                params = optree.tree_unflatten(self.spec, list(w))
                updates, state = self._update(optree.tree_unflatten(self.spec, g), state, params, k > 0)
                w = tuple(optree.tree_leaves(torchopt.apply_updates(params, updates, inplace=False)))
                (step,), flat_state = self._update((flat.join(g),), flat_state, (v,), k > 0)
                v = v + step
            return bool(torch.equal(flat.join(w), v))
        except Exception:  # e.g. a mask that does not fit one vector: keep the per-leaf layout
            return False


def describe(state: Any) -> str:
    """A short, stable text of a state pytree's structure (types and field names), for checkpoints."""
    return str(optree.tree_structure(state))


def leaf_kinds(leaves: list[Any]) -> list[str]:
    """``'tensor'`` or the Python type name of each leaf (optimiser states hold a few ints)."""
    return ["tensor" if isinstance(leaf, Tensor) else type(leaf).__name__ for leaf in leaves]


def float_leaves(tree: Any) -> list[Tensor]:
    """The floating-point tensors in a pytree (what a non-finite check must look at)."""
    return [t for t in optree.tree_leaves(tree) if isinstance(t, Tensor) and t.is_floating_point()]
