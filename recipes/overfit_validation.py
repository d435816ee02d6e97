"""Overfit 50 validation examples by tuning one weight decay per weight: Section 5.2, Fig. 5 and Fig. 10.

With only 50 training and 50 validation images and one log-decay λ_i per weight,
L_T = CE(train) + ½ Σ e^λ_i w_i² and L_V = CE(val), Algorithm 1 (``bilevel.BilevelOptimizer``:
Adam on the weights, RMSprop on λ, Neumann hypergradients) must steer the weights until the
validation set is classified perfectly, while test accuracy stays lower. Four models: logistic
regression, an MLP, a LeNet-style CNN, and that CNN with BatchNorm and dropout. Setup, departures
from the paper and results: docs/recipes/overfit_validation.md.

Run:  python recipes/overfit_validation.py [--quick] [--models linear,mlp,cnn,bncnn]
                                           [--dataset digits|mnist|cifar10 --data-dir DIR] [--out DIR]
Data-parallel (each rank steps on its shard of the 50 + 50 examples; same updates as one process):
      torchrun --standalone --nproc_per_node=2 recipes/overfit_validation.py --quick
"""

from __future__ import annotations

import argparse
import json
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
import torchopt
from torch import Tensor, nn

import bilevel

NAME = "overfit_validation"
MODELS = ("linear", "mlp", "cnn", "bncnn")


# --8<-- [start:core]
def make_model(kind: str, image_shape: tuple[int, int, int], classes: int) -> nn.Module:
    """An ordinary ``nn.Module``: logistic regression, a 1-hidden-layer MLP, a LeNet-style CNN, or that CNN
    with BatchNorm and dropout (``bncnn``)."""
    channels, height, width = image_shape
    pixels = channels * height * width
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(pixels, classes))
    if kind == "mlp":  # as many hidden units as input size (appendix E.1)
        return nn.Sequential(nn.Flatten(), nn.Linear(pixels, pixels), nn.ReLU(), nn.Linear(pixels, classes))
    # LeNet-style: two 5×5 conv + pool stages (padded, so 8×8 digits fit too), then 120-84-classes;
    # bncnn adds BatchNorm after each convolution and dropout before each fully connected layer.
    norm = kind == "bncnn"

    def conv(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 5, padding=2), *([nn.BatchNorm2d(c_out)] if norm else []), nn.ReLU()]

    def dense(n_in: int, n_out: int) -> list[nn.Module]:
        return [*([nn.Dropout(0.1)] if norm else []), nn.Linear(n_in, n_out)]

    features = 16 * (height // 4) * (width // 4)
    return nn.Sequential(
        *conv(channels, 6),
        nn.MaxPool2d(2),
        *conv(6, 16),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *dense(features, 120),
        nn.ReLU(),
        *dense(120, 84),
        nn.ReLU(),
        *dense(84, classes),
    )


def make_losses(fm: bilevel.FunctionalModule):
    """L_T = CE (train mode) + ½ Σ e^λ w² (one log-decay per weight) and L_V = CE (eval mode)."""

    def cross_entropy(params: dict, state: dict, batch: tuple, train: bool) -> tuple[Tensor, dict]:
        x, y, *weight = batch  # under torchrun: (x, y, weight) of this rank's shard (recipe_common.shard)
        logits, state = fm(params, state, x, train=train)
        loss = nn.functional.cross_entropy(logits, y)
        return (loss * weight[0] if weight else loss), state

    def train_loss(params: dict, hparams: dict, batch: Any, state: dict) -> tuple[Tensor, dict]:
        loss, state = cross_entropy(params, state, batch, train=True)
        return loss + bilevel.weight_decay(params, hparams), state

    def val_loss(params: dict, hparams: dict, batch: Any, state: dict) -> tuple[Tensor, dict]:
        return cross_entropy(params, state, batch, train=False)

    return train_loss, val_loss


def tune_decays(
    fm, train: tuple, val: tuple, args: argparse.Namespace, after_step: Callable
) -> bilevel.BilevelOptimizer:
    """Algorithm 1 with one log-decay per weight, all starting at ``args.init_decay``: Adam steps on the
    weights, an RMSprop step on the decays after every ``args.inner_steps`` of them, and
    ``after_step(opt, result)`` after every step; returns the optimiser. Under torchrun ``train`` and
    ``val`` are this rank's (x, y, weight) shards and the optimiser averages over the ranks."""
    hparams = {k: torch.full_like(v, math.log(args.init_decay)) for k, v in fm.params.items()}
    train_loss, val_loss = make_losses(fm)
    opt = bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        fm.params,
        hparams,
        state=fm.state,
        seed=args.seed,
        inner=torchopt.adam(args.inner_lr),
        outer=torchopt.rmsprop(args.outer_lr),
        # 5 terms (4 HVPs); α = 1/λ_max re-estimated every 10 hypersteps: a fixed α let the series diverge
        strategy=bilevel.Neumann(steps=5, alpha="auto", refresh_every=10),
        inner_steps=args.inner_steps,
        # shard() weights each rank's mean loss by its share, so unequal shards average exactly
        distributed=bilevel.DataParallel(check_shards=False) if args.world > 1 else None,
        check=args.check,
    )
    for _ in range(args.steps // args.inner_steps * args.inner_steps):
        after_step(opt, opt.step(train, val))
    return opt


# --8<-- [end:core]


# ----------------------------------------------------------------------------------------- data


def split(dataset: str, data_dir: str | None, per_class: int, generator: torch.Generator):
    """(train, val, test) as (x, y) pairs: ``per_class`` examples of each class for train and val."""
    x, y, test_x, test_y = recipe_data.load_images(dataset, data_dir)
    counts = torch.bincount(y)
    if counts.numel() < 2 or int(counts.min()) < 2 * per_class:
        raise ValueError(
            f"--dataset {dataset}: every class needs >= {2 * per_class} training images for the "
            f"{per_class}+{per_class} per class split, found class counts {counts.tolist()}."
        )
    train_idx = recipe_data.stratified_subset(y, per_class, generator)
    left = torch.ones(len(y), dtype=torch.bool)
    left[train_idx] = False
    rest = torch.nonzero(left).flatten()
    val_idx = rest[recipe_data.stratified_subset(y[rest], per_class, generator)]
    left[val_idx] = False
    if dataset == "digits":  # no official test split: everything not used for train/val
        test_x, test_y = torch.cat([x[left], test_x]), torch.cat([y[left], test_y])
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx]), (test_x, test_y)


