"""The inner update written in place, into private buffers: no fresh weight-sized tensor per step.

torchopt's updates run out of place by default: every operation of an Adam step allocates a new
weight-sized tensor. PyTorch's CPU allocator does not cache, so on a large model each of those is
a fresh mapping of memory that the kernel then page-faults in: on a 1 068 810-weight MLP one Adam
update took 13.7 ms out of place against 2.2 ms for ``torch.optim.Adam(foreach=True)`` (and 3.1 ms
out of place once glibc was told to keep freed memory, which confirms where the time goes).

Here the weights (one flat vector) and the optimiser state live in two private buffer sets, the
current one and a spare; each set is one vector holding the weights and every state tensor of
their dtype, so that the non-finite guard screens a single tensor. An update writes its results
into the spare set: for torchopt's sgd, adam and adamw the fused form (``_fused``) runs torchopt's
own operations with their outputs there, for any other rule the current values are copied into the
spare set and torchopt runs with ``inplace=True`` on the copy. Only when the guard accepts the
result does the spare set become current, and the old one the next spare. So a refused or
interrupted update leaves the current buffers untouched, as the optimiser's guarantees require, and
the numbers are torchopt's own: at construction three updates of random gradients are run both
ways, and an in-place form is used only if it matches the out-of-place update bitwise.

Buffers are written again two steps after they stop being current, so nothing handed out may alias
them: ``BilevelOptimizer.params`` and ``state_dict()`` return copies, and a loaded checkpoint is
copied in, never adopted.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

from bilevel._fused import FusedUpdate
from bilevel._transform import Transformation, float_leaves


def _clone(tree: Any) -> Any:
    return optree.tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, tree)


class InPlaceUpdate:
    """Double-buffered in-place updates of a flat-layout transformation (see the module docstring)."""

    def __init__(self, transformation: Transformation, fused: FusedUpdate | None = None) -> None:
        self.transformation, self.fused = transformation, fused
        self.spare: tuple[Tensor, Any] | None = None
        self._views: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = {}  # the two buffers' leaf views
        self._sets: dict[int, tuple[Tensor, Tensor, list[Tensor], bool]] = {}  # weights -> their buffer set

    @classmethod
    def build(cls, transformation: Transformation, like: Tensor) -> InPlaceUpdate | None:
        """The fastest in-place form that gives torchopt's numbers bitwise (fused, else copy-then-update),
        or None where neither does (the optimiser keeps the out-of-place update)."""
        fused = FusedUpdate.recognise(transformation.transformation)
        for candidate in ([cls(transformation, fused)] if fused is not None else []) + [cls(transformation)]:
            if candidate.matches(like):
                return candidate
        return None

    def views(self, w: Tensor) -> tuple[Tensor, ...]:
        """The leaf views of buffer ``w``, made once per buffer (two of them alternate)."""
        cached = self._views.get(id(w))
        if cached is None or cached[0] is not w:
            assert self.transformation.flat is not None
            cached = self._views[id(w)] = (w, self.transformation.flat.split(w))
        return cached[1]

    def matches(self, like: Tensor) -> bool:
        """Do three updates of random gradients, run exactly as :meth:`update` runs them, give bitwise
        torchopt's out-of-place numbers (weights and state)?"""
        transformation = self.transformation
        gen = torch.Generator(device=like.device).manual_seed(1)
        grads = [torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device) for _ in range(3)]
        try:
            w_out, state_out = like.clone(), transformation.init((like,))
            w_in, state_in = self.adopt(like, state_out)
            for k, g in enumerate(grads):
                (u,), state_out = transformation._update((g,), state_out, (w_out,), k > 0)
                w_out = w_out + u
                w_new, state_new = self.update(g, state_in, w_in, started=k > 0)
                self.commit(w_in, state_in)
                w_in, state_in = w_new, state_new
            same = [torch.equal(a, b) for a, b in zip(optree.tree_leaves(state_out), optree.tree_leaves(state_in))
                    if isinstance(a, Tensor)]
            return bool(torch.equal(w_out, w_in)) and all(same)
        except Exception:  # a transformation without an in-place mode: keep the out-of-place path
            return False
        finally:
            self.spare, self._views, self._sets = None, {}, {}

    def adopt(self, w: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Private copies of (weights, state) to become current, and a spare set shaped like them."""
        self.spare, self._views, self._sets = None, {}, {}
        current = self._pack(w.detach(), state, fill=True)
        spare = self._pack(w.detach(), state, fill=False)
        self.spare = (spare[0], spare[1])
        return current

    def _pack(self, w: Tensor, state: Any, *, fill: bool) -> tuple[Tensor, Any]:
        """One buffer set: a single vector holding the weights and every state tensor of their dtype and
        device (so that the guard screens one tensor), the other state leaves as separate tensors. With
        ``fill`` it holds copies of (w, state), otherwise zeros."""
        leaves, spec = optree.tree_flatten(state)
        take = [isinstance(t, Tensor) and t.dtype == w.dtype and t.device == w.device for t in leaves]
        sizes = [w.numel()] + [t.numel() for t, k in zip(leaves, take) if k]
        whole = torch.zeros(sum(sizes), dtype=w.dtype, device=w.device)
        pieces = iter(whole.split(sizes))
        vector = next(pieces)
        out: list[Any] = []
        for t, k in zip(leaves, take):
            if k:
                out.append(next(pieces).view(t.shape))
            elif isinstance(t, Tensor):
                out.append(torch.zeros_like(t, requires_grad=False))
            else:
                out.append(t)
            if fill and isinstance(t, Tensor):
                out[-1].copy_(t.detach())
        if fill:
            vector.copy_(w)
        packed = [t for t, k in zip(out, take) if k]
        complete = len(packed) == len(float_leaves(out))  # every floating-point state tensor is in ``whole``
        self._sets[id(vector)] = (vector, whole, packed, complete)
        return vector, optree.tree_unflatten(spec, out)

    def written(self, w: Tensor, state: Any) -> list[Tensor]:
        """What a guard must screen after :meth:`update` returned (w, state): the set's single buffer
        when the state's floating-point tensors are exactly the ones packed in it, else every tensor.
        The fused update writes its results into those very tensors (by construction, and ``out=``
        returns its argument); torchopt's in-place update is checked leaf by leaf."""
        entry = self._sets.get(id(w))
        if entry is None or entry[0] is not w:
            return [w, *float_leaves(state)]
        _, whole, packed, complete = entry
        if self.fused is not None and complete:
            return [whole]
        floats = float_leaves(state)
        if len(floats) == len(packed) and all(a is b for a, b in zip(floats, packed)):
            return [whole]
        return [w, *floats]

    def update(self, grad: Tensor, state: Any, w: Tensor, *, started: bool) -> tuple[Tensor, Any]:
        """w + update(grad) and the new state, written into the spare set (the inputs stay untouched)."""
        assert self.spare is not None, "adopt() first"
        spare_w, spare_state = self.spare
        if self.fused is not None:
            return self.fused(grad, state, spare_state, w, spare_w, started=started)
        spare_w.copy_(w)
        copied = optree.tree_map(
            lambda into, now: into.copy_(now) if isinstance(into, Tensor) else now, spare_state, state
        )
        (step,), new_state = self.transformation._update((grad,), copied, (spare_w,), started, inplace=True)
        return spare_w.add_(step), new_state

    def commit(self, old_w: Tensor, old_state: Any) -> None:
        """The update was accepted: the buffers it replaced become the spare set."""
        self.spare = (old_w, old_state)
