"""How accurate are approximate hypergradients? Section 5.1, Fig. 3 and Fig. 4 of Lorraine et al. (2020).

A small tanh net on scikit-learn's diabetes data, with one weight decay per weight, is trained to
stationarity; there the hypergradients of ``Neumann``, ``ConjugateGradient``, ``Nystrom`` and
``Identity`` are compared with ``Exact``'s (cosine similarity, ℓ2 distance) as the number of
Hessian-vector products grows (Fig. 3), and Neumann's approximations of the inverse Hessian are
pictured next to the true one (Fig. 4). Setup, conventions and results:
docs/recipes/hypergradient_accuracy.md.

Run:  python recipes/hypergradient_accuracy.py [--quick] [--model mlp|linear] [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import recipe_common
import recipe_data
import torch
from torch import Tensor, nn
from torch.func import functional_call

import bilevel

NAME = "hypergradient_accuracy"
DTYPE = torch.float64  # the comparison is about the solver, not rounding: float64 throughout


# --8<-- [start:core]
def make_model(kind: str, n_in: int, hidden: int) -> nn.Module:
    """``mlp`` (the default): a 1-hidden-layer tanh net; ``linear``: the paper's linear model."""
    if kind == "linear":
        return nn.Linear(n_in, 1)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def make_losses(model: nn.Module):
    """L_T = MSE + ½ Σ e^λ w² (one log-decay per weight; exp keeps every decay > 0) and L_V = MSE."""

    def mse(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return ((functional_call(model, params, (x,)).squeeze(-1) - y) ** 2).mean()

    def train_loss(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any) -> Tensor:
        return mse(params, batch) + bilevel.weight_decay(params, hparams)

    def val_loss(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any) -> Tensor:
        return mse(params, batch)

    return train_loss, val_loss


def solve_inner(train_loss, params, hparams, batch, tol: float = 1e-12) -> tuple[dict[str, Tensor], float]:
    """(w*(λ), ‖∇_w L_T‖ there): L-BFGS to get close, then Newton steps to ‖∇_w L_T‖ ≤ tol, because the
    IFT hypergradient is exact only at a stationary point."""
    w = recipe_data.fit_lbfgs(train_loss, params, hparams, batch, 2000, history_size=50, tolerance_grad=1e-7,
                              tolerance_change=1e-9)  # fmt: skip
    loss = flat_loss(train_loss, w, hparams, batch)
    v = flat(w)
    for _ in range(20):
        grad = torch.func.grad(loss)(v)
        if float(grad.norm()) <= tol:
            break
        v = v - torch.linalg.solve(torch.func.hessian(loss)(v), grad)
    return unflatten(v, w), float(torch.func.grad(loss)(v).norm())


def accuracy_curves(train_loss, val_loss, w, h, train, val, steps: list[int], update: Callable) -> dict[str, Any]:
    """Cosine similarity and ℓ2 distance to ``Exact``'s hypergradient at w = w*(λ) of Neumann(steps=k),
    ConjugateGradient(maxiter=k) and Nystrom(rank=k) for each k in ``steps``, and of Identity;
    ``update(**status)`` reports each k."""

    def hypergrad(strategy: bilevel.Strategy, **kwargs: Any) -> tuple[Any, bilevel.HypergradInfo]:
        return bilevel.hypergradient(train_loss, val_loss, w, h, train, val, strategy, **kwargs)

    exact = flat(hypergrad(bilevel.Exact())[0])
    # α = 1/μ_max (μ_max: the library's power-iteration estimate of H's spectral radius), fixed for all k
    alpha = float(hypergrad(bilevel.Neumann(steps=1, alpha="auto", power_iters=100))[1].alpha)
    rho = float(torch.linalg.eigvalsh(dense_hessian(train_loss, w, h, train)).median())  # Nyström's damping
    size = sum(t.numel() for t in w.values())
    cosine: dict[str, list[float]] = {"neumann": [], "cg": [], "nystrom": []}
    l2: dict[str, list[float]] = {"neumann": [], "cg": [], "nystrom": []}
    for k in steps:
        methods = {"neumann": bilevel.Neumann(steps=k, alpha=alpha), "cg": bilevel.ConjugateGradient(maxiter=k)}
        if k <= size:  # a Nyström rank cannot exceed the number of weights
            methods["nystrom"] = bilevel.Nystrom(rank=k, damping=rho)
        for name, strategy in methods.items():
            c, d = compare(hypergrad(strategy, seed=0)[0], exact)
            cosine[name].append(c)
            l2[name].append(d)
        update(k=k, cos_neumann=cosine["neumann"][-1], cos_cg=cosine["cg"][-1], cos_nystrom=cosine["nystrom"][-1])
    cosine_identity, l2_identity = compare(hypergrad(bilevel.Identity(alpha=alpha))[0], exact)
    curves = {"steps": steps, "cosine": cosine, "l2": l2, "cosine_identity": cosine_identity}
    # printed and drawn, not written to results.json
    extra = {"_l2_identity": l2_identity, "_alpha": alpha, "_nystrom_damping": rho, "_exact_norm": float(exact.norm())}
    return {**curves, **extra}


# --8<-- [end:core]


# ------------------------------------------------------------------------- flat vectors and the Hessian
# A dense P×P Hessian also appears in benchmarks/inrun.py (`_hessian`). bilevel exports none (Exact's
# `bilevel._hypergradient.dense_hessian` is private and works on its HVP operator), a recipe must run
# with nothing but bilevel, recipe_common and recipe_data beside it, and benchmarks import nothing
# from recipes/: so each keeps its own few lines.


def flat(tree: dict[str, Tensor]) -> Tensor:
    """The tensors of ``tree`` concatenated into one vector, in sorted key order."""
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def unflatten(v: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`flat`: ``v`` split into tensors shaped like those of ``like``."""
    keys = sorted(like)
    parts = torch.split(v, [like[k].numel() for k in keys])
    return {k: p.reshape(like[k].shape) for k, p in zip(keys, parts)}


def flat_loss(loss: Callable, like: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any) -> Callable:
    """v ↦ loss(unflatten(v, like), hparams, batch): the loss as a function of one flat vector."""
    return lambda v: loss(unflatten(v, like), hparams, batch)


def dense_hessian(train_loss: Callable, w: dict[str, Tensor], h: dict[str, Tensor], batch: Any) -> Tensor:
    """The P×P training Hessian at w (P is tiny here: for ρ and the picture of Fig. 4).

    ``torch.func.hessian`` is fine for this tanh net; bilevel's ``Exact`` builds its Hessian from
    batched Hessian-vector products instead, because nested torch.func transforms get train-mode
    normalisation layers wrong."""
    return torch.func.hessian(flat_loss(train_loss, w, h, batch))(flat(w))


def compare(approx: dict[str, Tensor], exact: Tensor) -> tuple[float, float]:
    """(cosine similarity, ℓ2 distance) of an approximate hypergradient to the exact one."""
    g = flat(approx)
    cosine = float(torch.dot(g, exact) / (g.norm() * exact.norm()))
    return cosine, float((g - exact).norm())


# ---------------------------------------------------------------------------------------- problem


def build_problem(kind: str, hidden: int, decay: float, device: torch.device, seed: int) -> tuple[tuple, float]:
    """Diabetes split in half (train/val), a fresh model, per-weight log-decays, and w*(λ): the point
    (train_loss, val_loss, w*, λ, train, val) that bilevel.hypergradient takes, and ‖∇_w L_T(w*)‖."""
    gen = recipe_common.seed_everything(seed)
    x, y = recipe_data.load_diabetes()
    x, y = x.to(DTYPE), y.to(DTYPE)
    perm = torch.randperm(len(x), generator=gen)
    half = len(x) // 2
    train = (x[perm[:half]].to(device), y[perm[:half]].to(device))
    val = (x[perm[half:]].to(device), y[perm[half:]].to(device))
    model = make_model(kind, x.shape[1], hidden).to(device=device, dtype=DTYPE)
    params = {k: v.detach() for k, v in model.named_parameters()}
    # Per-weight decays spread over two orders of magnitude around `decay`, so that the
    # hypergradient has structure worth approximating.
    hparams = {
        k: (math.log(decay) + torch.randn(v.shape, generator=gen, dtype=DTYPE)).to(device) for k, v in params.items()
    }
    train_loss, val_loss = make_losses(model)
    w_star, grad_norm = solve_inner(train_loss, params, hparams, train)
    return (train_loss, val_loss, w_star, hparams, train, val), grad_norm


# --------------------------------------------------------------------------------------- Fig. 3


def plot_curves(curves: dict[str, Any], path: Path, title: str) -> None:
    fig, (ax_cos, ax_l2) = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = curves["steps"]
    # x = Hessian-vector products: Neumann(steps=k) uses k − 1 of them, ConjugateGradient(maxiter=k) and
    # Nystrom(rank=k) k (Nyström's in one batched call).
    hvps = {"neumann": [k - 1 for k in steps], "cg": steps, "nystrom": steps[: len(curves["cosine"]["nystrom"])]}
    for name, label, style in (
        ("neumann", "Neumann(steps=k): k − 1 HVPs", "-o"),
        ("cg", "CG(maxiter=k): k HVPs", "-s"),
        ("nystrom", f"Nystrom(rank=k, ρ={curves['_nystrom_damping']:.2g}): k HVPs", "-^"),
    ):
        ax_cos.plot(hvps[name], curves["cosine"][name], style, ms=3, label=label)
        ax_l2.plot(hvps[name], curves["l2"][name], style, ms=3, label=label)
    ax_cos.axhline(curves["cosine_identity"], color="grey", ls="--", label="Identity: 0 HVPs")
    ax_l2.axhline(curves["_l2_identity"], color="grey", ls="--", label="Identity: 0 HVPs")
    ax_cos.set(xlabel="Hessian-vector products", ylabel="cosine similarity to exact", title="direction")
    ax_l2.set(xlabel="Hessian-vector products", ylabel="ℓ2 distance to exact", yscale="log", title="distance")
    ax_cos.legend()
    ax_l2.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------- Fig. 4


def neumann_matrices(hessian: Tensor, alpha: float, terms: list[int]) -> dict[int, Tensor]:
    """α Σ_{j<k} (I − αH)^j for each k in ``terms`` (the matrix Algorithm 3 applies to a vector)."""
    eye = torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    power, total, out = eye, torch.zeros_like(hessian), {}
    for j in range(max(terms)):
        total = total + power  # Σ_{i≤j} (I − αH)^i
        power = power @ (eye - alpha * hessian)
        if j + 1 in terms:
            out[j + 1] = alpha * total
    return out


def plot_inverse(point: tuple, terms: list[int], path: Path) -> dict[str, float]:
    train_loss, _, w, h, train, _ = point
    hessian = dense_hessian(train_loss, w, h, train)
    eigs = torch.linalg.eigvalsh(hessian)
    alpha = 1.0 / float(eigs.max())
    inverse = torch.linalg.inv(hessian)
    approx = neumann_matrices(hessian, alpha, terms)
    # tanh(M / s) with s = the median |diagonal entry| of each panel's own matrix: the diagonal
    # saturates and the off-diagonal structure stays visible. Each panel has its own s because the
    # picture is about structure (a few Neumann terms are far smaller than H⁻¹ in magnitude: the
    # one-term series is just αI); the relative errors printed by main() compare magnitudes.
    panels = [("true $H^{-1}$", inverse)] + [
        (f"Neumann, {k} term{'s' if k > 1 else ''} ({k - 1} HVPs)", approx[k]) for k in terms
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.9), layout="constrained")
    for ax, (label, matrix) in zip(axes, panels):
        scale = float(matrix.diagonal().abs().median())
        ax.imshow(torch.tanh(matrix / scale).cpu().numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(f"{label}\ns = {scale:.3g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"tanh(M / s) for a 1-hidden-layer net ({len(hessian)} weights)", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    errors = {k: float((m - inverse).norm() / inverse.norm()) for k, m in approx.items()}
    return {
        "lambda_min": float(eigs.min()),
        "lambda_max": float(eigs.max()),
        **{f"rel_err_{k}": e for k, e in errors.items()},
    }


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=("linear", "mlp"),
        default="mlp",
        help="model for Fig. 3 (default mlp; the paper used a linear one, see the recipe's page)",
    )
    parser.add_argument("--steps", type=int, default=None, help="largest k (default 100; 30 with --quick)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden units of the 1-layer net (default 8; 4 quick)")
    parser.add_argument("--decay", type=float, default=1e-1, help="typical per-weight decay exp(λ_i) (default 0.1)")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (30 if args.quick else 100)
    args.hidden = args.hidden if args.hidden is not None else (4 if args.quick else 8)
    recipe_common.require(parser, args, counts=("steps", "hidden"), positive=("decay",))
    return args


def main(argv: list[str] | None = None) -> dict:
    return recipe_common.main(run, parse_args(argv))  # one thread: a 49–97-weight model is all per-op overhead


def run(args: argparse.Namespace, device: torch.device) -> dict:
    start = time.perf_counter()
    point, grad_norm = build_problem(args.model, args.hidden, args.decay, device, args.seed)
    if args.check:  # the derivatives at w*, where every curve of Fig. 3 is computed
        print(bilevel.check_derivatives(*point, strategy=bilevel.Exact()), flush=True)
    steps = list(range(1, args.steps + 1))
    with recipe_common.progress(f"Fig. 3 ({args.model})", total=len(steps)) as update:
        curves = accuracy_curves(*point, steps, update)
    plot_curves(
        curves,
        args.out / "fig3_hypergradient_accuracy.png",
        f"{args.model} model on diabetes, ‖∇L_T(w*)‖ = {grad_norm:.1e}, α = {curves['_alpha']:.3g}",
    )

    # Fig. 4 always uses the 1-hidden-layer net (as in the paper); reuse the problem if it is one.
    mlp = point if args.model == "mlp" else build_problem("mlp", args.hidden, args.decay, device, args.seed)[0]
    terms = [1, 10, 100] if args.quick else [1, 10, 100, 1000]
    picture = plot_inverse(mlp, terms, args.out / "fig4_inverse_hessian.png")

    results = {k: v for k, v in curves.items() if not k.startswith("_")}
    recipe_common.write_results(args.out, results)
    print(
        f"exact ‖dL_V/dλ‖ = {curves['_exact_norm']:.4g}; identity cosine {curves['cosine_identity']:.4f}; "
        f"k={steps[-1]} (Neumann {steps[-1] - 1} HVPs, CG {steps[-1]}): "
        f"Neumann cosine {curves['cosine']['neumann'][-1]:.4f} l2 {curves['l2']['neumann'][-1]:.3g}, "
        f"CG cosine {curves['cosine']['cg'][-1]:.4f} l2 {curves['l2']['cg'][-1]:.3g}, "
        f"Nystrom (rank {len(curves['cosine']['nystrom'])}) cosine {curves['cosine']['nystrom'][-1]:.4f}"
    )
    print(
        "Fig. 4 Hessian eigenvalues in "
        f"[{picture['lambda_min']:.3g}, {picture['lambda_max']:.3g}]; relative error of the Neumann matrix: "
        + ", ".join(f"{k} terms ({k - 1} HVPs) {picture[f'rel_err_{k}']:.3f}" for k in terms)
    )
    print(f"wrote {args.out}/results.json and 2 figures in {time.perf_counter() - start:.1f}s")
    return results


if __name__ == "__main__":
    main()
