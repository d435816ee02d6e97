"""The measurements behind each key of bench.json, one function per key.

Every function returns a record ``{"value", "unit", "goal", "met", "details"}``; ``value`` is the
headline number, ``details`` the per-problem numbers it was taken from. Times are medians over
interleaved rounds (see :mod:`benchmarks.timing`); memory comes from :mod:`benchmarks.memory`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torchopt

import bilevel
from benchmarks import baselines, cases, inrun, memory, problems, quadratic, timing
from benchmarks.problems import Problem

ALPHA = 1e-3  # Neumann step for the timing cases: small enough that 100 terms stay finite at init
K = 20
# The synthetic MLPs are untrained, so their Hessians are indefinite: CG(K) there ends worse than no solve
# and bilevel refuses it before its mixed product, which would time less work than the limit counts and make
# the comparison with torchopt's (accepted) solve meaningless. Damping 1 makes the systems positive definite
# (relative residual 2e-10 after 20 iterations on the 536k MLP, against 9.1 undamped); torchopt's CG gets
# the same ridge.
CG_DAMPING = 1.0


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and effort of one run (``--quick`` or full)."""

    quick: bool
    mlps: tuple[tuple[int, ...], ...]
    batch: int
    cnn_batch: int
    mid: tuple[int, ...]  # the problem for the single-problem comparisons
    unroll_widths: tuple[int, ...]
    unroll_batch: int
    unroll_steps: tuple[int, ...]
    unroll_mem_steps: tuple[int, ...]
    tta_widths: tuple[int, ...]
    quadratic: tuple[int, int, int, int]  # hypersteps, seeds, n, d of benchopt's quadratic
    rounds: int
    min_time: float
    threads: int
    device: str

    @classmethod
    def make(cls, mode: str, threads: int, device: str) -> Config:
        """``mode``: "full", "quick" (~3.5 min) or "tiny" (seconds; for the smoke test only)."""
        large = (784, 1024, 256, 10)  # 1 068 810 params and as many hparams
        mid = (784, 512, 256, 10)  # the MLP of the higher measurement
        common = {"threads": threads, "device": device}
        if mode == "tiny":
            tiny = (16, 8, 4)
            mem = (256, 128, 10)  # memory cases need tensors above the 64 KiB mmap threshold to register
            return cls(
                quick=True,
                mlps=(tiny,),
                batch=64,
                cnn_batch=2,
                mid=mem,
                unroll_widths=mem,
                unroll_batch=64,
                unroll_steps=(2,),
                unroll_mem_steps=(2, 3),
                tta_widths=(8, 3),
                quadratic=(3, 1, 64, 16),
                rounds=1,
                min_time=0.0,
                **common,
            )
        if mode == "quick":
            small = (784, 128, 10)
            return cls(
                quick=True,
                mlps=(small, large),
                batch=64,
                cnn_batch=16,
                mid=small,
                unroll_widths=small,
                unroll_batch=128,
                unroll_steps=(5, 20),
                unroll_mem_steps=(2, 20),
                tta_widths=(64, 10),
                quadratic=(60, 3, 1024, 100),
                rounds=3,
                min_time=0.03,
                **common,
            )
        if mode != "full":
            raise ValueError(f"`mode={mode!r}`: expected 'full', 'quick' or 'tiny'.")
        return cls(
            quick=False,
            mlps=((784, 128, 10), mid, large),
            batch=256,
            cnn_batch=64,
            mid=mid,
            unroll_widths=mid,
            unroll_batch=512,
            unroll_steps=(5, 20),
            unroll_mem_steps=(2, 10, 20, 50),
            tta_widths=(784, 10),
            quadratic=(200, 5, 1024, 100),
            rounds=5,
            min_time=0.2,
            **common,
        )

    @property
    def tiny(self) -> bool:
        return self.rounds == 1 and self.min_time == 0.0

    def problem(self, kind: str, widths: tuple[int, ...] = (), batch: int | None = None, **kw: Any) -> Problem:
        return problems.make(kind, widths or self.mid, batch or self.batch, device=self.device, **kw)


def record(value: float, unit: str, goal: str | None, met: bool | None, **details: Any) -> dict[str, Any]:
    return {"value": value, "unit": unit, "goal": goal, "met": met, "details": details}


