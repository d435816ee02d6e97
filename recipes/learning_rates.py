"""Per-layer learning rates and momenta tuned online by truncated unrolling, against a fixed-rate grid.

The implicit function theorem cannot tune an optimiser's own hyperparameters (Lorraine et al. 2020,
Section 4.3); differentiating through its last K updates can. ``bilevel.BilevelOptimizer`` with
``strategy=bilevel.Unroll(K)`` and a callable ``inner`` (hyperparameters -> optimiser) tunes one
learning rate and one momentum per layer of an MLP on 8×8 digits while it trains, and the result is
compared with the best of a grid of fixed rates trained on the same minibatches. Setup, caveats and
measured results: docs/recipes/learning_rates.md.

Run:  python recipes/learning_rates.py [--quick] [--steps 500] [--unroll 10] [--grid 0.01,0.1,1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

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

NAME = "learning_rates"


# --8<-- [start:core]
class PerLayerTrace(NamedTuple):
    """Momentum buffers, one per parameter tensor (a dict with the parameters' names)."""

    trace: dict[str, Tensor]


def per_layer_sgd(lrs: Tensor, momenta: Tensor, layer_of: dict[str, int]) -> torchopt.base.GradientTransformation:
    """SGD with heavy-ball momentum, one rate ``lrs[l]`` and momentum ``momenta[l]`` per layer l.

    ``v ← μ_l v + g`` and update ``−η_l v`` for every parameter in layer ``l = layer_of[name]``;
    with v = 0 at the start, the first trace is the gradient, as in torch.optim.SGD. ``lrs`` and
    ``momenta`` may carry autograd history: the update is differentiable in them, which is what
    ``bilevel.Unroll`` backpropagates through. Always out of place (``inplace`` is ignored).
    """

    def init_fn(params: dict[str, Tensor]) -> PerLayerTrace:
        return PerLayerTrace({name: torch.zeros_like(p) for name, p in params.items()})

    def update_fn(updates: dict[str, Tensor], state: PerLayerTrace, *, params: Any = None, inplace: bool = True):
        trace = {name: momenta[layer_of[name]] * state.trace[name] + g for name, g in updates.items()}
        return {name: -lrs[layer_of[name]] * v for name, v in trace.items()}, PerLayerTrace(trace)

    return torchopt.base.GradientTransformation(init_fn, update_fn)


def make_model(args: argparse.Namespace, x: Tensor) -> tuple[bilevel.FunctionalModule, list[str], dict[str, int]]:
    """The ReLU MLP pixels–hidden–hidden–classes on images like ``x`` as a pure function, with the same
    initial weights for a given ``args.seed``; the names ``layer1``… of its Linear layers; and each
    parameter's layer index."""
    torch.manual_seed(args.seed)
    h = args.hidden
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(x[0].numel(), h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, args.classes)
    )
    linear = [name for name, m in model.named_children() if isinstance(m, nn.Linear)]
    layer_of = {f"{name}.{kind}": i for i, name in enumerate(linear) for kind in ("weight", "bias")}
    names = [f"layer{i + 1}" for i in range(len(linear))]
    return bilevel.FunctionalModule(model.to(device=x.device, dtype=x.dtype)), names, layer_of


def batches(n: int, size: int, seed: int) -> Iterator[Tensor]:
    """Minibatch indices forever: a fresh permutation per epoch, the last short batch dropped."""
    generator = torch.Generator().manual_seed(seed)  # every run of a seed sees the same minibatches
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - size + 1, size):
            yield perm[i : i + size]


