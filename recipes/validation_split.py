"""How big should the validation split be? Section 5.6 and Fig. 9 of Lorraine et al. (2020).

Logistic regression on the bundled 8×8 digits: for each validation proportion p of the training
data, the weight decay is tuned with ``bilevel`` in two regimes, one global decay and one decay per
weight (640), and the test accuracy is measured with and without re-training on training +
validation data, averaged over ``--repeats`` random splits. Derivations, defaults and what the
curves show: docs/recipes/validation_split.md.

Run:  python recipes/validation_split.py [--quick] [--proportions 0.1,0.5,0.9] [--repeats R]
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F
import torchopt
from torch import Tensor

import bilevel

NAME = "validation_split"
DTYPE = torch.float32
N_CLASSES = 10
REGIMES = ("global", "per_weight")
MODES = ("no_retrain", "retrain")


# --8<-- [start:core]
def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """Multinomial logistic regression on flattened pixels."""
    return x.flatten(1) @ params["weight"] + params["bias"]


def penalty(weight: Tensor, log_decay: Tensor) -> Tensor:
    """½ Σᵢ exp(λᵢ) Wᵢ² (torch.optim's weight_decay with λ = log wd); a 0-dim λ is one global decay."""
    return bilevel.weight_decay({"weight": weight}, {"weight": log_decay})


def train_loss(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(logits(params, x), y) + penalty(params["weight"], hparams["log_decay"])


def val_loss(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(logits(params, x), y)


def zero_model(n_features: int, device: torch.device) -> dict[str, Tensor]:
    return {
        "weight": torch.zeros(n_features, N_CLASSES, dtype=DTYPE, device=device),
        "bias": torch.zeros(N_CLASSES, dtype=DTYPE, device=device),
    }


def tune(
    regime: str,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    args: argparse.Namespace,
    update: Any,
) -> bilevel.BilevelOptimizer:
    """Jointly optimise weights and log-decays (Algorithm 1), the weights first brought near w*(λ₀);
    the optimiser holds the final weights ``opt.params`` and λ ``opt.hparams["log_decay"]``."""
    x = train[0]
    shape = () if regime == "global" else (x[0].numel(), N_CLASSES)
    log_decay = torch.full(shape, math.log(args.init_decay), dtype=DTYPE, device=x.device)
    opt = bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        zero_model(x[0].numel(), x.device),
        {"log_decay": log_decay},
        inner=torchopt.adam(args.inner_lr),
        outer=torchopt.rmsprop(args.outer_lr),
        strategy=bilevel.ConjugateGradient(maxiter=20),
        inner_steps=args.inner_steps,
        check=args.check,
    )
    for _ in range(args.warmup):  # the IFT hypergradient assumes w ≈ w*(λ)
        opt.inner_step(train)
    for _ in range(args.hypersteps):
        for _ in range(args.inner_steps):
            result = opt.step(train, val)
        decay = opt.hparams["log_decay"].exp()
        update(train=float(result.loss), val=float(result.hyper.val_loss), decay=float(decay.mean()))
    return opt


# --8<-- [end:core]


# ---------------------------------------------------------------------------------- evaluation


def fit_from_scratch(x: Tensor, y: Tensor, log_decay: Tensor) -> dict[str, Tensor]:
    """A fresh model minimising L_T = CE + ½ Σ exp(λ) W² from zero with L-BFGS (the convex problem's
    unique minimiser) at fixed decays."""
    return recipe_data.fit_lbfgs(train_loss, zero_model(x[0].numel(), x.device), {"log_decay": log_decay}, (x, y), 300)


def accuracy(params: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    return recipe_common.accuracy(lambda chunk: logits(params, chunk), x, y)


# ------------------------------------------------------------------------------------------ run


def parse_proportions(text: str) -> list[float]:
    try:
        values = recipe_common.numbers_flag(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every proportion must lie strictly between 0 and 1")
    return sorted(values)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--proportions",
        type=parse_proportions,
        default=None,
        help="validation proportions, comma-separated (default 0.05,0.1,0.2,0.3,0.5,0.7,0.9; --quick 0.1,0.5,0.9)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="random splits per proportion (default 3; --quick 1)")
    parser.add_argument("--hypersteps", type=int, default=None, help="outer steps per run (default 100; --quick 20)")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner Adam steps per hyperstep (default 10)")
    parser.add_argument("--warmup", type=int, default=100, help="inner steps before the first hyperstep (default 100)")
    parser.add_argument(
        "--inner-lr", type=float, default=1e-2, help="inner Adam learning rate (default 1e-2; paper 1e-4)"
    )
    parser.add_argument(
        "--outer-lr", type=float, default=1e-1, help="outer RMSprop learning rate (default 1e-1; paper 1e-2)"
    )
    parser.add_argument("--init-decay", type=float, default=1e-2, help="initial weight decay exp(λ₀) (default 1e-2)")
    args = parser.parse_args(argv)

    if args.proportions is None:
        args.proportions = [0.1, 0.5, 0.9] if args.quick else [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.hypersteps = args.hypersteps if args.hypersteps is not None else (20 if args.quick else 100)
    recipe_common.require(parser, args, ("repeats", "hypersteps", "inner_steps"))
    if args.warmup < 0 or args.warmup % args.inner_steps:
        # BilevelOptimizer counts the warm-up's inner steps too: a hyperstep comes every inner_steps-th step.
        parser.error(f"--warmup {args.warmup}: must be an integer >= 0 and a multiple of --inner-steps.")
    recipe_common.require(parser, args, positive=("inner_lr", "outer_lr", "init_decay"))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return recipe_common.main(run, parse_args(argv))


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    generator = recipe_common.seed_everything(args.seed)
    started = time.perf_counter()

    train_x, train_y, test_x, test_y = recipe_data.load_images("digits")
    train_x, train_y = train_x.to(device, DTYPE), train_y.to(device)
    test_x, test_y = test_x.to(device, DTYPE), test_y.to(device)
    n = len(train_x)

    # acc[regime][mode][i][r]: test accuracy at proportion i, repeat r.
    acc = {regime: {"no_retrain": [], "retrain": []} for regime in REGIMES}
    runs = len(args.proportions) * args.repeats * len(REGIMES)
    with recipe_common.progress("tuning weight decay", runs) as update:
        for p in args.proportions:
            for regime in REGIMES:
                acc[regime]["no_retrain"].append([])
                acc[regime]["retrain"].append([])
            for _ in range(args.repeats):
                perm = torch.randperm(n, generator=generator).to(device)
                n_val = min(max(round(p * n), 1), n - 1)
                val = (train_x[perm[:n_val]], train_y[perm[:n_val]])
                train = (train_x[perm[n_val:]], train_y[perm[n_val:]])
                for regime in REGIMES:

                    def live(**status: float) -> None:
                        update(advance=0, p=p, regime=regime, **status)  # noqa: B023 (called in this iteration)

                    opt = tune(regime, train, val, args, live)
                    recipe_common.print_check(opt)
                    refit = fit_from_scratch(train_x[perm], train_y[perm], opt.hparams["log_decay"])
                    acc[regime]["no_retrain"][-1].append(accuracy(opt.params, test_x, test_y))
                    acc[regime]["retrain"][-1].append(accuracy(refit, test_x, test_y))
                    update(advance=1, p=p, regime=regime)

    results = {
        "proportions": args.proportions,
        **{regime: {mode: [_mean(r) for r in acc[regime][mode]] for mode in MODES} for regime in REGIMES},
    }
    errors = {regime: {mode: [_stderr(r) for r in acc[regime][mode]] for mode in MODES} for regime in REGIMES}
    recipe_common.write_results(args.out, results)
    plot(results, errors, args.repeats, args.out / "validation_split_accuracy.png")
    print(f"test accuracy, mean ± standard error over {args.repeats} split(s)  [{time.perf_counter() - started:.0f} s]")
    print("   p   global         global+retrain  per-weight     per-weight+retrain")
    for i, p in enumerate(results["proportions"]):
        cells = [f"{results[g][m][i]:.3f}±{errors[g][m][i]:.3f}" for g in REGIMES for m in MODES]
        print(f"{p:4.2f}   " + "    ".join(cells))
    print(f"-> {args.out}")
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _stderr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def plot(results: dict[str, Any], errors: dict[str, Any], repeats: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"global": ("-", "o", "1 global decay"), "per_weight": (":", "s", "a decay per weight")}
    colours = {"no_retrain": "tab:blue", "retrain": "tab:orange"}
    for regime, (line, marker, label) in styles.items():
        for mode, colour in colours.items():
            suffix = ", re-trained on train+val" if mode == "retrain" else ", no re-training"
            ax.errorbar(
                results["proportions"],
                results[regime][mode],
                yerr=errors[regime][mode] if repeats > 1 else None,
                linestyle=line,
                marker=marker,
                color=colour,
                capsize=3,
                label=label + suffix,
            )
    ax.set_xlabel("proportion of the training data used for validation")
    what = f"mean ± s.e. of {repeats} splits" if repeats > 1 else "1 split"
    ax.set_ylabel(f"test accuracy ({what})")
    ax.set_title("Logistic regression on digits: validation split vs. test accuracy", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