def _div(a: float, b: float) -> float:
    """a / b, or NaN (null in the JSON) when b is not positive (a case too small to register)."""
    return a / b if b > 0 else math.nan


# ------------------------------------------------------------------------------ 1. overhead
def overhead(cfg: Config, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ours vs the sum of separately timed primitives, per problem; also feeds max_hparams."""
    rows: dict[str, Any] = {}
    shapes = [("mlp", w) for w in cfg.mlps] + ([] if cfg.tiny else [("cnn", ())])
    for kind, widths in shapes:
        problem = cfg.problem(kind, widths, cfg.cnn_batch if kind == "cnn" else cfg.batch)
        log(f"overhead: {problem.name}")
        prim = cases.Primitives(problem)
        fns = prim.fns()
        fns["neumann"] = cases.ours(problem, bilevel.Neumann(steps=K, alpha=ALPHA))
        fns["cg"] = cases.ours(problem, bilevel.ConjugateGradient(maxiter=K, tol=0.0, damping=CG_DAMPING))
        samples = timing.interleaved(fns, cfg.rounds, cfg.min_time)
        rows[problem.name] = {
            "params": problem.size,
            "neumann": timing.ratio(samples, lambda t: t["neumann"], lambda t: cases.Primitives.limit(t, K - 1)),
            "cg": timing.ratio(samples, lambda t: t["cg"], lambda t: cases.Primitives.limit(t, K)),
            "neumann_over_tight": timing.ratio(
                samples, lambda t: t["neumann"], lambda t: cases.Primitives.tight_limit(t, K - 1)
            ),
            "cg_over_tight": timing.ratio(samples, lambda t: t["cg"], lambda t: cases.Primitives.tight_limit(t, K)),
            "limits_ms": {
                k: 1e3 * v
                for k, v in cases.Primitives.limits({k: timing.median(v) for k, v in samples.items()}, K - 1).items()
            },
            "ms": timing.ms(samples),
        }
    worst = max(max(r["neumann"], r["cg"]) for r in rows.values())
    largest = max(rows, key=lambda k: rows[k]["params"])
    big = rows[largest]
    rec = record(worst, "ratio (worst problem, Neumann and CG)", "≤ 1.05", worst <= 1.05, K=K, problems=rows)
    maxh = record(
        float(big["params"]),
        "hyperparameters",
        "≥ 1 000 000",
        big["params"] >= 1_000_000,
        problem=largest,
        neumann20_ms=big["ms"]["neumann"],
        cg20_ms=big["ms"]["cg"],
        forward_backward_ms=big["ms"]["grad_val"],
    )
    return rec, maxh


# ------------------------------------------------------------------------- 2. torchopt
def torchopt_ratio(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    problem = cfg.problem("mlp")
    log(f"torchopt at equal iterations: {problem.name}")
    ls = torchopt.linear_solve
    fns = {
        "ours_neumann": cases.ours(problem, bilevel.Neumann(steps=K, alpha=ALPHA)),
        "torchopt_ns": cases.torchopt_implicit(problem, ls.solve_inv(ns=True, maxiter=K - 1, alpha=ALPHA)),
        "ours_cg": cases.ours(problem, bilevel.ConjugateGradient(maxiter=K, tol=0.0, damping=CG_DAMPING)),
        "torchopt_cg": cases.torchopt_implicit(problem, ls.solve_cg(maxiter=K, rtol=0.0, atol=0.0, ridge=CG_DAMPING)),
        "torchopt_normal_cg": cases.torchopt_implicit(problem, ls.solve_normal_cg(maxiter=K, rtol=0.0, atol=0.0)),
    }
    grads = {k: f() for k, f in fns.items()}
    diffs = {
        "ns_vs_neumann": cases.rel_diff(grads["torchopt_ns"], grads["ours_neumann"]),
        "cg_vs_cg": cases.rel_diff(grads["torchopt_cg"], grads["ours_cg"]),
        "normal_cg_vs_cg": cases.rel_diff(grads["torchopt_normal_cg"], grads["ours_cg"]),
    }
    samples = timing.interleaved(fns, cfg.rounds, cfg.min_time)
    ratios = {
        "ns_over_neumann": timing.ratio(samples, lambda t: t["torchopt_ns"], lambda t: t["ours_neumann"]),
        "cg_over_cg": timing.ratio(samples, lambda t: t["torchopt_cg"], lambda t: t["ours_cg"]),
        "normal_cg_over_cg": timing.ratio(samples, lambda t: t["torchopt_normal_cg"], lambda t: t["ours_cg"]),
    }
    value = min(ratios["ns_over_neumann"], ratios["cg_over_cg"])
    return record(
        value,
        "torchopt time / ours, equal iterations (worse of Neumann, CG)",
        "≥ 1.0",
        value >= 1.0,
        problem=problems.spec(problem),
        K=K,
        ratios=ratios,
        rel_diff=diffs,
        ms=timing.ms(samples),
    )


# ------------------------------------------------------------------- 2b. time to accuracy
def time_to_accuracy(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """Fastest configuration reaching cosine ≥ 0.99 with the converged hypergradient, ours vs torchopt."""
    target = 0.99
    log("time to accuracy: training the inner problem and a float64 CG reference")
    # Multinomial logistic regression (an MLP without hidden layer): L_T is convex, so the float64
    # CG reference converges. On the hidden-layer MLPs the trained Hessian is indefinite and even
    # float64 CG needs > 1000 iterations (docs/benchmarks.md).
    ref_problem = cfg.problem("mlp", cfg.tta_widths, log_decay=math.log(1e-2), dtype=torch.float64)
    problems.train(ref_problem, 300 if cfg.quick else 1000, lr=3e-3)
    reference, ref_info = bilevel.hypergradient(
        ref_problem.train_loss,
        ref_problem.val_loss,
        ref_problem.params,
        ref_problem.hparams,
        ref_problem.train_batch,
        ref_problem.val_batch,
        bilevel.ConjugateGradient(maxiter=5000, tol=1e-10),
    )
    problem = dataclasses.replace(
        ref_problem,
        params={k: v.float() for k, v in ref_problem.params.items()},
        hparams={k: v.float() for k, v in ref_problem.hparams.items()},
        train_batch=(ref_problem.train_batch[0].float(), ref_problem.train_batch[1]),
        val_batch=(ref_problem.val_batch[0].float(), ref_problem.val_batch[1]),
    )
    grad_norm = float(
        cases.flat(torch.func.grad(problem.train_loss)(problem.params, problem.hparams, problem.train_batch)).norm()
    )
    # λ_max of H, given to torchopt's Neumann for free (ours pays for its power iteration)
    _, info = bilevel.hypergradient(
        problem.train_loss,
        problem.val_loss,
        problem.params,
        problem.hparams,
        problem.train_batch,
        problem.val_batch,
        bilevel.Neumann(steps=1, alpha="auto", power_iters=50),
    )
    alpha_star = float(info.alpha)
    ls = torchopt.linear_solve
    grid = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    tols = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 1e-3)
    families: dict[str, list[tuple[str, Callable[[], Any]]]] = {
        "ours: CG(maxiter=m)": [(f"m={m}", cases.ours(problem, bilevel.ConjugateGradient(m, tol=0.0))) for m in grid],
        "ours: CG(tol=t)": [(f"tol={t}", cases.ours(problem, bilevel.ConjugateGradient(1000, tol=t))) for t in tols],
        "ours: Neumann(K, 'auto', power_iters=5)": [
            (f"K={k}", cases.ours(problem, bilevel.Neumann(k, "auto", power_iters=5))) for k in grid
        ],
        "ours: Neumann(K, 'auto', power_iters=10)": [
            (f"K={k}", cases.ours(problem, bilevel.Neumann(k, "auto", power_iters=10))) for k in grid
        ],
        "torchopt: solve_cg(maxiter=m)": [
            (f"m={m}", cases.torchopt_implicit(problem, ls.solve_cg(maxiter=m, rtol=0.0, atol=0.0))) for m in grid
        ],
        "torchopt: solve_cg(rtol=t)": [
            (f"rtol={t}", cases.torchopt_implicit(problem, ls.solve_cg(maxiter=1000, rtol=t))) for t in tols
        ],
        "torchopt: solve_normal_cg(maxiter=m)": [
            (f"m={m}", cases.torchopt_implicit(problem, ls.solve_normal_cg(maxiter=m, rtol=0.0, atol=0.0)))
            for m in grid
        ],
        "torchopt: solve_inv(ns=True, alpha=1/λ_max given)": [
            (f"K={k}", cases.torchopt_implicit(problem, ls.solve_inv(ns=True, maxiter=k - 1, alpha=alpha_star)))
            for k in grid
        ],
    }
    winners: dict[str, Callable[[], Any]] = {}
    found: dict[str, Any] = {}
    for family, configs in families.items():
        found[family] = None
        for label, fn in configs:
            cos = cases.cosine(fn(), reference)
            if cos >= target:
                winners[family] = fn
                found[family] = {"config": label, "cosine": cos}
                break
    samples = timing.interleaved(winners, cfg.rounds, cfg.min_time) if winners else {}
    ms = timing.ms(samples)
    for family, t in ms.items():
        found[family]["ms"] = t
    ours_keys = [k for k in winners if k.startswith("ours")]
    peer_keys = [k for k in winners if k.startswith("torchopt")]
    if ours_keys and peer_keys:
        value = timing.ratio(samples, lambda t: min(t[k] for k in peer_keys), lambda t: min(t[k] for k in ours_keys))
    else:
        value = math.nan
    return record(
        value,
        "torchopt's best time / ours to cosine ≥ 0.99",
        "≥ 2.0",
        value >= 2.0,
        problem=problems.spec(problem),
        train_grad_norm=grad_norm,
        reference={
            "strategy": "float64 CG, tol 1e-10",
            "iterations": ref_info.iterations,
            "converged": ref_info.converged,
        },
        alpha_given_to_torchopt=alpha_star,
        families=found,
    )


# -------------------------------------------------------------------- 3. unroll vs higher
def unroll_vs_higher(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    lr = 0.05
    problem = cfg.problem("mlp", cfg.unroll_widths, cfg.unroll_batch)
    shape = {"kind": "mlp", "widths": list(cfg.unroll_widths), "batch": cfg.unroll_batch}
    rows: dict[str, Any] = {}
    peer, peer_case = "higher", "higher"
    try:  # the peer is optional: without it, the plain-autograd loop stands in, labelled as such
        import higher  # noqa: F401
    except Exception as error:  # any import failure means "not usable here"
        peer, peer_case = f"plain autograd unroll (higher unusable: {type(error).__name__}: {error})", "autograd_unroll"
        log(f"higher unusable ({error!r}); comparing with the plain-autograd unroll instead")
    for steps in cfg.unroll_steps:
        log(f"unroll vs higher: {problem.name}, K={steps}")
        fns = {
            "ours": cases.ours(problem, bilevel.Unroll(steps, torchopt.sgd(lr=lr))),
            "higher": cases.build(problem, {"case": peer_case, "steps": steps, "lr": lr}),
            "autograd": cases.autograd_unroll(problem, steps, lr),
        }
        diff = cases.rel_diff(fns["ours"](), fns["higher"]())
        samples = timing.interleaved(fns, cfg.rounds, cfg.min_time)
        mem = {
            name: memory.measure(
                {"case": case, "steps": steps, "lr": lr, "problem": shape, "threads": cfg.threads, "device": cfg.device}
            )
            for name, case in (("ours", "unroll"), ("higher", peer_case), ("autograd", "autograd_unroll"))
        }
        rows[f"K={steps}"] = {
            "time_ratio": timing.ratio(samples, lambda t: t["ours"], lambda t: t["higher"]),
            "memory_ratio": _div(mem["ours"], mem["higher"]),
            "autograd_time_ratio": timing.ratio(samples, lambda t: t["autograd"], lambda t: t["higher"]),
            "autograd_memory_ratio": _div(mem["autograd"], mem["higher"]),
            "rel_diff_vs_higher": diff,
            "ms": timing.ms(samples),
            "peak_mib": mem,
        }
    both = [v for r in rows.values() for v in (r["time_ratio"], r["memory_ratio"])]
    value = math.nan if any(math.isnan(v) for v in both) else max(both)
    return record(
        value,
        f"ours / {'higher' if peer == 'higher' else 'plain-autograd unroll (higher unusable; see details.peer)'} "
        f"(worse of time and peak memory, K ∈ {{{', '.join(map(str, cfg.unroll_steps))}}})",
        "≤ 1.0",
        value <= 1.0,
        problem=problems.spec(problem),
        peer=peer,
        lr=lr,
        steps=rows,
    )


# ---------------------------------------------------------------------- 4. Neumann memory
def neumann_mem_ratio(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    shape = {"kind": "mlp", "widths": list(cfg.mid), "batch": cfg.batch}
    name = problems.make("mlp", cfg.mid, 2).name
    log(f"memory against K: {name}")

    def peak(case: str, steps: int) -> float:
        return memory.measure(
            {
                "case": case,
                "steps": steps,
                "alpha": ALPHA,
                "lr": 0.05,
                "problem": shape,
                "threads": cfg.threads,
                "device": cfg.device,
            }
        )

    neumann = {k: peak("neumann", k) for k in (2, 100)}
    cg = {k: peak("cg", k) for k in (2, 100)} if not cfg.tiny else {}
    unroll = {k: peak("unroll", k) for k in cfg.unroll_mem_steps}
    value = _div(neumann[100], neumann[2])
    return record(
        value,
        "peak memory Neumann(K=100) / Neumann(K=2)",
        "≤ 1.10",
        value <= 1.10,
        problem=name,
        batch=cfg.batch,
        method=memory.METHOD_CUDA if cfg.device.startswith("cuda") else memory.METHOD_CPU,
        peak_mib={"neumann": neumann, "cg": cg, "unroll": unroll},
        **({"cg_ratio": _div(cg[100], cg[2])} if cg else {}),
        unroll_ratio_per_step=(unroll[max(unroll)] - unroll[min(unroll)]) / (max(unroll) - min(unroll)),
    )


# --------------------------------------------------------------------- 5. step overhead
def step_overhead_ratio(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """``BilevelOptimizer.inner_step`` against the loop users have: ``loss.backward()`` +
    ``torch.optim.Adam(foreach=True)`` on the same module and the same loss."""
    goals = {(64, 50, 10): 1.10, (784, 1024, 256, 10): 1.05}
    sizes = [((16, 8, 4), 64)] if cfg.tiny else [((64, 50, 10), 100), ((784, 1024, 256, 10), 256)]
    rows = {}
    for widths, batch in sizes:
        problem = cfg.problem("mlp", widths, batch)
        log(f"inner step vs plain PyTorch: {problem.name}")
        n = 10
        fns = {"ours": baselines.bilevel_inner_steps(problem, n), "plain": baselines.plain_steps(problem, n)}
        samples = timing.interleaved(fns, cfg.rounds, cfg.min_time)
        ratio = timing.ratio(samples, lambda t: t["ours"], lambda t: t["plain"])
        goal = goals.get(widths)
        rows[problem.name] = {
            "ratio": ratio,
            "goal": goal,
            "met": None if goal is None else ratio <= goal,
            "ms_per_step": {k: v / n for k, v in timing.ms(samples).items()},
        }
    value = max(r["ratio"] for r in rows.values())
    met = [r["met"] for r in rows.values() if r["met"] is not None]
    return record(
        value,
        "BilevelOptimizer.inner_step / plain PyTorch step (Adam, foreach), worst problem",
        "≤ 1.10 (MLP 64-50-10, batch 100), ≤ 1.05 (MLP 784-1024-256-10, batch 256)",
        all(met) if met else None,
        problems=rows,
    )


def decay_step_ratio(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """An inner step with one weight decay per tensor by ``bilevel.weight_decay`` against plain PyTorch with
    ``torch.optim``'s built-in ``weight_decay`` (the same gradient), on a 26-tensor BatchNorm + dropout
    ResNet on digits; beside it, the naive hand-written decay sum."""
    batch, n = (8, 2) if cfg.tiny else (64, 5)
    log(f"inner step with weight_decay vs torch.optim's: digits ResNet, batch {batch}")
    fns = baselines.decay_cases(batch, n)
    samples = timing.interleaved(fns, cfg.rounds, cfg.min_time)
    ratio = timing.ratio(samples, lambda t: t["ours"], lambda t: t["plain"])
    naive = timing.ratio(samples, lambda t: t["ours_naive"], lambda t: t["plain"])
    return record(
        ratio,
        "inner step with bilevel.weight_decay / plain step with torch.optim.Adam(weight_decay=...), 26-tensor ResNet",
        "≤ 1.05",
        ratio <= 1.05,
        naive_sum_ratio=naive,
        ms_per_step={k: v / n for k, v in timing.ms(samples).items()},
    )


def algorithm1_vs_handwritten(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """A whole Algorithm-1 run (hypersteps × [10 Adam steps + Neumann(5 terms, fixed α)]) against the same
    run hand-written with autograd double backward and torch.optim; and one hyperstep alone."""
    widths, batch = ((16, 8, 4), 64) if cfg.tiny else ((64, 50, 10), 100)
    problem = cfg.problem("mlp", widths, batch)
    hypersteps = 2 if cfg.tiny else 20
    log(f"Algorithm 1 vs hand-written: {problem.name}")
    fns = {
        "ours": baselines.bilevel_run(problem, hypersteps, 10, 5, ALPHA),
        "hand": baselines.handwritten_run(problem, hypersteps, 10, 5, ALPHA),
    }
    diff = cases.rel_diff([fns["ours"]()], [fns["hand"]()])
    samples = timing.interleaved(fns, cfg.rounds, cfg.min_time)
    run_ratio = timing.ratio(samples, lambda t: t["ours"], lambda t: t["hand"])
    hyper = baselines.hyperstep_only(problem, 5, ALPHA)
    hyper_samples = timing.interleaved(hyper, cfg.rounds, cfg.min_time)
    hyper_ratio = timing.ratio(hyper_samples, lambda t: t["ours"], lambda t: t["hand"])
    return record(
        run_ratio,
        f"time of {hypersteps} × (10 inner steps + 1 hyperstep), ours / hand-written autograd + torch.optim",
        "≤ 1.10 (whole run); ≤ 1.05 (hyperstep alone)",
        run_ratio <= 1.10 and hyper_ratio <= 1.05,
        problem=problems.spec(problem),
        hyperstep_ratio=hyper_ratio,
        rel_diff_of_first_hparam=diff,
        ms=timing.ms(samples),
        hyperstep_ms=timing.ms(hyper_samples),
    )


def betty_ratio(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """Betty (betty-ml, ImplicitProblem + Engine, its Neumann) on the digits per-weight-decay task."""
    hypersteps = 2 if cfg.tiny else 20
    shape = {"hypersteps": hypersteps, "inner": 10, "neumann_hvps": 5, "alpha": 1e-2, "hidden": 50}
    try:
        from importlib import metadata

        version = metadata.version("betty-ml")
        fns = {"ours": baselines.ours_digits(**shape), "betty": baselines.betty_digits(**shape)}
        fns["betty"]()  # one run here: a Betty that imports but fails to run must not end the whole benchmark
    except Exception as error:  # the peer is optional
        log(f"Betty unusable ({error!r})")
        return record(math.nan, "Betty time / ours", None, None, peer=f"unusable: {error!r}")
    # the floor both are measured against: the same run hand-written with torch.optim and double backward
    module, train, val = baselines.digits_task(shape["hidden"])
    params = {k: v.detach() for k, v in module.named_parameters()}
    digits = Problem("digits", module, params, {k: torch.full_like(v, math.log(1e-3)) for k, v in params.items()},
                     train, val)  # fmt: skip
    fns["hand"] = baselines.handwritten_run(digits, hypersteps, 10, shape["neumann_hvps"] + 1, shape["alpha"])
    log(f"Betty vs ours: digits, MLP 64-50-10, {hypersteps} hypersteps")
    samples = timing.interleaved(fns, cfg.rounds, cfg.min_time)
    value = timing.ratio(samples, lambda t: t["betty"], lambda t: t["ours"])
    return record(
        value,
        f"Betty {version} time / ours, {hypersteps} × (10 Adam steps + Neumann with 5 HVPs), digits MLP 64-50-10",
        "≥ 1.2",
        value >= 1.2,
        task=shape,
        ms=timing.ms(samples),
        betty_over_hand=timing.ratio(samples, lambda t: t["betty"], lambda t: t["hand"]),
        ours_over_hand=timing.ratio(samples, lambda t: t["ours"], lambda t: t["hand"]),
    )


def bn_dropout_overhead(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """The cost of model state: a BatchNorm + dropout CNN through FunctionalModule and ``state=``,
    against plain PyTorch training of the same module, beside the same comparison without state."""
    batch = 8 if cfg.tiny else 64
    plain_cnn, bn_cnn, data = baselines.bn_dropout_problem(batch)
    log(f"BatchNorm/dropout overhead: CNN, batch {batch}")
    n = 5
    rows = {}
    for name, module in (("without state", plain_cnn), ("BatchNorm + dropout", bn_cnn)):
        fns = baselines.module_cases(module, data, n)
        samples = timing.interleaved(fns, cfg.rounds, cfg.min_time)
        ms = timing.ms(samples)
        rows[name] = {
            "ratio": timing.ratio(samples, lambda t: t["ours"], lambda t: t["plain"]),
            "extra_forward_passes": (ms["ours"] - ms["plain"]) / n / ms["forward"],
            "ms_per_step": {"ours": ms["ours"] / n, "plain": ms["plain"] / n, "one_forward": ms["forward"]},
        }
    extra = rows["BatchNorm + dropout"]["extra_forward_passes"] - rows["without state"]["extra_forward_passes"]
    return record(
        extra,
        "extra cost of model state per inner step, in forward passes of the model (BN+dropout minus stateless)",
        "≤ 1",
        extra <= 1.0,
        models=rows,
    )


# -------------------------------------------------------------------------- 6. HVP modes
def hvp_modes(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    problem = cfg.problem("mlp")
    log(f"HVP modes: {problem.name}")
    modes = {
        "reverse": bilevel.ReverseHVP(),
        "forward_over_reverse": bilevel.ForwardOverReverseHVP(),
        "finite_difference": bilevel.FiniteDifferenceHVP(),
    }
    fns = {k: cases.ours(problem, bilevel.Neumann(steps=K, alpha=ALPHA, hvp=m)) for k, m in modes.items()}
    grads = {k: f() for k, f in fns.items()}
    samples = timing.interleaved(fns, cfg.rounds, cfg.min_time)
    ratios = {k: timing.ratio(samples, lambda t, k=k: t[k], lambda t: t["reverse"]) for k in fns}
    return record(
        ratios["forward_over_reverse"],
        "time forward-over-reverse / reverse-over-reverse, Neumann(20)",
        None,
        None,
        problem=problems.spec(problem),
        ratio_to_reverse=ratios,
        ms=timing.ms(samples),
        rel_diff_to_reverse={k: cases.rel_diff(g, grads["reverse"]) for k, g in grads.items()},
    )


# ------------------------------------------------------------- 8. bilevel vs plain training
def bilevel_vs_plain_training(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    problem = cfg.problem("mlp")
    log(f"bilevel vs plain training: {problem.name}")
    n = 10
    fns = {
        "bilevel": cases.optimizer_steps(problem, n, torchopt.adam(1e-4), bilevel.Neumann(5, ALPHA), n),
        "plain": cases.plain_steps(problem, n, torchopt.adam(1e-4)),
    }
    samples = timing.interleaved(fns, cfg.rounds, cfg.min_time)
    value = timing.ratio(samples, lambda t: t["bilevel"], lambda t: t["plain"])
    return record(
        value,
        "time of 10 inner steps + 1 Neumann(5) hyperstep / 10 plain steps",
        "a few (paper)",
        None,
        problem=problems.spec(problem),
        ms=timing.ms(samples),
    )


# ------------------------------------------------------------- 9. HVPs to accuracy in a run
def quadratic_bilevel(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """benchopt's simulated quadratic: ‖∇h(x_t)‖² of every strategy in a BilevelOptimizer, full batch and
    mini-batch 64, median over seeds (see :mod:`benchmarks.quadratic`)."""
    hypersteps, seeds, n, d = cfg.quadratic
    log(f"benchopt's quadratic (n = {n}, d = {d}): {hypersteps} hypersteps × {seeds} seeds per strategy and mode")
    traces = quadratic.study(hypersteps, seeds, n=n, d=d)
    summary = quadratic.summary(traces)
    full = summary["full batch"]
    return record(
        full["at_budget"][full["winner"]],
        f"‖∇h(x)‖², best strategy, full batch, at the wall time of the fastest run (median of {seeds} seeds)",
        None,
        None,
        hypersteps=hypersteps,
        seeds=seeds,
        n=n,
        d=d,
        summary=summary,
        traces=traces,
    )


def hvps_to_accuracy(cfg: Config, log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    return inrun.hvps_to_accuracy(cfg, log)
