"""Learn a data-augmentation network whose every weight is a hyperparameter (Section 5.4, Table 3, Fig 7).

A U-Net x̃ = f_λ(x, ε) sees the image and one channel of N(0, 1) noise and starts as the identity; a
classifier is trained only on its outputs, and all the U-Net's weights λ are tuned by BilevelOptimizer
on the classifier's loss on clean validation images. Compared over restarts with identical seeds: no
tuning, Identity, Neumann(3) and Unroll(3) — validation and test accuracy, and the peak memory of one
hyperstep. Data: scikit-learn's digits, or MNIST / CIFAR-10 files with --data-dir (nothing is
downloaded); ``--checkpoint PATH`` resumes a killed run. The method, the choices behind it and the
measured results: docs/recipes/augmentation.md.

Run:  python recipes/augmentation.py [--quick] [--device cuda] [--dataset cifar10 --data-dir DIR]
Writes ``results.json``, ``samples.png`` (Fig 7) and ``accuracy.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_common as common
import recipe_data

import bilevel

NAME = "augmentation"
METHODS = ("no_ho", "identity", "neumann3", "unroll3")


# --8<-- [start:core]
def _conv(c_out: int, c_in: int, k: int = 3, zero: bool = False) -> tuple[Tensor, Tensor]:
    bound = 1.0 / math.sqrt(c_in * k * k)
    w = torch.zeros(c_out, c_in, k, k) if zero else torch.empty(c_out, c_in, k, k).uniform_(-bound, bound)
    return w, torch.zeros(c_out)


def init_unet(channels: int, width: int) -> dict[str, Tensor]:
    """λ: a two-level U-Net on image + 1 noise channel; the output convolution starts at zero (identity)."""
    c, p = width, {}
    for name, shape in (
        ("enc1", (c, channels + 1)),
        ("enc2", (2 * c, c)),
        ("mid", (2 * c, 2 * c)),
        ("dec1", (c, 3 * c)),
    ):
        p[f"{name}.w"], p[f"{name}.b"] = _conv(*shape)
    p["out.w"], p["out.b"] = _conv(channels, c, zero=True)
    return p


def augment(lam: dict[str, Tensor], x: Tensor, eps: Tensor) -> Tensor:
    """x̃ = x + U-Net([x, ε]); the skip from enc1 to dec1 is the U-Net's, the x + … residual the paper's."""
    h1 = F.relu(F.conv2d(torch.cat([x, eps], 1), lam["enc1.w"], lam["enc1.b"], padding=1))
    h2 = F.relu(F.conv2d(F.avg_pool2d(h1, 2), lam["enc2.w"], lam["enc2.b"], padding=1))
    h2 = F.relu(F.conv2d(h2, lam["mid.w"], lam["mid.b"], padding=1))
    up = F.interpolate(h2, scale_factor=2.0, mode="nearest")
    h3 = F.relu(F.conv2d(torch.cat([up, h1], 1), lam["dec1.w"], lam["dec1.b"], padding=1))
    return x + F.conv2d(h3, lam["out.w"], lam["out.b"], padding=1)


def losses(classifier: Callable) -> tuple[Callable, Callable]:
    """L_T: cross-entropy on augmented examples, in train mode; L_V: on clean validation images, in eval mode
    (λ enters it only through w). ``classifier(w, state, x, train)`` returns (logits, new state)."""

    def train_loss(w: dict, lam: dict, batch: tuple, state: dict) -> tuple[Tensor, dict]:
        x, y, eps = batch
        logits, state = classifier(w, state, augment(lam, x, eps), train=True)
        return F.cross_entropy(logits, y), state

    def val_loss(w: dict, lam: dict, batch: tuple, state: dict) -> tuple[Tensor, dict]:
        x, y = batch
        logits, state = classifier(w, state, x, train=False)
        return F.cross_entropy(logits, y), state

    return train_loss, val_loss


def next_batch(data: dict, cfg: dict, gen: torch.Generator, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """(x, y, ε): the noise travels in the batch, so L_T is a deterministic function of (w, λ, batch) and the
    HVPs, the mixed product and Unroll's replay of a hyperstep all see the same ε."""
    idx = torch.randint(0, len(data["x"]), (cfg["batch"],), generator=gen)
    x = data["x"][idx]
    eps = torch.randn(x.shape[0], 1, *x.shape[2:], generator=gen)
    return x.to(device), data["y"][idx].to(device), eps.to(device)