# ------------------------------------------------------------------------------------------ run


def run_model(kind: str, args, data, device: torch.device, update) -> tuple[dict[str, Any], dict[str, list]]:
    """Train one model with :func:`tune_decays`, recording train/validation/test error ~100 times."""
    train, val, test = data
    recipe_common.seed_everything(args.seed)
    model = make_model(kind, tuple(train[0].shape[1:]), int(train[1].max()) + 1)
    fm = bilevel.FunctionalModule(model.to(device=device, dtype=train[0].dtype))
    hypersteps = args.steps // args.inner_steps
    every = max(1, hypersteps // 100)  # ~100 points per curve
    history: dict[str, list] = {"hyperstep": [], "train_err": [], "val_err": [], "test_err": []}

    def record(params: dict, state: dict, hyperstep: int) -> list[float]:
        """Accuracies on the full train, validation and test sets (the same on every rank), in eval mode."""
        accs = [
            recipe_common.accuracy(lambda x: fm(params, state, x, train=False)[0], *part, chunk=2048)
            for part in (train, val, test)
        ]
        history["hyperstep"].append(hyperstep)
        for name, acc in zip(("train_err", "val_err", "test_err"), accs):
            history[name].append(1.0 - acc)
        return accs

    status: dict[str, Any] = {"model": kind}

    def after_step(opt: bilevel.BilevelOptimizer, result: bilevel.StepResult) -> None:
        if result.hyper is not None:
            hyper = result.hyper
            status.update(
                train_loss=float(result.loss), val_loss=float(hyper.val_loss), hypergrad=float(hyper.grad_norm)
            )
            if opt.hypersteps % every == 0 or opt.hypersteps == hypersteps:
                status["val_acc"] = record(opt.params, opt.state, opt.hypersteps)[1]
        update(advance=1, **status)

    record(fm.params, fm.state, 0)
    # Under torchrun each rank steps on its own shard; the optimiser averages over ranks, so every rank
    # applies the full-batch update.
    shards = [recipe_common.shard(*part, args.rank, args.world) for part in (train, val)]
    opt = tune_decays(fm, *shards, args, after_step)
    train_acc, val_acc, test_acc = (1.0 - history[k][-1] for k in ("train_err", "val_err", "test_err"))
    summary = {
        "train_acc": train_acc,
        "val_acc": val_acc,
        "test_acc": test_acc,
        "n_hparams": sum(h.numel() for h in opt.hparams.values()),
    }
    if opt.skipped_outer_steps and args.rank == 0:
        print(f"{kind}: {opt.skipped_outer_steps} hyperstep(s) skipped as non-finite")
    recipe_common.print_check(opt)
    return summary, history


def plot(histories: dict[str, dict[str, list]], results: dict[str, Any], path: Path, dataset: str) -> None:
    fig, axes = plt.subplots(1, len(histories), figsize=(3.6 * len(histories), 3.2), squeeze=False)
    for ax, (kind, history) in zip(axes[0], histories.items()):
        for key, label in (("train_err", "train"), ("val_err", "validation"), ("test_err", "test")):
            ax.plot(history["hyperstep"], history[key], label=label)
        n = results["models"][kind]["n_hparams"]
        ax.set(title=f"{kind} ({n:,} hparams)", xlabel="hyperstep", ylabel="error", ylim=(-0.01, 0.5))
        ax.legend()
    fig.suptitle(f"{dataset}: 50 train / 50 validation examples, one weight decay per weight", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "mnist", "cifar10"), default="digits")
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST IDX / CIFAR-10 pickle files")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of linear,mlp,cnn,bncnn")
    parser.add_argument("--steps", type=int, default=None, help="inner steps per model (default 4000; 500 quick)")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner steps per hyperstep (default 10)")
    parser.add_argument("--inner-lr", type=float, default=3e-3, help="Adam learning rate of the weights")
    parser.add_argument("--outer-lr", type=float, default=1e-2, help="RMSprop learning rate of the log-decays")
    parser.add_argument("--init-decay", type=float, default=1e-3, help="initial weight decay of every weight")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (500 if args.quick else 4000)
    args.models = recipe_common.subset_flag(parser, "models", args.models, MODELS)
    if args.inner_steps < 1 or args.steps < args.inner_steps:
        parser.error(f"--steps {args.steps} / --inner-steps {args.inner_steps}: need 1 <= inner-steps <= steps")
    recipe_common.require(parser, args, positive=("inner_lr", "init_decay"))
    if not (math.isfinite(args.outer_lr) and args.outer_lr >= 0):  # 0 freezes the decays
        parser.error(f"--outer-lr {args.outer_lr}: must be a finite number >= 0.")
    return args


