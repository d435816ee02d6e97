"""check_derivatives: is the hypergradient right on *this* model, at *these* weights?

A hypergradient is only as right as the second derivatives PyTorch gives for the user's model, and
only meaningful where the implicit function theorem's assumptions hold (w at a minimum of L_T, H
positive definite). Both can fail silently: a wrong double backward (``weight_norm`` in torch 2.13),
a backward that is not differentiable but raises nothing (``@once_differentiable``), nested
transforms through norm layers, weights far from a minimum. The check measures each on the user's
own losses, batches and weights, through the same evaluation rules the hypergradient uses (state,
replayed seeds, autocast, micro-batches, data parallelism), and says what to change.

Cost: a handful of gradients and products on random probe vectors, never a dense matrix.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel import _hypergradient, _linalg, _random, _tree
from bilevel._distributed import DataParallel
from bilevel._hvp import HVP, FiniteDifferenceHVP, ReverseHVP, _Operator
from bilevel._hypergradient import Seeds, check_strategy
from bilevel._problem import Problem
from bilevel._strategies import Exact, Nystrom, Strategy, Unroll
from bilevel._tree import Leaves


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Thresholds of :func:`check_derivatives`, per dtype the losses are evaluated in.

    - ``symmetry``: an exact Hessian-vector product is symmetric up to the rounding of the sums it
      is made of, |uᵀHv − vᵀHu| ≲ eps · ‖u‖‖Hv‖ times a modest factor, so the threshold allows
      ~10⁷·eps in float64 and ~10³·eps in float32; PyTorch's wrong double backwards are off by percents.
    - ``finite_difference``: a product disagrees with the Richardson-extrapolated central difference of
      ∇_w L_T by more than this (relative) *and* by more than 10× the difference's own error bar. The
      extrapolated difference is good to ~eps^(2/3) relative (4e-11 in float64, 2e-5 in float32, 3e-2
      in bf16) where the loss is smooth at this scale; where it is not (ReLU kinks crossed by the step)
      its error bar says so and nothing is flagged.
    - ``curvature``: a Ritz value below −curvature · λ_max counts as negative curvature (rounding
      makes tiny negative values of a positive semi-definite H).
    - ``stationarity``: w counts as far from a stationary point when the Newton step ‖H⁻¹∇_w L_T‖ (its
      Lanczos estimate, a lower bound) exceeds this fraction of ‖w‖: the minimum of the local quadratic
      model is then about as far away as the weights are large. A heuristic: a network trained by
      L-BFGS until its gradient stalled (ReLU kinks) measured 0.15–0.27 here.
    """

    symmetry: float
    finite_difference: float
    curvature: float
    stationarity: float = 0.5

    @staticmethod
    def for_dtype(dtype: torch.dtype) -> Tolerances:
        if dtype == torch.float64:
            return Tolerances(symmetry=1e-8, finite_difference=1e-6, curvature=1e-8)
        if dtype == torch.float32:
            return Tolerances(symmetry=1e-4, finite_difference=1e-3, curvature=1e-4)
        return Tolerances(symmetry=5e-2, finite_difference=5e-2, curvature=1e-2)  # bf16 / fp16 under autocast


