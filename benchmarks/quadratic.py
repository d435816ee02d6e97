"""The field's standard bilevel benchmark: benchopt's ``benchmark_bilevel`` "simulated" quadratic problem.

Built as its code defines it (``datasets/simulated.py`` and ``benchmark_utils/gen_matrices.py`` of
benchopt/benchmark_bilevel), with torch's generator in place of JAX's: for i = 1..n,

    g_i(z, x) = ½ zᵀA_i z + ½ xᵀB_i x + xᵀC_i z + a_iᵀz + b_iᵀx        (inner, z ∈ R^d_inner)
    f_i(z, x)   the same form with its own draws                        (outer, x ∈ R^d_outer)

with A_i = S u_iuᵢᵀ S for Gaussian u_i and S symmetric with eigenvalues geometric in [√μ, √L] (so the
mean inner Hessian E A_i = S² has eigenvalues geometric in [μ, L]); B_i alike but with one zero
eigenvalue; C_i = U D v_ivᵢᵀ Vᵀ with U, V orthonormal and D's singular values geometric in [μ, L_cross];
a_i, b_i Gaussian. The inner problem is min_z mean_i g_i, the outer min_x h(x) = mean_i f_i(z*(x), x),
and the metric is benchopt's, ‖∇h(x)‖², computed by exact solves:

    z* = −Ā⁻¹(ā + C̄ᵀx),   v = −Ā⁻¹ ∇_z f(z*, x),   ∇h(x) = ∇_x f(z*, x) + C̄ v.

A_i, B_i and C_i are rank one (sums of outer products), so they are stored by their vectors and a batch
of g_i costs a few matrix products.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torchopt
from torch import Tensor

import bilevel


@dataclasses.dataclass(frozen=True)
class Quadratic:
    """One family of quadratics g_i (or f_i), stored by the vectors of their rank-one matrices."""

    u: Tensor  # (n, d_inner): A_i = S u_i u_iᵀ S, stored as (u_i S)
    s_outer: Tensor  # (n, d_outer): B_i likewise
    cross_left: Tensor  # (d_outer, d_inner): U D
    cross_v: Tensor  # (n, d_inner): v_i
    cross_right: Tensor  # (d_inner, d_inner): Vhᵀ (gen_matrices multiplies by the transpose of svd's Vh)
    a: Tensor  # (n, d_inner)
    b: Tensor  # (n, d_outer)

    def value(self, z: Tensor, x: Tensor, idx: Tensor | slice) -> Tensor:
        zs = self.u[idx] @ z  # (u_i S) z
        xs = self.s_outer[idx] @ x
        # xᵀ C_i z = (xᵀ U D v_iᵀ)(v_i Vᵀ z)
        cross = (self.cross_v[idx] @ (self.cross_left.T @ x)) * (self.cross_v[idx] @ (self.cross_right @ z))
        return (0.5 * zs**2 + 0.5 * xs**2 + cross + self.a[idx] @ z + self.b[idx] @ x).mean()

    @functools.cached_property
    def dense(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The full-batch Ā, B̄, C̄ (d_outer × d_inner), ā, b̄."""
        n = len(self.u)
        A = self.u.T @ self.u / n
        B = self.s_outer.T @ self.s_outer / n
        C = self.cross_left @ (self.cross_v.T @ self.cross_v / n) @ self.cross_right
        return A, B, C, self.a.mean(0), self.b.mean(0)


def _sqrt_spectrum(d: int, low: float, high: float, gen: torch.Generator, zero: bool = False) -> Tensor:
    """S = U diag(geometric in [√low, √high]) Uᵀ, U from the SVD of a random vector (as gen_matrices)."""
    U, _, _ = torch.linalg.svd(torch.randn(d, 1, generator=gen, dtype=torch.float64))
    if zero:
        diag = torch.cat(
            [
                torch.zeros(1, dtype=torch.float64),
                torch.logspace(math.log10(low) / 2, math.log10(high) / 2, d - 1, dtype=torch.float64),
            ]
        )
    else:
        diag = torch.logspace(math.log10(low) / 2, math.log10(high) / 2, d, dtype=torch.float64)
    return U @ torch.diag(diag) @ U.T


