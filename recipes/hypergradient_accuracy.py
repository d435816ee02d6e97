"""How accurate are approximate hypergradients? Section 5.1, Fig. 3 and Fig. 4 of Lorraine et al. (2020).

A small regression network on the diabetes data (scikit-learn's bundled stand-in for the paper's
Boston housing set, split in half into training and validation data) with one weight-decay
hyperparameter per weight,

    L_T(w, λ) = mean (f(x; w) − y)² + Σ_i exp(λ_i) w_i²,        L_V(w) = mean (f(x_v; w) − y_v)²,

is trained to stationarity first — L-BFGS, then Newton steps to ‖∇_w L_T‖ ≤ 1e-12 — because the
IFT hypergradient is exact only at w*(λ). The true hypergradient dL_V/dλ comes from
``bilevel.Exact`` (a dense Hessian solve, in float64); against it we measure the cosine similarity
and the ℓ2 distance of

* ``Neumann(steps=k, alpha)``  — k series terms, k − 1 Hessian-vector products (the paper's
  Algorithm 3 with i = k − 1, its code's ``num_neumann_terms=k − 1``),
* ``ConjugateGradient(maxiter=k)`` — k CG iterations, k Hessian-vector products,
* ``Nystrom(rank=k, damping=ρ)`` — a rank-k Nyström approximation of H from k random columns,
  k Hessian-vector products taken in one batched call, inverted with the Woodbury identity
  (Hataya & Yamada, 2023), k ≤ the number of weights; ρ = the median eigenvalue of H, the best in
  ℓ2 distance of the values we tried (μ_min, 0.1, the median, 0.5, 1, 2) — directions the k columns
  miss are inverted as 1/ρ, so a small ρ amplifies them and a large one biases the rest,
* ``Identity(alpha)`` — H⁻¹ ≈ αI, no Hessian-vector product at all,

for k = 1…N, with α = 1/μ_max (μ_max the largest eigenvalue of H) so that the Neumann series
converges. That is Fig. 3, plotted against the number of Hessian-vector products of each method.

The default model is a 1-hidden-layer tanh net (10–8–1, 97 weights) rather than the paper's
linear model: on diabetes the linear model's 11×11 Hessian is so benign that even Identity has
cosine similarity 0.96 and every curve sits flat near 1 (``--model linear`` shows it).

Fig. 4 is a picture of the inverse Hessian itself for the 1-hidden-layer net, as in the paper: the
true H⁻¹ next to the Neumann approximations α Σ_{j<k} (I − αH)^j (k terms, k − 1 HVPs), each passed
through tanh so that large entries saturate and the structure of the small ones stays visible.
Only this picture forms dense matrices; every number in results.json comes from
``bilevel.hypergradient``.

There is no weight/hyperparameter optimiser here (the paper's Adam/RMSprop setup does not apply):
the hyperparameters are fixed and only the hypergradient at w*(λ) is measured.

Run:  python recipes/hypergradient_accuracy.py [--quick] [--model mlp|linear] [--steps N] [--out DIR]
"""

from __future__ import annotations

import math
import time
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


# ---------------------------------------------------------------------------------------- problem


