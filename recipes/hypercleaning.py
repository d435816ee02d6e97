"""Data hyper-cleaning: one weight per training example, learned on a small clean validation set.

Half of the training labels (``--corruption``) are moved to a wrong class, and every training
example gets its own weight σ(λ_i), a hyperparameter. Algorithm 1 (``bilevel.BilevelOptimizer`` with
the IFT strategies Neumann and CG side by side) tunes the weights so that a model trained on the
weighted set does well on a small clean validation set: the weights of the mislabelled examples
fall, and the model re-trained with them is compared with unweighted training and an oracle.
Franceschi et al. (2017), Section 5.1, for logistic regression and an MLP. Setup, departures from
the paper and measured results: docs/recipes/hypercleaning.md.

Run:  python recipes/hypercleaning.py [--quick] [--models linear,mlp] [--strategies neumann,cg]
                                      [--corruption 0.5] [--dataset digits|mnist --data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
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
from torch import Tensor, nn

import bilevel

NAME = "hypercleaning"
MODELS = ("linear", "mlp")
STRATEGIES = ("neumann", "cg")
THRESHOLD = 0.5  # flag an example as corrupted when its weight σ(λ_i) falls below this


# --8<-- [start:core]
def make_model(kind: str, args: argparse.Namespace, x: Tensor) -> bilevel.FunctionalModule:
    """Logistic regression (``linear``) or a ReLU MLP with ``args.hidden`` units (``mlp``) on images
    like ``x``, as a pure function; the same initial weights for a given ``args.seed``."""
    torch.manual_seed(args.seed)
    pixels, classes, hidden = x[0].numel(), args.classes, args.hidden
    if kind == "linear":
        model = nn.Sequential(nn.Flatten(), nn.Linear(pixels, classes))
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    return bilevel.FunctionalModule(model.to(device=x.device, dtype=x.dtype))


def weighted_loss(fm: bilevel.FunctionalModule, params: dict, x: Tensor, y: Tensor, logits: Tensor, decay: float):
    """L_T(w, λ) = Σ_i σ(λ_i) CE_i(w) / Σ_i σ(λ_i) + δ‖w‖²: the training loss of every model here."""
    out, _ = fm(params, fm.state, x)
    ce = F.cross_entropy(out, y, reduction="none")
    return bilevel.weighted_mean(ce, logits) + decay * sum((p**2).sum() for p in params.values())


def learn_weights(
    fm: bilevel.FunctionalModule,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    strategy: bilevel.Strategy,
    args: argparse.Namespace,
) -> Iterator[tuple[bilevel.BilevelOptimizer, bilevel.StepResult]]:
    """Algorithm 1 on (the weights w of ``fm``, one logit λ_i per training example), full batch on both
    levels: ``args.inner_steps`` Adam steps on w, the last of them followed by one Adam step on λ.
    Yields the optimiser and the last step's result after each of the ``args.hypersteps`` hypersteps."""

    def train_loss(params: dict, hparams: dict, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return weighted_loss(fm, params, x, y, hparams["logits"], args.weight_decay)

    def val_loss(params: dict, hparams: dict, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(fm(params, fm.state, x)[0], y)  # clean labels, no weights

    logits = torch.zeros(len(train[1]), dtype=train[0].dtype, device=train[0].device)  # σ(0) = ½ for all
    opt = bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        fm.params,
        {"logits": logits},
        inner=torchopt.adam(args.inner_lr),
        outer=torchopt.adam(args.outer_lr),
        strategy=strategy,
        inner_steps=args.inner_steps,
        seed=args.seed,
        check=args.check,
    )
    for _ in range(args.hypersteps):
        for _ in range(args.inner_steps):
            result = opt.step(train, val)
        yield opt, result


# --8<-- [end:core]


# ----------------------------------------------------------------------------------------- data


def corrupt_labels(y: Tensor, fraction: float, classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(noisy labels, corrupted mask): exactly ``round(fraction · len(y))`` labels, chosen uniformly at
    random, moved to a different class drawn uniformly from the other ``classes − 1``.

    A label y becomes ``(y + k) mod classes`` with k uniform in 1..classes−1, which is never y and
    hits each other class with probability 1/(classes − 1).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction={fraction!r}`: must lie in [0, 1].")
    if classes < 2:
        raise ValueError(f"`classes={classes!r}`: need at least 2 classes to move a label to another one.")
    n = len(y)
    chosen = torch.randperm(n, generator=generator)[: round(fraction * n)]  # a CPU generator's draws
    shift = torch.randint(1, classes, (len(chosen),), generator=generator).to(y.device)
    chosen = chosen.to(y.device)
    noisy = y.clone()
    noisy[chosen] = (y[chosen] + shift) % classes
    corrupted = torch.zeros(n, dtype=torch.bool, device=y.device)
    corrupted[chosen] = True
    return noisy, corrupted


def detection_scores(weights: Tensor, corrupted: Tensor, threshold: float = THRESHOLD) -> dict[str, float]:
    """Precision, recall and F1 of "weight < threshold" as a detector of the corrupted examples.

    With nothing flagged the precision is 0 (scikit-learn's ``zero_division=0`` convention), and F1
    is 0 whenever precision + recall is 0.
    """
    flagged = weights < threshold
    hits = int((flagged & corrupted).sum())
    n_flagged, n_corrupted = int(flagged.sum()), int(corrupted.sum())
    precision = hits / n_flagged if n_flagged else 0.0
    recall = hits / n_corrupted if n_corrupted else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": n_flagged}


def split(args: argparse.Namespace, generator: torch.Generator):
    """(train, val, test) as (x, y) pairs: a stratified clean validation set, ``n_train`` training
    images drawn from the rest of the training split, and the test split."""
    (x, y), val, test = recipe_data.clean_split(args.dataset, args.data_dir, args.val_per_class, generator)
    n_train = len(y) if args.n_train is None else args.n_train
    if n_train > len(y):
        raise ValueError(f"--n-train {n_train}: only {len(y)} training images are left after the validation set.")
    keep = torch.randperm(len(y), generator=generator)[:n_train]
    return (x[keep], y[keep]), val, test


# ----------------------------------------------------------------------------------- experiments


def predictor(fm: bilevel.FunctionalModule, params: dict):
    return lambda x: fm(params, fm.state, x)[0]


def train_fixed(kind: str, logits: Tensor, args: argparse.Namespace, data, update) -> float:
    """Test accuracy after ``args.steps`` full-batch Adam steps on L_T with fixed example weights σ(logits)."""
    (x, y), _, test = data
    fm = make_model(kind, args, x)
    params = {k: v.detach().clone() for k, v in fm.params.items()}
    adam = torchopt.adam(args.inner_lr)  # the bilevel run's inner optimiser
    state, logits = adam.init(params), logits.detach()
    grad = torch.func.grad(lambda p: weighted_loss(fm, p, x, y, logits, args.weight_decay))
    for _ in range(args.steps):
        updates, state = adam.update(grad(params), state)
        params = torchopt.apply_updates(params, updates)
        update(advance=1)
    return recipe_common.accuracy(predictor(fm, params), *test)


def strategy_for(name: str, cg_damping: float) -> bilevel.Strategy:
    if name == "neumann":
        return bilevel.Neumann(steps=10, alpha="auto", refresh_every=10)
    return bilevel.ConjugateGradient(maxiter=10, damping=cg_damping, warm_start=True)


def label(name: str, cg_damping: float) -> str:
    if name == "neumann":
        return 'Neumann(10, alpha="auto")'
    return f"CG(10, damping={cg_damping:g}, warm)"


def run_bilevel(kind: str, strategy: str, args: argparse.Namespace, data, corrupted: Tensor, update):
    """:func:`learn_weights` for one model and strategy, evaluated along the way; returns the learned
    logits λ, a summary and the curves."""
    train, val, test = data
    fm = make_model(kind, args, train[0])
    every = max(1, args.hypersteps // 50)
    history: dict[str, list] = {"hyperstep": [], "test_acc": [], "val_acc": [], "f1": []}

    def record(hyperstep: int, params: dict, logits: Tensor) -> None:
        history["hyperstep"].append(hyperstep)
        history["test_acc"].append(recipe_common.accuracy(predictor(fm, params), *test))
        history["val_acc"].append(recipe_common.accuracy(predictor(fm, params), *val))
        history["f1"].append(detection_scores(torch.sigmoid(logits), corrupted)["f1"])

    record(0, fm.params, torch.zeros(len(train[1]), dtype=train[0].dtype, device=train[0].device))
    hvps, elapsed, start = 0, 0.0, time.perf_counter()
    for opt, result in learn_weights(fm, train, val, strategy_for(strategy, args.cg_damping), args):
        elapsed += time.perf_counter() - start  # the bilevel run only, not the evaluation below
        hvps += result.hyper.hvps
        if opt.hypersteps % every == 0 or opt.hypersteps == args.hypersteps:
            record(opt.hypersteps, opt.params, opt.hparams["logits"])
        update(
            advance=args.inner_steps,
            run=f"{kind}/{strategy}",
            val_loss=float(result.hyper.val_loss),
            f1=history["f1"][-1],
        )
        start = time.perf_counter()
    summary = {
        "online_test_acc": history["test_acc"][-1],
        "wall_time_s": elapsed,
        "hvps_per_hyperstep": hvps / args.hypersteps,
        "skipped_hypersteps": opt.skipped_outer_steps,
    }
    recipe_common.print_check(opt)
    return opt.hparams["logits"].detach(), summary, history


# ------------------------------------------------------------------------------------------ run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with the four MNIST IDX files")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of linear,mlp")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of neumann,cg")
    parser.add_argument("--corruption", type=float, default=0.5, help="fraction of training labels corrupted")
    parser.add_argument(
        "--val-per-class", type=int, default=None, help="clean validation images per class (default 20; 500 for mnist)"
    )
    parser.add_argument("--n-train", type=int, default=None, help="training images (default: all left; 5000 mnist)")
    parser.add_argument("--hypersteps", type=int, default=None, help="outer steps (default 300; --quick 30)")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner Adam steps per hyperstep (default 10)")
    parser.add_argument("--inner-lr", type=float, default=1e-2, help="Adam learning rate of the weights")
    parser.add_argument("--outer-lr", type=float, default=0.03, help="Adam learning rate of the example logits")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="fixed δ in L_T (default 1e-3)")
    parser.add_argument("--cg-damping", type=float, default=0.1, help="δ of the CG solve (H + δI)x = b (default 0.1)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP (default 64)")
    args = parser.parse_args(argv)

    if args.dataset != "digits" and args.data_dir is None:
        parser.error(f"--dataset {args.dataset} reads files from disk: pass --data-dir pointing at your copy.")
    args.models = recipe_common.subset_flag(parser, "models", args.models, MODELS)
    args.strategies = recipe_common.subset_flag(parser, "strategies", args.strategies, STRATEGIES)
    mnist = args.dataset == "mnist"
    args.val_per_class = args.val_per_class if args.val_per_class is not None else (500 if mnist else 20)
    args.n_train = args.n_train if args.n_train is not None else (5000 if mnist else None)
    args.hypersteps = args.hypersteps if args.hypersteps is not None else (30 if args.quick else 300)
    if not 0.0 <= args.corruption < 1.0:
        parser.error(f"--corruption {args.corruption}: must lie in [0, 1) (some clean training labels must remain).")
    counts = ("val_per_class", "hypersteps", "inner_steps", "hidden")
    counts += ("n_train",) if args.n_train is not None else ()  # None: the whole training split
    recipe_common.require(parser, args, counts, ("inner_lr", "outer_lr", "weight_decay"))
    if not (math.isfinite(args.cg_damping) and args.cg_damping >= 0):
        parser.error(f"--cg-damping {args.cg_damping}: must be a finite number >= 0.")
    args.steps = args.hypersteps * args.inner_steps  # every model of the comparison trains this long
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return recipe_common.main(run, parse_args(argv))


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    generator = recipe_common.seed_everything(args.seed)
    train, val, test = split(args, generator)
    args.classes = int(max(train[1].max(), val[1].max(), test[1].max())) + 1
    noisy, corrupted = corrupt_labels(train[1], args.corruption, args.classes, generator)
    data = tuple((x.to(device), y.to(device)) for x, y in ((train[0], noisy), val, test))
    corrupted = corrupted.to(device)
    print(
        f"{args.dataset}: {len(noisy)} training images ({int(corrupted.sum())} labels corrupted), "
        f"{len(val[1])} clean validation, {len(test[1])} test"
    )

    n_runs = len(args.models) * len(args.strategies)
    total = (n_runs + len(args.models) * 2) * args.steps  # bilevel runs, then unweighted and oracle per model
    total += n_runs * args.steps  # a cleaned re-training per bilevel run
    test_acc: dict[str, Any] = {"models": {}}
    detection: dict[str, Any] = {"models": {}}
    strategies: dict[str, Any] = {}
    histories: dict[str, dict[str, dict[str, list]]] = {}
    learned: dict[str, dict[str, Tensor]] = {}
    # fixed weights as logits: σ(0) = ½ for all (the plain mean), σ(±∞) = 1 / 0 for the oracle
    even = torch.zeros(len(noisy), dtype=data[0][0].dtype, device=device)
    oracle = torch.where(corrupted.to(device), -math.inf, math.inf).to(even.dtype)
    with recipe_common.progress("hyper-cleaning", total=total) as update:
        for kind in args.models:
            histories[kind], learned[kind], strategies[kind] = {}, {}, {}
            accs: dict[str, Any] = {"cleaned": {}, "online": {}}
            detection["models"][kind] = {}
            for name in args.strategies:
                logits, summary, histories[kind][name] = run_bilevel(kind, name, args, data, corrupted, update)
                weights = torch.sigmoid(logits)
                learned[kind][name] = weights
                strategies[kind][name] = summary
                accs["online"][name] = summary["online_test_acc"]
                accs["cleaned"][name] = train_fixed(kind, logits, args, data, update)
                detection["models"][kind][name] = detection_scores(weights, corrupted)
            accs["unweighted"] = train_fixed(kind, even, args, data, update)
            accs["oracle"] = train_fixed(kind, oracle, args, data, update)
            test_acc["models"][kind] = accs

    first_model, first_strategy = args.models[0], args.strategies[0]
    head = test_acc["models"][first_model]
    results: dict[str, Any] = {
        "headline": {"model": first_model, "strategy": first_strategy},
        "test_acc": {
            "unweighted": head["unweighted"],
            "cleaned": head["cleaned"][first_strategy],
            "oracle": head["oracle"],
            **test_acc,
        },
        "detection": {
            **{k: v for k, v in detection["models"][first_model][first_strategy].items() if k != "flagged"},
            **detection,
        },
        "strategies": strategies,
        "n_hparams": len(noisy),
        "n_corrupted": int(corrupted.sum()),
        "sizes": {"train": len(noisy), "val": len(val[1]), "test": len(test[1])},
        "steps": args.steps,
    }
    recipe_common.write_results(args.out, results)
    (args.out / "history.json").write_text(json.dumps(histories) + "\n")
    labels = {name: label(name, args.cg_damping) for name in args.strategies}
    plot_weights(learned, corrupted.cpu(), labels, args.out / "hypercleaning_weights.png")
    plot_accuracy(histories, test_acc["models"], labels, args.out / "hypercleaning_accuracy.png")
    for kind in args.models:
        accs = test_acc["models"][kind]
        print(f"{kind:>6}: test accuracy unweighted {accs['unweighted']:.3f}  oracle {accs['oracle']:.3f}")
        for name in args.strategies:
            d, s = detection["models"][kind][name], strategies[kind][name]
            print(
                f"        {labels[name]:<30} cleaned {accs['cleaned'][name]:.3f} (online {accs['online'][name]:.3f})  "
                f"detection P {d['precision']:.3f} R {d['recall']:.3f} F1 {d['f1']:.3f}  "
                f"{s['wall_time_s']:.1f} s, {s['hvps_per_hyperstep']:.1f} HVPs/hyperstep"
            )
    print(f"wrote {args.out}/results.json, history.json and two figures in {time.perf_counter() - started:.1f}s")
    return results


# ----------------------------------------------------------------------------------------- plots


def plot_weights(learned: dict[str, dict[str, Tensor]], corrupted: Tensor, labels: dict[str, str], path: Path) -> None:
    """Histograms of the learned σ(λ_i), clean and corrupted examples apart; one panel per run."""
    runs = [(kind, name) for kind, by in learned.items() for name in by]
    fig, axes = plt.subplots(1, len(runs), figsize=(3.4 * len(runs), 3.0), squeeze=False)
    bins = torch.linspace(0, 1, 41).tolist()
    for ax, (kind, name) in zip(axes[0], runs):
        weights = learned[kind][name].cpu()
        ax.hist(weights[~corrupted].tolist(), bins=bins, alpha=0.6, label=f"clean ({int((~corrupted).sum())})")
        ax.hist(weights[corrupted].tolist(), bins=bins, alpha=0.6, label=f"corrupted ({int(corrupted.sum())})")
        ax.axvline(THRESHOLD, color="k", lw=0.8, ls=":")
        ax.set(title=f"{kind}, {labels[name]}", xlabel="learned weight σ(λ_i)", ylabel="training examples")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(histories: dict, accs: dict[str, dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    """Test accuracy of the model trained during the bilevel run, against the unweighted and oracle models."""
    fig, axes = plt.subplots(1, len(histories), figsize=(4.4 * len(histories), 3.3), squeeze=False)
    for ax, (kind, by) in zip(axes[0], histories.items()):
        for name, history in by.items():
            ax.plot(history["hyperstep"], history["test_acc"], label=f"during bilevel run, {labels[name]}")
        ax.axhline(accs[kind]["unweighted"], color="tab:red", ls="--", lw=1, label="unweighted (end)")
        ax.axhline(accs[kind]["oracle"], color="tab:green", ls="--", lw=1, label="oracle (end)")
        ax.set(title=kind, xlabel="hyperstep", ylabel="test accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
