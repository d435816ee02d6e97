"""Pytree boundary and arithmetic on lists of tensors.

Trees are flattened once with optree where they enter the library; every solver then works on
flat tuples of tensors with fused ``torch._foreach_*`` kernels (the same ones ``torch.optim``
uses), so a Neumann or CG iteration costs a handful of kernel launches whatever the number of
leaves.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import UserDict
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

Leaves = tuple[Tensor, ...]


def flatten(tree: Any, name: str, *, floating: bool, allow_empty: bool = False) -> tuple[Leaves, optree.PyTreeSpec]:
    """Flatten a user pytree of tensors, checking every leaf.

    Raises ``TypeError`` naming the leaf (as ``name['w']``) when it is not a tensor or, with
    ``floating``, when its dtype is not a real floating-point dtype; ``ValueError`` when the tree
    holds no tensor at all (unless ``allow_empty``).
    """
    paths, leaves, spec = optree.tree_flatten_with_path(tree)
    if not leaves and not allow_empty:
        raise ValueError(
            f"`{name}` holds no tensors; pass a dict (or other pytree) of torch.Tensor, "
            f"e.g. {{'weight': torch.zeros(3)}}."
        )
    for path, leaf in zip(paths, leaves):
        where = name + "".join(f"[{key!r}]" for key in path)
        if not isinstance(leaf, Tensor):
            raise TypeError(f"`{where}` must be a torch.Tensor, got {type(leaf).__name__}.")
        if floating and not (leaf.is_floating_point() and not leaf.is_complex()):
            raise TypeError(
                f"`{where}` has dtype {leaf.dtype}; it must be a real floating-point dtype "
                f"(float32 or float64) to be differentiated. Cast it with .float() or .double()."
            )
    return tuple(leaf.detach() for leaf in leaves), spec


def unflatten(spec: optree.PyTreeSpec, leaves: Sequence[Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    return optree.tree_unflatten(spec, list(leaves))


def check_same_device(**trees: Leaves) -> torch.device:
    """Return the one device every leaf lives on, or raise ``ValueError`` listing them."""
    names = " and ".join(trees)
    seen: dict[torch.device, str] = {}
    for name, leaves in trees.items():
        for leaf in leaves:
            seen.setdefault(leaf.device, name)
    if len(seen) > 1:
        found = ", ".join(f"{dev} (in `{name}`)" for dev, name in seen.items())
        raise ValueError(f"all tensors in {names} must be on one device; found {found}. Move them with .to(device).")
    return next(iter(seen))


def add(x: Sequence[Tensor], y: Sequence[Tensor], alpha: float = 1.0) -> list[Tensor]:
    """x + alpha * y."""
    return list(torch._foreach_add(list(x), list(y), alpha=alpha))


def add_(x: list[Tensor], y: Sequence[Tensor], alpha: float = 1.0) -> None:
    """x += alpha * y, in place on tensors this module allocated."""
    torch._foreach_add_(x, list(y), alpha=alpha)


def scale(x: Sequence[Tensor], alpha: float | Tensor) -> list[Tensor]:
    """alpha * x."""
    return list(torch._foreach_mul(list(x), alpha))


def writable(x: Sequence[Tensor]) -> list[Tensor]:
    """``x`` with every tensor whose elements share memory (autograd's expanded, stride-0 gradients of a
    tensor used through a sum or a broadcast) replaced by a dense copy, so that in-place updates of the
    results (CG's damping term, the average over micro-batches) can write into them."""
    return [t if t.is_contiguous() or not _overlaps(t) else t.contiguous() for t in x]


def _overlaps(t: Tensor) -> bool:
    return any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape))