def make_model(kind: str, n_in: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(n_in, 1)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def make_losses(model: nn.Module):
    """L_T with a log-parametrised decay per weight, ½ Σ e^λ w² (exp keeps every decay > 0), and L_V."""

    def mse(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return ((functional_call(model, params, (x,)).squeeze(-1) - y) ** 2).mean()

    def train_loss(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any) -> Tensor:
        return mse(params, batch) + bilevel.weight_decay(params, hparams)

    def val_loss(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any) -> Tensor:
        return mse(params, batch)

    return train_loss, val_loss


def solve_inner(train_loss, params, hparams, batch, tol: float = 1e-12) -> tuple[dict, float]:
    """Minimise L_T(·, λ): L-BFGS to get close, then Newton steps to ‖∇_w L_T‖ ≤ tol.

    The IFT hypergradient is only exact at a stationary point, so the comparison needs w*(λ) to
    machine precision. The model is tiny, so Newton's method on the dense Hessian (the same one
    ``bilevel.Exact`` builds) gets there in a few steps once L-BFGS is in the basin.
    """
    w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    lbfgs = torch.optim.LBFGS(list(w.values()), max_iter=2000, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = train_loss(w, hparams, batch)
        loss.backward()
        return loss

    lbfgs.step(closure)
    keys = sorted(w)
    shapes, sizes = [w[k].shape for k in keys], [w[k].numel() for k in keys]

    def on_flat(v: Tensor) -> Tensor:
        return train_loss({k: p.reshape(s) for k, p, s in zip(keys, torch.split(v, sizes), shapes)}, hparams, batch)

    v = flat({k: t.detach() for k, t in w.items()})
    for _ in range(20):
        grad = torch.func.grad(on_flat)(v)
        if float(grad.norm()) <= tol:
            break
        v = v - torch.linalg.solve(torch.func.hessian(on_flat)(v), grad)
    grad_norm = float(torch.func.grad(on_flat)(v).norm())
    return {k: p.reshape(s) for k, p, s in zip(keys, torch.split(v, sizes), shapes)}, grad_norm


def flat(tree: dict[str, Tensor]) -> Tensor:
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def compare(approx: dict[str, Tensor], exact: Tensor) -> tuple[float, float]:
    """(cosine similarity, ℓ2 distance) of an approximate hypergradient to the exact one."""
    g = flat(approx)
    cosine = float(torch.dot(g, exact) / (g.norm() * exact.norm()))
    return cosine, float((g - exact).norm())


def build_problem(kind: str, hidden: int, decay: float, device: torch.device, seed: int):
    """Diabetes split in half (train/val), a fresh model, per-weight log-decays, and w*(λ)."""
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
    return train_loss, val_loss, w_star, hparams, train, val, grad_norm


# --------------------------------------------------------------------------------------- Fig. 3


def accuracy_curves(problem, steps: list[int], update) -> dict[str, Any]:
    train_loss, val_loss, w, h, train, val, _ = problem

    def hypergrad(strategy):
        return bilevel.hypergradient(train_loss, val_loss, w, h, train, val, strategy=strategy)

    exact_tree, _ = hypergrad(bilevel.Exact())
    exact = flat(exact_tree)
    # α = 1/μ_max makes every term of the series contract (0 < αμ_i ≤ 1, μ_i the eigenvalues of H);
    # μ_max is the library's alpha="auto" power-iteration estimate of the spectral radius (= μ_max,
    # H being positive definite at w*), then held fixed for all k.
    _, info = hypergrad(bilevel.Neumann(steps=1, alpha="auto", power_iters=100))
    alpha = float(info.alpha)
    # Nyström's damping: the median eigenvalue of H, read off the dense Hessian (P ≤ a few hundred).
    rho = float(torch.linalg.eigvalsh(dense_hessian(train_loss, w, h, train)).median())
    size = sum(t.numel() for t in w.values())
    cosine: dict[str, list[float]] = {"neumann": [], "cg": [], "nystrom": []}
    l2: dict[str, list[float]] = {"neumann": [], "cg": [], "nystrom": []}
    for k in steps:
        methods = [("neumann", bilevel.Neumann(steps=k, alpha=alpha)), ("cg", bilevel.ConjugateGradient(maxiter=k))]
        if k <= size:
            methods.append(("nystrom", bilevel.Nystrom(rank=k, damping=rho)))
        for name, strategy in methods:
            c, d = compare(bilevel.hypergradient(train_loss, val_loss, w, h, train, val, strategy, seed=0)[0], exact)
            cosine[name].append(c)
            l2[name].append(d)
        update(k=k, cos_neumann=cosine["neumann"][-1], cos_cg=cosine["cg"][-1], cos_nystrom=cosine["nystrom"][-1])
    cosine_identity, l2_identity = compare(hypergrad(bilevel.Identity(alpha=alpha))[0], exact)
    return {
        "steps": steps,
        "cosine": cosine,
        "l2": l2,
        "cosine_identity": cosine_identity,
        # not in results.json; printed and used in the figure
        "_l2_identity": l2_identity,
        "_alpha": alpha,
        "_nystrom_damping": rho,
        "_exact_norm": float(exact.norm()),
    }


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


def dense_hessian(train_loss, w: dict[str, Tensor], h: dict[str, Tensor], batch) -> Tensor:
    """The P×P training Hessian at w (for the picture only; P is tiny here)."""
    keys = sorted(w)
    shapes = [w[k].shape for k in keys]
    sizes = [w[k].numel() for k in keys]

    def on_flat(v: Tensor) -> Tensor:
        parts = torch.split(v, sizes)
        return train_loss({k: p.reshape(s) for k, p, s in zip(keys, parts, shapes)}, h, batch)

    return torch.func.hessian(on_flat)(flat(w))


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


def plot_inverse(problem, terms: list[int], path: Path) -> dict[str, float]:
    train_loss, _, w, h, train, _, _ = problem
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


def parse_args(argv: list[str] | None):
    parser = recipe_common.base_parser(NAME, "Section 5.1: accuracy of approximate hypergradients (Fig. 3, Fig. 4).")
    parser.add_argument(
        "--model",
        choices=("linear", "mlp"),
        default="mlp",
        help="model for Fig. 3 (default mlp; the paper used a linear one, see the docstring)",
    )
    parser.add_argument("--steps", type=int, default=None, help="largest k (default 100; 30 with --quick)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden units of the 1-layer net (default 8; 4 quick)")
    parser.add_argument("--decay", type=float, default=1e-1, help="typical per-weight decay exp(λ_i) (default 0.1)")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (30 if args.quick else 100)
    args.hidden = args.hidden if args.hidden is not None else (4 if args.quick else 8)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be an integer >= 1")
    if args.hidden < 1:
        parser.error(f"--hidden {args.hidden}: must be an integer >= 1")
    if not (args.decay > 0 and math.isfinite(args.decay)):
        parser.error(f"--decay {args.decay}: must be a finite number > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = recipe_common.prepare(args)  # --out and --device checked before any work
    start = time.perf_counter()
    with recipe_common.one_thread():  # a 49–97-weight model: all per-op overhead
        return _run(args, device, start)


def _run(args, device: torch.device, start: float) -> dict:
    problem = build_problem(args.model, args.hidden, args.decay, device, args.seed)
    if args.check:  # the derivatives at w*, where every curve of Fig. 3 is computed
        print(bilevel.check_derivatives(*problem[:6], strategy=bilevel.Exact()), flush=True)
    steps = list(range(1, args.steps + 1))
    with recipe_common.progress(f"Fig. 3 ({args.model})", total=len(steps)) as update:
        curves = accuracy_curves(problem, steps, update)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_curves(
        curves,
        args.out / "fig3_hypergradient_accuracy.png",
        f"{args.model} model on diabetes, ‖∇L_T(w*)‖ = {problem[-1]:.1e}, α = {curves['_alpha']:.3g}",
    )

    # Fig. 4 always uses the 1-hidden-layer net (as in the paper); reuse the problem if it is one.
    mlp = problem if args.model == "mlp" else build_problem("mlp", args.hidden, args.decay, device, args.seed)
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
