"""Hessian-vector products of the training loss, from PyTorch's autograd and torch.func.

Every IFT strategy needs two linear maps of the training loss L_T at (w, λ):

* the Hessian-vector product  v ↦ H v,  H = ∂²L_T/∂w∂wᵀ  (many times, inside the solve), and
* the mixed product           x ↦ (∂²L_T/∂w∂λᵀ)ᵀ x = ∇_λ ⟨∇_w L_T(w, λ), x⟩  (once, at the end).

Three ways to get them are offered as small frozen configs. The default, ``ReverseHVP``, takes
both from one autograd graph of ∇_w L_T; a first version reused a ``torch.func.vjp`` linearisation
instead, which cannot restrict a product to w or to λ and so needed a second linearisation for the
mixed product: the one-graph version measured 0.83–0.96× its time (docs/benchmarks.md). The other
two modes are built on ``torch.func`` (forward-mode ``jvp``; first-order ``grad`` only).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import torch
from torch import Tensor

from bilevel import _tree
from bilevel._tree import Leaves

# A training loss on flat leaves: (param leaves, hparam leaves) -> scalar.
LeafLoss = Callable[[Leaves, Leaves], Tensor]


class DerivativeError(RuntimeError):
    """The derivatives a hypergradient needs are missing or wrong: PyTorch could not take one (the
    message says which configuration works instead), or, with ``BilevelOptimizer(check=True,
    strict=True)``, [`check_derivatives`][bilevel.check_derivatives] found a problem (then ``check``
    holds its [`DerivativeCheck`][bilevel.DerivativeCheck]).

    Example:
        >>> import torch, bilevel
        >>> def loss(p, h, b):  # torch.cdist's exact path has no double backward
        ...     d = torch.cdist(b, p["c"], compute_mode="donot_use_mm_for_euclid_dist")
        ...     return d.sum() + (h["l"].exp() * p["c"] ** 2).sum()
        >>> params, hparams = {"c": torch.randn(2, 3)}, {"l": torch.zeros(())}
        >>> try:
        ...     bilevel.hypergradient(loss, loss, params, hparams, torch.randn(4, 3), torch.randn(4, 3),
        ...                           strategy=bilevel.ConjugateGradient(maxiter=2))
        ... except bilevel.DerivativeError as error:
        ...     print("FiniteDifferenceHVP" in str(error))
        True
    """

    def __init__(self, message: str, check: Any = None) -> None:
        super().__init__(message)
        self.check = check


# PyTorch's own messages for the second derivatives it cannot take, and what each means for the user.
_KNOWN_FAILURES = (
    ("does not currently support double backward", "compiled"),  # AOTAutograd (a compiled loss)
    ("donated buffers", "compiled"),  # a compiled module's backward
    ("ZeroTensors are immutable", "forward_bug"),  # forward-over-reverse through e.g. F.mse_loss
    ("forward AD", "no_forward"),  # an op without a forward-mode derivative
    ("is not implemented", "no_double"),  # "derivative for aten::... is not implemented"
)


def explain(err: BaseException, what: str) -> DerivativeError | None:
    """A :class:`DerivativeError` for one of PyTorch's known second-derivative failures (``what`` names
    the computation that needed it), or ``None`` for any other error."""
    if isinstance(err, DerivativeError) or not isinstance(err, (RuntimeError, NotImplementedError)):
        return None
    text = str(err)
    kind = next((k for pattern, k in _KNOWN_FAILURES if pattern in text), None)
    if kind is None:
        return None
    detail = text.strip().splitlines()[0][:200]
    fd = "hvp=bilevel.FiniteDifferenceHVP() (first derivatives only)"
    if kind == "compiled":
        message = (
            f"{what} needs second derivatives of train_loss, which runs a torch.compile'd function or module: "
            f"AOTAutograd has no double backward (pytorch#91469; PyTorch said: {detail}). What works: {fd}, or "
            f"ForwardOverReverseHVP() for a compiled loss function; or compile only what the inner step runs "
            f"and give the hypergradient the uncompiled module."
        )
    elif kind == "no_double":
        message = (
            f"{what} needs the second derivative of an operation in train_loss that PyTorch does not implement "
            f"(PyTorch said: {detail}). Use an IFT strategy with {fd}."
        )
    elif kind == "no_forward":
        message = (
            f"{what}: ForwardOverReverseHVP needs forward-mode AD through every operation of train_loss, and "
            f"PyTorch has none for one of them (PyTorch said: {detail}). Use the default hvp=bilevel.ReverseHVP() "
            f"or {fd}."
        )
    else:
        message = (
            f"{what}: forward-over-reverse differentiation hit a PyTorch bug (PyTorch said: {detail}; known "
            f"through F.mse_loss). Use the default hvp=bilevel.ReverseHVP() or {fd}."
        )
    return DerivativeError(message)


@contextlib.contextmanager
def explained(what: str) -> Iterator[None]:
    """Re-raise PyTorch's known second-derivative failures inside the block as :class:`DerivativeError`."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as err:
        better = explain(err, what)
        if better is None:
            raise
        raise better from err


