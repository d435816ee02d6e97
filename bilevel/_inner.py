"""The inner update of a ``BilevelOptimizer``: one training gradient, the optimiser's update and its guard.

The update runs per leaf, on one flat vector where torchopt's rule is the same on the concatenation
(``Transformation.flat``), or in place into private double buffers where a probe finds that bitwise
the same (``_inplace``). The non-finite guard is a host branch (a cheap sum screen, then the exact
check) or, on accelerators outside strict mode, a device-side select that needs no host sync.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

from bilevel import _random, _tree
from bilevel._checkpoint import RunState
from bilevel._family import Family
from bilevel._inplace import InPlaceUpdate
from bilevel._nonfinite import NonFiniteError
from bilevel._problem import Problem
from bilevel._transform import Transformation, float_leaves
from bilevel._tree import Leaves


class InnerUpdate:
    """w ← w + inner(∇_w L_T(w, λ)) on a ``RunState``, returning the new state (never mutating the old)."""

    def __init__(self, problem: Problem, inner: Transformation, w: Leaves, *, strict: bool, unrolled: bool) -> None:
        self.problem, self.inner, self.strict = problem, inner, strict
        # Accelerators select on the device instead of branching on a host bool (no sync per step); strict
        # mode must decide before changing anything, and Unroll records only applied steps: both branch.
        self.device_select = w[0].device.type != "cpu" and not strict and not unrolled
        self.inplace: InPlaceUpdate | None = None
        if inner.flat is not None and not self.device_select and not unrolled:
            self.inplace = InPlaceUpdate.build(inner, _tree.ravel(w))

    def flattened(self, run: RunState) -> RunState:
        """``run`` with its weights living in one vector when the update is flat (in private buffers when
        it is in place: copies, and a spare set)."""
        flat = self.inner.flat
        if flat is None:
            return run
        vector, state = flat.join(run.w), run.inner_state
        if self.inplace is not None:
            vector, state = self.inplace.adopt(vector, state)
            return run.replace(w=self.inplace.views(vector), w_flat=vector, inner_state=state)
        return run.replace(w=flat.split(vector), w_flat=vector, inner_state=state)

    def spare(self) -> Any:
        """Which in-place buffers are free to write (a call that fails hands them back: ``restore``)."""
        return None if self.inplace is None else self.inplace.spare

    def restore(self, spare: Any) -> None:
        if self.inplace is not None:
            self.inplace.spare = spare

    def __call__(self, run: RunState, batch: Any, family: Family) -> tuple[RunState, Tensor, Tensor]:
        """(the run after the step, the training loss before it, whether it was applied: a 0-dim bool)."""
        problem, flat = self.problem, self.inner.flat
        seed = _random.derive(run.seed, _random.INNER, run.steps)  # inner step k always draws the same numbers
        (grads,), loss, s = problem.value_and_grad(
            problem.train_loss, batch, run.w, run.h, (0,), run.s, seed, chain_state=True,
            concatenated=flat is not None and run.w_flat is not None,
        )  # fmt: skip
        vector: Tensor | None = None
        if flat is not None and run.w_flat is not None:
            if self.inplace is not None:
                vector, state = self.inplace.update(grads[0], run.inner_state, run.w_flat, started=run.inner_started)
                w: Leaves = self.inplace.views(vector)
            else:
                vector, state = self.inner.apply_flat(grads[0], run.inner_state, run.w_flat, started=run.inner_started)
                w = flat.split(vector)
        else:
            hparams = problem.hparams(run.h) if self.inner.factory is not None else None
            w, state = self.inner.apply(grads, run.inner_state, run.w, started=run.inner_started, hparams=hparams)
        if self.inplace is not None and vector is not None:
            written = [*self.inplace.written(vector, state), *float_leaves(s)]
        else:
            written = [*(w if vector is None else [vector]), *float_leaves(state), *float_leaves(s)]
        if self.device_select:
            new, ok = self._select_on_device(run, loss, written, w, vector, state, s)
            return new, loss, ok
        written.append(loss)
        applied = _tree.sum_is_finite(written) or bool(_tree.all_finite(written))
        if not applied and self.strict:  # raise before touching any state: the step did not happen
            raise NonFiniteError(
                f"inner step {run.steps + 1}: non-finite loss, weights, model state or optimiser state; "
                f"nothing was changed (strict mode)."
            )
        if not applied:
            return run.replace(steps=run.steps + 1, skipped_inner=run.skipped_inner + 1), loss, torch.tensor(False)
        new = run.replace(
            w=w, w_flat=vector, s=s, inner_state=state, inner_started=True, steps=run.steps + 1,
            family=family.recorded(run.family, run, batch),
        )  # fmt: skip
        if self.inplace is not None and run.w_flat is not None:
            self.inplace.commit(run.w_flat, run.inner_state)
        return new, loss, torch.tensor(True)

    def _select_on_device(
        self, run: RunState, loss: Tensor, written: list[Tensor], w: Leaves, vector: Tensor | None, state: Any,
        s: Leaves,
    ) -> tuple[RunState, Tensor]:  # fmt: skip
        """The guard on an accelerator: keep or refuse on the device, without a host sync."""
        flat = self.inner.flat
        ok = torch.isfinite(loss) & _tree.all_finite(written)
        if vector is not None and run.w_flat is not None and flat is not None:
            vector = torch.where(ok, vector, run.w_flat)
            w = flat.split(vector)
        else:
            w = _select(ok, w, run.w)
        new = run.replace(
            w=w,
            w_flat=vector,
            s=_select(ok, s, run.s),
            inner_state=optree.tree_map(
                lambda new, old: torch.where(ok, new, old) if isinstance(new, Tensor) else new, state, run.inner_state
            ),
            inner_started=run.inner_started or bool(ok),  # torchopt's momentum must know: one sync, until applied
            steps=run.steps + 1,
            skipped_inner=run.skipped_inner + (~ok).long(),
        )
        return new, ok


def _select(ok: Tensor, new: Leaves, old: Leaves) -> Leaves:
    return tuple(torch.where(ok, a, b) for a, b in zip(new, old))
