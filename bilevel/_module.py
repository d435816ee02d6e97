"""FunctionalModule: an ``nn.Module`` as a pure function of (params, state).

The library differentiates functions of ``(params, hparams)``; models people have are ``nn.Module``
objects with frozen layers, buffers that change in the forward pass (BatchNorm's running statistics)
and train/eval modes. ``FunctionalModule`` bridges the two through ``torch.func.functional_call``:
trainable weights and buffers become explicit inputs, the buffers a train-mode forward updates
become an explicit output, and the module itself is never touched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class FunctionalModule:
    r"""A pure-function view of an ``nn.Module``: ``fm(params, state, *inputs) -> (output, new_state)``.

    - ``params``: a dict name → detached copy of every parameter with ``requires_grad=True``, taken at
      construction. Frozen parameters (``requires_grad=False``) are not in it: every call reads them
      from the module itself (so they follow ``module.load_state_dict()``), as constants that are never
      optimised.
    - ``state``: a dict name → copy of every buffer (BatchNorm's ``running_mean``, ``running_var``,
      ``num_batches_tracked``, ...), taken at construction. Buffers the forward updates in place or by
      reassignment (``self.ema = 0.9 * self.ema + 0.1 * x``) both come back in ``new_state``.

    ``fm(params, state, *inputs, train=True, **kwargs)`` runs the module's forward in train mode
    (BatchNorm normalises with batch statistics and the updated running statistics come back in
    ``new_state``; dropout is active) or, with ``train=False``, in eval mode (running statistics
    used, dropout off; ``new_state`` is ``state`` itself). It never mutates the module, ``params`` or
    ``state`` — a train-mode forward updates fresh copies of the buffers — so it can be called inside
    ``torch.func`` transforms and differentiated twice by autograd, as Hessian-vector products need.

    Random numbers (dropout masks) come from torch's default generator as in the module; inside
    [`hypergradient`][bilevel.hypergradient] and [`BilevelOptimizer`][bilevel.BilevelOptimizer] the
    generator is seeded so that every evaluation belonging to one derivative sees the same masks.

    Args:
        module: the model. Its trainable parameters and buffers are copied at construction; later changes
            to them in the module do not reach ``params``/``state`` (use
            [`write_back`][bilevel.FunctionalModule.write_back] for the other direction). Convert the module
            (``.double()``, ``.to(device)``) *before* wrapping it: a call after a conversion raises
            ``ValueError``. Layers whose forward writes into their own weights are refused
            (``nn.Embedding(max_norm=...)``), and so is a forward that changes a parameter in place.

    Example:
        >>> import torch, bilevel
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
        >>> net[0].requires_grad_(False)  # a frozen first layer
        Linear(in_features=3, out_features=4, bias=True)
        >>> fm = bilevel.FunctionalModule(net)
        >>> sorted(fm.params), sorted(fm.state)
        (['1.bias', '1.weight', '2.bias', '2.weight'], ['1.num_batches_tracked', '1.running_mean', '1.running_var'])
        >>> out, new_state = fm(fm.params, fm.state, torch.randn(8, 3))
        >>> out.shape, int(new_state["1.num_batches_tracked"]), int(fm.state["1.num_batches_tracked"])
        (torch.Size([8, 1]), 1, 0)
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"`FunctionalModule(module)` needs a torch.nn.Module, got {type(module).__name__}.")
        _refuse_in_place_forward(module)
        self.module = module
        named = dict(module.named_parameters())
        self.params: dict[str, Tensor] = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
        # Frozen parameters are read from the module at every call (where they live: (submodule, attribute)),
        # so that they follow net.load_state_dict() and a replaced nn.Parameter.
        self._frozen = {n: _owner(module, n) for n, p in named.items() if not p.requires_grad}
        self.state: dict[str, Tensor] = {n: b.detach().clone() for n, b in module.named_buffers()}
        self._layout = {n: (t.dtype, t.device) for n, t in (*named.items(), *module.named_buffers())}
        self._modules = list(module.modules())
        # Where every tensor lives, tied ones under each of their names: (the owner's dict, key, our name).
        canonical = {id(p): n for n, p in named.items()}
        self._param_slots = [
            (owner._parameters, attr, canonical[id(p)])
            for n, p in module.named_parameters(remove_duplicate=False)
            for owner, attr in [_owner(module, n)]
        ]
        buffers = dict(module.named_buffers())
        first = {id(b): n for n, b in buffers.items()}
        self._buffer_slots = [
            (owner._buffers, attr, first[id(b)])
            for n, b in module.named_buffers(remove_duplicate=False)
            for owner, attr in [_owner(module, n)]
        ]

    def __call__(
        self, params: dict[str, Tensor], state: dict[str, Tensor], *inputs: Any, train: bool = True, **kwargs: Any
    ) -> tuple[Any, dict[str, Tensor]]:
        """The module's forward on ``inputs`` with these weights and buffers; see the class docstring."""
        if not isinstance(train, bool):
            raise TypeError(f"`train={train!r}`: must be True (train mode) or False (eval mode).")
        self._check(params, self.params, "params")
        self._check(state, self.state, "state")
        frozen: dict[str, Tensor] = {n: owner._parameters[attr] for n, (owner, attr) in self._frozen.items()}  # type: ignore[misc]
        self._check_layout(frozen)
        # Train mode updates buffers in place: give it fresh copies, which become the new state.
        # (Copies made here, inside any torch.func transform, are the transform's own tensors.)
        buffers = {n: b.clone() for n, b in state.items()} if train else state
        weights = (*params.values(), *frozen.values())
        versions = [t._version for t in weights], None if train else [b._version for b in state.values()]
        tensors = {**frozen, **params, **buffers}
        out = self._call_with(tensors, train, inputs, kwargs)
        if versions[0] != [t._version for t in weights]:
            raise RuntimeError(
                "FunctionalModule: the module's forward changed a parameter in place, which would change the "
                "caller's tensors and every derivative taken from them. Parameters must only be read in forward."
            )
        if train:
            return out, {n: tensors[n] for n in state}
        if versions[1] != [b._version for b in state.values()] or any(tensors[n] is not state[n] for n in state):
            raise RuntimeError(
                "FunctionalModule: the module changed a buffer in eval mode (train=False), in place or by "
                "reassignment, which would mutate `state` or be lost; call it with train=True so that buffer "
                "updates go to a fresh new_state."
            )
        return out, state

    def _call_with(self, tensors: dict[str, Tensor], train: bool, inputs: Any, kwargs: Any) -> Any:
        """The module's forward with its parameters and buffers replaced by ``tensors`` (the dict entries
        ``torch.func.functional_call`` would swap, without its per-call lookups and checks: on a 3-layer
        MLP that overhead cost a third of a forward and backward). Buffers the forward *reassigns*
        (``self.ema = 0.9 * self.ema + ...``) are read back into ``tensors`` before the originals return.
        """
        slots: list[tuple[dict[str, Any], str, str]] = [*self._param_slots, *self._buffer_slots]
        originals = [owner[attr] for owner, attr, _ in slots]
        modes = [m.training for m in self._modules]
        try:
            for owner, attr, name in slots:
                owner[attr] = tensors[name]
            for m in self._modules:
                if m.training is not train:
                    object.__setattr__(m, "training", train)  # (nn.Module.__setattr__ costs µs per module)
            out = self.module(*inputs, **kwargs)
            for owner, attr, name in self._buffer_slots:
                tensors[name] = owner[attr]  # type: ignore[assignment]
        finally:
            for (owner, attr, _), original in zip(slots, originals):
                owner[attr] = original
            for m, mode in zip(self._modules, modes):
                if m.training is not mode:
                    object.__setattr__(m, "training", mode)
        return out

    def _check_layout(self, frozen: dict[str, Tensor]) -> None:
        for name, t in frozen.items():
            if (t.dtype, t.device) != self._layout[name]:
                dtype, device = self._layout[name]
                raise ValueError(
                    f"FunctionalModule: the module's frozen parameter {name!r} is now {t.dtype} on {t.device}, but "
                    f"it was {dtype} on {device} when FunctionalModule(module) copied fm.params and fm.state. The "
                    f"module was converted (.double(), .to(...)) afterwards: build FunctionalModule(module) again."
                )

    def write_back(self, params: dict[str, Tensor], state: dict[str, Tensor]) -> None:
        """Copy ``params`` and ``state`` into the wrapped module's parameters and buffers, in place.

        Afterwards ``module.eval()(x)`` equals ``fm(params, state, x, train=False)[0]``, so the
        trained model can be used, saved with ``module.state_dict()`` or handed on as a module.
        """
        self._check(params, self.params, "params")
        self._check(state, self.state, "state")
        named, buffers = dict(self.module.named_parameters()), dict(self.module.named_buffers())
        with torch.no_grad():
            for name, value in params.items():
                named[name].copy_(value)
            for name, value in state.items():
                buffers[name].copy_(value)

    @staticmethod
    def _check(given: Any, expected: dict[str, Tensor], name: str) -> None:
        if not isinstance(given, dict) or given.keys() != expected.keys():
            got = sorted(given) if isinstance(given, dict) else type(given).__name__
            raise ValueError(
                f"FunctionalModule: `{name}` must be a dict with the keys of fm.{name} ({sorted(expected)}), got {got}."
            )


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding parameter ``name`` ("block.0.weight") and its attribute name."""
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _refuse_in_place_forward(module: nn.Module) -> None:
    """Refuse layers whose forward writes into their own weights (there would be no pure function)."""
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.max_norm is not None:
            where = f"`{name}`" if name else "the module"
            raise ValueError(
                f"FunctionalModule: {where} is {type(sub).__name__}(max_norm={sub.max_norm}), which renormalises "
                f"its weight in place inside forward: the caller's params would change under every evaluation and "
                f"derivative. Build it with max_norm=None and, if you need the constraint, apply it in the loss "
                f"(e.g. scale the looked-up rows by (max_norm / row_norm).clamp(max=1))."
            )