class _Operator(abc.ABC):
    """The two linear maps at one point (w, λ), with a count of HVPs applied.

    ``notes`` collects what the caller should report (e.g. a batched product that fell back to
    sequential ones); ``mode`` names the configuration in error messages.
    """

    mode = "HVP"

    def __init__(self, loss: LeafLoss, w: Leaves, h: Leaves) -> None:
        self.loss, self.w, self.h = loss, w, h
        self.hvps = 0
        self._notes: list[str] = []

    @property
    def notes(self) -> list[str]:
        """What happened that the caller should report (each note once)."""
        return list(dict.fromkeys(self._notes))

    def hvp(self, v: Sequence[Tensor]) -> list[Tensor]:
        """H v."""
        self.hvps += 1
        with explained(f"{self.mode} (Hessian-vector products)"):
            return _tree.writable(self._hvp(tuple(v)))

    @abc.abstractmethod
    def _hvp(self, v: Leaves) -> list[Tensor]: ...

    def hvp_batched(self, vs: Sequence[Tensor]) -> list[Tensor]:
        """H v_i for k vectors at once: each leaf of ``vs`` has a leading dimension k (counts k HVPs)."""
        self.hvps += vs[0].shape[0]
        with explained(f"{self.mode} (Hessian-vector products)"):
            return _tree.writable(self._hvp_batched(tuple(vs)))

    def _hvp_batched(self, vs: Leaves) -> list[Tensor]:
        """One product after the other; modes with a batched product override this."""
        columns = [self._hvp(tuple(leaf[i] for leaf in vs)) for i in range(vs[0].shape[0])]
        return [torch.stack(parts) for parts in zip(*columns)]

    def mixed_vjp(self, x: Sequence[Tensor]) -> list[Tensor]:
        """(∂²L_T/∂w∂λᵀ)ᵀ x, shaped like the hparams."""
        with explained(f"{self.mode} (the mixed product ∂²L_T/∂w∂λ)"):
            return _tree.writable(self._mixed_vjp(tuple(x)))

    @abc.abstractmethod
    def _mixed_vjp(self, x: Leaves) -> list[Tensor]: ...

    def _grad_w(self, w: Leaves, h: Leaves) -> Leaves:
        return torch.func.grad(self.loss, argnums=0)(w, h)

    def _grad_h(self, w: Leaves, h: Leaves) -> Leaves:
        return torch.func.grad(self.loss, argnums=1)(w, h)


class HVP(abc.ABC):
    r"""Base of the HVP configurations; pass an instance as the ``hvp=`` field of a strategy.

    Every configuration provides, at one point (w, λ), the two linear maps an IFT strategy needs:
    \(v \mapsto Hv\) with \(H = \partial^2 L_T/\partial w\,\partial w^\top\), and
    \(x \mapsto (\partial^2 L_T/\partial w\,\partial\lambda^\top)^\top x\). The three concrete ones are
    [`ReverseHVP`][bilevel.ReverseHVP] (default), [`ForwardOverReverseHVP`][bilevel.ForwardOverReverseHVP]
    and [`FiniteDifferenceHVP`][bilevel.FiniteDifferenceHVP].

    Example:
        >>> import bilevel
        >>> isinstance(bilevel.Neumann(steps=5, alpha=0.1).hvp, bilevel.HVP)
        True
    """

    @abc.abstractmethod
    def build(
        self, loss: LeafLoss, w: Leaves, h: Leaves, *, retain: bool = True, eval_dtype: torch.dtype | None = None
    ) -> _Operator:
        """Return the operator at (w, λ). ``retain=False`` asks not to keep graphs between products
        (used with micro-batches, where one graph per micro-batch would defeat their purpose);
        ``eval_dtype`` is the dtype the loss is evaluated in (lower than the params' under autocast)."""


