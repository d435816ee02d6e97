"""Dataset distillation: Section 5.3 and Fig. 6 of Lorraine et al. (2020).

Learn one synthetic image per class, every pixel a hyperparameter, so that a logistic regression
trained on those ten images alone classifies real data well: the synthetic images are the training
set, all real labelled training data is the validation set. A fresh logistic regression trained on
the distilled images is compared with ones trained on ten random real images and on all the data.
Derivations, defaults and measured results: docs/recipes/distillation.md.

Run:  python recipes/distillation.py [--quick] [--dataset digits|mnist|cifar10 --data-dir DIR]
Data-parallel (each rank holds a shard of the real validation data; same updates as one process):
      torchrun --standalone --nproc_per_node=2 recipes/distillation.py --quick
"""

from __future__ import annotations

import argparse
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

NAME = "distillation"
DTYPE = torch.float32
N_CLASSES = 10


# --8<-- [start:core]
def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """Logistic regression (multinomial): flattened pixels times W plus b."""
    return x.flatten(1) @ params["weight"] + params["bias"]


def zero_model(n_features: int, device: torch.device) -> dict[str, Tensor]:
    return {
        "weight": torch.zeros(n_features, N_CLASSES, dtype=DTYPE, device=device),
        "bias": torch.zeros(N_CLASSES, dtype=DTYPE, device=device),
    }


def make_losses(weight_decay: float):
    """L_T on the synthetic images (the hyperparameters) with their fixed labels 0…9, and L_V on real data."""

    def train_loss(params: dict[str, Tensor], hparams: dict[str, Tensor], labels: Tensor) -> Tensor:
        return F.cross_entropy(logits(params, hparams["images"]), labels) + weight_decay * params["weight"].pow(2).sum()

    def val_loss(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: tuple) -> Tensor:
        x, y, *weight = batch  # under torchrun: (x, y, weight) of this rank's shard (recipe_common.shard)
        loss = F.cross_entropy(logits(params, x), y)
        return loss * weight[0] if weight else loss

    return train_loss, val_loss


def distill(
    train_x: Tensor, train_y: Tensor, args: argparse.Namespace, generator: torch.Generator, update: Any
) -> tuple[bilevel.BilevelOptimizer, dict[str, list[float]]]:
    """Algorithm 1 on the pixels of one image per class, all real training data (minibatches of it
    when large) as the validation set: the optimiser (``opt.hparams["images"]``) and the losses."""
    device = train_x.device
    labels = torch.arange(N_CLASSES, device=device)
    # Blank images to start. Zero is not a symmetric start: the mixed derivative ∂²L_T/∂W∂x̃_c carries
    # each image's own label.
    images = torch.zeros((N_CLASSES, *train_x.shape[1:]), dtype=DTYPE, device=device)
    strategy = (
        bilevel.ConjugateGradient(maxiter=20)
        if args.strategy == "cg"
        else bilevel.Neumann(steps=20, alpha="auto", refresh_every=10)
    )
    train_loss, val_loss = make_losses(args.weight_decay)
    opt = bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        zero_model(train_x[0].numel(), device),
        {"images": images},
        inner=torchopt.adam(args.inner_lr),
        outer=torchopt.rmsprop(args.outer_lr),
        strategy=strategy,
        inner_steps=args.inner_steps,
        # Under torchrun each rank takes a shard of the validation data (the synthetic training set is
        # the same everywhere) and the optimiser averages over ranks, so all apply the same update;
        # shard() weights each rank's mean loss by its share, so unequal shards average exactly.
        distributed=bilevel.DataParallel(check_shards=False) if args.world > 1 else None,
        check=args.check,
    )
    history: dict[str, list[float]] = {"hyperstep": [], "train_loss": [], "val_loss": []}
    for _ in range(args.hypersteps):
        if len(train_x) <= args.val_batch:
            val_batch = (train_x, train_y)
        else:
            idx = torch.randint(len(train_x), (args.val_batch,), generator=generator).to(device)
            val_batch = (train_x[idx], train_y[idx])
        val_batch = recipe_common.shard(*val_batch, args.rank, args.world)
        before = opt.hparams["images"]
        for _ in range(args.inner_steps):
            result = opt.step(labels, val_batch)
        history["hyperstep"].append(opt.hypersteps)
        history["train_loss"].append(float(result.loss))
        history["val_loss"].append(float(result.hyper.val_loss))
        change = (opt.hparams["images"] - before).pow(2).mean().sqrt()
        update(train=history["train_loss"][-1], val=history["val_loss"][-1], pixel_step=float(change))
    return opt, history


