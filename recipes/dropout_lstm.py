"""Tune an LSTM language model's regularisers by implicit differentiation (Section 5.5, Table 4, Fig 8).

A word-level LSTM language model in the AWD-LSTM style (Merity et al., 2018), small by default,
regularised by the seven hyperparameters of the paper:

* variational dropout on the input (embedded words), on the hidden activations between LSTM
  layers, and on the output of the last layer (one mask per sequence, shared over time);
* embedding dropout (whole rows of the embedding matrix, i.e. word types, dropped for a batch);
* DropConnect on the hidden-to-hidden weights (one mask per batch);
* activation regularisation (AR, α·mean h²) and temporal activation regularisation
  (TAR, β·mean (h_t − h_{t−1})²) on the last layer's output.

Dropout rates are made differentiable with concrete (relaxed Bernoulli) dropout (Gal et al.,
2017): with drop rate p = sigmoid(θ) and u ~ U(0, 1),

    z = sigmoid((θ + log u − log(1 − u)) / t),        mask = (1 − z) / (1 − p),

a smooth function of θ for fixed u. The uniform noise u is drawn from an explicit
``torch.Generator`` and carried *in the batch*, so both losses are deterministic functions of
(w, λ, batch): hypergradients are well defined and a resumed run is bitwise identical.
``--rates global`` tunes the 7 scalars; ``--rates per-unit`` tunes one rate per embedding row,
input unit, hidden unit, output unit and hidden-to-hidden weight (DropConnect) — many thousands.
``--tune-weight-decay`` adds a per-weight decay to the tuned runs.

Second derivatives through the LSTM. cuDNN's fused RNN kernel has no double backward, so
``torch.nn.LSTM`` on CUDA breaks reverse-over-reverse HVPs. This recipe therefore writes the
LSTM as a loop of plain torch ops (one matmul for the input projection of all time steps, then
one small cell per step); torch.func differentiates that twice on every device and the default
``bilevel.ReverseHVP`` is exact. ``--hvp finite-difference`` switches to
``bilevel.FiniteDifferenceHVP`` (first derivatives only), which also works with fused kernels.

Compared, as in Table 4: no hyperparameter optimisation (rates fixed at their initial 0.5, the
paper's initialisation), tuned global rates, tuned many rates — validation and test perplexity.
The Fig 8 check trains on 10 sequences with a separate, signed weight decay for every weight and
tunes the decays on 10 validation sequences, recording the validation loss at every hyperstep
(inner SGD, outer AdamW; ``overfit_train_loss`` says why).

Data: the English text of Python's documentation topics (``pydoc_data.topics``, standard
library; split 80/10/10), or Penn Treebank with ``--corpus ptb --data-dir DIR``
(``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt``). Nothing is downloaded.

``--checkpoint PATH`` saves the BilevelOptimizer state (with its seed), the data/noise generator's
state, the loop counters and all results so far every ``--checkpoint-every`` hyper-periods (one
hyper-period = ``--inner-steps`` inner steps); rerunning with the same flags resumes there and
finishes with the same numbers as an uninterrupted run.

Run:  python recipes/dropout_lstm.py [--quick] [--device cuda] [--corpus ptb --data-dir DIR]
Writes ``results.json``, ``rates.png`` (rate trajectories) and ``overfit.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
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


# ------------------------------------------------------------------------------ configuration


def build_parser() -> argparse.ArgumentParser:
    p = common.base_parser(NAME, "Tune LSTM dropout/AR/TAR hyperparameters by implicit differentiation (Table 4).")
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
    p.add_argument("--checkpoint", type=Path, default=None, help="save/resume file")
    p.add_argument("--checkpoint-every", type=int, default=5, help="hyper-periods between checkpoint saves")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes and budgets; --quick shrinks everything."""
    quick = args.quick
    cfg = {
        "embed": _given(args.embed, 24 if quick else 48),
        "hidden": _given(args.hidden, 32 if quick else 96),
        "layers": args.layers,
        "batch": 8 if quick else 32,
        "bptt": 12 if quick else 30,
        "steps": _given(args.steps, 40 if quick else 800),
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
    for key in ("embed", "hidden", "steps", "inner_steps", "neumann", "layers", "checkpoint_every"):
        value = cfg.get(key, getattr(args, key, None))
        minimum = 2 if key == "layers" else 1
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"`--{key.replace('_', '-')} {value}`: must be an integer >= {minimum}.")
    if cfg["steps"] < cfg["inner_steps"]:
        raise ValueError(f"`--steps {cfg['steps']}` must be >= `--inner-steps {cfg['inner_steps']}`.")
    if not (math.isfinite(args.overfit_hlr) and args.overfit_hlr > 0):
        raise ValueError(f"`--overfit-hlr {args.overfit_hlr}`: must be > 0 (default 0.01).")
    if not (math.isfinite(args.overfit_damping) and args.overfit_damping >= 0):
        raise ValueError(f"`--overfit-damping {args.overfit_damping}`: must be >= 0 (default 80; 0 = plain Adam).")
    if args.stop_after is not None and (args.stop_after < 1 or args.checkpoint is None):
        raise ValueError(f"`--stop-after {args.stop_after}`: must be an integer >= 1 and needs --checkpoint.")
    if args.corpus == "ptb" and args.data_dir is None:
        raise ValueError("`--corpus ptb` needs `--data-dir DIR` holding ptb.train.txt, ptb.valid.txt, ptb.test.txt.")
    return cfg


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


