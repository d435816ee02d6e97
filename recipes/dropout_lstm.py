"""Tune an LSTM language model's regularisers by implicit differentiation (Section 5.5, Table 4, Fig 8).

A word-level LSTM language model in the AWD-LSTM style, regularised by the paper's seven
hyperparameters: concrete (relaxed Bernoulli) dropout on the embedding, input, hidden and output
activations and DropConnect on the hidden-to-hidden weights, and the AR/TAR activation penalties. The
rates are tuned by BilevelOptimizer as 7 scalars and as one per unit or weight, against the untuned
model (Table 4: validation and test perplexity); the Fig 8 check tunes one decay coefficient per weight
to drive down the loss on 10 validation sequences. Data: Python's documentation text (standard
library), or Penn Treebank with --corpus ptb --data-dir DIR; ``--checkpoint PATH`` resumes a killed
run. The method, the choices behind it and the measured results: docs/recipes/dropout_lstm.md.

Run:  python recipes/dropout_lstm.py [--quick] [--device cuda] [--corpus ptb --data-dir DIR]
Writes ``results.json``, ``rates.png`` (rate trajectories) and ``overfit.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optree
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_common as common
import text_data

import bilevel

NAME = "dropout_lstm"
RATES = ("embed", "input", "hidden", "output", "dropconnect")  # concrete-dropout rates
TEMPERATURE = 0.1  # concrete relaxation temperature (Gal et al., 2017)


# --8<-- [start:core]
def concrete_mask(theta: Tensor, u: Tensor) -> Tensor:
    """Relaxed-Bernoulli keep mask scaled by 1/(1−p), p = sigmoid(θ) the drop rate, for uniforms u."""
    theta = theta.clamp(-6.0, 6.0)  # keep p in [0.0025, 0.9975] so 1/(1−p) stays bounded
    drop = torch.sigmoid((theta + torch.log(u) - torch.log1p(-u)) / TEMPERATURE)
    return (1.0 - drop) / (1.0 - torch.sigmoid(theta))


def forward(params: dict, x: Tensor, hparams: dict | None = None, noise: dict | None = None):
    """Logits (B, T, V), the dropped and the raw last-layer outputs; with ``noise`` (uniforms) dropout applies."""
    L = sum(1 for k in params if k.startswith("w_hh"))

    def keep(group: str, key: str | None = None, layer: int = 0) -> Tensor:  # a list: the rates of each layer
        theta = hparams["rates"][group]
        theta = theta[min(layer, len(theta) - 1)] if isinstance(theta, list) else theta
        return concrete_mask(theta, noise[key or group])

    embed = params["embed"]  # embedding dropout drops word types (rows); input/hidden/output: a mask per sequence
    out = embed[x] if noise is None else (embed * keep("embed").unsqueeze(1))[x] * keep("input").unsqueeze(1)
    for layer in range(L):
        w_hh = params[f"w_hh{layer}"]
        if noise is not None:
            w_hh = w_hh * keep("dropconnect", f"dropconnect{layer}", layer)
        out = lstm_layer(out, params[f"w_ih{layer}"], w_hh, params[f"b{layer}"])
        if noise is not None and layer < L - 1:
            out = out * keep("hidden", f"hidden{layer}", layer).unsqueeze(1)
    dropped = out if noise is None else out * keep("output").unsqueeze(1)
    return dropped @ embed.T + params["dec_b"], dropped, out  # decoder tied to the (undropped) embedding


def train_loss(params: dict, hparams: dict, batch: tuple) -> Tensor:
    """Cross-entropy under concrete dropout + AR + TAR (+ per-weight decay when tuned). The masks' uniforms come
    with the batch: the loss is a deterministic function of (w, λ, batch)."""
    x, y, noise = batch
    logits, dropped, raw = forward(params, x, hparams, noise)
    loss = cross_entropy(logits, y)
    loss = loss + hparams["log_ar"].exp() * dropped.pow(2).mean()
    loss = loss + hparams["log_tar"].exp() * (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    return loss + weight_decay(params, hparams)


def val_loss(params: dict, hparams: dict, batch: tuple) -> Tensor:
    """Plain cross-entropy, no regularisation (the quantity the hyperparameters are tuned for)."""
    return cross_entropy(forward(params, batch[0])[0], batch[1])


def overfit_train_loss(params: dict, hparams: dict, batch: tuple) -> Tensor:
    """Fig 8: cross-entropy plus a signed decay coefficient d_i on every weight, Σ d_i w_i², no dropout."""
    x, y = batch
    decay = sum((hparams["decay"][k] * v.pow(2)).sum() for k, v in params.items())
    return cross_entropy(forward(params, x)[0], y) + decay


def make_optimizer(
    phase: str, params: dict, hparams: dict, cfg: dict, args: argparse.Namespace
) -> bilevel.BilevelOptimizer:
    """Table 4's runs: Adam with gradient clipping on the weights, Adam on λ. The Fig 8 check ("overfit"):
    plain SGD inside, and outside AdamW, whose decay pulls the signed coefficients back towards 0."""
    if phase == "overfit":
        losses, inner_steps = (overfit_train_loss, val_loss), cfg["overfit_inner_steps"]
        inner = torchopt.sgd(cfg["overfit_lr"])
        outer = torchopt.adamw(cfg["overfit_hlr"], weight_decay=cfg["overfit_damping"])
    else:
        losses, inner_steps = (train_loss, val_loss), cfg["inner_steps"]
        inner = torchopt.chain(torchopt.clip_grad_norm(1.0), torchopt.adam(cfg["lr"]))
        outer = torchopt.adam(cfg["hlr"])
    hvp = bilevel.FiniteDifferenceHVP() if args.hvp == "finite-difference" else bilevel.ReverseHVP()
    return bilevel.BilevelOptimizer(
        *losses,
        params,
        hparams,
        inner=inner,
        outer=outer,
        strategy=bilevel.Neumann(steps=cfg["neumann"], alpha=1e-2, hvp=hvp),
        inner_steps=inner_steps,
        seed=args.seed,  # the losses draw no random numbers (the noise is in the batch); fixed anyway
        check=args.check,
    )


def train(opt: bilevel.BilevelOptimizer, batches: Callable, steps: int, tune: bool = True) -> Iterator[tuple]:
    """Step ``opt`` to ``steps`` inner steps on ``batches(hyperstep_due)`` -> (train, val batch or None), or only
    inner steps (``tune=False``); yield every hyper-period's last training loss and hyperstep record."""
    N = opt.inner_steps
    while opt.steps < steps:
        hyper = None
        for _ in range(N):
            train_batch, val_batch = batches(tune and (opt.steps + 1) % N == 0)
            if not tune:
                loss = opt.inner_step(train_batch)
                continue
            result = opt.step(train_batch, val_batch)
            loss, hyper = result.loss, hyper if result.hyper is None else result.hyper
        yield float(loss), hyper