def make_family(n: int, d_inner: int, d_outer: int, mu: float, L: float, L_cross: float, seed: int) -> Quadratic:
    gen = torch.Generator().manual_seed(seed)
    S = _sqrt_spectrum(d_inner, mu, L, gen)
    u = torch.randn(n, d_inner, generator=gen, dtype=torch.float64) @ S
    S_out = _sqrt_spectrum(d_outer, mu, L, gen, zero=True)
    s_outer = torch.randn(n, d_outer, generator=gen, dtype=torch.float64) @ S_out
    U, _, Vh = torch.linalg.svd(torch.randn(d_outer, d_inner, generator=gen, dtype=torch.float64))
    m = min(d_outer, d_inner)
    D = torch.zeros(d_outer, d_inner, dtype=torch.float64)
    D[:m, :m] = torch.diag(torch.logspace(math.log10(mu), math.log10(L_cross), m, dtype=torch.float64))
    cross_v = torch.randn(n, d_inner, generator=gen, dtype=torch.float64)
    a = torch.randn(n, d_inner, generator=gen, dtype=torch.float64)
    b = torch.randn(n, d_outer, generator=gen, dtype=torch.float64)
    return Quadratic(u, s_outer, U @ D, cross_v, Vh.T, a, b)


@dataclasses.dataclass(frozen=True)
class Problem:
    """The simulated bilevel problem: inner family g, outer family f, and the exact metric."""

    g: Quadratic
    f: Quadratic

    @classmethod
    def make(
        cls, n: int = 1024, d: int = 100, mu: float = 0.1, L: float = 1.0, L_cross: float = 0.1, seed: int = 0
    ) -> Problem:
        """benchopt's defaults; like its dataset, redraws (up to 20 times) until h is convex (λ_min ∇²h ≥ 1e-12)."""
        gen = torch.Generator().manual_seed(2442 + seed)
        for _ in range(20):
            inner_seed, outer_seed = (int(s) for s in torch.randint(0, 2**31 - 1, (2,), generator=gen))
            problem = cls(
                make_family(n, d, d, mu, L, L_cross, inner_seed), make_family(n, d, d, mu, L, L_cross, outer_seed)
            )
            if float(torch.linalg.eigvalsh(problem.value_hessian())[0]) >= 1e-12:
                return problem
        raise RuntimeError("no draw with a convex value function in 20 trials")

    def value_hessian(self) -> Tensor:
        """∇²h = Jᵀ Āf J + B̄f + C̄f J + (C̄f J)ᵀ with J = dz*/dx = −Ā⁻¹C̄ᵀ (h is quadratic: exact).

        (benchopt's ``get_hessian_min_eigval`` adds half the last two terms; the redraw test here uses the
        whole Hessian.)"""
        A, _, C, _, _ = self.g.dense
        Af, Bf, Cf, _, _ = self.f.dense
        J = -torch.linalg.solve(A, C.T)
        cross = Cf @ J
        return J.T @ Af @ J + Bf + cross + cross.T

    def train_loss(self, p: dict, h: dict, idx: Any) -> Tensor:
        return self.g.value(p["z"], h["x"], idx)

    def val_loss(self, p: dict, h: dict, idx: Any) -> Tensor:
        return self.f.value(p["z"], h["x"], idx)

    def grad_h(self, x: Tensor) -> Tensor:
        """∇h(x) by exact solves (benchopt's metric is its squared norm)."""
        A, _, C, a, _ = self.g.dense
        Af, Bf, Cf, af, bf = self.f.dense
        z = torch.linalg.solve(A, -(a + C.T @ x))
        v = -torch.linalg.solve(A, Af @ z + Cf.T @ x + af)  # ∇_z f = Āf z + C̄fᵀ x + āf
        return Bf @ x + Cf @ z + bf + C @ v  # ∇_x f + C̄ v

    def metric(self, x: Tensor) -> float:
        return float(self.grad_h(x).norm() ** 2)