def val_batch(data: dict, cfg: dict, gen: torch.Generator, device: str) -> tuple[Tensor, Tensor]:
    idx = torch.randint(0, len(data["val_x"]), (cfg["batch"],), generator=gen)
    return data["val_x"][idx].to(device), data["val_y"][idx].to(device)


def make_optimizer(
    classifier: Any, lam: dict, strategy: bilevel.Strategy, cfg: dict, seed: int, check: bool = False
) -> bilevel.BilevelOptimizer:
    """Adam on the classifier's weights (its ``state``, e.g. BatchNorm statistics, follows the inner steps),
    Adam on the U-Net's weights λ, a hyperstep every cfg["inner_steps"] inner steps."""
    return bilevel.BilevelOptimizer(
        *losses(classifier),
        classifier.params,
        lam,
        state=classifier.state,
        inner=torchopt.adam(cfg["lr"], eps_root=1e-10),  # eps_root: finite derivatives of √v at v = 0 (Unroll)
        outer=torchopt.adam(cfg["hlr"]),
        strategy=strategy,
        inner_steps=cfg["inner_steps"],
        seed=seed,
        check=check,
    )


def train(
    opt: bilevel.BilevelOptimizer, data: dict, cfg: dict, gen: torch.Generator, device: str, tune: bool = True
) -> Iterator[float]:
    """Step ``opt`` to cfg["steps"] inner steps, with a validation batch for every hyperstep (``tune=False``:
    inner steps only, the untuned baseline); yield the training loss after every hyper-period."""
    N = opt.inner_steps
    while opt.steps < cfg["steps"]:
        for _ in range(N):
            batch = next_batch(data, cfg, gen, device)
            if not tune:
                loss = opt.inner_step(batch)
                continue
            vb = val_batch(data, cfg, gen, device) if (opt.steps + 1) % N == 0 else None
            loss = opt.step(batch, vb).loss
        yield float(loss)


# --8<-- [end:core]


# ---------------------------------------------------------------------------------- classifiers


def init_resnet(channels: int, width: int, classes: int = 10) -> dict[str, Tensor]:
    """A small ResNet without batch norm: stem, a residual block at `width`, a strided one at 2·width."""
    c = width
    p = {}
    for name, shape in (
        ("stem", (c, channels)),
        ("b1a", (c, c)),
        ("b1b", (c, c)),
        ("b2a", (2 * c, c)),
        ("b2b", (2 * c, 2 * c)),
    ):
        p[f"{name}.w"], p[f"{name}.b"] = _conv(*shape)
    p["b2s.w"], p["b2s.b"] = _conv(2 * c, c, k=1)
    p["b1b.w"] *= 0.1  # damp the residual branches at init (no batch norm here)
    p["b2b.w"] *= 0.1
    bound = 1.0 / math.sqrt(2 * c * 16)
    p["fc.w"] = torch.empty(classes, 2 * c * 16).uniform_(-bound, bound)
    p["fc.b"] = torch.zeros(classes)
    return p


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm, and a 1×1 projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(c_out)
        self.b = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        r = F.relu(self.bn_a(self.a(x)))
        return F.relu(self.shortcut(x) + self.bn_b(self.b(r)))