# --8<-- [end:core]


# ---------------------------------------------------------------------------------- evaluation


def fit_from_scratch(x: Tensor, y: Tensor, weight_decay: float) -> dict[str, Tensor]:
    """A fresh logistic regression on (x, y): the same L_T minimised from zero to convergence (convex,
    so this reaches the unique minimiser w* that the distillation was optimised for)."""
    train_loss, _ = make_losses(weight_decay)
    return recipe_data.fit_lbfgs(train_loss, zero_model(x[0].numel(), x.device), {"images": x}, y, max_iter=200)


def accuracy(params: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    return recipe_common.accuracy(lambda chunk: logits(params, chunk), x, y, chunk=10_000)


# ------------------------------------------------------------------------------------------ run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", default="digits", choices=("digits", "mnist", "cifar10"), help="default digits (bundled)"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="folder holding the MNIST/CIFAR-10 files")
    parser.add_argument("--hypersteps", type=int, default=None, help="outer steps (default 300; --quick 60)")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner Adam steps per hyperstep (default 10)")
    parser.add_argument(
        "--inner-lr", type=float, default=1e-2, help="inner Adam learning rate (default 1e-2; paper 1e-4)"
    )
    parser.add_argument("--outer-lr", type=float, default=1e-2, help="outer RMSprop learning rate (default 1e-2)")
    parser.add_argument(
        "--weight-decay", type=float, default=1e-2, help="fixed δ in L_T, makes w* unique (default 1e-2)"
    )
    parser.add_argument("--strategy", default="cg", choices=("cg", "neumann"), help="hypergradient (default cg)")
    parser.add_argument(
        "--val-batch",
        type=int,
        default=2000,
        help="real validation examples per hyperstep (default 2000; all if fewer)",
    )
    parser.add_argument("--draws", type=int, default=None, help="random-real baseline draws (default 20; --quick 5)")
    args = parser.parse_args(argv)

    if args.dataset != "digits" and args.data_dir is None:
        parser.error(f"--dataset {args.dataset} reads files from disk: pass --data-dir pointing at your copy.")
    args.hypersteps = args.hypersteps if args.hypersteps is not None else (60 if args.quick else 300)
    args.draws = args.draws if args.draws is not None else (5 if args.quick else 20)
    recipe_common.require(
        parser, args, ("hypersteps", "inner_steps", "val_batch", "draws"), ("inner_lr", "outer_lr", "weight_decay")
    )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Not recipe_common.main: torchrun's process group, and all threads for the large data sets.
    device = recipe_common.prepare(args)  # --out and --device checked before any work
    with recipe_common.distributed(device) as (args.rank, args.world, device):
        with recipe_common.one_thread(device.type == "cpu" and args.dataset == "digits"):
            return run(args, device)


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    generator = recipe_common.seed_everything(args.seed)
    started = time.perf_counter()

    train_x, train_y, test_x, test_y = recipe_data.load_images(args.dataset, args.data_dir)
    train_x, train_y = train_x.to(device, DTYPE), train_y.to(device)
    test_x, test_y = test_x.to(device, DTYPE), test_y.to(device)
    lead = args.rank == 0  # under torchrun only rank 0 reports and writes files
    with recipe_common.progress(f"distilling {args.dataset}", args.hypersteps, enabled=lead) as update:
        opt, history = distill(train_x, train_y, args, generator, update)

    distilled = opt.hparams["images"].detach()
    if not lead:
        return {}
    print("evaluating: fresh logistic regressions on distilled, random real and all training images ...")
    labels = torch.arange(N_CLASSES, device=device)
    acc_distilled = accuracy(fit_from_scratch(distilled, labels, args.weight_decay), test_x, test_y)
    random_accs, example = [], None
    for _ in range(args.draws):
        idx = recipe_data.stratified_subset(train_y.cpu(), 1, generator).to(device)
        order = torch.argsort(train_y[idx])  # one image per class, in class order
        x, y = train_x[idx][order], train_y[idx][order]
        random_accs.append(accuracy(fit_from_scratch(x, y, args.weight_decay), test_x, test_y))
        example = x if example is None else example
    acc_random = sum(random_accs) / len(random_accs)
    acc_full = accuracy(fit_from_scratch(train_x, train_y, args.weight_decay), test_x, test_y)

    results = {
        "n_hparams": distilled.numel(),
        "test_acc_distilled": acc_distilled,
        "test_acc_random_real": acc_random,
        "test_acc_full_data": acc_full,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot_images(distilled.cpu(), example.cpu(), acc_distilled, random_accs, args.out / "distillation_images.png")
    plot_history(history, args.out / "distillation_loss.png")
    torch.save(distilled.cpu(), args.out / "distilled_images.pt")  # reload with torch.load
    recipe_common.write_results(args.out, results)
    print(
        f"{args.dataset}: {results['n_hparams']} hyperparameters; test accuracy of a logistic regression trained on "
        f"10 distilled images {acc_distilled:.3f}, on 10 random real images {acc_random:.3f} "
        f"(mean of {args.draws}), on all {len(train_x)} training images {acc_full:.3f}  "
        f"[{time.perf_counter() - started:.0f} s] -> {args.out}"
    )
    recipe_common.print_check(opt)
    return results


# ----------------------------------------------------------------------------------------- plots


def _show(ax: Any, image: Tensor) -> None:
    """Greyscale: red = positive, blue = negative, white = 0, on a scale symmetric about zero (learned
    pixels are unconstrained). Colour images: min-max scaled per image."""
    if image.shape[0] == 1:
        vmax = float(image.abs().max().clamp_min(1e-12))
        ax.imshow(image[0].numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    else:
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_images(distilled: Tensor, real: Tensor, acc_distilled: float, acc_real: list[float], path: Path) -> None:
    """The distilled images above the first random real draw; ``acc_real`` holds every draw's accuracy."""
    fig, axes = plt.subplots(2, N_CLASSES, figsize=(1.2 * N_CLASSES, 3.0))
    for c in range(N_CLASSES):
        _show(axes[0, c], distilled[c])
        _show(axes[1, c], real[c])
        axes[0, c].set_title(str(c))
    mean = sum(acc_real) / len(acc_real)
    labels = (
        f"distilled\n{acc_distilled:.1%}",
        f"random real\nthis draw {acc_real[0]:.1%}\nmean of {len(acc_real)}: {mean:.1%}",
    )
    for ax, label in zip(axes[:, 0], labels):
        ax.set_ylabel(label, rotation=0, ha="right", va="center", labelpad=8)
    fig.suptitle(
        "One training image per class (red > 0, blue < 0, white = 0); "
        "test accuracy of a logistic regression trained on the row"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_history(history: dict[str, list[float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history["hyperstep"], history["val_loss"], label="$L_V$: cross-entropy on real training data")
    ax.plot(history["hyperstep"], history["train_loss"], label="$L_T$: on the 10 synthetic images, with δ‖W‖²")
    ax.set_xlabel("hyperstep")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