# -------------------------------------------------------------------------------------- model


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


def concrete_mask(theta: Tensor, u: Tensor) -> Tensor:
    """Relaxed-Bernoulli keep mask scaled by 1/(1−p); ``theta`` is the drop logit, broadcast against u."""
    theta = theta.clamp(-6.0, 6.0)  # keep p in [0.0025, 0.9975] so 1/(1−p) stays bounded
    drop = torch.sigmoid((theta + torch.log(u) - torch.log1p(-u)) / TEMPERATURE)
    return (1.0 - drop) / (1.0 - torch.sigmoid(theta))


def lstm_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor) -> Tensor:
    """An LSTM over (B, T, in) from a zero state, in plain torch ops so torch.func can differentiate twice."""
    B, T, _ = x.shape
    H = w_hh.shape[1]
    gates_x = x @ w_ih.T + b  # input projection of every time step at once
    h = x.new_zeros(B, H)
    c = x.new_zeros(B, H)
    outs = []
    for t in range(T):
        i, f, g, o = (gates_x[:, t] + h @ w_hh.T).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1)


def forward(params: dict, x: Tensor, hparams: dict | None = None, noise: dict | None = None):
    """Logits (B, T, V); with ``noise`` also the dropped and raw last-layer outputs for AR/TAR."""
    L = sum(1 for k in params if k.startswith("w_hh"))
    embed = params["embed"]
    r = hparams["rates"] if noise is not None else None
    if r is not None:
        embed_used = embed * concrete_mask(r["embed"], noise["embed"]).unsqueeze(1)
        out = embed_used[x] * concrete_mask(r["input"], noise["input"]).unsqueeze(1)
    else:
        out = embed[x]
    for layer in range(L):
        w_hh = params[f"w_hh{layer}"]
        if r is not None:
            dc = r["dropconnect"]
            w_hh = w_hh * concrete_mask(dc[min(layer, len(dc) - 1)], noise[f"dropconnect{layer}"])
        out = lstm_layer(out, params[f"w_ih{layer}"], w_hh, params[f"b{layer}"])
        if r is not None and layer < L - 1:
            hid = r["hidden"]
            out = out * concrete_mask(hid[min(layer, len(hid) - 1)], noise[f"hidden{layer}"]).unsqueeze(1)
    raw = out
    if r is not None:
        out = out * concrete_mask(r["output"], noise["output"]).unsqueeze(1)
    logits = out @ embed.T + params["dec_b"]  # decoder tied to the (undropped) embedding
    return logits, out, raw


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_loss(params: dict, hparams: dict, batch: tuple) -> Tensor:
    """Cross-entropy under concrete dropout + AR + TAR (+ per-weight decay when tuned)."""
    x, y, noise = batch
    logits, dropped, raw = forward(params, x, hparams, noise)
    loss = cross_entropy(logits, y)
    loss = loss + hparams["log_ar"].exp() * dropped.pow(2).mean()
    loss = loss + hparams["log_tar"].exp() * (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    return loss + weight_decay(params, hparams)


def weight_decay(params: dict, hparams: dict) -> Tensor:
    if "log_wd" not in hparams:
        return params["embed"].new_zeros(())
    return bilevel.weight_decay(params, hparams["log_wd"])


def val_loss(params: dict, hparams: dict, batch: tuple) -> Tensor:
    """Plain cross-entropy, no regularisation (the quantity the hyperparameters are tuned for)."""
    x, y = batch[0], batch[1]
    return cross_entropy(forward(params, x)[0], y)


def overfit_train_loss(params: dict, hparams: dict, batch: tuple) -> Tensor:
    """Fig 8: cross-entropy plus a separate decay coefficient d_i on every weight, Σ d_i w_i², no dropout.

    The coefficients are signed. Positive ones (the paper's d_i = e^{λ_i}) can only pull weights
    towards 0, and at this width that cannot fit held-out text: even optimising a [0, 1] factor on
    every weight directly against the validation loss stalls near the validation unigram entropy.
    A signed d_i can also grow w_i, but then it acts as a growth rate: under plain SGD (the inner
    optimiser of this check) the decay term alone gives w_i ← (1 − 2·lr·d_i)·w_i per step. An outer
    optimiser that accumulates hypergradients into d_i then integrates twice (hypergradient → d_i →
    log|w_i|) and overshoots until the weights blow up; the outer AdamW's decoupled decay
    (``--overfit-damping``) pulls every d_i back to 0, so d_i follows the current hypergradient and
    log|w_i| moves along it at about 2·lr·N/damping per hyperstep. docs/recipes/dropout_lstm.md has
    the measurements.
    """
    x, y = batch
    decay = sum((hparams["decay"][k] * v.pow(2)).sum() for k, v in params.items())
    return cross_entropy(forward(params, x)[0], y) + decay


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


# -------------------------------------------------------------------------------- checkpoints


# ----------------------------------------------------------------------------------- training


def run(
    phase: str,
    data: dict,
    cfg: dict,
    args: argparse.Namespace,
    ckpt: dict,
    track: Any,
) -> dict:
    """Train one model (phase in no_ho / tuned / tuned_many / overfit) and return its results."""
    device = args.device
    seed = args.seed
    tune = phase != "no_ho"
    torch.manual_seed(seed)  # same initial weights for every phase
    params = init_params(len(data["vocab"]), cfg, device)
    gen = torch.Generator().manual_seed(seed + 1)  # data order and dropout noise
    if phase == "overfit":
        hparams = {"decay": {k: torch.zeros_like(v) for k, v in params.items()}}
        losses = (overfit_train_loss, val_loss)
        total = cfg["overfit_steps"]
        train_set = windows(data["train"], cfg["overfit_seqs"], cfg["bptt"], gen)
        val_set = windows(data["val"], cfg["overfit_seqs"], cfg["bptt"], gen)
        # Signed coefficients act as growth rates of the weights; see overfit_train_loss for why the
        # inner optimiser is plain SGD and the outer one decays the coefficients towards 0.
        inner = torchopt.sgd(cfg["overfit_lr"])
        outer = torchopt.adamw(cfg["overfit_hlr"], weight_decay=cfg["overfit_damping"])
    else:
        hparams = init_hparams(
            params,
            cfg,
            many=args.rates if phase == "tuned_many" else None,
            weight_decay=tune and args.tune_weight_decay,
        )
        losses = (train_loss, val_loss)
        total = cfg["steps"]
        inner = torchopt.chain(torchopt.clip_grad_norm(1.0), torchopt.adam(cfg["lr"]))
        outer = torchopt.adam(cfg["hlr"])
    hvp = bilevel.FiniteDifferenceHVP() if args.hvp == "finite-difference" else bilevel.ReverseHVP()
    opt = bilevel.BilevelOptimizer(
        *losses,
        params,
        hparams,
        inner=inner,
        outer=outer,
        strategy=bilevel.Neumann(steps=cfg["neumann"], alpha=1e-2, hvp=hvp),
        inner_steps=cfg["overfit_inner_steps"] if phase == "overfit" else cfg["inner_steps"],
        seed=args.seed,  # the losses draw no random numbers (the noise is in the batch); fixed anyway
        check=args.check,
    )
    log: dict[str, list] = {"val_loss": [], "rates": []}
    current = ckpt.get("current")
    if current is not None and current["phase"] == phase:
        opt.load_state_dict(current["opt"])
        gen.set_state(current["gen"])
        log = current["log"]
    ref = params["embed"]
    N = opt.inner_steps
    while opt.steps < total:
        for _ in range(N):
            if phase == "overfit":
                train_batch = to_device(train_set, ref)
            else:
                x, y = windows(data["train"], cfg["batch"], cfg["bptt"], gen)
                train_batch = to_device((x, y, draw_noise(params, cfg["batch"], gen)), ref)
            if not tune:
                loss = opt.inner_step(train_batch)
                continue
            hyper_due = (opt.steps + 1) % N == 0
            if hyper_due and phase != "overfit":
                val_batch = to_device(windows(data["val"], cfg["batch"], cfg["bptt"], gen), ref)
            else:
                val_batch = to_device(val_set, ref) if phase == "overfit" else None
            result = opt.step(train_batch, val_batch)
            loss = result.loss
            if result.hyper is not None:
                log["val_loss"].append(float(result.hyper.val_loss))
                if phase != "overfit":
                    log["rates"].append(rate_summary(opt.hparams))
        ckpt["periods"] += 1
        track(phase, opt.steps, float(loss))
        every = args.checkpoint_every
        stopping = args.stop_after is not None and ckpt["periods"] >= args.stop_after
        if ckpt["path"] is not None and (ckpt["periods"] % every == 0):
            ckpt["current"] = {
                "phase": phase,
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "log": log,
            }
            common.save_checkpoint(ckpt["path"], _persist(ckpt))
        if stopping:  # like a kill: whatever was not checkpointed is lost
            raise common.Stop
    if phase == "overfit":
        return {"val_loss": log["val_loss"]}
    final = opt.params
    common.print_check(opt)
    return {
        "val_ppl": perplexity(final, data["val_ids"], cfg),
        "test_ppl": perplexity(final, data["test_ids"], cfg),
        "rates": log["rates"],
        "final_rates": rate_summary(opt.hparams),
        "n_hparams": sum(t.numel() for t in _leaves(opt.hparams)) if tune else 0,
    }


def _leaves(tree: Any) -> list[Tensor]:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _leaves(v)]
    if isinstance(tree, list):
        return [t for v in tree for t in _leaves(v)]
    return [tree]


