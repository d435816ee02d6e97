"""Matrix-free linear algebra on lists of tensors: Neumann series, CG, power iteration.

Each routine takes ``matvec``, a function computing H v for a symmetric operator H, and never
forms H. They are pure functions of their inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bilevel import _tree

MatVec = Callable[[Sequence[Tensor]], list[Tensor]]


@dataclasses.dataclass(frozen=True)
class NeumannResult:
    """What :func:`neumann` computed: the sum, and how its terms behaved (free by-products)."""

    x: list[Tensor]
    growth: Tensor  # ‖last term‖ / ‖v‖ (0-dim)
    diverging: Tensor  # 0-dim bool: the terms grow with alternating sign, i.e. α μ_max > 2
    warm: Tensor | None = None  # 0-dim bool: the guess x₀ was used (None: no guess given)


def neumann(
    matvec: MatVec, v: Sequence[Tensor], steps: int, alpha: float, x0: Sequence[Tensor] | None = None
) -> NeumannResult:
    r"""Truncated Neumann series for H⁻¹v with ``steps − 1`` products (``steps`` from a guess x₀).

    .. math:: x = \alpha \sum_{j=0}^{\text{steps}-1} (I - \alpha H)^j v

    From an initial guess x₀ the same series is applied to the residual r₀ = v − Hx₀ (one more
    product): x = x₀ + α Σ_j (I − αH)^j r₀, which is ``steps`` Richardson iterations
    x ← x + α(v − Hx) started at x₀ — the error (I − αH)^steps (x₀ − H⁻¹v) shrinks from x₀'s, not
    from H⁻¹v's. A guess with ‖r₀‖ > ‖v‖ is worse than none and is replaced by x₀ = 0.

    Departure from the paper's Algorithm 3: there the sum is returned without the outer α (the
    α is absorbed by the caller); we include it, so x → H⁻¹v as steps → ∞ whenever
    0 < α μ < 2 for every eigenvalue μ of H.

    Divergence is read off the last two terms t_{s−1} = (I − αH)^{s−1} v and t_{s−2}, which the loop
    has anyway: for symmetric H, ‖t_j‖ ≤ ‖v‖ whenever every |1 − αμ| ≤ 1, so ``growth`` =
    ‖t_{s−1}‖/‖v‖ > 1 means some factor exceeds 1 in size. Its sign tells the two causes apart:
    ⟨t_{s−1}, t_{s−2}⟩ = vᵀ(I − αH)^{2s−3} v is dominated by the fastest-growing factor, negative when
    it is 1 − αμ < −1 (α too large for the top of the spectrum: ``diverging``), positive when it is
    1 − αμ > 1 (negative curvature, μ < 0, which no α > 0 cures).
    """
    first = list(v)
    keep: Tensor | None = None
    if x0 is not None:
        residual = _tree.add(v, matvec(x0), -1.0)  # r₀ = v − H x₀
        # A guess worse than 0 (‖r₀‖ > ‖v‖: the system moved, or an indefinite H drove an earlier solution
        # far out) is dropped for the cold series; selected on the device, without a host sync.
        keep = _tree.norm(residual) <= _tree.norm(v)
        first = [torch.where(keep, r, t) for r, t in zip(residual, v)]
        x0 = [torch.where(keep, t, torch.zeros_like(t)) for t in x0]
    term = previous = first
    total = [t.clone() for t in first]
    for j in range(steps - 1):
        new = _tree.add(term, matvec(term), -alpha)  # term ← (I − αH) term
        if j == steps - 2:  # keep t_{s−2} for the divergence test (only then: memory stays flat in steps)
            previous = term
        term = new
        _tree.add_(total, term)
    tiny = torch.finfo(v[0].dtype).tiny
    growth = _tree.norm(term) / _tree.norm(first).clamp_min(tiny)
    diverging = (growth > 1) & (_tree.vdot(term, previous) < 0) if steps > 1 else torch.zeros((), dtype=torch.bool)
    x = _tree.scale(total, alpha)
    if x0 is not None:
        _tree.add_(x, x0)
    return NeumannResult(x, growth, diverging, keep)


@dataclasses.dataclass(frozen=True)
class CGResult:
    """What :func:`conjugate_gradient` found."""

    x: list[Tensor]
    residual: Tensor  # ||b − (H + δI) x|| from the CG recursion
    iterations: int
    converged: bool
    warm: bool | None = None  # the guess x₀ was used (None: no guess given)
    energy: Tensor | None = None  # ½ xᵀ(H + δI)x − bᵀx = −½ xᵀ(b + r), from the recursion's r
    negative_curvature: bool = False  # some search direction had pᵀ(H + δI)p < 0: not positive definite


def conjugate_gradient(
    matvec: MatVec,
    b: Sequence[Tensor],
    maxiter: int,
    tol: float,
    damping: float,
    x0: Sequence[Tensor] | None = None,
) -> CGResult:
    r"""Solve (H + δI) x = b by conjugate gradients, starting from x₀ (default 0).

    Stops when ‖r‖ ≤ tol · ‖b‖ (relative to b, so a good x₀ stops early) or after ``maxiter``
    iterations (one product each, plus one for the residual of a given x₀). An x₀ whose residual is
    larger than ‖b‖ is worse than none: CG then starts from 0 (the product is spent all the same).
    H must be symmetric; CG is guaranteed to converge only when H + δI is positive definite. If a
    search direction has zero curvature (pᵀ(H+δI)p = 0) the solve stops there, unconverged.
    """
    # The loop already reads ‖r‖² and pᵀHp on the host to test convergence, so the step sizes are
    # Python floats and every vector update is one fused in-place pass over the tensors: the
    # vector arithmetic is O(P) per iteration and, at small batch, a visible share of an HVP.
    warm: bool | None = None
    if x0 is None:
        x, r = [torch.zeros_like(t) for t in b], [t.clone() for t in b]
    else:
        x = [t.clone() for t in x0]
        hx = matvec(x)
        if damping:
            _tree.add_(hx, x, damping)
        r = _tree.add(b, hx, -1.0)  # r₀ = b − (H + δI) x₀
        warm = float(_tree.vdot(r, r)) <= float(_tree.vdot(b, b))
        if not warm:  # worse than starting from 0: do that
            x, r = [torch.zeros_like(t) for t in b], [t.clone() for t in b]
    p = [t.clone() for t in r]
    rs = float(_tree.vdot(r, r))
    threshold = tol * (math.sqrt(rs) if x0 is None else float(_tree.norm(b)))
    iterations = 0
    negative = False
    converged = math.sqrt(rs) <= threshold
    while not converged and iterations < maxiter:
        hp = matvec(p)
        if damping:
            _tree.add_(hp, p, damping)
        curvature = float(_tree.vdot(p, hp))
        iterations += 1
        negative = negative or curvature < 0
        if curvature == 0.0:
            break
        step = rs / curvature
        _tree.add_(x, p, step)  # x ← x + step p
        _tree.add_(r, hp, -step)  # r ← r − step Hp
        rs_new = float(_tree.vdot(r, r))
        converged = math.sqrt(rs_new) <= threshold
        torch._foreach_mul_(p, rs_new / rs)  # p ← r + (rs_new / rs) p
        _tree.add_(p, r)
        rs = rs_new
    residual = torch.tensor(math.sqrt(rs), dtype=b[0].dtype, device=b[0].device)
    energy = -0.5 * _tree.vdot(x, _tree.add(b, r))  # (H + δI)x = b − r
    return CGResult(x, residual, iterations, converged, warm, energy, negative)


def power_iteration(matvec: MatVec, like: Sequence[Tensor], iters: int, seed: int = 0) -> Tensor:
    r"""Estimate the spectral radius max |λ(H)| with ``iters`` products.

    Starts from a Gaussian vector drawn from a private generator with a fixed seed (so results
    are reproducible and the global RNG is untouched) and returns ‖H u‖ for the final unit u.
    The estimate approaches the true value from below.
    """
    device = like[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    u = [torch.randn(t.shape, generator=gen, device=device, dtype=t.dtype) for t in like]
    u = _tree.scale(u, 1.0 / _tree.norm(u))
    estimate = torch.zeros((), dtype=like[0].dtype, device=device)
    for _ in range(iters):
        hu = matvec(u)
        estimate = _tree.norm(hu)
        u = _tree.scale(hu, 1.0 / estimate)
    return estimate


def dense_solve(hessian: Tensor, b: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Solve (H + δI) x = b for a dense H; returns x and ‖(H + δI)x − b‖."""
    if damping:
        hessian = hessian + damping * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    x = torch.linalg.solve(hessian, b)
    return x, torch.linalg.vector_norm(hessian @ x - b)


