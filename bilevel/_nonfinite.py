"""The exception a strict ``BilevelOptimizer`` raises instead of skipping a failed update."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """Raised in ``strict`` mode instead of skipping a failed update; nothing of that update is kept.

    An update fails when it would write NaN/Inf, or, for a hyperstep, when the hypergradient could
    not be computed (``info.failure``: a singular Hessian for ``Exact``, a zero Hessian for
    ``alpha="auto"``) or its Neumann series diverged (``info.diverging``). The exception is
    raised before anything changes: weights, hyperparameters, both optimiser states, the model
    state and every counter keep their values from before the call — as after any exception inside
    ``step()``, which is all or nothing (a ``step()`` whose hyperstep fails keeps no part of its inner
    update either).

    Example:
        >>> import torch, bilevel
        >>> def loss(p, h, b):
        ...     return ((p["w"] - b) ** 2).sum() + (h["log_decay"].exp() * p["w"] ** 2).sum()
        >>> opt = bilevel.BilevelOptimizer(loss, loss, {"w": torch.zeros(2)},
        ...                                {"log_decay": torch.zeros(2)}, strict=True)
        >>> try:
        ...     opt.step(torch.tensor([1.0, float("nan")]), torch.ones(2))
        ... except bilevel.NonFiniteError:
        ...     print("skipped; weights still", opt.params["w"].tolist())
        skipped; weights still [0.0, 0.0]
    """