# --8<-- [end:core]


# -------------------------------------------------------------------------------------- model


def lstm_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor) -> Tensor:
    """An LSTM over (B, T, in) from a zero state, in plain torch ops so torch.func can differentiate twice
    (cuDNN's fused kernel has no double backward)."""
    gates_x = x @ w_ih.T + b  # input projection of every time step at once
    h = c = x.new_zeros(x.shape[0], w_hh.shape[1])
    outs = []
    for t in range(x.shape[1]):
        i, f, g, o = (gates_x[:, t] + h @ w_hh.T).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def weight_decay(params: dict, hparams: dict) -> Tensor:
    if "log_wd" not in hparams:
        return params["embed"].new_zeros(())
    return bilevel.weight_decay(params, hparams["log_wd"])


def init_params(vocab: int, cfg: dict, device: str) -> dict[str, Tensor]:
    """Uniform init as in AWD-LSTM; layer l maps in_l → out_l, the last layer outputs `embed` (tied decoder)."""
    E, H, L = cfg["embed"], cfg["hidden"], cfg["layers"]
    sizes = [E] + [H] * (L - 1) + [E]
    p: dict[str, Tensor] = {"embed": torch.empty(vocab, E).uniform_(-0.1, 0.1)}
    for layer in range(L):
        n_in, n_out = sizes[layer], sizes[layer + 1]
        k = 1.0 / math.sqrt(n_out)
        p[f"w_ih{layer}"] = torch.empty(4 * n_out, n_in).uniform_(-k, k)
        p[f"w_hh{layer}"] = torch.empty(4 * n_out, n_out).uniform_(-k, k)
        p[f"b{layer}"] = torch.zeros(4 * n_out)
    p["dec_b"] = torch.zeros(vocab)
    return {k: v.to(device) for k, v in p.items()}


