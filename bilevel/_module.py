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
from torch.func import functional_call


class FunctionalModule:
    r"""A pure-function view of an ``nn.Module``: ``fm(params, state, *inputs) -> (output, new_state)``.

    - ``params``: a dict name → detached copy of every parameter with ``requires_grad=True``. Frozen
      parameters (``requires_grad=False``) are not in it: they are held inside as constants (the
      module's own tensors, not copies) and never optimised.
    - ``state``: a dict name → copy of every buffer (BatchNorm's ``running_mean``, ``running_var``,
      ``num_batches_tracked``, ...).

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
        module: the model. Its parameters and buffers are copied at construction; later changes to
            the module do not reach ``params``/``state`` (use [`write_back`][bilevel.FunctionalModule.write_back]
            for the other direction).

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
        self.module = module
        named = dict(module.named_parameters())
        self.params: dict[str, Tensor] = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
        self._frozen: dict[str, Tensor] = {n: p.detach() for n, p in named.items() if not p.requires_grad}
        self.state: dict[str, Tensor] = {n: b.detach().clone() for n, b in module.named_buffers()}
        self._modules = list(module.modules())

    def __call__(
        self, params: dict[str, Tensor], state: dict[str, Tensor], *inputs: Any, train: bool = True, **kwargs: Any
    ) -> tuple[Any, dict[str, Tensor]]:
        """The module's forward on ``inputs`` with these weights and buffers; see the class docstring."""
        if not isinstance(train, bool):
            raise TypeError(f"`train={train!r}`: must be True (train mode) or False (eval mode).")
        self._check(params, self.params, "params")
        self._check(state, self.state, "state")
        # Train mode updates buffers in place: give it fresh copies, which become the new state.
        # (Copies made here, inside any torch.func transform, are the transform's own tensors.)
        buffers = {n: b.clone() for n, b in state.items()} if train else state
        versions = None if train else [b._version for b in state.values()]
        modes = [m.training for m in self._modules]
        try:
            for m in self._modules:
                m.training = train
            out = functional_call(self.module, {**self._frozen, **params, **buffers}, inputs, kwargs)
        finally:
            for m, mode in zip(self._modules, modes):
                m.training = mode
        if versions is not None and versions != [b._version for b in state.values()]:
            raise RuntimeError(
                "FunctionalModule: the module changed a buffer in place in eval mode (train=False), which would "
                "mutate `state`; call it with train=True so that buffer updates go to a fresh new_state."
            )
        return out, buffers

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