@dataclasses.dataclass(frozen=True)
class ReverseHVP(HVP):
    r"""Reverse-over-reverse HVPs from one autograd graph reused for every product.

    $$
    Hv = \Big(v^\top \frac{\partial \nabla_w L_T(w, \lambda)}{\partial w}\Big)^{\!\top},
    \qquad
    \Big(\frac{\partial^2 L_T}{\partial w\,\partial\lambda^\top}\Big)^{\!\top} x
      = \Big(x^\top \frac{\partial \nabla_w L_T(w, \lambda)}{\partial \lambda}\Big)^{\!\top}
    $$

    Builds \(\nabla_w L_T(w, \lambda)\) once per hypergradient with ``torch.autograd.grad(...,
    create_graph=True)``, w and λ both requiring grad (one forward and one backward pass, graph
    kept). Each product \(Hv = (v^\top H)^\top\) (H is symmetric) is then a single double-backward
    pass that autograd restricts to the path to w, and the mixed product is one more pass through
    the same graph restricted to λ: no second linearisation, and the HVPs never pay for
    λ-cotangents. Memory: one retained graph of the gradient.

    Example:
        >>> import bilevel
        >>> strategy = bilevel.Neumann(steps=10, alpha=0.1, hvp=bilevel.ReverseHVP())

    References:
        Pearlmutter (1994), "Fast exact multiplication by the Hessian"; Lorraine, Vicol &
        Duvenaud (2020), Algorithm 2 (vector-Jacobian products instead of matrices).
    """

    def build(
        self, loss: LeafLoss, w: Leaves, h: Leaves, *, retain: bool = True, eval_dtype: torch.dtype | None = None
    ) -> _Operator:
        op = _ReverseOperator(loss, w, h)
        op.retain = retain
        return op


class _ReverseOperator(_Operator):
    _graph: tuple[Leaves, Leaves, Leaves] | None = None
    retain = True
    mode = "ReverseHVP"

    def _linearise(self) -> tuple[Leaves, Leaves, Leaves]:
        """∇_w L_T with a graph, w and λ both requiring grad: one forward and one backward pass.

        Every later product is one double-backward pass through this graph, and autograd only
        walks the paths to the inputs a product asks for (w for Hv, λ for the mixed product), so
        the mixed product needs no second linearisation.
        """
        graph = self._graph
        if graph is None:
            with torch.enable_grad():
                w = tuple(t.detach().requires_grad_() for t in self.w)
                h = tuple(t.detach().requires_grad_() for t in self.h)
                g = torch.autograd.grad(self.loss(w, h), w, create_graph=True, allow_unused=True)
            graph = (w, h, tuple(torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, w)))
            if self.retain:
                self._graph = graph
        return graph

    def _product(self, wrt: Leaves, g: Leaves, v: Sequence[Tensor]) -> list[Tensor]:
        live = [i for i, gi in enumerate(g) if gi.requires_grad]  # leaves with a constant gradient have no path
        if not live:
            return [torch.zeros_like(t) for t in wrt]
        found = torch.autograd.grad(
            [g[i] for i in live], wrt, [v[i] for i in live], retain_graph=self.retain, allow_unused=True
        )
        return [torch.zeros_like(t) if f is None else f for f, t in zip(found, wrt)]

    def _hvp(self, v: Leaves) -> list[Tensor]:
        w, _, g = self._linearise()
        return self._product(w, g, v)

    def _hvp_batched(self, vs: Leaves) -> list[Tensor]:
        """All k products in one double-backward pass vectorised over k (``is_grads_batched``).

        The vectorised pass needs a batching rule for every backward op; where PyTorch has a broken or
        missing one (``group_norm``'s double backward, in torch 2.13) the products are taken one after the
        other instead, and ``notes`` says so.
        """
        w, _, g = self._linearise()
        live = [i for i, gi in enumerate(g) if gi.requires_grad]
        k = vs[0].shape[0]
        if not live:
            return [torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device) for t in w]
        try:
            found = torch.autograd.grad(
                [g[i] for i in live],
                w,
                [vs[i] for i in live],
                retain_graph=True,  # kept, so that a failure can fall back to single products
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as err:
            if explain(err, self.mode) is not None:  # no second derivative at all: sequential would fail too
                raise
            reason = str(err).strip().splitlines()[0][:160]
            self._notes.append(
                f"batched Hessian-vector products failed in PyTorch ({reason}); the {k} products were taken one "
                f"after the other instead (same numbers, slower)"
            )
            return super()._hvp_batched(vs)
        if not self.retain:
            self._graph = None
        return [
            torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device) if f is None else f for f, t in zip(found, w)
        ]

    def _mixed_vjp(self, x: Leaves) -> list[Tensor]:
        _, h, g = self._linearise()
        return self._product(h, g, x)