def _persist(ckpt: dict) -> dict:
    return {k: ckpt[k] for k in ("fingerprint", "periods", "done", "current")}


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


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.device = str(common.prepare(args))  # --out and --device checked before any work
    cfg = config(args)
    train_ids, val_ids, test_ids, vocab = text_data.load_corpus(args.corpus, args.data_dir)
    if cfg["max_tokens"]:
        train_ids = train_ids[: cfg["max_tokens"]]
        val_ids, test_ids = val_ids[: cfg["max_tokens"] // 4], test_ids[: cfg["max_tokens"] // 4]
    data = {"train": train_ids, "val": val_ids, "vocab": vocab.itos, "val_ids": val_ids, "test_ids": test_ids}
    fingerprint = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for key in ("checkpoint", "stop_after", "out", "checkpoint_every"):
        fingerprint.pop(key)
    ckpt: dict[str, Any] = {"fingerprint": fingerprint, "periods": 0, "done": {}, "current": None}
    loaded = common.load_checkpoint(args.checkpoint, fingerprint)
    if loaded is not None:
        ckpt.update(loaded)
    ckpt["path"] = args.checkpoint
    phases = ("no_ho", "tuned", "tuned_many", "overfit")
    per_phase = [math.ceil(cfg["steps"] / cfg["inner_steps"])] * 3 + [
        math.ceil(cfg["overfit_steps"] / cfg["overfit_inner_steps"])
    ]
    start = time.perf_counter()
    with common.progress(f"{NAME} ({len(vocab)} words)", total=sum(per_phase)) as update:
        update(advance=ckpt["periods"])

        def track(phase: str, step: int, loss: float) -> None:
            update(phase=phase, step=step, loss=loss)

        try:
            for phase in phases:
                if phase in ckpt["done"]:
                    continue
                ckpt["done"][phase] = run(phase, data, cfg, args, ckpt, track)
                ckpt["current"] = None
                common.save_checkpoint(args.checkpoint, _persist(ckpt))
        except common.Stop:
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


if __name__ == "__main__":
    main()