@dataclasses.dataclass(frozen=True)
class DerivativeCheck:
    r"""What [`check_derivatives`][bilevel.check_derivatives] measured; ``print()`` it for a report.

    Relative errors are "measured / scale" with the scale named below; ``None`` where a quantity was
    not measured. Error bars are the finite differences' own error estimate (relative): a bar above
    the tolerance makes that comparison inconclusive rather than wrong.

    Attributes:
        ok: no problem found.
        derivatives_ok: the products are right (symmetry, finite differences, the strategy's own
            products); ``ok`` also needs the IFT's assumptions (curvature, stationarity) to hold.
        problems: one sentence per problem: the quantity, the measured number, the tolerance and what to
            do.
        dtype: the dtype the losses are evaluated in (the tolerances' dtype).
        hvp: the Hessian-vector product configuration checked.
        strategy: the name of the strategy checked for (``None`` when none was given); for ``"unroll"``
            the curvature and the Newton step are reported but are no problem (Unroll assumes neither).
        symmetry: max over probe pairs of |uᵀHv − vᵀHu| / ½(‖u‖‖Hv‖ + ‖v‖‖Hu‖).
        hvp_error: max over probes v of ‖Hv − D(v)‖ / ‖D(v)‖, D the extrapolated central difference of
            ∇_w L_T along v; ``hvp_error_bar`` its error bar.
        mixed_error: max over probes (x, d) of |⟨(∂²L_T/∂w∂λᵀ)ᵀx, d⟩ − D| / (‖(∂²L_T/∂w∂λᵀ)ᵀx‖‖d‖), D the
            difference of ⟨∇_w L_T, x⟩ along d in λ; ``mixed_error_bar`` its error bar.
        strategy_error: for ``Exact`` (its dense columns) and ``Nystrom`` (its batched products): max
            relative difference from single products; ``None`` for the other strategies, which use single
            products.
        lambda_max, lambda_min: the extreme Ritz values of ``lanczos_steps`` Lanczos steps on H (started
            from ∇_w L_T): λ_min(H) ≤ ``lambda_min`` and ``lambda_max`` ≤ λ_max(H).
        newton_step: ‖H⁻¹∇_w L_T‖ / ‖w‖ as estimated by the same Lanczos steps (CG's iterate: a lower
            bound); ``None`` when H showed negative curvature.
        train_grad_norm, val_grad_norm: ‖∇_w L_T‖ and ‖∂L_V/∂w‖ at the given point.
        hvps, gradients: the products and gradients the check spent; seconds: its wall time.
        tolerances: the thresholds applied (symmetry, finite_difference, curvature, stationarity), by
            the dtype the losses are evaluated in; the docs page "Is my hypergradient right?" lists them.
    """

    ok: bool
    derivatives_ok: bool
    problems: tuple[str, ...]
    dtype: str
    hvp: str
    strategy: str | None
    symmetry: float
    hvp_error: float
    hvp_error_bar: float
    mixed_error: float
    mixed_error_bar: float
    strategy_error: float | None
    lambda_max: float
    lambda_min: float
    newton_step: float | None
    train_grad_norm: float
    val_grad_norm: float
    hvps: int
    gradients: int
    seconds: float
    tolerances: Tolerances

    def __str__(self) -> str:
        tol = self.tolerances

        def verdict(value: float | None, limit: float, bar: float | None = None) -> str:
            if value is None or not math.isfinite(value):
                return "" if value is None else "FAIL"
            if value > limit and bar is not None and bar * 10 >= value:
                return "inconclusive"
            return "FAIL" if value > limit else "ok"

        def num(value: float | None) -> str:
            return "–" if value is None else f"{value:.2e}"

        assumed = "" if self.strategy == "unroll" else "FAIL"  # Unroll assumes no minimum
        curvature_bad = self.lambda_min < -tol.curvature * abs(self.lambda_max)
        far = self.newton_step is not None and self.newton_step > tol.stationarity
        fd = tol.finite_difference
        rows = [
            ("HVP symmetry |uᵀHv − vᵀHu| (rel.)", num(self.symmetry), num(tol.symmetry), "",
             verdict(self.symmetry, tol.symmetry)),
            ("HVP vs finite differences (rel.)", num(self.hvp_error), num(fd), num(self.hvp_error_bar),
             verdict(self.hvp_error, fd, self.hvp_error_bar)),
            ("mixed product vs FD in λ (rel.)", num(self.mixed_error), num(fd), num(self.mixed_error_bar),
             verdict(self.mixed_error, fd, self.mixed_error_bar)),
            ("strategy's products vs single (rel.)", num(self.strategy_error), num(tol.symmetry), "",
             verdict(self.strategy_error, tol.symmetry)),
            ("λ_max of H (Lanczos)", num(self.lambda_max), "", "", ""),
            ("λ_min of H (Lanczos)", num(self.lambda_min), num(-tol.curvature * abs(self.lambda_max)), "",
             assumed if curvature_bad else "ok"),
            ("Newton step ‖H⁻¹∇L_T‖ / ‖w‖", num(self.newton_step), num(tol.stationarity), "",
             assumed if far else ("ok" if self.newton_step is not None else "")),
            ("‖∇_w L_T‖, ‖∂L_V/∂w‖", f"{self.train_grad_norm:.2e}, {self.val_grad_norm:.2e}", "", "", ""),
        ]
        head = ("quantity", "measured", "tolerance", "error bar", "")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
        lines = [
            f"check_derivatives: {'ok' if self.ok else f'{len(self.problems)} problem(s)'} — {self.hvp}"
            f"{'' if self.strategy is None else f' for {self.strategy}'}, losses in {self.dtype}; {self.hvps} HVPs + "
            f"{self.gradients} gradients",
            "  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
        ]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines += [f"- {problem}" for problem in self.problems]
        return "\n".join(lines)