def init_hparams(params: dict[str, Tensor], cfg: dict, many: str | None, weight_decay: bool) -> dict[str, Any]:
    """Rates as logits θ (p = sigmoid θ), AR/TAR as log-coefficients; 'many' gives rates per unit/weight."""
    theta = math.log(cfg["init_rate"] / (1 - cfg["init_rate"]))
    ref = params["embed"]
    L = cfg["layers"]

    def full(*shape: int) -> Tensor:
        return torch.full(shape, theta, dtype=ref.dtype, device=ref.device)

    if many:
        rates = {
            "embed": full(ref.shape[0]),
            "input": full(ref.shape[1]),
            "hidden": [full(params[f"w_hh{i}"].shape[1]) for i in range(L - 1)],
            "output": full(ref.shape[1]),
            "dropconnect": [
                full(*params[f"w_hh{i}"].shape) if many == "per-weight" else full(params[f"w_hh{i}"].shape[0], 1)
                for i in range(L)
            ],
        }
    else:
        rates = {"embed": full(), "input": full(), "hidden": [full()], "output": full(), "dropconnect": [full()]}
    h: dict[str, Any] = {
        "rates": rates,
        "log_ar": torch.tensor(math.log(cfg["ar"]), dtype=ref.dtype, device=ref.device),
        "log_tar": torch.tensor(math.log(cfg["tar"]), dtype=ref.dtype, device=ref.device),
    }
    if weight_decay:
        h["log_wd"] = {k: torch.full_like(v, math.log(cfg["wd"])) for k, v in params.items()}
    return h


# --------------------------------------------------------------------------------------- data


