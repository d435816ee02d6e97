"""Problem: the two losses, the tree structures, and how the losses are evaluated.

Every gradient, product and dense Hessian of the core is taken through a ``Problem``, so the rules of
evaluation live in one place: output checks (a scalar with an autograd graph), autocast, averaging
over micro-batches and over data-parallel ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from bilevel import _tree
from bilevel._distributed import DataParallel, parts
from bilevel._hvp import HVP, MeanOperator, ReducedOperator, _Operator
from bilevel._tree import Leaves

Loss = Callable[[Any, Any, Any], Tensor]

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


def _checked(loss: Any, name: str) -> Loss:
    """``loss`` with its output checked: a scalar tensor, connected to the autograd graph.

    A loss computed under ``torch.no_grad``, through ``.detach()`` or from ``.item()`` has no graph:
    its derivatives would silently be zero (a zero hypergradient, or inner steps that do nothing).
    Every evaluation in the library needs a derivative, so such an output is an error.
    """
    if not callable(loss):
        raise TypeError(
            f"`{name}` must be a callable (params, hparams, batch) -> scalar Tensor, got {type(loss).__name__}."
        )

    def checked(params: Any, hparams: Any, batch: Any) -> Tensor:
        out = loss(params, hparams, batch)
        if not isinstance(out, Tensor):
            raise TypeError(f"`{name}` must return a scalar torch.Tensor, got {type(out).__name__}.")
        if out.ndim != 0:
            raise ValueError(
                f"`{name}` must return a scalar (0-dim) Tensor, got shape {tuple(out.shape)}; "
                f"reduce it with .mean() or .sum()."
            )
        if torch.is_grad_enabled() and not out.requires_grad:
            raise ValueError(
                f"`{name}` returned a tensor with no autograd graph (requires_grad=False): it does not depend on "
                f"params or hparams as far as autograd can see, so every derivative of it would be silently zero. "
                f"Compute it from the params/hparams it receives, without .detach(), .item() or torch.no_grad()."
            )
        return out

    return checked


@dataclasses.dataclass(frozen=True)
class Problem:
    """A bilevel problem on flat leaves: the losses, the tree structures, and how losses are evaluated
    (autocast dtype, data-parallel group). Every gradient and product of the core is taken through it."""

    train_loss: Loss
    val_loss: Loss
    params_spec: optree.PyTreeSpec
    hparams_spec: optree.PyTreeSpec
    device_type: str = "cpu"
    autocast: torch.dtype | None = None
    parallel: DataParallel | None = None

    @classmethod
    def create(
        cls,
        train_loss: Any,
        val_loss: Any,
        params: Any,
        hparams: Any,
        *,
        autocast: torch.dtype | None = None,
        distributed: DataParallel | None = None,
    ) -> tuple[Problem, Leaves, Leaves]:
        """Validate user inputs; return the problem and detached param and hparam leaves."""
        w, params_spec = _tree.flatten(params, "params", floating=True)
        h, hparams_spec = _tree.flatten(hparams, "hparams", floating=True)
        device = _tree.check_same_device(params=w, hparams=h)
        if device.type == "meta":
            raise ValueError(
                "`params` and `hparams` are meta tensors, which have shapes but no data: nothing can be computed "
                "from them. Materialise them first (e.g. module.to_empty(device='cpu') and initialise the weights)."
            )
        if autocast is not None and autocast not in _AUTOCAST_DTYPES:
            raise ValueError(
                f"`autocast={autocast!r}`: expected None, torch.bfloat16 (CPU or CUDA) or torch.float16 (CUDA)."
            )
        if distributed is not None:
            if not isinstance(distributed, DataParallel):
                raise TypeError(f"`distributed` must be None or bilevel.DataParallel(...), got {distributed!r}.")
            distributed.validate()
        checked_train, checked_val = _checked(train_loss, "train_loss"), _checked(val_loss, "val_loss")
        problem = cls(checked_train, checked_val, params_spec, hparams_spec, device.type, autocast, distributed)
        return problem, w, h

    def on(self, loss: Loss, batch: Any) -> Callable[[Leaves, Leaves], Tensor]:
        """``loss`` as a function of (param leaves, hparam leaves) on one fixed (micro-)batch."""
        params_spec, hparams_spec, dtype = self.params_spec, self.hparams_spec, self.autocast

        def f(w: Leaves, h: Leaves) -> Tensor:
            if dtype is None:
                return loss(_tree.unflatten(params_spec, w), _tree.unflatten(hparams_spec, h), batch)
            with torch.autocast(self.device_type, dtype=dtype):
                out = loss(_tree.unflatten(params_spec, w), _tree.unflatten(hparams_spec, h), batch)
            # The solve runs in the params' precision; only the loss evaluation is in low precision.
            return out.float() if out.dtype in _AUTOCAST_DTYPES else out

        return f

    def check_shards(self, batch: Any, name: str) -> None:
        """Under ``DataParallel``, refuse shards whose shapes differ between ranks (see DataParallel)."""
        if self.parallel is not None:
            self.parallel.check_equal_shards(batch, name)

    def value_and_grad(
        self, loss: Loss, batch: Any, w: Leaves, h: Leaves, argnums: tuple[int, ...]
    ) -> tuple[list[list[Tensor]], Tensor]:
        """Gradients of ``loss`` w.r.t. the leaves in ``argnums`` (0: params, 1: hparams) and its value,
        averaged over micro-batches and, when data-parallel, over ranks.

        Plain autograd (one forward, one backward per micro-batch): ``torch.func.grad_and_value`` gives
        the same numbers with more dispatch overhead per call, which shows on small models.
        """
        self.check_shards(batch, "train_batch" if loss is self.train_loss else "val_batch")
        pieces = parts(batch)
        total: list[Tensor] = []
        value: Tensor | None = None
        with torch.enable_grad():
            inputs = tuple(tuple(t.detach().requires_grad_() for t in leaves) for leaves in (w, h))
            wanted = [t for i in argnums for t in inputs[i]]
            for piece in pieces:
                out = self.on(loss, piece)(*inputs)
                found = torch.autograd.grad(out, wanted, allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for g, t in zip(found, wanted)]
                if value is None:
                    total, value = grads, out.detach()
                else:
                    _tree.add_(total, grads)
                    value = value + out.detach()
        assert value is not None  # parts() is never empty
        if len(pieces) > 1:
            total, value = _tree.scale(total, 1.0 / len(pieces)), value / len(pieces)
        if self.parallel is not None:
            *total, value = self.parallel.mean([*total, value])
        split, start = [], 0
        for i in argnums:
            split.append(list(total[start : start + len(inputs[i])]))
            start += len(inputs[i])
        return split, value

    def operator(self, hvp: HVP, batch: Any, w: Leaves, h: Leaves) -> _Operator:
        """The training loss's HVP / mixed-product operator, averaged like :meth:`value_and_grad`."""
        self.check_shards(batch, "train_batch")
        pieces = parts(batch)
        ops = [hvp.build(self.on(self.train_loss, piece), w, h, retain=len(pieces) == 1) for piece in pieces]
        op = ops[0] if len(ops) == 1 else MeanOperator(ops)
        return op if self.parallel is None else ReducedOperator(op, self.parallel)

    def dense_hessian(self, batch: Any, w: Leaves, h: Leaves) -> Tensor:
        """∂²L_T/∂w∂wᵀ as a dense matrix over the concatenated params, averaged like the rest."""
        flat_w = _tree.ravel(w)
        total: Tensor | None = None
        for piece in parts(batch):
            train_f = self.on(self.train_loss, piece)

            def on_flat(flat: Tensor, train_f: Callable[[Leaves, Leaves], Tensor] = train_f) -> Tensor:
                return train_f(tuple(_tree.unravel(flat, w)), h)

            hessian = torch.func.hessian(on_flat)(flat_w)
            total = hessian if total is None else total + hessian
        assert total is not None
        total = total / len(parts(batch))
        return total if self.parallel is None else self.parallel.mean([total])[0]

    def params(self, w: Sequence[Tensor]) -> Any:
        return _tree.unflatten(self.params_spec, w)

    def hparams(self, h: Sequence[Tensor]) -> Any:
        return _tree.unflatten(self.hparams_spec, h)