def tune_rates(
    fm: bilevel.FunctionalModule,
    layer_of: dict[str, int],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    args: argparse.Namespace,
) -> Iterator[tuple[bilevel.BilevelOptimizer, bilevel.StepResult]]:
    """Algorithm 1 with ``Unroll(K)`` on per-layer log η_l and logit μ_l: ``args.steps`` minibatch
    steps, every K-th (K = ``args.unroll``) also a hyperstep through the last K updates. Yields the
    optimiser and the step's result after every step."""
    x, y = train

    def train_loss(params: dict, hparams: dict, idx: Tensor) -> Tensor:
        return F.cross_entropy(fm(params, fm.state, x[idx])[0], y[idx])  # no hyperparameter in L_T

    def val_loss(params: dict, hparams: dict, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(fm(params, fm.state, batch[0])[0], batch[1])

    def inner(h: dict) -> torchopt.base.GradientTransformation:  # rebuilt from the hyperparameters every step
        return per_layer_sgd(h["log_lr"].exp(), torch.sigmoid(h["logit_momentum"]), layer_of)

    layers, like = len(set(layer_of.values())), dict(dtype=x.dtype, device=x.device)
    hparams = {
        "log_lr": torch.full((layers,), math.log(args.init_lr), **like),
        "logit_momentum": torch.full((layers,), math.log(args.init_momentum / (1 - args.init_momentum)), **like),
    }
    opt = bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        fm.params,
        hparams,
        inner=inner,
        outer=torchopt.adam(args.outer_lr),
        strategy=bilevel.Unroll(args.unroll),
        inner_steps=args.unroll,
        seed=args.seed,
        check=args.check,
    )
    order = batches(len(y), args.batch_size, args.seed)
    for _ in range(args.steps):
        yield opt, opt.step(next(order).to(x.device), val)


# --8<-- [end:core]


# ------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(fm: bilevel.FunctionalModule, params: dict, data: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """(accuracy, cross-entropy) on ``data``."""
    x, y = data
    logits = fm(params, fm.state, x)[0]
    return float((logits.argmax(-1) == y).double().mean()), float(F.cross_entropy(logits, y))


class Curves:
    """Validation and test accuracy and loss every ``every`` steps."""

    def __init__(self, fm: bilevel.FunctionalModule, val, test, every: int) -> None:
        self.fm, self.val, self.test, self.every = fm, val, test, every
        self.data: dict[str, list] = {k: [] for k in ("step", "val_acc", "val_loss", "test_acc", "test_loss")}

    def maybe(self, step: int, params: dict, last: bool = False) -> None:
        if step % self.every and not last:
            return
        self.data["step"].append(step)
        for part, data in (("val", self.val), ("test", self.test)):
            acc, loss = evaluate(self.fm, params, data)
            self.data[f"{part}_acc"].append(acc)
            self.data[f"{part}_loss"].append(loss)


# ------------------------------------------------------------------------------------------- runs


def train_fixed(lr: float, args: argparse.Namespace, data, update) -> dict[str, Any]:
    """The baseline: plain training with one fixed rate and momentum in every layer, on the tuned run's
    minibatches from its initial weights."""
    train, val, test = data
    x, y = train
    fm, names, layer_of = make_model(args, x)
    rates = torch.full((len(names),), lr, dtype=x.dtype, device=x.device)
    momenta = torch.full_like(rates, args.init_momentum)
    sgd = per_layer_sgd(rates, momenta, layer_of)
    params = {k: v.detach().clone() for k, v in fm.params.items()}
    state = sgd.init(params)

    def loss(p: dict, idx: Tensor) -> Tensor:
        return F.cross_entropy(fm(p, fm.state, x[idx])[0], y[idx])

    grad = torch.func.grad(loss)
    curves = Curves(fm, val, test, args.record_every)
    curves.maybe(0, params)
    order = batches(len(y), args.batch_size, args.seed)
    for step in range(1, args.steps + 1):
        updates, state = sgd.update(grad(params, next(order).to(x.device)), state)
        params = torchopt.apply_updates(params, updates)
        curves.maybe(step, params, last=step == args.steps)
        update(advance=1, run=f"lr={lr:g}")
    return curves.data