@dataclasses.dataclass(frozen=True)
class ForwardOverReverseHVP(HVP):
    r"""Forward-over-reverse HVPs: ``torch.func.jvp`` of ∇_w L_T, recomputed each time.

    $$
    Hv = \frac{d}{d\epsilon}\nabla_w L_T(w + \epsilon v, \lambda)\Big|_{\epsilon=0},
    \qquad
    \Big(\frac{\partial^2 L_T}{\partial w\,\partial\lambda^\top}\Big)^{\!\top} x
      = \frac{d}{d\epsilon}\nabla_\lambda L_T(w + \epsilon x, \lambda)\Big|_{\epsilon=0}
    $$

    Keeps no graph between products (lowest memory of the exact modes) at the price of a forward
    and backward pass each.

    Example:
        >>> import bilevel
        >>> strategy = bilevel.ConjugateGradient(maxiter=20, hvp=bilevel.ForwardOverReverseHVP())
    """

    def build(
        self, loss: LeafLoss, w: Leaves, h: Leaves, *, retain: bool = True, eval_dtype: torch.dtype | None = None
    ) -> _Operator:
        return _ForwardOperator(loss, w, h)


class _ForwardOperator(_Operator):
    mode = "ForwardOverReverseHVP"

    def _hvp(self, v: Leaves) -> list[Tensor]:
        hv = torch.func.jvp(lambda w: self._grad_w(w, self.h), (self.w,), (v,))[1]
        return list(hv)

    def _mixed_vjp(self, x: Leaves) -> list[Tensor]:
        out = torch.func.jvp(lambda w: self._grad_h(w, self.h), (self.w,), (tuple(x),))[1]
        return list(out)


@dataclasses.dataclass(frozen=True)
class FiniteDifferenceHVP(HVP):
    r"""Centred finite differences of first derivatives only (no double backward needed).

    $$
    Hv \approx \frac{\nabla_w L_T(w + \epsilon v) - \nabla_w L_T(w - \epsilon v)}{2\epsilon},
    \qquad
    (\partial^2 L_T/\partial w\partial\lambda^\top)^\top x \approx
    \frac{\nabla_\lambda L_T(w + \epsilon x) - \nabla_\lambda L_T(w - \epsilon x)}{2\epsilon}
    $$

    with \(\epsilon = \text{rel_step}\,(1 + \lVert w\rVert)/\lVert v\rVert\). The error is
    \(O(\epsilon^2)\) truncation plus \(O(\text{eps}_{\text{machine}}/\epsilon)\) round-off;
    the default ``rel_step`` (cube root of the dtype's machine epsilon) balances the two. Use it for
    models whose kernels have no second derivative (e.g. cuDNN's fused RNNs on CUDA).

    Args:
        rel_step: relative step; ``None`` picks ``finfo(dtype).eps ** (1/3)``.

    Example:
        >>> import bilevel
        >>> strategy = bilevel.Neumann(steps=5, alpha=0.1, hvp=bilevel.FiniteDifferenceHVP())

    References:
        Nocedal & Wright (2006), *Numerical Optimization*, 2nd ed., section 8.1 (finite-difference
        Hessian-vector products and the choice of step).
    """

    rel_step: float | None = None

    def __post_init__(self) -> None:
        if self.rel_step is not None and not (isinstance(self.rel_step, (int, float)) and 0 < self.rel_step < 1):
            raise ValueError(
                f"`FiniteDifferenceHVP(rel_step={self.rel_step!r})`: rel_step must be a float in "
                f"(0, 1), or None for the dtype's cube-root machine epsilon."
            )

    def build(
        self, loss: LeafLoss, w: Leaves, h: Leaves, *, retain: bool = True, eval_dtype: torch.dtype | None = None
    ) -> _Operator:
        return _FiniteDifferenceOperator(loss, w, h, self.rel_step, eval_dtype)