STRATEGIES: dict[str, Callable[[], Any]] = {
    "Neumann(auto)": lambda: bilevel.Neumann(steps=10, alpha="auto"),
    "CG": lambda: bilevel.ConjugateGradient(maxiter=10),
    "CG, warm": lambda: bilevel.ConjugateGradient(maxiter=10, warm_start=True),
    "Nystrom": lambda: bilevel.Nystrom(rank=10, damping=0.1),
    "Penalty": lambda: bilevel.Penalty(penalty=10.0, steps=10, growth=1.0),
    "Unroll": lambda: bilevel.Unroll(steps=10),
}


def cost_per_hyperstep(info: bilevel.HypergradInfo, inner_steps: int) -> int:
    """Gradients + HVPs of one hyperstep and its inner steps (1 gradient each).

    IFT: the validation gradient, the linearisation, the products and the mixed product; Unroll: the
    replayed steps' gradients, the validation gradient and the backward through them (≈ one product
    per step); Penalty: its gradients."""
    if info.strategy == "penalty":
        return inner_steps + info.gradients
    if info.strategy == "unroll":
        return inner_steps + 2 * inner_steps + 1
    return inner_steps + 3 + info.hvps


def run(
    problem: Problem,
    name: str,
    hypersteps: int,
    inner_steps: int,
    batch: int | None,
    seed: int,
    inner_lr: float = 0.5,
    outer_lr: float = 0.5,
) -> dict:
    """One BilevelOptimizer run; the metric, wall time and gradient+HVP count after every hyperstep."""
    n, d = len(problem.g.u), problem.g.u.shape[1]
    gen = torch.Generator().manual_seed(seed)
    full = slice(0, n)
    opt = bilevel.BilevelOptimizer(
        problem.train_loss, problem.val_loss, {"z": torch.zeros(d, dtype=torch.float64)},
        {"x": torch.zeros(d, dtype=torch.float64)}, inner=torchopt.sgd(inner_lr), outer=torchopt.sgd(outer_lr),
        strategy=STRATEGIES[name](), inner_steps=inner_steps, seed=seed,
    )  # fmt: skip
    trace = {"metric": [problem.metric(opt.hparams["x"])], "seconds": [0.0], "oracles": [0]}
    elapsed, oracles = 0.0, 0
    for _ in range(hypersteps):
        start = time.perf_counter()
        for _ in range(inner_steps):
            if batch is None:
                train, val = full, full
            else:
                train = torch.randint(0, n, (batch,), generator=gen)
                val = torch.randint(0, n, (batch,), generator=gen)
            result = opt.step(train, val)
        elapsed += time.perf_counter() - start
        assert result.hyper is not None
        oracles += cost_per_hyperstep(result.hyper, inner_steps)
        trace["metric"].append(problem.metric(opt.hparams["x"]))
        trace["seconds"].append(elapsed)
        trace["oracles"].append(oracles)
    trace["skipped"] = opt.skipped_outer_steps
    return trace


MINI_BATCH = 64
OUTER_GRID = (0.03, 0.01)  # mini-batch outer step sizes; each strategy gets its best (benchopt's practice)
MINI_INNER_LR = 0.1


def step_sizes(problem: Problem) -> tuple[float, float]:
    """Full batch: 1/L of each level, L = λ_max of Ā (inner) and of ∇²h (outer): known exactly here."""
    A = problem.g.dense[0]
    return 1.0 / float(torch.linalg.eigvalsh(A)[-1]), 1.0 / float(torch.linalg.eigvalsh(problem.value_hessian())[-1])


def _median(traces: list[dict], key: str) -> list[float]:
    return [statistics.median(t[key][i] for t in traces) for i in range(len(traces[0][key]))]