def main(argv: list[str] | None = None) -> dict:
    # not recipe_common.main: this recipe also joins torchrun's process group, and takes one thread only
    # for digits (MNIST and CIFAR-10 are large enough to use more)
    args = parse_args(argv)
    device = recipe_common.prepare(args)  # --out and --device checked before any work
    with recipe_common.distributed(device) as (args.rank, args.world, device):
        with recipe_common.one_thread(args.dataset == "digits"):
            return _run(args, device)


def _run(args, device: torch.device) -> dict:
    start = time.perf_counter()
    generator = recipe_common.seed_everything(args.seed)
    train, val, test = split(args.dataset, args.data_dir, 5, generator)
    data = tuple((x.to(device), y.to(device)) for x, y in (train, val, test))
    lead = args.rank == 0  # under torchrun only rank 0 reports and writes files
    if lead:
        print(f"{args.dataset}: {len(train[1])} train, {len(val[1])} validation, {len(test[1])} test images")

    results: dict[str, Any] = {"models": {}}
    histories: dict[str, dict[str, list]] = {}
    total = len(args.models) * (args.steps // args.inner_steps) * args.inner_steps
    with recipe_common.progress("overfit validation", total=total, enabled=lead) as update:
        for kind in args.models:
            results["models"][kind], histories[kind] = run_model(kind, args, data, device, update)
    if not lead:
        return results
    args.out.mkdir(parents=True, exist_ok=True)
    recipe_common.write_results(args.out, results)
    (args.out / "history.json").write_text(json.dumps(histories) + "\n")
    plot(histories, results, args.out / "fig10_overfit_validation.png", args.dataset)
    for kind, r in results["models"].items():
        print(
            f"{kind:>6}: {r['n_hparams']:>7,} hparams  train {r['train_acc']:.3f}  val {r['val_acc']:.3f}  "
            f"test {r['test_acc']:.3f}"
        )
    print(f"wrote {args.out}/results.json, history.json and the figure in {time.perf_counter() - start:.1f}s")
    return results


if __name__ == "__main__":
    main()