class ResNet18(nn.Module):
    """The paper's ResNet-18 for 32×32 images, with BatchNorm as in the paper: a 3×3 stem, then 4 stages
    of 2 basic blocks with base·(1, 2, 4, 8) channels (11.2 M weights at base 64). An ordinary
    ``nn.Module``: the recipe drives it through ``bilevel.FunctionalModule``, which carries the
    BatchNorm running statistics as model state."""

    def __init__(self, channels: int, classes: int = 10, base: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU())
        blocks, c_in = [], base
        for stage, mult in enumerate((1, 2, 4, 8)):
            for block in range(2):
                blocks.append(BasicBlock(c_in, base * mult, 2 if stage > 0 and block == 0 else 1))
                c_in = base * mult
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def classify(w: dict[str, Tensor], x: Tensor) -> Tensor:
    """The small ResNet's forward."""
    h = F.relu(F.conv2d(x, w["stem.w"], w["stem.b"], padding=1))
    r = F.relu(F.conv2d(h, w["b1a.w"], w["b1a.b"], padding=1))
    h = F.relu(h + F.conv2d(r, w["b1b.w"], w["b1b.b"], padding=1))
    r = F.relu(F.conv2d(h, w["b2a.w"], w["b2a.b"], padding=1, stride=2))
    h = F.relu(F.conv2d(h, w["b2s.w"], w["b2s.b"], stride=2) + F.conv2d(r, w["b2b.w"], w["b2b.b"], padding=1))
    return F.adaptive_avg_pool2d(h, 4).flatten(1) @ w["fc.w"].T + w["fc.b"]  # keep a 4×4 layout (8×8 digits)


class Classifier:
    """The classifier as ``forward(params, state, x, train) -> (logits, new_state)``: the small ResNet
    (a plain function, no state) or the ResNet-18 module through ``bilevel.FunctionalModule``."""

    def __init__(self, kind: str, channels: int, width: int, device: str, base: int = 64) -> None:
        if kind == "resnet18":
            self.module: bilevel.FunctionalModule | None = bilevel.FunctionalModule(
                ResNet18(channels, base=base).to(device)
            )
            self.params, self.state = self.module.params, self.module.state
        else:
            self.module = None
            self.params = {k: v.to(device) for k, v in init_resnet(channels, width).items()}
            self.state = {}

    def __call__(self, w: dict, state: dict, x: Tensor, train: bool) -> tuple[Tensor, dict]:
        if self.module is None:
            return classify(w, x), state
        return self.module(w, state, x, train=train)


def strategy_for(method: str, alpha: float) -> bilevel.Strategy:
    if method == "identity":
        return bilevel.Identity(alpha=alpha)
    if method == "unroll3":
        return bilevel.Unroll(steps=3)  # BilevelOptimizer differentiates through its own last 3 inner updates
    return bilevel.Neumann(steps=3, alpha=alpha)


def build(
    method: str, data: dict, cfg: dict, run_seed: int, device: str, check: bool = False
) -> tuple[Classifier, bilevel.BilevelOptimizer]:
    torch.manual_seed(run_seed)  # same classifier and U-Net initialisation for every method
    channels = data["x"].shape[1]
    net = Classifier(cfg["classifier"], channels, 2 * cfg["width"], device)
    lam = {k: v.to(device) for k, v in init_unet(channels, cfg["width"]).items()}
    return net, make_optimizer(net, lam, strategy_for(method, cfg["alpha"]), cfg, run_seed, check)


# ------------------------------------------------------------------------------ configuration