def nystrom_solve(sketch: Tensor, columns: Tensor, v: Tensor, damping: float) -> Tensor:
    r"""(H_k + ρI)⁻¹ v for the Nyström approximation H_k = C W⁻¹ Cᵀ, by the Woodbury identity.

    ``sketch`` holds Ωᵀ (k × P) and ``columns`` Cᵀ = (HΩ)ᵀ (k × P); W = ΩᵀHΩ = Ωᵀ C. Then
    (ρI + C W⁻¹ Cᵀ)⁻¹ v = (v − C (ρW + CᵀC)⁻¹ Cᵀ v) / ρ: one k×k solve, O(k²P) work. The k×k matrix
    is symmetrised against round-off; a singular one raises ``torch.linalg.LinAlgError``.

    Along the sketched directions the bracket nearly cancels (v − C(…)Cᵀv is O(ρ/μ) of v for an
    eigenvalue μ) and is then divided by ρ, so its round-off is amplified by μ/ρ. Solved in float32, a
    full-rank Nyström hypergradient of a 10-8-1 tanh network was 7e-3 off at ρ = 1e-4 and 1.3 (130 %)
    off at ρ = 1e-6. The solve therefore runs in float64 whatever the columns' dtype (round-off
    1e-16 · μ/ρ) and the result is cast back: 5e-7 off at every ρ there, with float32 columns (float32
    CG: 4e-6). It holds 8kP bytes of float64 columns while it runs.
    """
    dtype = v.dtype
    sketch, columns, v = sketch.double(), columns.double(), v.double()
    W = sketch @ columns.T
    inner = damping * (W + W.T) / 2 + columns @ columns.T
    coefficients = torch.linalg.solve(inner, columns @ v)
    return ((v - columns.T @ coefficients) / damping).to(dtype)