def train_tuned(args: argparse.Namespace, data, update) -> tuple[dict, dict]:
    """:func:`tune_rates` from the grid's initial weights, with its curves and the rates and momenta
    after every hyperstep."""
    train, val, test = data
    fm, names, layer_of = make_model(args, train[0])
    trajectory: dict[str, Any] = {"step": [0], "lr": {n: [args.init_lr] for n in names}}
    trajectory["momentum"] = {n: [args.init_momentum] for n in names}
    curves = Curves(fm, val, test, args.record_every)
    curves.maybe(0, fm.params)
    for step, (opt, result) in enumerate(tune_rates(fm, layer_of, train, val, args), start=1):
        if result.hyper is not None:
            trajectory["step"].append(step)
            for i, n in enumerate(names):
                trajectory["lr"][n].append(float(opt.hparams["log_lr"][i].exp()))
                trajectory["momentum"][n].append(float(torch.sigmoid(opt.hparams["logit_momentum"][i])))
            status = {n: trajectory["lr"][n][-1] for n in names}
            update(advance=1, run="tuned", val_loss=float(result.hyper.val_loss), **status)
        else:
            update(advance=1)
        curves.maybe(step, opt.params, last=step == args.steps)
    if opt.skipped_outer_steps or opt.skipped_inner_steps:
        print(f"tuned run: {opt.skipped_inner_steps} inner and {opt.skipped_outer_steps} outer steps skipped")
    recipe_common.print_check(opt)
    return curves.data, trajectory


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with the four MNIST IDX files")
    parser.add_argument("--steps", type=int, default=None, help="minibatch steps per run (default 500; quick 300)")
    parser.add_argument("--batch-size", type=int, default=64, help="training minibatch size (default 64)")
    parser.add_argument("--unroll", type=int, default=10, help="K: steps per hyperstep, all unrolled (default 10)")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam learning rate of the hyperparameters")
    parser.add_argument("--init-lr", type=float, default=0.01, help="initial learning rate of every layer")
    parser.add_argument("--init-momentum", type=float, default=0.9, help="initial (tuned) / fixed (grid) momentum")
    parser.add_argument("--grid", default=None, help="fixed learning rates to compare (default 0.01,0.03,0.1,0.3,1)")
    parser.add_argument("--val-per-class", type=int, default=25, help="validation images per class (default 25)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units per layer (default 64)")
    args = parser.parse_args(argv)

    if args.dataset != "digits" and args.data_dir is None:
        parser.error(f"--dataset {args.dataset} reads files from disk: pass --data-dir pointing at your copy.")
    args.steps = args.steps if args.steps is not None else (300 if args.quick else 500)
    grid = args.grid or ("0.01,0.1,1" if args.quick else "0.01,0.03,0.1,0.3,1")
    try:
        args.grid = recipe_common.numbers_flag(grid)
    except ValueError as err:
        parser.error(f"--grid {err}: expected comma-separated learning rates such as 0.01,0.1,1")
    if not all(math.isfinite(v) and v > 0 for v in args.grid):
        parser.error(f"--grid {grid!r}: expected comma-separated learning rates > 0 such as 0.01,0.1,1")
    recipe_common.require(parser, args, ("steps", "batch_size", "unroll", "val_per_class", "hidden"))
    if args.unroll > args.steps:
        parser.error(f"--unroll {args.unroll} / --steps {args.steps}: need unroll <= steps for one hyperstep.")
    recipe_common.require(parser, args, positive=("outer_lr", "init_lr"))
    if not 0 < args.init_momentum < 1:
        parser.error(f"--init-momentum {args.init_momentum}: must lie strictly between 0 and 1 (it is a logit).")
    args.record_every = max(1, args.steps // 60)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return recipe_common.main(run, parse_args(argv))


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    generator = recipe_common.seed_everything(args.seed)
    train, val, test = recipe_data.clean_split(args.dataset, args.data_dir, args.val_per_class, generator)
    if len(train[1]) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size}: only {len(train[1])} training images.")
    args.classes = int(max(train[1].max(), val[1].max(), test[1].max())) + 1
    data = tuple((x.to(device), y.to(device)) for x, y in (train, val, test))
    print(f"{args.dataset}: {len(train[1])} training, {len(val[1])} validation, {len(test[1])} test images")

    grid: dict[str, dict] = {}
    times: dict[str, float] = {}
    with recipe_common.progress("learning rates", total=args.steps * (1 + len(args.grid))) as update:
        clock = time.perf_counter()
        tuned, trajectory = train_tuned(args, data, update)
        times["tuned"] = time.perf_counter() - clock
        for lr in args.grid:
            clock = time.perf_counter()
            grid[f"{lr:g}"] = train_fixed(lr, args, data, update)
            times[f"lr={lr:g}"] = time.perf_counter() - clock

    best = max(grid, key=lambda k: grid[k]["val_acc"][-1])  # chosen on validation, as a user would
    results: dict[str, Any] = {
        "test_acc": {
            "tuned": tuned["test_acc"][-1],
            "best_fixed": grid[best]["test_acc"][-1],
            "grid": {k: c["test_acc"][-1] for k, c in grid.items()},
        },
        "val_acc": {
            "tuned": tuned["val_acc"][-1],
            "best_fixed": grid[best]["val_acc"][-1],
            "grid": {k: c["val_acc"][-1] for k, c in grid.items()},
        },
        "best_fixed_lr": float(best),
        "learning_rates": trajectory,
        "wall_time_s": times,
        "steps": args.steps,
    }
    recipe_common.write_results(args.out, results)
    (args.out / "history.json").write_text(json.dumps({"tuned": tuned, "grid": grid}) + "\n")
    plot_rates(trajectory, grid, best, args.out / "learning_rates_trajectory.png")
    plot_curves(tuned, grid, best, args.out / "learning_rates_curves.png")
    final = ", ".join(f"{n} {v[-1]:.3g}" for n, v in trajectory["lr"].items())
    momenta = ", ".join(f"{v[-1]:.2f}" for v in trajectory["momentum"].values())
    print(f"grid (fixed lr, momentum {args.init_momentum:g}):")
    for k in grid:
        mark = "  <- best on validation" if k == best else ""
        print(f"  lr {k:>5}: val {results['val_acc']['grid'][k]:.3f}  test {results['test_acc']['grid'][k]:.3f}{mark}")
    print(
        f"tuned: val {results['val_acc']['tuned']:.3f}  test {results['test_acc']['tuned']:.3f}  "
        f"(final rates {final}; momenta {momenta}; {times['tuned']:.1f} s vs {times[f'lr={best}']:.1f} s fixed)"
    )
    print(f"wrote {args.out}/results.json, history.json and two figures in {time.perf_counter() - started:.1f}s")
    return results