def build_parser() -> argparse.ArgumentParser:
    p = common.base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist", "cifar10"], help="image data")
    p.add_argument("--data-dir", type=Path, default=None, help="directory with MNIST IDX or CIFAR-10 pickle files")
    p.add_argument("--restarts", type=int, default=None, help="random restarts per method")
    p.add_argument("--steps", type=int, default=None, help="inner (classifier) steps per run")
    p.add_argument("--inner-steps", type=int, default=5, help="inner steps per hyperstep (N, >= 3 for Unroll(3))")
    p.add_argument("--width", type=int, default=None, help="channels of the first U-Net / ResNet stage")
    p.add_argument(
        "--classifier",
        default="small",
        choices=["small", "resnet18"],
        help="classifier: the small ResNet (default) or the paper's ResNet-18 layout (for CIFAR-10 on a GPU)",
    )
    p.add_argument("--n-train", type=int, default=None, help="training examples (the rest of train is validation)")
    common.checkpoint_flags(p, every=10)
    p.add_argument("--measure-memory", default=None, choices=["neumann3", "unroll3"], help=argparse.SUPPRESS)
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    cfg = {
        "restarts": common.given(args.restarts, 2 if quick else 4),
        "steps": common.given(args.steps, 30 if quick else 600),
        "inner_steps": args.inner_steps,
        "width": common.given(args.width, 4 if quick else 12),
        "n_train": common.given(args.n_train, 200 if quick else 500),
        "n_val": 100 if quick else 300,
        "batch": 32 if quick else 64,
        "lr": 1e-2 if quick else 2e-3,
        "hlr": 3e-3,
        "alpha": 1e-2,  # Neumann / Identity step size (≈ 1/λ_max of the training Hessian; see docs)
        "checkpoint_every": args.checkpoint_every,
        "classifier": args.classifier,
    }
    common.check_counts(cfg, ("restarts", "steps", "inner_steps", "width", "n_train", "checkpoint_every"))
    if cfg["inner_steps"] < 3:
        raise ValueError(f"`--inner-steps {cfg['inner_steps']}`: Unroll(3) needs >= 3 inner steps per hyperstep.")
    if cfg["steps"] < cfg["inner_steps"]:
        raise ValueError(f"`--steps {cfg['steps']}` must be >= `--inner-steps {cfg['inner_steps']}`.")
    common.check_stop_after(args)
    if args.dataset != "digits" and args.data_dir is None:
        raise ValueError(f"`--dataset {args.dataset}` reads files from disk: pass --data-dir pointing at your copy.")
    return cfg


# ---------------------------------------------------------------------------------------- data


def load_data(args: argparse.Namespace, cfg: dict) -> dict[str, Tensor]:
    """Fixed (seeded) train / validation split of the training set, plus the test set."""
    x, y, test_x, test_y = recipe_data.load_images(args.dataset, args.data_dir)
    dtype = torch.get_default_dtype()  # the loaders give float32; follow the models' dtype
    x, test_x = x.to(dtype), test_x.to(dtype)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    n_train, n_val = cfg["n_train"], cfg["n_val"]
    if n_train + n_val > len(x):
        raise ValueError(f"`--n-train {n_train}` + {n_val} validation examples exceed the {len(x)} available.")
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    return {"x": x[tr], "y": y[tr], "val_x": x[va], "val_y": y[va], "test_x": test_x, "test_y": test_y}


def accuracy(net: Classifier, w: dict, state: dict, x: Tensor, y: Tensor, device: str) -> float:
    return common.accuracy(lambda chunk: net(w, state, chunk.to(device), train=False)[0], x, y.to(device), chunk=512)


# ------------------------------------------------------------------------------------ training


def run(method: str, restart: int, data: dict, cfg: dict, args: argparse.Namespace, ckpt: dict, track: Any) -> dict:
    """Train one classifier (and, unless no_ho, its augmentation); return accuracies and final λ."""
    device = args.device
    run_seed = args.seed + 1000 * restart
    net, opt = build(method, data, cfg, run_seed, device, check=args.check)
    gen = torch.Generator().manual_seed(run_seed + 1)  # data order and augmentation noise
    key = f"{method}/{restart}"
    current = ckpt.get("current")
    if current is not None and current["key"] == key:
        opt.load_state_dict(current["opt"])
        gen.set_state(current["gen"])
    for loss in train(opt, data, cfg, gen, device, tune=method != "no_ho"):
        track(f"{method}#{restart}", loss)
        common.end_period(ckpt, args, lambda: {"key": key, "opt": opt.state_dict(), "gen": gen.get_state()})
    common.print_check(opt, f"{method}#{restart}: ")
    w, state = opt.params, opt.state
    return {
        "val_acc": accuracy(net, w, state, data["val_x"], data["val_y"], device),
        "test_acc": accuracy(net, w, state, data["test_x"], data["test_y"], device),
        "hparams": {k: v.detach().cpu() for k, v in opt.hparams.items()},
    }