def vdot(x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensor:
    """Real inner product sum_i <x_i, y_i> as a 0-dim tensor (no host sync)."""
    return sum(torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(x, y))  # type: ignore[return-value]


def norm(x: Sequence[Tensor]) -> Tensor:
    """Euclidean norm of the concatenation of ``x`` as a 0-dim tensor."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(x))))


def all_finite(x: Sequence[Tensor]) -> Tensor:
    """0-dim bool tensor: every element of every tensor is finite (exact; no host sync).

    Uses each tensor's min and max (one read, no tensor-sized temporary): NaN propagates through
    both, +inf shows in the max and -inf in the min.
    """
    extremes = [v.double() for t in x if t.numel() for v in torch.aminmax(t.detach())]
    return torch.isfinite(torch.stack(extremes)).all() if extremes else torch.ones((), dtype=torch.bool)


def sum_is_finite(x: Sequence[Tensor]) -> bool:
    """A fast screen for :func:`all_finite`: True implies every element is finite.

    A sum is non-finite whenever an element is NaN or ±inf; the converse can fail only if finite
    values overflow when added (|values| near the dtype's max), so a False needs the exact check.
    On the CPU each tensor's sum is read as a Python float (cheaper than stacking them); on an
    accelerator the sums are stacked so that one number crosses to the host.
    """
    x = [t.detach() for t in x if t.numel()]
    if all(t.device.type == "cpu" for t in x):
        return math.isfinite(sum(float(t if t.dim() == 0 else t.sum()) for t in x))
    return bool(torch.isfinite(torch.stack([t.sum().double() for t in x]).sum()))


def ravel(x: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one vector (differentiable; a copy)."""
    return torch.cat([t.reshape(-1) for t in x])


def unravel(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a vector made by :func:`ravel` back into tensors shaped like ``like``."""
    sizes = [t.numel() for t in like]
    return [piece.view_as(t) for piece, t in zip(torch.split(flat, sizes), like)]


def unravel_batched(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Rows of a (k × P) matrix as k stacked trees: leaves of shape (k, *leaf.shape), each in its leaf's dtype."""
    sizes = [t.numel() for t in like]
    pieces = torch.split(flat, sizes, dim=1)
    return [piece.reshape(flat.shape[0], *t.shape).to(t.dtype) for piece, t in zip(pieces, like)]


def ravel_batched(stacked: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`unravel_batched`: k stacked trees as the rows of a (k × P) matrix of ``dtype``."""
    return torch.cat([t.reshape(t.shape[0], -1).to(dtype) for t in stacked], dim=1)


def widest_dtype(x: Sequence[Tensor]) -> torch.dtype:
    """The floating dtype all of ``x`` can be represented in (float64 for float32 + float64 leaves)."""
    dtype = x[0].dtype
    for t in x[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class Flat:
    """Leaves of one dtype and device as views into one contiguous vector, and back.

    Elementwise work on many leaves — an optimiser update, a finite check — costs a kernel launch (and,
    in torchopt's Python updates, an interpreter round trip) per leaf and per operation; on the
    concatenation it costs one. The views are free, so weights can live in the vector and be handed to
    the losses as leaves.
    """

    def __init__(self, like: Sequence[Tensor]) -> None:
        self.shapes = [t.shape for t in like]
        self.sizes = [t.numel() for t in like]

    @staticmethod
    def fits(leaves: Sequence[Tensor]) -> bool:
        """Several leaves of one dtype (one leaf gains nothing from a flat layout)."""
        return len(leaves) > 1 and len({(t.dtype, t.device) for t in leaves}) == 1

    def join(self, leaves: Sequence[Tensor]) -> Tensor:
        """The leaves concatenated into one new vector (differentiable)."""
        return ravel(leaves)

    def split(self, flat: Tensor) -> Leaves:
        """Views of ``flat`` shaped like the leaves (differentiable; no copy)."""
        return tuple(piece.view(shape) for piece, shape in zip(torch.split(flat, self.sizes), self.shapes))


# ------------------------------------------------------------------------------------ batches
# A batch is whatever the user's losses accept: tensors in tuples, dicts and named tuples, but also
# dataclasses, ``Mapping``/``UserDict`` objects (transformers' ``BatchEncoding``) and plain objects with
# tensor attributes, which optree treats as leaves. The two walks below reach tensors in all of them.

_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


def _children(obj: Any) -> Iterator[Any]:
    """The objects directly inside a batch container (nothing for tensors and atoms)."""
    if isinstance(obj, (Tensor, *_ATOMS)) or isinstance(obj, type):
        return
    if isinstance(obj, Mapping):
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    elif dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            yield getattr(obj, field.name)
    if hasattr(obj, "__dict__") and not isinstance(obj, (list, tuple, dict)):
        yield from vars(obj).values()


def batch_tensors(batch: Any) -> list[Tensor]:
    """Every tensor inside ``batch``, in a deterministic order, each once (cycles are followed once)."""
    found: list[Tensor] = []
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            found.append(obj)
            return
        for child in _children(obj):
            walk(child)

    walk(batch)
    return found


def copy_batch(batch: Any) -> Any:
    """A copy of ``batch`` whose tensors are private clones (detached) and whose containers are new, so
    that the caller may refill its buffers in place; other leaves (strings, numbers, tokenisers) are
    shared. Containers are rebuilt by type: pytrees through optree, ``Mapping``s (``UserDict`` and
    ``BatchEncoding`` included) and objects with attributes (dataclasses included) through a shallow
    ``copy.copy`` whose entries are then replaced."""
    memo: dict[int, Any] = {}

    def clone(obj: Any) -> Any:
        if id(obj) in memo:
            return memo[id(obj)]
        out = _clone(obj, clone)
        memo[id(obj)] = out
        return out

    return clone(batch)


def _clone(obj: Any, clone: Callable[[Any], Any]) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, _ATOMS) or isinstance(obj, type) or not batch_tensors(obj):
        return obj  # nothing inside to protect
    if type(obj) in (list, tuple, set, frozenset):
        return type(obj)(clone(x) for x in obj)
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):  # a named tuple
        return type(obj)(*(clone(x) for x in obj))
    if type(obj) is dict:
        return {key: clone(value) for key, value in obj.items()}
    new = copy.copy(obj)  # a new container of the same type: UserDict (with a new .data), dataclass, object
    if isinstance(obj, MutableMapping):
        for key, value in obj.items():
            new[key] = clone(value)
    if hasattr(new, "__dict__"):
        for name, value in vars(obj).items():
            if not (isinstance(obj, UserDict) and name == "data"):  # already rebuilt through new[key]
                object.__setattr__(new, name, clone(value))
    return new