# ----------------------------------------------------------------------------------------- plots


def plot_rates(trajectory: dict, grid: dict, best: str, path: Path) -> None:
    fig, (ax_lr, ax_mu) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for name in trajectory["lr"]:
        ax_lr.plot(trajectory["step"], trajectory["lr"][name], label=name)
        ax_mu.plot(trajectory["step"], trajectory["momentum"][name], label=name)
    for k in grid:
        ax_lr.axhline(float(k), color="k" if k == best else "0.8", lw=0.8, ls="--")
    ax_lr.set(
        yscale="log", xlabel="step", ylabel="learning rate η_l", title="learned rates (dashed: grid; black: best)"
    )
    ax_mu.set(xlabel="step", ylabel="momentum μ_l", title="learned momenta")
    ax_lr.title.set_fontsize(9)
    ax_mu.title.set_fontsize(9)
    ax_lr.legend(fontsize=8)
    ax_mu.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(tuned: dict, grid: dict, best: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for ax, part in zip(axes, ("val", "test")):
        ax.plot(tuned["step"], tuned[f"{part}_acc"], color="tab:blue", lw=2, label="tuned per-layer rates")
        for k, c in grid.items():
            style = dict(color="k", lw=1.5) if k == best else dict(color="0.7", lw=0.8)
            ax.plot(c["step"], c[f"{part}_acc"], label=f"fixed lr {k}" + (" (best)" if k == best else ""), **style)
        ax.set(xlabel="step", ylabel=f"{'validation' if part == 'val' else 'test'} accuracy", ylim=(0.5, 1.0))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