def check_derivatives(
    train_loss: Callable[..., Any],
    val_loss: Callable[..., Any],
    params: Any,
    hparams: Any,
    train_batch: Any,
    val_batch: Any,
    *,
    state: Any = None,
    hvp: HVP | None = None,
    strategy: Strategy | None = None,
    seed: int = 0,
    probes: int = 2,
    lanczos_steps: int = 10,
    autocast: torch.dtype | None = None,
    distributed: DataParallel | None = None,
) -> DerivativeCheck:
    r"""Measure whether the second derivatives a hypergradient uses are right on your model, and
    whether the implicit function theorem's assumptions hold at ``params``.

    With random probe vectors u, v (and d in λ-space), from the same evaluation of the losses that
    [`hypergradient`][bilevel.hypergradient] makes (model state, replayed seed, autocast, micro-batches):

    - **symmetry**: \(u^\top H v = v^\top H u\) for the true Hessian; PyTorch's wrong double backwards
      (``weight_norm`` in torch 2.13) break it.
    - **finite differences**: \(Hv\) against \(\big(\nabla_w L_T(w + \epsilon v) - \nabla_w L_T(w -
      \epsilon v)\big)/2\epsilon\), Richardson-extrapolated from ε and 2ε, with ε chosen for the
      evaluation dtype and an error bar from the two; likewise the mixed product
      \(\langle(\partial^2 L_T/\partial w\partial\lambda^\top)^\top u, d\rangle\) against a difference in
      λ. This catches wrong products that are symmetric, and products that silently miss a part of the
      model.
    - **the strategy's own products**: ``Exact``'s dense columns and ``Nystrom``'s batched products
      against single ones (the class of bug of ``jacfwd(jacrev(·))`` through norm layers).
    - **the IFT's assumptions**: a few Lanczos steps on H give its extreme eigenvalues (a negative
      one means w is at a saddle: the IFT gives a saddle's hypergradient and Neumann diverges) and the
      Newton step ‖H⁻¹∇_w L_T‖ relative to ‖w‖ (how far w is from a stationary point). They are
      measured for every strategy but are problems only for the IFT ones: ``Unroll`` assumes neither.

    Nothing is changed: params, hparams, state and torch's global generator are left as they were.

    Args:
        train_loss: as for [`hypergradient`][bilevel.hypergradient].
        val_loss: as for ``hypergradient``.
        params: the weights to check at (as for ``hypergradient``: taken as w*(λ)).
        hparams: as for ``hypergradient``.
        train_batch: as for ``hypergradient``.
        val_batch: as for ``hypergradient``.
        state: as for ``hypergradient``.
        hvp: the HVP configuration to check; by default ``strategy``'s, else
            [`ReverseHVP`][bilevel.ReverseHVP].
        strategy: the strategy you will use: its products are checked too (``Exact``: ReverseHVP's dense
            columns; ``Nystrom``: its batched products).
        seed: seeds the losses' random numbers (as ``hypergradient(seed=...)``) and the probe vectors.
        probes: random probe vectors (≥ 2: symmetry needs a pair).
        lanczos_steps: Lanczos iterations (one HVP each) for the curvature and the Newton step.
        autocast: as for ``hypergradient`` (the tolerances follow the autocast dtype).
        distributed: as for ``hypergradient``.

    Returns:
        a [`DerivativeCheck`][bilevel.DerivativeCheck]; ``print(check)`` shows a table.

    Cost: ``probes`` + ``lanczos_steps`` HVPs and 1 mixed product (+ up to 4 dense columns and 4 single
    products for ``Exact``, 2 batched products for ``Nystrom``), and 4·``probes`` + 6 gradients (up to 8
    more per probe where kinks make the finite differences retry with smaller steps).

    Example:
        >>> import torch, bilevel
        >>> X, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
        >>> def train_loss(p, h, batch):
        ...     X, y = batch
        ...     return ((X @ p["w"] - y) ** 2).mean() + (h["log_l2"].exp() * p["w"] ** 2).sum()
        >>> w_star = torch.linalg.solve(X.T @ X / 50 + torch.eye(3, dtype=torch.float64), X.T @ y / 50)
        >>> check = bilevel.check_derivatives(train_loss, train_loss, {"w": w_star},
        ...                                   {"log_l2": torch.zeros(3, dtype=torch.float64)}, (X, y), (X, y))
        >>> check.ok, check.problems
        (True, ())
    """
    strategy_ = None if strategy is None else check_strategy(strategy)
    hvp_ = _resolve_hvp(hvp, strategy_)
    _check_count("probes", probes, 2)
    _check_count("lanczos_steps", lanczos_steps, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed={seed!r}`: must be an int.")
    problem, w, h, s = Problem.create(
        train_loss, val_loss, params, hparams, state=state, autocast=autocast, distributed=distributed
    )
    w, h = tuple(t.clone() for t in w), tuple(t.clone() for t in h)
    seeds = Seeds(_random.derive(seed, _random.TRAIN), _random.derive(seed, _random.VAL))
    return run_check(problem, w, h, s, train_batch, val_batch, hvp_, strategy_, seeds, seed, probes, lanczos_steps)


def _resolve_hvp(hvp: HVP | None, strategy: Strategy | None) -> HVP:
    if hvp is not None and not isinstance(hvp, HVP):
        raise TypeError(f"`hvp={hvp!r}`: must be None or an HVP configuration such as bilevel.ReverseHVP().")
    own = getattr(strategy, "hvp", None)
    if isinstance(strategy, (Exact, Unroll)):
        own = ReverseHVP()  # Exact's columns and Unroll's backpropagation are plain double backward
    if hvp is not None and own is not None and hvp != own:
        raise ValueError(
            f"`hvp={hvp!r}` differs from the products `strategy={strategy!r}` uses ({own!r}); pass one of them."
        )
    return hvp or own or ReverseHVP()


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}={value!r}`: must be an integer >= {minimum}.")


def run_check(
    problem: Problem,
    w: Leaves,
    h: Leaves,
    s: Leaves,
    train_batch: Any,
    val_batch: Any,
    hvp: HVP,
    strategy: Strategy | None,
    seeds: Seeds,
    probe_seed: int,
    probes: int = 2,
    lanczos_steps: int = 10,
) -> DerivativeCheck:
    """:func:`check_derivatives` on flat leaves (also run by ``BilevelOptimizer(check=True)``)."""
    start = time.perf_counter()
    eval_dtype = problem.autocast or _tree.widest_dtype(w)
    tol = Tolerances.for_dtype(eval_dtype)
    counter = {"gradients": 0}

    def grad_w(ww: Sequence[Tensor], hh: Sequence[Tensor]) -> list[Tensor]:
        counter["gradients"] += 1
        (g,), _, _ = problem.value_and_grad(problem.train_loss, train_batch, tuple(ww), tuple(hh), (0,), s, seeds.train)
        return g

    g = grad_w(w, h)
    (val_w,), _, _ = problem.value_and_grad(problem.val_loss, val_batch, w, h, (0,), s, seeds.val)
    counter["gradients"] += 1
    op = problem.operator(hvp, train_batch, w, h, s, seeds.train)
    gen = torch.Generator(device=w[0].device).manual_seed(probe_seed)
    us = [_gaussian(w, gen) for _ in range(probes)]
    hus = [op.hvp(u) for u in us]

    # symmetry, over consecutive pairs
    symmetry = 0.0
    for (u, hu), (v, hv) in zip(zip(us, hus), zip(us[1:], hus[1:])):
        scale = 0.5 * (float(_tree.norm(u) * _tree.norm(hv)) + float(_tree.norm(v) * _tree.norm(hu)))
        symmetry = max(symmetry, abs(float(_tree.vdot(u, hv) - _tree.vdot(v, hu))) / max(scale, 1e-300))

    # HVPs against finite differences of ∇_w L_T
    hvp_fd: tuple[float, float] | None = None
    w_scale = 1.0 + float(_tree.norm(w))
    for u, hu in zip(us, hus):
        eps = torch.finfo(eval_dtype).eps ** (1 / 3) * w_scale / float(_tree.norm(u))
        # A step that straddles kinks (ReLU, max-pooling) makes the two differences disagree: the error
        # bar is then large and the comparison inconclusive. Smaller steps cross fewer kinks, at the price
        # of more round-off, so up to two of them are tried before the result stands as inconclusive.
        probe: tuple[float, float] | None = None

        def along(t: float, u: list[Tensor] = u) -> list[Tensor]:
            return grad_w(_tree.add(w, u, t), h)

        for shrink in (1.0, 1 / 16, 1 / 256):
            d1, d2, noise = _central(along, eps * shrink, eval_dtype)
            extrapolated = _tree.add(d1, _tree.add(d1, d2, -1.0), 1.0 / 3.0)  # D(ε) + (D(ε) − D(2ε))/3
            # (the round-off level keeps a zero product, e.g. of a loss linear in w, from dividing by zero)
            denominator = max(float(_tree.norm(extrapolated)), float(_tree.norm(hu)), noise, 1e-300)
            error = float(_tree.norm(_tree.add(hu, extrapolated, -1.0))) / denominator
            bar = (float(_tree.norm(_tree.add(d1, d2, -1.0))) + noise) / denominator
            probe = (error, bar) if probe is None or bar < probe[1] else probe
            if 10 * probe[1] < max(probe[0], tol.finite_difference):  # conclusive either way
                break
        assert probe is not None
        hvp_fd = probe if hvp_fd is None else _worse(hvp_fd, probe)
    assert hvp_fd is not None  # probes >= 2
    hvp_error, hvp_bar = hvp_fd

    # the mixed product against a finite difference in λ
    d = _gaussian(h, gen)
    x = us[0]
    mixed = op.mixed_vjp(x)
    exact_value = float(_tree.vdot(mixed, d))
    eps_h = torch.finfo(eval_dtype).eps ** (1 / 3) * (1.0 + float(_tree.norm(h))) / float(_tree.norm(d))

    def along_d(t: float) -> list[Tensor]:
        return [_tree.vdot(grad_w(w, _tree.add(h, d, t)), x).reshape(1)]

    # ⟨∇_w L_T, x⟩ is rounded at the scale ‖∇_w L_T‖‖x‖, whatever cancellation makes its value
    m1, m2, noise = _central(along_d, eps_h, eval_dtype, size=float(_tree.norm(x)) * float(_tree.norm(g)))
    fd_value = float(m1[0] + (m1[0] - m2[0]) / 3.0)
    scale = max(float(_tree.norm(mixed)) * float(_tree.norm(d)), abs(fd_value), noise, 1e-300)
    mixed_error = abs(exact_value - fd_value) / scale
    mixed_bar = (abs(float(m1[0] - m2[0])) + noise) / scale

    strategy_error = _strategy_error(strategy, op, w, us, hus, gen)

    # curvature and stationarity from Lanczos started at ∇_w L_T
    g_norm = float(_tree.norm(g))
    lanczos_start = g if math.isfinite(g_norm) and g_norm > 0 else _gaussian(w, gen)
    T = _linalg.lanczos(op.hvp, lanczos_start, lanczos_steps)
    ritz = torch.linalg.eigvalsh(T)
    lambda_min, lambda_max = float(ritz[0]), float(ritz[-1])
    newton: float | None = None
    if lambda_min > 0:
        e1 = torch.zeros(len(T), dtype=T.dtype)
        e1[0] = 1.0
        w_norm = max(float(_tree.norm(w)), 1e-300)
        newton = (g_norm * float(torch.linalg.norm(torch.linalg.solve(T, e1))) if g_norm > 0 else 0.0) / w_norm

    fds = (hvp_error, hvp_bar), (mixed_error, mixed_bar)
    wrong = _wrong_derivatives(tol, hvp, strategy, symmetry, *fds, strategy_error)
    # Unroll differentiates through the inner updates and assumes neither a minimum nor stationarity.
    unrolled = isinstance(strategy, Unroll)
    problems = [*wrong, *([] if unrolled else _broken_assumptions(tol, lambda_min, lambda_max, newton, lanczos_steps))]
    return DerivativeCheck(
        ok=not problems,
        derivatives_ok=not wrong,
        problems=tuple(problems),
        dtype=str(eval_dtype).replace("torch.", ""),
        hvp=type(hvp).__name__,
        strategy=None if strategy is None else strategy.name,
        symmetry=symmetry,
        hvp_error=hvp_error,
        hvp_error_bar=hvp_bar,
        mixed_error=mixed_error,
        mixed_error_bar=mixed_bar,
        strategy_error=strategy_error,
        lambda_max=lambda_max,
        lambda_min=lambda_min,
        newton_step=newton,
        train_grad_norm=g_norm,
        val_grad_norm=float(_tree.norm(val_w)),
        hvps=op.hvps,
        gradients=counter["gradients"],
        seconds=time.perf_counter() - start,
        tolerances=tol,
    )


def _gaussian(like: Leaves, gen: torch.Generator) -> list[Tensor]:
    return [torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in like]


def _central(
    f: Callable[[float], list[Tensor]], eps: float, dtype: torch.dtype, size: float | None = None
) -> tuple[list[Tensor], list[Tensor], float]:
    """Central differences D(ε), D(2ε) of f at 0, and the round-off in D(ε), eps_dtype · size / ε with
    ``size`` the scale f is rounded at (default ‖f(ε)‖ + ‖f(−ε)‖)."""
    plus, minus = f(eps), f(-eps)
    plus2, minus2 = f(2 * eps), f(-2 * eps)
    d1 = _tree.scale(_tree.add(plus, minus, -1.0), 1.0 / (2 * eps))
    d2 = _tree.scale(_tree.add(plus2, minus2, -1.0), 1.0 / (4 * eps))
    size = size if size is not None else float(_tree.norm(plus)) + float(_tree.norm(minus))
    noise = torch.finfo(dtype).eps * size / eps
    return d1, d2, noise


def _worse(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """The (error, bar) pair that is the stronger evidence of a problem: the larger error beyond its bar."""
    return a if a[0] - 10 * a[1] >= b[0] - 10 * b[1] else b


def _strategy_error(
    strategy: Strategy | None, op: _Operator, w: Leaves, us: list[list[Tensor]], hus: list[list[Tensor]],
    gen: torch.Generator,
) -> float | None:
    if isinstance(strategy, Exact):  # dense columns, as Exact builds them, against single products
        # One column in each of up to 4 leaves: the first leaf (the first layer, before any norm layer: where
        # nested transforms went wrong) and three others at random, at a random position in each.
        sizes = [t.numel() for t in w]
        size, offsets = sum(sizes), [sum(sizes[:i]) for i in range(len(sizes))]
        leaves = [0, *(1 + i for i in torch.randperm(len(w) - 1, generator=gen).tolist())][: min(4, len(w))]
        picks = torch.tensor([offsets[i] + int(torch.randint(sizes[i], (), generator=gen)) for i in leaves])
        columns = _hypergradient.dense_columns(op, w, picks)  # looked up at call time: Exact's own path
        worst = 0.0
        for row, j in zip(columns, picks.tolist()):
            unit = torch.zeros(size, dtype=columns.dtype, device=columns.device)
            unit[j] = 1.0
            single = _tree.ravel_batched([t.unsqueeze(0) for t in op.hvp(_tree.unravel(unit, w))], columns.dtype)[0]
            worst = max(worst, float((row - single).norm() / single.norm().clamp_min(1e-300)))
        return worst
    if isinstance(strategy, Nystrom):  # the probes' products in one batched call
        batched = op.hvp_batched([torch.stack(leaves) for leaves in zip(*us[:2])])
        worst = 0.0
        for i, hu in enumerate(hus[:2]):
            got = [leaf[i] for leaf in batched]
            worst = max(worst, float(_tree.norm(_tree.add(got, hu, -1.0)) / _tree.norm(hu).clamp_min(1e-300)))
        return worst
    return None


def _wrong_derivatives(
    tol: Tolerances,
    hvp: HVP,
    strategy: Strategy | None,
    symmetry: float,
    hvp_fd: tuple[float, float],
    mixed_fd: tuple[float, float],
    strategy_error: float | None,
) -> list[str]:
    """The report's sentences on the products: the quantity, the number, the tolerance, what to do."""
    found = []
    finite_difference = isinstance(hvp, FiniteDifferenceHVP)
    fix = (
        "hvp=bilevel.FiniteDifferenceHVP() needs first derivatives only; use it (or check_derivatives("
        "hvp=bilevel.FiniteDifferenceHVP()) to confirm it passes)"
        if not finite_difference
        else "the loss may not be smooth at this scale, or evaluated in too low a precision: check at a "
        "float64 copy of the model, or pass FiniteDifferenceHVP(rel_step=...)"
    )
    if not symmetry <= tol.symmetry:
        found.append(
            f"Hessian-vector products are not symmetric (relative asymmetry {symmetry:.2g} > {tol.symmetry:g}): "
            f"an op in train_loss has a wrong second derivative in this torch version (weight_norm's is, in "
            f"torch 2.13), so every {type(hvp).__name__} product is wrong; {fix}."
        )
    error, bar = hvp_fd
    if not (error <= tol.finite_difference or error <= 10 * bar):
        found.append(
            f"Hessian-vector products disagree with finite differences of ∇_w L_T (relative error {error:.2g} > "
            f"{tol.finite_difference:g}, the differences' own error bar {bar:.1g}): {type(hvp).__name__} misses "
            f"or distorts part of the model's curvature (e.g. a custom autograd.Function whose backward is "
            f"@once_differentiable or runs under no_grad: PyTorch raises nothing and its part is lost); {fix}."
        )
    error, bar = mixed_fd
    if not (error <= tol.finite_difference or error <= 10 * bar):
        found.append(
            f"The mixed product (∂²L_T/∂w∂λᵀ)ᵀx disagrees with a finite difference in λ (relative error {error:.2g}"
            f" > {tol.finite_difference:g}, error bar {bar:.1g}): the hypergradient's last term is wrong; {fix}."
        )
    if strategy_error is not None and not strategy_error <= tol.symmetry:
        what = "dense Hessian columns" if isinstance(strategy, Exact) else "batched Hessian-vector products"
        found.append(
            f"{type(strategy).__name__}'s {what} disagree with single products (relative difference "
            f"{strategy_error:.2g} > {tol.symmetry:g}): PyTorch computes them wrongly for this model; use "
            f"ConjugateGradient or Neumann, which use single products."
        )
    return found


def _broken_assumptions(
    tol: Tolerances, lambda_min: float, lambda_max: float, newton: float | None, lanczos_steps: int
) -> list[str]:
    """The report's sentences on the IFT's assumptions at w."""
    found = []
    if lambda_min < -tol.curvature * abs(lambda_max):
        found.append(
            f"The training Hessian has negative curvature (Lanczos, {lanczos_steps} steps: an eigenvalue ≤ "
            f"{lambda_min:.3g}, against λ_max ≥ {lambda_max:.3g}): w is not at a minimum, so the IFT gives the "
            f"hypergradient of a saddle point, CG may end worse than no solve and Neumann's series grows along "
            f"it. Train closer to a minimum before each hyperstep (more inner steps), or damp: "
            f"ConjugateGradient(damping={1.5 * -lambda_min:.2g}) or more."
        )
    if newton is not None and newton > tol.stationarity:
        found.append(
            f"w is far from a stationary point of train_loss: the Newton step ‖H⁻¹∇_w L_T‖ is at least "
            f"{newton:.2g} × ‖w‖ (> {tol.stationarity:g}), so the IFT's w*(λ) is not where the weights are. "
            f"Take more inner steps before each hyperstep, or use Unroll, which assumes no stationarity."
        )
    return found
