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
from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch
import torchopt
from torch import Tensor

from bilevel._tree import Flat, Leaves

_FLAG = "first_call"


def is_transformation(value: Any) -> bool:
    """Whether ``value`` looks like a torchopt ``GradientTransformation`` (``init`` and ``update``)."""
    return callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))


def check_transformation(value: Any, name: str, *, factory: bool = False) -> None:
    """Raise ``TypeError`` unless ``value`` is a torchopt ``GradientTransformation``, a dict of them (one
    per top-level key of the tree it updates), or, with ``factory``, a callable ``hparams ->
    GradientTransformation``."""
    if isinstance(value, Mapping):
        bad = [key for key, t in value.items() if not is_transformation(t)]
        if not value or bad:
            raise TypeError(
                f"`{name}`: a dict of optimisers must map top-level keys to torchopt GradientTransformations "
                f"(e.g. {{'decay': torchopt.adam(1e-2), 'example_weights': torchopt.adam(1e-1)}}); "
                f"{'it is empty' if not value else f'the entries {bad} are not'}."
            )
        return
    if is_transformation(value) or (factory and callable(value) and not isinstance(value, type)):
        return  # (a class such as torch.optim.Adam is callable, but not a factory of transformations)
    also = " or a callable hparams -> GradientTransformation" if factory else ""
    raise TypeError(
        f"`{name}` must be a torchopt GradientTransformation such as torchopt.adam(1e-4), a dict of them by "
        f"top-level key{also}; got {value!r}."
    )