def windows(ids: Tensor, n: int, bptt: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` random windows (inputs, next-token targets) of length ``bptt`` from a 1-D id stream."""
    starts = torch.randint(0, len(ids) - bptt - 1, (n,), generator=gen)
    idx = starts.unsqueeze(1) + torch.arange(bptt + 1)
    seq = ids[idx]
    return seq[:, :-1], seq[:, 1:]


def draw_noise(params: dict, batch: int, gen: torch.Generator) -> dict[str, Tensor]:
    """Uniforms for every concrete-dropout mask of one batch (variational: one per sequence)."""
    L = sum(1 for k in params if k.startswith("w_hh"))

    def u(*shape: int) -> Tensor:
        return torch.rand(shape, generator=gen, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)

    E = params["embed"].shape[1]
    noise = {"embed": u(params["embed"].shape[0]), "input": u(batch, E), "output": u(batch, E)}
    for layer in range(L):
        noise[f"dropconnect{layer}"] = u(*params[f"w_hh{layer}"].shape)
        if layer < L - 1:
            noise[f"hidden{layer}"] = u(batch, params[f"w_hh{layer}"].shape[1])
    return noise


def to_device(batch: Any, ref: Tensor) -> Any:
    if isinstance(batch, dict):
        return {k: to_device(v, ref) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_device(v, ref) for v in batch)
    dtype = ref.dtype if batch.is_floating_point() else batch.dtype
    return batch.to(device=ref.device, dtype=dtype)


@torch.no_grad()
def perplexity(params: dict, ids: Tensor, cfg: dict) -> float:
    """exp(mean next-token cross-entropy) over consecutive bptt-long segments, each from a zero state."""
    data = text_data.batchify(ids, cfg["eval_rows"]).to(params["embed"].device)
    total, count = 0.0, 0
    for start in range(0, data.shape[1] - 1, cfg["bptt"]):
        stop = min(start + cfg["bptt"], data.shape[1] - 1)
        logits = forward(params, data[:, start:stop])[0]
        y = data[:, start + 1 : stop + 1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return math.exp(total / count)


def rate_summary(hparams: dict) -> dict[str, float]:
    """Mean drop rate of each group, and the AR/TAR coefficients (for the trajectory plot)."""
    r = hparams["rates"]
    out = {}
    for name in RATES:
        value = r[name]
        leaves = value if isinstance(value, list) else [value]
        out[name] = float(torch.cat([torch.sigmoid(t.clamp(-6, 6)).reshape(-1) for t in leaves]).mean())
    out["ar"] = float(hparams["log_ar"].exp())
    out["tar"] = float(hparams["log_tar"].exp())
    return out


# ------------------------------------------------------------------------------ configuration


def build_parser() -> argparse.ArgumentParser:
    p = common.base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="pydoc", choices=["pydoc", "ptb"], help="text corpus (default pydoc)")
    p.add_argument("--data-dir", type=Path, default=None, help="directory with ptb.{train,valid,test}.txt")
    p.add_argument(
        "--rates",
        default="per-weight",
        choices=["per-unit", "per-weight"],
        help="granularity of the 'tuned_many' run: a rate per unit for every dropout, and for DropConnect "
        "one per gate unit (per-unit) or one per hidden-to-hidden weight (per-weight, default)",
    )
    p.add_argument("--tune-weight-decay", action="store_true", help="also tune a per-weight decay in tuned runs")
    p.add_argument("--hvp", default="reverse", choices=["reverse", "finite-difference"], help="HVP operator")
    p.add_argument("--embed", type=int, default=None, help="embedding size (= last LSTM layer size, tied decoder)")
    p.add_argument("--hidden", type=int, default=None, help="hidden units of the first LSTM layer")
    p.add_argument("--layers", type=int, default=2, help="LSTM layers (>= 2 so that hidden dropout exists)")
    p.add_argument("--steps", type=int, default=None, help="inner (weight) steps per run")
    p.add_argument("--inner-steps", type=int, default=10, help="inner steps per hyperstep (N)")
    p.add_argument("--neumann", type=int, default=3, help="Neumann series terms")
    p.add_argument("--overfit-hlr", type=float, default=0.01, help="hyper learning rate of the Fig 8 check")
    p.add_argument(
        "--overfit-damping",
        type=float,
        default=80.0,
        help="Fig 8 check: decoupled decay of the outer AdamW on the decay coefficients (0 = plain Adam)",
    )
    common.checkpoint_flags(p, every=5)
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes and budgets; --quick shrinks everything."""
    quick = args.quick
    cfg = {
        "embed": common.given(args.embed, 24 if quick else 48),
        "hidden": common.given(args.hidden, 32 if quick else 96),
        "layers": args.layers,
        "batch": 8 if quick else 32,
        "bptt": 12 if quick else 30,
        "steps": common.given(args.steps, 40 if quick else 800),
        "inner_steps": args.inner_steps,
        "neumann": args.neumann,
        "lr": 3e-3,
        "hlr": 0.05 if quick else 0.03,
        "init_rate": 0.5,  # paper: "a larger initialization of 0.5"
        "ar": 2.0,
        "tar": 1.0,  # AWD-LSTM's defaults
        "wd": 1e-6,
        "eval_rows": 10,
        "overfit_seqs": 10,
        "overfit_steps": 100 if quick else 400,
        "overfit_inner_steps": 2,
        "overfit_lr": 1.0,  # plain SGD: a coefficient d_i then scales w_i by (1 − 2·lr·d_i) per step
        "overfit_hlr": args.overfit_hlr,
        "overfit_damping": args.overfit_damping,
        "max_tokens": 12000 if quick else None,  # quick: a slice of the corpus
    }
    common.check_counts(cfg, ("embed", "hidden", "steps", "inner_steps", "neumann"))
    common.check_counts(cfg, ("layers",), minimum=2)
    common.check_counts(vars(args), ("checkpoint_every",))
    if cfg["steps"] < cfg["inner_steps"]:
        raise ValueError(f"`--steps {cfg['steps']}` must be >= `--inner-steps {cfg['inner_steps']}`.")
    if not (math.isfinite(args.overfit_hlr) and args.overfit_hlr > 0):
        raise ValueError(f"`--overfit-hlr {args.overfit_hlr}`: must be > 0 (default 0.01).")
    if not (math.isfinite(args.overfit_damping) and args.overfit_damping >= 0):
        raise ValueError(f"`--overfit-damping {args.overfit_damping}`: must be >= 0 (default 80; 0 = plain Adam).")
    common.check_stop_after(args)
    if args.corpus == "ptb" and args.data_dir is None:
        raise ValueError("`--corpus ptb` needs `--data-dir DIR` holding ptb.train.txt, ptb.valid.txt, ptb.test.txt.")
    return cfg


# ----------------------------------------------------------------------------------- training


def run(phase: str, data: dict, cfg: dict, args: argparse.Namespace, ckpt: dict, track: Any) -> dict:
    """Train one model (phase in no_ho / tuned / tuned_many / overfit) and return its results."""
    tune = phase != "no_ho"
    torch.manual_seed(args.seed)  # same initial weights for every phase
    params = init_params(len(data["vocab"]), cfg, args.device)
    ref = params["embed"]
    gen = torch.Generator().manual_seed(args.seed + 1)  # data order and dropout noise
    if phase == "overfit":
        hparams = {"decay": {k: torch.zeros_like(v) for k, v in params.items()}}
        train_set = windows(data["train"], cfg["overfit_seqs"], cfg["bptt"], gen)
        val_set = windows(data["val"], cfg["overfit_seqs"], cfg["bptt"], gen)

        def batches(hyperstep_due: bool) -> tuple:
            return to_device(train_set, ref), to_device(val_set, ref)  # the same 10 sequences every step
    else:
        many = args.rates if phase == "tuned_many" else None
        hparams = init_hparams(params, cfg, many=many, weight_decay=tune and args.tune_weight_decay)

        def batches(hyperstep_due: bool) -> tuple:
            x, y = windows(data["train"], cfg["batch"], cfg["bptt"], gen)
            train_batch = to_device((x, y, draw_noise(params, cfg["batch"], gen)), ref)
            if not hyperstep_due:
                return train_batch, None
            return train_batch, to_device(windows(data["val"], cfg["batch"], cfg["bptt"], gen), ref)

    opt = make_optimizer(phase, params, hparams, cfg, args)
    log: dict[str, list] = {"val_loss": [], "rates": []}
    current = ckpt.get("current")
    if current is not None and current["phase"] == phase:
        opt.load_state_dict(current["opt"])
        gen.set_state(current["gen"])
        log = current["log"]
    total = cfg["overfit_steps"] if phase == "overfit" else cfg["steps"]
    for loss, hyper in train(opt, batches, total, tune):
        if hyper is not None:
            log["val_loss"].append(float(hyper.val_loss))
            if phase != "overfit":
                log["rates"].append(rate_summary(opt.hparams))
        track(phase, opt.steps, loss)
        common.end_period(
            ckpt, args, lambda: {"phase": phase, "opt": opt.state_dict(), "gen": gen.get_state(), "log": log}
        )
    if phase == "overfit":
        return {"val_loss": log["val_loss"]}
    final = opt.params
    common.print_check(opt)
    return {
        "val_ppl": perplexity(final, data["val_ids"], cfg),
        "test_ppl": perplexity(final, data["test_ids"], cfg),
        "rates": log["rates"],
        "final_rates": rate_summary(opt.hparams),
        "n_hparams": sum(t.numel() for t in optree.tree_leaves(opt.hparams)) if tune else 0,
    }


def plot(results: dict, out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, phase in zip(axes, ("tuned", "tuned_many")):
        traj = results[phase]["rates"]
        for name in (*RATES, "ar", "tar"):
            ax.plot([r[name] for r in traj], label=name)
        ax.set_title(f"{phase}: mean drop rates, AR/TAR coefficients", fontsize=9)
        ax.set_xlabel("hyperstep")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    rates_png = out / "rates.png"
    fig.savefig(rates_png, dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(results["overfit"]["val_loss"])
    ax.set_xlabel("hyperstep")
    ax.set_ylabel("validation loss (10 sequences)")
    ax.set_title("Fig 8: overfitting validation with per-weight decay", fontsize=9)
    fig.tight_layout()
    overfit_png = out / "overfit.png"
    fig.savefig(overfit_png, dpi=90)
    plt.close(fig)
    return [rates_png, overfit_png]


def experiment(args: argparse.Namespace, device: torch.device) -> dict:
    """The four phases (resuming from --checkpoint), results and figures."""
    args.device = str(device)
    cfg = config(args)
    train_ids, val_ids, test_ids, vocab = text_data.load_corpus(args.corpus, args.data_dir)
    if cfg["max_tokens"]:
        train_ids = train_ids[: cfg["max_tokens"]]
        val_ids, test_ids = val_ids[: cfg["max_tokens"] // 4], test_ids[: cfg["max_tokens"] // 4]
    data = {"train": train_ids, "val": val_ids, "vocab": vocab.itos, "val_ids": val_ids, "test_ids": test_ids}
    ckpt = common.resume(args)
    phases = ("no_ho", "tuned", "tuned_many", "overfit")
    per_phase = [math.ceil(cfg["steps"] / cfg["inner_steps"])] * 3 + [
        math.ceil(cfg["overfit_steps"] / cfg["overfit_inner_steps"])
    ]
    start = time.perf_counter()
    with common.progress(f"{NAME} ({len(vocab)} words)", total=sum(per_phase)) as update:
        update(advance=ckpt["periods"])

        def track(phase: str, step: int, loss: float) -> None:
            update(phase=phase, step=step, loss=loss)

        runs = {p: functools.partial(run, p, data, cfg, args, ckpt, track) for p in phases}
        if not common.run_pending(ckpt, runs):
            return {"stopped_after": ckpt["periods"]}
    done = ckpt["done"]
    results = {
        "val_ppl": {p: done[p]["val_ppl"] for p in phases[:3]},
        "test_ppl": {p: done[p]["test_ppl"] for p in phases[:3]},
        "rates": {
            p: {"trajectory": done[p]["rates"], "final": done[p]["final_rates"]} for p in ("tuned", "tuned_many")
        },
        "overfit_val_loss": done["overfit"]["val_loss"],
    }
    common.write_results(args.out, results)
    plot(done, args.out)
    elapsed = time.perf_counter() - start
    print(
        f"{NAME}: vocab {len(vocab)}, hparams tuned {done['tuned']['n_hparams']} / "
        f"{done['tuned_many']['n_hparams']}, {elapsed:.0f}s"
    )
    for p in phases[:3]:
        print(f"  {p:>10}: val ppl {results['val_ppl'][p]:.1f}  test ppl {results['test_ppl'][p]:.1f}")
    ov = results["overfit_val_loss"]
    print(f"  overfit: validation loss {ov[0]:.3f} -> {ov[-1]:.3f}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # Not common.main: the recipe leaves torch's thread count alone (its numbers depend on it).
    return experiment(args, common.prepare(args))


if __name__ == "__main__":
    main()