# -------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's own peak resident memory (VmHWM). ``getrusage``'s ``ru_maxrss`` is the same counter
    but also reports the peak inherited from the parent across exec, which would hide the child's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _reset_peak_rss() -> None:
    """Reset the peak mark to the current resident memory (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_here(method: str, data: dict, cfg: dict, args: argparse.Namespace) -> int:
    """Peak extra memory of one step() call that performs a hyperstep: on CUDA the allocator's peak above
    the memory allocated before it; on CPU (in the fresh subprocess of measure_memory) the growth of peak
    resident memory above the resident memory before it. docs/recipes/augmentation.md says why."""
    device = args.device
    _, opt = build(method, data, cfg, args.seed, device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(2 * cfg["inner_steps"] - 1):  # one full hyper-period first, for warm allocator caches
        opt.step(next_batch(data, cfg, gen, device), val_batch(data, cfg, gen, device))
    tb, vb = next_batch(data, cfg, gen, device), val_batch(data, cfg, gen, device)
    if torch.device(device).type == "cuda":
        return common.step_peak_memory(opt, tb, vb)
    _reset_peak_rss()
    before = _rss_bytes()
    opt.step(tb, vb)
    return _peak_rss_bytes() - before


def measure_memory(method: str, argv: list[str], args: argparse.Namespace, data: dict, cfg: dict) -> int:
    """measure_here; on CPU in a fresh subprocess where glibc returns large freed blocks to the OS, so that
    resident memory follows live tensor memory."""
    if torch.device(args.device).type == "cuda":
        return measure_here(method, data, cfg, args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(torch.get_num_threads()))
    package_root = str(Path(bilevel.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--measure-memory", method]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement subprocess failed:\n{out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_mem_bytes"])


def _clean_argv(argv: list[str]) -> list[str]:
    """The user's flags minus the checkpoint/stop/out ones (the memory subprocess needs none of them)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--checkpoint", "--stop-after", "--out", "--checkpoint-every"):
            skip = True
            continue
        if a.split("=")[0] in ("--checkpoint", "--stop-after", "--out", "--checkpoint-every"):
            continue
        out.append(a)
    return out


# ------------------------------------------------------------------------------------- figures