def by_key(groups: Mapping[str, Any], spec: optree.PyTreeSpec, name: str) -> Any:
    """One torchopt transformation made of one per top-level key of a dict tree (per-group rules and
    rates): each updates its own subtree with its own state; the state is the tuple of theirs, in the
    tree's key order, so it checkpoints and resumes like any torchopt state."""
    tree = optree.tree_unflatten(spec, [0] * spec.num_leaves)
    if not isinstance(tree, dict) or set(tree) != set(groups):
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(
            f"`{name}`: a dict of optimisers needs a dict tree with exactly its keys; the optimisers are for "
            f"{sorted(groups)}, the tree has {keys}."
        )
    members = tuple((key, groups[key]) for key in tree)  # a tuple: first_call_cells walks into it

    def init(params: Any) -> tuple[Any, ...]:
        return tuple(t.init(params[key]) for key, t in members)

    def update(updates: Any, state: Any, params: Any = None, inplace: bool = True) -> tuple[Any, Any]:
        out, states = {}, []
        for (key, t), sub in zip(members, state):
            out[key], new = t.update(updates[key], sub, params=None if params is None else params[key], inplace=inplace)
            states.append(new)
        return out, tuple(states)

    return torchopt.base.GradientTransformation(init, update)


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
    """A torchopt transformation applied to flat leaves, with three things torchopt leaves to us.

    - Its ``first_call`` flags follow ``started`` (whether an update was applied) instead of its
      call history (see the module docstring).
    - Its layout. torchopt's updates run a Python function per leaf and per operation, which on a
      small model costs more than the forward and backward passes (an Adam update measured ~3×
      ``torch.optim.Adam(foreach=True)``). Most transformations are elementwise, and then updating the
      concatenation of all leaves as one tensor gives the very same numbers with one operation each.
      Whether this transformation is such is not guessed from its type: two updates of random
      gradients are run both ways and compared bitwise. Masks, per-parameter options and global norms
      change the result or fail on one vector, so they keep the per-leaf layout, in which torchopt
      sees the user's own tree (masks written against it apply).
    - Hyperparameters of the optimiser itself. ``source`` may be a callable ``hparams ->
      GradientTransformation`` (e.g. ``lambda h: torchopt.sgd(lr=h["log_lr"].exp())``); it is called
      with the current hyperparameters at every update, with differentiable ones when ``Unroll``
      replays updates, so learning rates and momentum get hypergradients. Its state must not depend
      on the hyperparameters (torchopt's states hold moments and counts, not rates).
    """

    def __init__(
        self, source: Any, spec: optree.PyTreeSpec, like: Leaves | None = None, hparams: Any = None, name: str = ""
    ) -> None:
        self.spec = spec
        if isinstance(source, Mapping):
            source = by_key(source, spec, name)
        self.factory = None if is_transformation(source) else source
        self.transformation = self._build(hparams) if self.factory is not None else source
        self._cells = first_call_cells(self.transformation)
        self.flat: Flat | None = None
        if self.factory is None and like is not None and Flat.fits(like) and self._flat_equivalent(like):
            self.flat = Flat(like)

    def _build(self, hparams: Any) -> Any:
        assert self.factory is not None
        built = self.factory(hparams)
        if not is_transformation(built):
            raise TypeError(
                f"`inner(hparams)` must return a torchopt GradientTransformation, got {type(built).__name__}."
            )
        return built

    def _at(self, hparams: Any) -> tuple[Any, list[types.CellType]]:
        if self.factory is None:
            return self.transformation, self._cells
        built = self._build(hparams)
        return built, first_call_cells(built)

    def init(self, w: Sequence[Tensor]) -> Any:
        if self.flat is not None:
            return self.transformation.init((self.flat.join(w),))
        return self.transformation.init(optree.tree_unflatten(self.spec, list(w)))

    def _update(
        self, updates: Any, state: Any, params: Any, started: bool, hparams: Any = None, inplace: bool = False
    ) -> tuple[Any, Any]:
        """``transformation.update`` as if the state had seen ``started`` earlier updates (0 or some)."""
        transformation, cells = self._at(hparams)
        for cell in cells:
            cell.cell_contents = not started
        return transformation.update(updates, state, params=params, inplace=inplace)

    def apply(
        self, grads: Sequence[Tensor], state: Any, w: Sequence[Tensor], *, started: bool, hparams: Any = None
    ) -> tuple[Leaves, Any]:
        """(w + update(grads), new state) on leaves. Out of place and differentiable: the inputs stay valid
        (the optimiser commits a result only if it is finite; unrolling differentiates through it).
        ``hparams`` (a tree) feeds a factory ``source``; ignored otherwise."""
        if self.flat is not None:
            new, state = self.apply_flat(self.flat.join(grads), state, self.flat.join(w), started=started)
            return self.flat.split(new), state
        params = optree.tree_unflatten(self.spec, list(w))
        updates, state = self._update(optree.tree_unflatten(self.spec, list(grads)), state, params, started, hparams)
        new = torchopt.apply_updates(params, updates, inplace=False)
        return tuple(optree.tree_leaves(new)), state

    def hparams_used(self, w: Leaves, h: Leaves, hparams_spec: optree.PyTreeSpec) -> list[int]:
        """Indices of the hyperparameter leaves a factory's updates depend on (two updates of unit
        gradients, so that momentum, which the first update ignores, shows too)."""
        if self.factory is None:
            return []
        with torch.enable_grad():
            hh = [t.detach().requires_grad_() for t in h]
            tree = optree.tree_unflatten(hparams_spec, hh)
            state, ww = self.transformation.init(optree.tree_unflatten(self.spec, list(w))), tuple(w)
            for started in (False, True):
                ww, state = self.apply([torch.ones_like(t) for t in w], state, ww, started=started, hparams=tree)
            total = sum(t.sum() for t in ww)
            if not isinstance(total, Tensor) or not total.requires_grad:
                return []
            found = torch.autograd.grad(total, hh, allow_unused=True)
        return [i for i, g in enumerate(found) if g is not None]

    def is_linear(self, like: Leaves) -> bool:
        """Is the update linear in the gradient (SGD, momentum, Nesterov) rather than normalised by it
        (Adam, RMSProp, Adagrad)? Two updates of g and of 2g from fresh states at zero weights (so that
        weight decay drops out), compared; a factory is not probed (False)."""
        if self.factory is not None:
            return False
        gen = torch.Generator(device=like[0].device).manual_seed(0)
        g = [torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in like]
        zeros = tuple(torch.zeros_like(t) for t in like)

        def two_updates(scale: float) -> list[Tensor]:
            state, out = self.init(zeros), []
            for started in (False, True):
                new, state = self.apply([scale * t for t in g], state, zeros, started=started)
                out += list(new)
            return out

        return all(torch.allclose(2 * a, b, rtol=1e-4, atol=0) for a, b in zip(two_updates(1.0), two_updates(2.0)))

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
