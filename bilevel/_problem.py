"""Problem: the two losses, the tree structures, and how the losses are evaluated.

Every gradient, product and dense Hessian of the core is taken through a ``Problem``, so the rules of
evaluation live in one place: output checks (a scalar with an autograd graph), autocast, averaging
over micro-batches and over data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from bilevel import _random, _tree
from bilevel._distributed import DataParallel, coefficients, parts
from bilevel._hvp import HVP, FiniteDifferenceHVP, MeanOperator, ReducedOperator, _Operator
from bilevel._tree import Leaves

Loss = Callable[..., Any]  # (params, hparams, batch[, state]) -> scalar or (scalar, new_state)

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _math_attention() -> contextlib.AbstractContextManager[None]:
        return sdpa_kernel([SDPBackend.MATH])
except ImportError:  # older torch: its fused attention kernels are chosen the same way, but cannot be ruled out here
    _math_attention = contextlib.nullcontext


@contextlib.contextmanager
def second_order() -> Iterator[None]:
    """Evaluate a loss that will be differentiated twice (HVPs, Exact's columns, Unroll's replay).

    ``F.scaled_dot_product_attention`` (inside ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``)
    dispatches to fused flash / memory-efficient kernels whose backward has no derivative of its own in
    torch 2.13 ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented") and no forward-mode AD. Its math kernel computes the same function with ordinary ops,
    which have both; it is selected only here, so inner steps keep the fused kernels.
    """
    with _math_attention():
        yield


def _checked(loss: Any, name: str, stateful: bool) -> Callable[..., Any]:
    """``loss`` with its output checked: a scalar tensor connected to the autograd graph (and, for a
    stateful problem, a pair ``(scalar, new_state)``).

    A loss computed under ``torch.no_grad``, through ``.detach()`` or from ``.item()`` has no graph:
    its derivatives would silently be zero (a zero hypergradient, or inner steps that do nothing).
    Every evaluation in the library needs a derivative, so such an output is an error.
    """
    if not callable(loss):
        signature = "(params, hparams, batch, state) -> (scalar, new_state)" if stateful else ""
        signature = signature or "(params, hparams, batch) -> scalar Tensor"
        raise TypeError(f"`{name}` must be a callable {signature}, got {type(loss).__name__}.")

    def checked(*args: Any) -> Any:
        out = loss(*args)
        if stateful:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError(
                    f"`{name}` must return (scalar loss, new_state) when `state=` is given, got "
                    f"{type(out).__name__}; return the state unchanged if the loss does not update it."
                )
            value, new_state = out
        else:
            value, new_state = out, None
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must return a scalar torch.Tensor, got {type(value).__name__}.")
        if value.ndim != 0:
            raise ValueError(
                f"`{name}` must return a scalar (0-dim) Tensor, got shape {tuple(value.shape)}; "
                f"reduce it with .mean() or .sum()."
            )
        if torch.is_grad_enabled() and not value.requires_grad:
            raise ValueError(
                f"`{name}` returned a tensor with no autograd graph (requires_grad=False): it does not depend on "
                f"params or hparams as far as autograd can see, so every derivative of it would be silently zero. "
                f"Compute it from the params/hparams it receives, without .detach(), .item() or torch.no_grad()."
            )
        return value, new_state

    return checked


@dataclasses.dataclass(frozen=True)
class Problem:
    """A bilevel problem on flat leaves: the losses, the tree structures, and how losses are evaluated
    (model state, replayed random numbers, autocast dtype, data-parallel group). Every gradient and
    product of the core is taken through :meth:`evaluate`."""

    train_loss: Callable[..., Any]
    val_loss: Callable[..., Any]
    params_spec: optree.PyTreeSpec
    hparams_spec: optree.PyTreeSpec
    state_spec: optree.PyTreeSpec | None  # None: the losses take no model state
    device: torch.device
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
        state: Any = None,
        autocast: torch.dtype | None = None,
        distributed: DataParallel | None = None,
    ) -> tuple[Problem, Leaves, Leaves, Leaves]:
        """Validate user inputs; return the problem and detached param, hparam and state leaves."""
        w, params_spec = _tree.flatten(params, "params", floating=True)
        h, hparams_spec = _tree.flatten(hparams, "hparams", floating=True)
        device = _tree.check_same_device(params=w, hparams=h)
        if device.type == "meta":
            raise ValueError(
                "`params` and `hparams` are meta tensors, which have shapes but no data: nothing can be computed "
                "from them. Materialise them first (e.g. module.to_empty(device='cpu') and initialise the weights)."
            )
        s: Leaves = ()
        state_spec = None
        if state is not None:
            s, state_spec = _tree.flatten(state, "state", floating=False, allow_empty=True)
            _tree.check_same_device(params=w, state=s)
        if autocast is not None and autocast not in _AUTOCAST_DTYPES:
            raise ValueError(
                f"`autocast={autocast!r}`: expected None, torch.bfloat16 (CPU or CUDA) or torch.float16 (CUDA)."
            )
        if distributed is not None:
            if not isinstance(distributed, DataParallel):
                raise TypeError(f"`distributed` must be None or bilevel.DataParallel(...), got {distributed!r}.")
            distributed.validate()
        stateful = state is not None
        checked_train, checked_val = (
            _checked(train_loss, "train_loss", stateful),
            _checked(val_loss, "val_loss", stateful),
        )
        problem = cls(checked_train, checked_val, params_spec, hparams_spec, state_spec, device, autocast, distributed)
        return problem, w, h, tuple(t.clone() for t in s)

    # ------------------------------------------------------------------------- evaluation
    def evaluate(
        self, loss: Callable[..., Any], batch: Any, w: Leaves, h: Leaves, s: Leaves, seed: int | None
    ) -> tuple[Tensor, Leaves]:
        """``loss`` at (w, λ) on one (micro-)batch with model state ``s`` and random numbers from
        ``seed``: its value and the new model state (``s`` itself when the problem has none)."""
        args = [_tree.unflatten(self.params_spec, w), _tree.unflatten(self.hparams_spec, h), batch]
        if self.state_spec is not None:
            args.append(_tree.unflatten(self.state_spec, s))
        versions = [t._version for t in (*w, *h)]
        with _random.replay(seed, self.device):
            if self.autocast is None:
                value, new_state = loss(*args)
            else:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    value, new_state = loss(*args)
                # The solve runs in the params' precision; only the loss evaluation is in low precision.
                value = value.float() if value.dtype in _AUTOCAST_DTYPES else value
        if versions != [t._version for t in (*w, *h)]:
            self._mutated(loss, w, h, versions)
        if self.state_spec is None:
            return value, s
        return value, self._new_state(loss, new_state, s)

    def _mutated(self, loss: Callable[..., Any], w: Leaves, h: Leaves, versions: list[int]) -> None:
        name = "train_loss" if loss is self.train_loss else "val_loss"
        changed = [i for i, t in enumerate((*w, *h)) if t._version != versions[i]]
        what = ", ".join(f"params leaf {i}" if i < len(w) else f"hparams leaf {i - len(w)}" for i in changed)
        raise RuntimeError(
            f"`{name}` changed its inputs in place ({what}): the library differentiates pure functions of "
            f"(params, hparams), and an in-place write corrupts the weights it is given (and every "
            f"derivative taken from them). A common cause is nn.Embedding(max_norm=...), which renormalises "
            f"its weight inside forward; renormalise in the loss instead (w / w.norm(dim=1, keepdim=True)"
            f".clamp_min(1 / max_norm) ...), or drop max_norm."
        )

    def _new_state(self, loss: Callable[..., Any], new_state: Any, s: Leaves) -> Leaves:
        name = "train_loss" if loss is self.train_loss else "val_loss"
        leaves, spec = optree.tree_flatten(new_state)
        same = spec == self.state_spec and all(
            isinstance(a, Tensor) and a.shape == b.shape and a.dtype == b.dtype for a, b in zip(leaves, s)
        )
        if not same:
            raise ValueError(
                f"`{name}` returned a new_state that does not match `state` (structure {spec}, expected "
                f"{self.state_spec}, with the same shapes and dtypes): return the state it was given, updated."
            )
        return tuple(t.detach() for t in leaves)

    def on(
        self, loss: Callable[..., Any], batch: Any, s: Leaves, seed: int | None, *, twice: bool = True
    ) -> Callable[[Leaves, Leaves], Tensor]:
        """``loss`` as a function of (param leaves, hparam leaves) alone: batch, model state and random
        numbers fixed, so that every evaluation — each HVP, each finite difference — is the same function.
        ``twice``: it will be differentiated twice (see :func:`second_order`)."""

        def f(w: Leaves, h: Leaves) -> Tensor:
            with second_order() if twice else contextlib.nullcontext():
                return self.evaluate(loss, batch, w, h, s, seed)[0]

        return f

    def seed_for(self, seed: int | None) -> int | None:
        """Under DataParallel every rank draws its own random numbers (its own dropout masks)."""
        if seed is None or self.parallel is None:
            return seed
        return _random.derive(seed, _random.RANK, self.parallel.rank)

    def check_shards(self, batch: Any, name: str) -> None:
        """Under ``DataParallel``, refuse shards whose shapes differ between ranks (see DataParallel)."""
        if self.parallel is not None:
            self.parallel.check_equal_shards(batch, name)

    def value_and_grad(
        self,
        loss: Callable[..., Any],
        batch: Any,
        w: Leaves,
        h: Leaves,
        argnums: tuple[int, ...],
        s: Leaves = (),
        seed: int | None = None,
        *,
        chain_state: bool = False,
        concatenated: bool = False,
    ) -> tuple[list[list[Tensor]], Tensor, Leaves]:
        """Gradients of ``loss`` w.r.t. the leaves in ``argnums`` (0: params, 1: hparams), its value and
        the new model state, averaged over micro-batches and, when data-parallel, over ranks.

        ``chain_state`` (inner steps): micro-batch i+1 sees the state micro-batch i returned, as in
        PyTorch's gradient accumulation, and under DataParallel the floating-point state is averaged
        over ranks in the same all-reduce as the gradient. Otherwise every micro-batch sees ``s`` and the
        state that comes back is the last micro-batch's.

        With ``concatenated`` (argnums ``(0,)`` only), the gradient comes back as one vector, the params'
        gradients concatenated: ``[[vector]]``.

        Plain autograd (one forward, one backward per micro-batch): ``torch.func.grad_and_value`` gives
        the same numbers with more dispatch overhead per call, which shows on small models.
        """
        self.check_shards(batch, "train_batch" if loss is self.train_loss else "val_batch")
        pieces, seed = parts(batch), self.seed_for(seed)
        coefs, scale = coefficients(batch)
        total: list[Tensor] = []
        value: Tensor | None = None
        state = s
        with torch.enable_grad():  # (only the differentiated leaves record a graph: cheaper inner steps)
            inputs = tuple(
                tuple(t.detach().requires_grad_() if i in argnums else t.detach() for t in leaves)
                for i, leaves in enumerate((w, h))
            )
            wanted = [t for i in argnums for t in inputs[i]]
            for piece, coef in zip(pieces, coefs):
                out, new_state = self.evaluate(loss, piece, inputs[0], inputs[1], state if chain_state else s, seed)
                state = new_state
                found = torch.autograd.grad(out, wanted, allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for g, t in zip(found, wanted)]
                if value is None and coef == 1.0:
                    total, value = grads, out.detach()
                elif value is None:
                    total, value = _tree.scale(grads, coef), coef * out.detach()
                else:  # (autograd's gradient of a tensor used through a sum is expanded: not writable)
                    total = _tree.writable(total)
                    _tree.add_(total, grads, coef)
                    value = value + coef * out.detach()
        assert value is not None  # parts() is never empty
        if scale != 1.0:
            total, value = _tree.scale(total, scale), value * scale
        if self.parallel is not None:
            floating = [i for i, t in enumerate(state) if t.is_floating_point()] if chain_state else []
            reduced = self.parallel.mean([*total, value, *(state[i] for i in floating)])
            total, value = reduced[: len(total)], reduced[len(total)]
            averaged = list(state)
            for i, t in zip(floating, reduced[len(total) + 1 :]):
                averaged[i] = t
            state = tuple(averaged)
        if concatenated and argnums == (0,):
            return [[_tree.ravel(total)]], value, state
        total = _tree.writable(total)
        split, start = [], 0
        for i in argnums:
            split.append(list(total[start : start + len(inputs[i])]))
            start += len(inputs[i])
        return split, value, state

    def operator(
        self, hvp: HVP, batch: Any, w: Leaves, h: Leaves, s: Leaves = (), seed: int | None = None
    ) -> _Operator:
        """The training loss's HVP / mixed-product operator, averaged like :meth:`value_and_grad`."""
        self.check_shards(batch, "train_batch")
        pieces, seed = parts(batch), self.seed_for(seed)
        twice = not isinstance(hvp, FiniteDifferenceHVP)  # finite differences need first derivatives only
        dtype = self.autocast or w[0].dtype
        retain = len(pieces) == 1
        losses = [self.on(self.train_loss, piece, s, seed, twice=twice) for piece in pieces]
        ops = [hvp.build(loss, w, h, retain=retain, eval_dtype=dtype) for loss in losses]
        op = ops[0] if len(ops) == 1 else MeanOperator(ops, coefficients(batch))
        return op if self.parallel is None else ReducedOperator(op, self.parallel)

    def params(self, w: Sequence[Tensor]) -> Any:
        return _tree.unflatten(self.params_spec, w)

    def hparams(self, h: Sequence[Tensor]) -> Any:
        return _tree.unflatten(self.hparams_spec, h)

    def state(self, s: Sequence[Tensor]) -> Any:
        return None if self.state_spec is None else _tree.unflatten(self.state_spec, s)