class _FiniteDifferenceOperator(_Operator):
    mode = "FiniteDifferenceHVP"

    def __init__(
        self, loss: LeafLoss, w: Leaves, h: Leaves, rel_step: float | None, eval_dtype: torch.dtype | None
    ) -> None:
        super().__init__(loss, w, h)
        # The round-off that the step balances is the loss's: under autocast the gradients carry bf16/fp16
        # precision, so the step is chosen for that dtype, not for the params' (measured on logistic
        # regression in bf16, CG hypergradient against float64: 22 % off with the float32 step, 0.37 %
        # with the bf16 one, where ReverseHVP is 0.11 % off).
        dtype = eval_dtype or w[0].dtype
        self.rel_step: Final = rel_step if rel_step is not None else torch.finfo(dtype).eps ** (1 / 3)
        self.w_scale: Final = 1.0 + float(_tree.norm(w))

    def _central(self, grad: Callable[[Leaves, Leaves], Leaves], x: Sequence[Tensor]) -> list[Tensor]:
        x_norm = float(_tree.norm(x))
        if x_norm == 0.0 or not math.isfinite(x_norm):
            # A zero direction has a zero product; a non-finite one must stay visible as such.
            return _tree.scale(grad(self.w, self.h), 0.0 if x_norm == 0.0 else math.nan)
        eps = self.rel_step * self.w_scale / x_norm
        plus = grad(tuple(_tree.add(self.w, x, eps)), self.h)
        minus = grad(tuple(_tree.add(self.w, x, -eps)), self.h)
        return _tree.scale(_tree.add(plus, minus, -1.0), 1.0 / (2.0 * eps))

    def _hvp(self, v: Leaves) -> list[Tensor]:
        return self._central(self._grad_w, v)

    def _mixed_vjp(self, x: Leaves) -> list[Tensor]:
        return self._central(self._grad_h, x)


class MeanOperator(_Operator):
    """The weighted average of operators built on micro-batches: H v = s Σ_i c_i H_i v, likewise the mixed
    product (``weights`` = (c, s) from ``_distributed.coefficients``)."""

    def __init__(self, ops: Sequence[_Operator], weights: tuple[tuple[float, ...], float]) -> None:
        super().__init__(ops[0].loss, ops[0].w, ops[0].h)
        self.ops = list(ops)
        self.coefs, self.scale = weights

    @property
    def notes(self) -> list[str]:
        return list(dict.fromkeys(note for op in self.ops for note in op.notes))

    def _mean(self, outs: list[list[Tensor]]) -> list[Tensor]:
        total = outs[0] if self.coefs[0] == 1.0 else _tree.scale(outs[0], self.coefs[0])
        for coef, out in zip(self.coefs[1:], outs[1:]):
            _tree.add_(total, out, coef)
        return total if self.scale == 1.0 else _tree.scale(total, self.scale)

    def _hvp(self, v: Leaves) -> list[Tensor]:
        return self._mean([op.hvp(v) for op in self.ops])

    def _hvp_batched(self, vs: Leaves) -> list[Tensor]:
        return self._mean([op.hvp_batched(vs) for op in self.ops])

    def _mixed_vjp(self, x: Leaves) -> list[Tensor]:
        return self._mean([op.mixed_vjp(x) for op in self.ops])


class ReducedOperator(_Operator):
    """An operator whose products are averaged over data-parallel ranks (see ``_distributed``)."""

    def __init__(self, op: _Operator, parallel: Any) -> None:
        super().__init__(op.loss, op.w, op.h)
        self.op, self.parallel = op, parallel

    @property
    def notes(self) -> list[str]:
        return self.op.notes

    def _hvp(self, v: Leaves) -> list[Tensor]:
        return self.parallel.mean(self.op.hvp(v))

    def _hvp_batched(self, vs: Leaves) -> list[Tensor]:
        return self.parallel.mean(self.op.hvp_batched(vs))

    def _mixed_vjp(self, x: Leaves) -> list[Tensor]:
        return self.parallel.mean(self.op.mixed_vjp(x))