def lanczos(matvec: MatVec, start: Sequence[Tensor], steps: int) -> Tensor:
    r"""The k×k tridiagonal matrix T of ``steps`` Lanczos iterations on a symmetric H from ``start``.

    With q₁ = start/‖start‖ and the three-term recurrence β_{j} q_{j+1} = H q_j − α_j q_j − β_{j−1} q_{j−1},
    T = tridiag(β, α, β) = Qᵀ H Q on the Krylov space K_k(H, start). Its eigenvalues (Ritz values) lie in
    [λ_min(H), λ_max(H)] and approach the extreme ones first: a negative Ritz value proves that H has
    a negative eigenvalue. And ‖start‖ · T⁻¹e₁ are the coordinates of CG's k-th iterate for H x = start.
    Only three vectors are kept (no reorthogonalisation: the extreme Ritz values stay reliable when
    orthogonality is lost; only duplicates appear). Stops early on an invariant subspace (β = 0).
    """
    norm = float(_tree.norm(start))
    q = _tree.scale(start, 1.0 / norm)
    previous: list[Tensor] | None = None
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        z = matvec(q)
        alpha = float(_tree.vdot(q, z))
        alphas.append(alpha)
        z = _tree.add(z, q, -alpha)
        if previous is not None:
            _tree.add_(z, previous, -betas[-1])
        beta = float(_tree.norm(z))
        if j == steps - 1 or not math.isfinite(beta) or beta <= 1e-12 * max(abs(alpha), 1e-300):
            break
        betas.append(beta)
        previous, q = q, _tree.scale(z, 1.0 / beta)
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T