def study(hypersteps: int, seeds: int, inner_steps: int = 10, n: int = 1024, d: int = 100) -> dict[str, Any]:
    """Every strategy, full batch and mini-batch 64, on ``seeds`` problems: median traces per strategy."""
    problems = [Problem.make(n=n, d=d, seed=s) for s in range(seeds)]
    out: dict[str, Any] = {"full batch": {}, f"mini-batch {MINI_BATCH}": {}}
    for name in STRATEGIES:
        traces = []
        for s, problem in enumerate(problems):
            inner_lr, outer_lr = step_sizes(problem)
            traces.append(run(problem, name, hypersteps, inner_steps, None, s, inner_lr, outer_lr))
        out["full batch"][name] = {k: _median(traces, k) for k in ("metric", "seconds", "oracles")}
        out["full batch"][name]["outer_lr"] = "1/L"
        best = None
        for outer_lr in OUTER_GRID:
            traces = [
                run(problem, name, hypersteps, inner_steps, MINI_BATCH, s, MINI_INNER_LR, outer_lr)
                for s, problem in enumerate(problems)
            ]
            medians = {k: _median(traces, k) for k in ("metric", "seconds", "oracles")}
            final = medians["metric"][-1]
            if best is None or (math.isfinite(final) and not final >= best["metric"][-1]):
                best = {**medians, "outer_lr": outer_lr}
        out[f"mini-batch {MINI_BATCH}"][name] = best
    return out


def _value(m: float | None) -> float:
    return math.inf if m is None or not math.isfinite(m) else m  # (None: a non-finite value through JSON)


def _first_reach(trace: dict, target: float) -> float:
    """Seconds at which ``trace``'s metric first fell to ``target`` (inf if never)."""
    return next((t for t, m in zip(trace["seconds"], trace["metric"]) if _value(m) <= target), math.inf)


def _at(trace: dict, seconds: float) -> float:
    """The metric at the last hyperstep finished by ``seconds``."""
    return _value([m for t, m in zip(trace["seconds"], trace["metric"]) if t <= seconds][-1])


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per mode: every strategy's ‖∇h‖² at the wall time the fastest run took for all its hypersteps (the
    budget all of them had), ranked by it; how far ahead the winner is there, and how much sooner it
    reached the runner-up's value; and each one's final value after all hypersteps."""
    out = {}
    for mode, runs in result.items():
        budget = min(run["seconds"][-1] for run in runs.values())
        at_budget = {name: _at(run, budget) for name, run in runs.items()}
        ranked = sorted(runs, key=lambda k: at_budget[k])
        first, second = ranked[0], ranked[1]
        target = at_budget[second]
        out[mode] = {
            "budget_seconds": budget,
            "ranking": ranked,
            "at_budget": {k: at_budget[k] for k in ranked},
            "final_metric": {k: _value(runs[k]["metric"][-1]) for k in ranked},
            "seconds": {k: runs[k]["seconds"][-1] for k in ranked},
            "oracles": {k: runs[k]["oracles"][-1] for k in ranked},
            "outer_lr": {k: runs[k]["outer_lr"] for k in ranked},
            "winner": first,
            "runner_up": second,
            "margin": target / at_budget[first],
            "speedup": _first_reach(runs[second], target) / _first_reach(runs[first], target),
        }
    return out


def plot(result: dict[str, Any], path: Any) -> None:
    """‖∇h(x_t)‖² (median over seeds) against seconds and against gradient+HVP count, one row per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(result), 2, figsize=(11, 4 * len(result)), squeeze=False)
    for row, (mode, runs) in zip(axes, result.items()):
        for name, trace in runs.items():
            metric = [m if math.isfinite(m) and m < 1e6 else float("nan") for m in trace["metric"]]
            for ax, x in zip(row, ("seconds", "oracles")):
                ax.semilogy(trace[x], metric, label=name)
        for ax, x in zip(row, ("wall time [s]", "gradients + HVPs")):
            ax.set_xlabel(x)
            ax.set_ylabel("‖∇h(x)‖²")
            ax.set_title(mode)
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