@torch.no_grad()
def plot(done: dict, data: dict, cfg: dict, out: Path, restarts: int) -> list[Path]:
    lam = done["neumann3/0"]["hparams"]
    x = data["val_x"][:6]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([augment(lam, x, torch.randn(len(x), 1, *x.shape[2:], generator=gen)) for _ in range(64)])
    std = draws.std(0)
    fig, axes = plt.subplots(len(x), 4, figsize=(5.2, 1.3 * len(x)))
    show = (lambda t: t[0]) if x.shape[1] == 1 else (lambda t: t.permute(1, 2, 0).clamp(0, 1))
    for i in range(len(x)):
        panels = [(x[i], "original"), (draws[0, i], "sample 1"), (draws[1, i], "sample 2"), (std[i], "pixel std")]
        for j, (img, title) in enumerate(panels):
            ax = axes[i, j]
            if j == 3:
                ax.imshow(img.mean(0).float().numpy(), cmap="magma")
            else:
                ax.imshow(show(img).float().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle("Fig 7: learned augmentation (Neumann 3, restart 0)", fontsize=9)
    fig.tight_layout()
    samples = out / "samples.png"
    fig.savefig(samples, dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    for k, key in enumerate(("val_acc", "test_acc")):
        means = [sum(done[f"{m}/{r}"][key] for r in range(restarts)) / restarts for m in METHODS]
        errs = [_std([done[f"{m}/{r}"][key] for r in range(restarts)]) for m in METHODS]
        ax.bar([i + 0.38 * k for i in range(len(METHODS))], means, 0.38, yerr=errs, label=key)
    lo = min(done[f"{m}/{r}"][k] for m in METHODS for r in range(restarts) for k in ("val_acc", "test_acc"))
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_xticks([i + 0.19 for i in range(len(METHODS))], METHODS)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title(f"Table 3: mean ± std over {restarts} restarts", fontsize=9)
    fig.tight_layout()
    acc = out / "accuracy.png"
    fig.savefig(acc, dpi=90)
    plt.close(fig)
    return [samples, acc]


def _std(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))


# ---------------------------------------------------------------------------------------- main


def experiment(args: argparse.Namespace, device: torch.device, argv: list[str]) -> dict:
    """Every method and restart (resuming from --checkpoint), the memory of a hyperstep, results and figures."""
    args.device = str(device)
    cfg = config(args)
    data = load_data(args, cfg)
    ckpt = common.resume(args, "measure_memory")
    R = cfg["restarts"]
    per_run = math.ceil(cfg["steps"] / cfg["inner_steps"])
    start = time.perf_counter()
    with common.progress(f"{NAME} ({args.dataset})", total=per_run * R * len(METHODS)) as update:
        update(advance=ckpt["periods"])

        def track(label: str, loss: float) -> None:
            update(run=label, loss=loss)

        runs = {
            f"{m}/{r}": functools.partial(run, m, r, data, cfg, args, ckpt, track) for r in range(R) for m in METHODS
        }
        if not common.run_pending(ckpt, runs):
            return {"stopped_after": ckpt["periods"]}

    def memory() -> dict[str, int]:
        return {m: measure_memory(m, _clean_argv(argv), args, data, cfg) for m in ("neumann3", "unroll3")}

    common.run_pending(ckpt, {"memory": memory})
    done = ckpt["done"]
    n_hparams = sum(v.numel() for v in done["neumann3/0"]["hparams"].values())
    results = {
        "val_acc": {m: [done[f"{m}/{r}"]["val_acc"] for r in range(R)] for m in METHODS},
        "test_acc": {m: [done[f"{m}/{r}"]["test_acc"] for r in range(R)] for m in METHODS},
        "peak_mem_bytes": done["memory"],
        "n_hparams": n_hparams,
    }
    common.write_results(args.out, results)
    plot(done, data, cfg, args.out, R)
    print(f"{NAME}: {n_hparams} hyperparameters, {R} restarts, {time.perf_counter() - start:.0f}s")
    for m in METHODS:
        va, te = results["val_acc"][m], results["test_acc"][m]
        print(
            f"  {m:>9}: val {100 * sum(va) / R:.2f} ± {100 * _std(va):.2f}   test {100 * sum(te) / R:.2f} ± "
            f"{100 * _std(te):.2f}"
        )
    mem = results["peak_mem_bytes"]
    print(
        f"  peak memory of a hyperstep: neumann3 {mem['neumann3'] / 2**20:.2f} MiB, "
        f"unroll3 {mem['unroll3'] / 2**20:.2f} MiB"
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.measure_memory is not None:  # the subprocess of measure_memory(): it writes no files
        args.device = str(common.resolve_device(args.device))
        cfg = config(args)
        peak = measure_here(args.measure_memory, load_data(args, cfg), cfg, args)
        print(json.dumps({"peak_mem_bytes": peak}))
        return {"peak_mem_bytes": peak}
    # Not common.main: the recipe leaves torch's thread count alone (its numbers depend on it).
    return experiment(args, common.prepare(args), argv)


if __name__ == "__main__":
    main()
