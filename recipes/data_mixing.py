"""Learn a data mixture for a small transformer language model: one weight per text domain.

K text domains train one byte-level causal transformer; the training loss is the mixture of their
language-model losses with weights softmax(λ), and the validation loss is the loss on a small clean
set of the target domain. Algorithm 1 learns λ with an IFT strategy and with the first-order
``Penalty`` side by side, against the uniform mixture and every single domain. Details, measured
results and what they show: docs/recipes/data_mixing.md.

Run:  python recipes/data_mixing.py [--quick] [--seeds 3] [--strategies ift,penalty] [--check]
                                    [--data-dir DIR --target NAME]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import recipe_common
import text_data
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn

import bilevel

NAME = "data_mixing"
STRATEGIES = ("ift", "penalty")
VOCAB = 256  # bytes


# --8<-- [start:core]
class ByteTransformer(nn.Module):
    """A small causal transformer over bytes: embeddings + learned positions, pre-norm
    ``nn.TransformerEncoderLayer`` blocks (LayerNorm, dropout, attention under a causal mask)."""

    def __init__(self, width: int, heads: int, layers: int, context: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(0.02 * torch.randn(context, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        h = self.embed(x) + self.position[:T]
        mask = torch.full((T, T), float("-inf"), dtype=h.dtype, device=x.device).triu(1)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def mixture_loss(fm: bilevel.FunctionalModule, params: dict, logits: Tensor, batch: Tensor, decay: float) -> Tensor:
    """Σ_k softmax(λ)_k L_k(w) + ½δ‖w‖²: row k of ``batch`` (K, B, T + 1) holds windows of domain k,
    L_k is their next-byte cross-entropy."""
    K, B, length = batch.shape
    out, _ = fm(params, fm.state, batch[..., :-1].reshape(K * B, length - 1))
    ce = F.cross_entropy(out.reshape(-1, VOCAB), batch[..., 1:].reshape(-1), reduction="none")
    penalty = 0.5 * decay * sum((p**2).sum() for p in params.values())
    return torch.softmax(logits, 0) @ ce.reshape(K, -1).mean(1) + penalty


def target_loss(fm: bilevel.FunctionalModule, params: dict, batch: Tensor) -> Tensor:
    """Next-byte cross-entropy on windows (N, T + 1) of the target domain, in eval mode (no dropout)."""
    out, _ = fm(params, fm.state, batch[:, :-1], train=False)
    return F.cross_entropy(out.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def learn_mixture(
    strategy: bilevel.Strategy, streams: list[Tensor], val: Tensor, args: argparse.Namespace, update: Any
) -> tuple[bilevel.FunctionalModule, dict, dict[str, Any]]:
    """Algorithm 1 on (weights, domain logits): the model trained during the run, its weights, and the
    mixture weights after every hyperstep with the run's costs."""
    fm = fresh_model(args, streams[0].device)
    opt = bilevel.BilevelOptimizer(
        lambda p, h, b: mixture_loss(fm, p, h["logits"], b, args.weight_decay),
        lambda p, h, b: target_loss(fm, p, b),
        fm.params,
        {"logits": torch.zeros(len(streams), device=streams[0].device)},
        inner=torchopt.adam(args.inner_lr),
        outer=torchopt.adam(args.outer_lr),
        strategy=strategy,
        inner_steps=args.inner_steps,
        seed=args.seed,
    )
    gen, val_gen = generators(args.seed)  # the same windows as every other run of this seed
    weights = [torch.softmax(opt.hparams["logits"], 0).tolist()]
    inner_s, hyper_s = [], []
    for _ in range(args.hypersteps):
        for k in range(args.inner_steps):
            batch, val_batch = (
                windows(streams, args.batch, args.context, gen),
                sample(val, args.val_batch, args, val_gen),
            )
            start = time.perf_counter()
            result = opt.step(batch, val_batch)
            (hyper_s if k == args.inner_steps - 1 else inner_s).append(time.perf_counter() - start)
        weights.append(torch.softmax(opt.hparams["logits"], 0).tolist())
        update(advance=args.inner_steps, val_loss=float(result.hyper.val_loss))
    inner = statistics.median(inner_s)
    costs = {
        "inner_step_ms": 1e3 * inner,
        "hyperstep_ms": 1e3 * (statistics.median(hyper_s) - inner),  # the hyperstep alone
        "wall_time_s": sum(inner_s) + sum(hyper_s),
        "hvps_per_hyperstep": result.hyper.hvps,
        "gradients_per_hyperstep": result.hyper.gradients,
        "skipped_hypersteps": opt.skipped_outer_steps,
    }
    return fm, opt.params, {"weights": weights, "logits": opt.hparams["logits"].tolist(), **costs}


# --8<-- [end:core]


# ----------------------------------------------------------------------------------- data


def split_text(text: str, val_chars: int, test_chars: int, where: str) -> tuple[str, str, str]:
    """(train, val, test): the last ``test_chars`` characters for test, the ``val_chars`` before them for
    validation, the rest for training."""
    if len(text) < val_chars + test_chars + 1000:
        raise ValueError(
            f"{where}: {len(text)} characters; need more than val + test ({val_chars + test_chars}) + 1000."
        )
    cut = len(text) - val_chars - test_chars
    return text[:cut], text[cut : cut + val_chars], text[cut + val_chars :]


def stdlib_domains(args: argparse.Namespace, generator: torch.Generator) -> tuple[dict[str, str], str, str]:
    """The default domains, all from Python's standard library: the target's scarce training text
    (docstrings of some modules), documentation prose, source code without docstrings, and docstrings
    with every line's characters shuffled (harmful: right characters, wrong structure). Validation and
    test text: docstrings of modules no training domain draws on."""
    from pydoc_data.topics import topics

    modules = text_data.STDLIB_MODULES
    val_mods, test_mods = modules[0::10], modules[5::10]
    rest = [m for m in modules if m not in val_mods and m not in test_mods]
    pool = "\n\n".join(text_data.docstrings(m) for m in rest)
    if len(pool) < args.target_chars + args.domain_chars:
        raise ValueError(f"the standard library's docstrings hold {len(pool)} characters; lower --target-chars.")
    domains = {
        "docstrings": pool[: args.target_chars],
        "docs": "\n".join(topics[name] for name in sorted(topics))[: args.domain_chars],
        "code": "\n\n".join(text_data.source_code(m) for m in rest)[: args.domain_chars],
        "shuffled": text_data.shuffle_within_lines(pool[-args.domain_chars :], generator),
    }
    val = "\n\n".join(text_data.docstrings(m) for m in val_mods)[: args.val_chars]
    test = "\n\n".join(text_data.docstrings(m) for m in test_mods)[: args.test_chars]
    return domains, val, test


def user_domains(args: argparse.Namespace) -> tuple[dict[str, str], str, str]:
    """``--data-dir``: one folder of ``*.txt`` files per domain; the ``--target`` folder's text is split
    into its training part (a domain like the others), validation and test text."""
    domains = text_data.read_domains(args.data_dir)
    if args.target not in domains:
        raise ValueError(f"--target {args.target!r}: not one of the domain folders {sorted(domains)}.")
    domains[args.target], val, test = split_text(domains[args.target], args.val_chars, args.test_chars, args.target)
    return domains, val, test


def windows(streams: list[Tensor], per_domain: int, context: int, generator: torch.Generator) -> Tensor:
    """(K, B, context + 1) int64: B random windows of each domain's byte stream, row k from stream k."""
    rows = []
    for stream in streams:
        starts = torch.randint(0, len(stream) - context - 1, (per_domain,), generator=generator)
        rows.append(torch.stack([stream[s : s + context + 1] for s in starts.tolist()]))
    return torch.stack(rows).long()


def sample(stream: Tensor, count: int, args: argparse.Namespace, generator: torch.Generator) -> Tensor:
    return windows([stream], count, args.context, generator)[0]


def generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The training and validation windows' generators of a seed (apart, so that runs without a
    validation set draw the same training windows)."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(10_000 + seed)


def fresh_model(args: argparse.Namespace, device: torch.device) -> bilevel.FunctionalModule:
    """The model every run of a seed starts from: the same initial weights."""
    torch.manual_seed(args.seed)
    model = ByteTransformer(args.width, args.heads, args.layers, args.context, args.dropout)
    return bilevel.FunctionalModule(model.to(device))


@torch.no_grad()
def perplexity(fm: bilevel.FunctionalModule, params: dict, stream: Tensor, context: int) -> float:
    """exp(mean next-byte cross-entropy) over non-overlapping windows covering ``stream``."""
    n = (len(stream) - 1) // context
    x = stream[: n * context + 1].long()
    inputs, targets = x[:-1].reshape(n, context), x[1:].reshape(n, context)
    total = 0.0
    for i in range(0, n, 256):
        out, _ = fm(params, fm.state, inputs[i : i + 256], train=False)
        total += float(F.cross_entropy(out.reshape(-1, VOCAB), targets[i : i + 256].reshape(-1), reduction="sum"))
    return math.exp(total / (n * context))


def train_fixed(logits: Tensor, streams: list[Tensor], args: argparse.Namespace, update: Any) -> tuple[Any, dict]:
    """The baselines: the same model, optimiser, windows and steps as a bilevel run, with fixed weights."""
    fm = fresh_model(args, streams[0].device)
    params = {k: v.detach().clone() for k, v in fm.params.items()}
    adam = torchopt.adam(args.inner_lr)  # the bilevel run's inner optimiser
    state = adam.init(params)
    grad = torch.func.grad(lambda p, b: mixture_loss(fm, p, logits, b, args.weight_decay))
    gen, _ = generators(args.seed)
    for _ in range(args.steps):
        updates, state = adam.update(grad(params, windows(streams, args.batch, args.context, gen)), state)
        params = torchopt.apply_updates(params, updates)
        update(advance=1)
    return fm, params


# ------------------------------------------------------------------------------------- run


def strategy_for(name: str, args: argparse.Namespace) -> bilevel.Strategy:
    """The IFT strategy the paper uses for networks, and the first-order penalty with a linear rule for
    its auxiliary pair (an adaptive one would not scale the pull of L_V/σ; see Penalty's docstring)."""
    if name == "ift":
        return bilevel.Neumann(steps=args.neumann_steps, alpha="auto")
    return bilevel.Penalty(penalty=args.penalty, steps=args.penalty_steps, optimizer=torchopt.sgd(args.penalty_lr))


def label(name: str, args: argparse.Namespace) -> str:
    if name == "ift":
        return f'Neumann({args.neumann_steps}, alpha="auto")'
    return f"Penalty(σ={args.penalty:g}, {args.penalty_steps} SGD steps)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_common.base_parser(NAME, __doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="one sub-folder of *.txt files per domain")
    parser.add_argument("--target", default=None, help="with --data-dir: the target domain's folder name")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of ift,penalty")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick 1)")
    parser.add_argument("--hypersteps", type=int, default=None, help="outer steps (default 50; --quick 8)")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner Adam steps per hyperstep")
    parser.add_argument("--inner-lr", type=float, default=3e-3, help="Adam learning rate of the weights")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam learning rate of the domain logits")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="fixed δ of ½δ‖w‖² in the training loss")
    parser.add_argument("--neumann-steps", type=int, default=10, help="terms of the IFT strategy's Neumann series")
    parser.add_argument("--penalty", type=float, default=10.0, help="σ of the Penalty strategy")
    parser.add_argument("--penalty-steps", type=int, default=5, help="auxiliary SGD steps per hyperstep of Penalty")
    parser.add_argument("--penalty-lr", type=float, default=0.3, help="SGD learning rate of Penalty's auxiliary pair")
    parser.add_argument("--batch", type=int, default=8, help="windows per domain per step")
    parser.add_argument("--val-batch", type=int, default=32, help="target validation windows per hyperstep")
    parser.add_argument("--context", type=int, default=32, help="bytes of context")
    parser.add_argument("--width", type=int, default=64, help="model width")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout of the transformer blocks")
    parser.add_argument("--target-chars", type=int, default=20_000, help="training text of the target domain")
    parser.add_argument("--domain-chars", type=int, default=200_000, help="text of each other default domain")
    parser.add_argument("--val-chars", type=int, default=20_000, help="target validation text")
    parser.add_argument("--test-chars", type=int, default=50_000, help="target test text")
    args = parser.parse_args(argv)
    if (args.data_dir is None) != (args.target is None):
        parser.error("--data-dir and --target go together: the folder of domains and the target among them.")
    args.strategies = recipe_common.subset_flag(parser, "strategies", args.strategies, STRATEGIES)
    args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    args.hypersteps = args.hypersteps if args.hypersteps is not None else (8 if args.quick else 50)
    counts = ("seeds", "hypersteps", "inner_steps", "batch", "val_batch", "context", "width", "heads", "layers",
              "neumann_steps", "penalty_steps")  # fmt: skip
    sizes = ("target_chars", "domain_chars", "val_chars", "test_chars")
    recipe_common.require(parser, args, (*counts, *sizes), ("inner_lr", "outer_lr", "penalty", "penalty_lr"))
    if args.width % args.heads:
        parser.error(f"--width {args.width} must be a multiple of --heads {args.heads}.")
    if not 0.0 <= args.dropout < 1.0 or not args.weight_decay >= 0.0:
        parser.error(f"--dropout {args.dropout} must lie in [0, 1), --weight-decay {args.weight_decay} be >= 0.")
    args.steps = args.hypersteps * args.inner_steps
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return recipe_common.main(run, parse_args(argv))


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    generator = recipe_common.seed_everything(0)  # the data is the same for every seed
    domains, val, test = stdlib_domains(args, generator) if args.data_dir is None else user_domains(args)
    names = list(domains)
    streams = [text_data.encode_bytes(domains[n]).to(device) for n in names]
    val_ids, test_ids = text_data.encode_bytes(val).to(device), text_data.encode_bytes(test).to(device)
    for name, ids in [*zip(names, streams), ("validation", val_ids), ("test", test_ids)]:
        if len(ids) < 4 * (args.context + 1):
            raise ValueError(f"{name}: {len(ids)} bytes, too few for windows of {args.context + 1}.")
    print("domains: " + ", ".join(f"{n} {len(s):,} bytes" for n, s in zip(names, streams)))
    print(f"target: validation {len(val_ids):,} bytes, test {len(test_ids):,} bytes")
    if args.check:
        print_first_check(streams, val_ids, args)

    per_seed = len(names) + 1 + 2 * len(args.strategies)
    seeds: list[dict[str, Any]] = []
    with recipe_common.progress("data mixing", total=args.seeds * per_seed * args.steps) as update:
        for seed in range(args.seeds):
            args.seed = seed
            out: dict[str, Any] = {"single": {}, "learned": {}}
            even = torch.zeros(len(names), device=device)
            for k, name in enumerate(names):  # one domain alone: every row of the batch from it
                fm, params = train_fixed(even, [streams[k]] * len(names), args, tag(update, f"{seed}: {name} only"))
                out["single"][name] = perplexity(fm, params, test_ids, args.context)
            fm, params = train_fixed(even, streams, args, tag(update, f"{seed}: uniform"))
            out["uniform"] = perplexity(fm, params, test_ids, args.context)
            for name in args.strategies:
                strategy, tagged = strategy_for(name, args), tag(update, f"{seed}: {name}")
                fm, params, trace = learn_mixture(strategy, streams, val_ids, args, tagged)
                online = perplexity(fm, params, test_ids, args.context)
                logits = torch.tensor(trace["logits"], device=device)  # the learned mixture, held fixed from the start
                fm, params = train_fixed(logits, streams, args, tag(update, f"{seed}: {name}, retrained"))
                retrained = perplexity(fm, params, test_ids, args.context)
                out["learned"][name] = {"test_ppl": online, "retrained_ppl": retrained, **trace}
            seeds.append(out)

    results = summarise(seeds, names, args)
    results["peak_mem_bytes"] = {
        name: recipe_common.step_peak_memory(*memory_case(name, streams, val_ids, args)) for name in args.strategies
    }
    results["cpu_time_s"], results["wall_time_s"] = time.process_time() - cpu_started, time.perf_counter() - started
    recipe_common.write_results(args.out, results)
    (args.out / "history.json").write_text(json.dumps([s["learned"] for s in seeds]) + "\n")
    plot_weights(seeds, names, {n: label(n, args) for n in args.strategies}, args.out / "data_mixing_weights.png")
    report(results, names, args)
    return results


def tag(update: Any, run: str) -> Any:
    """The progress bar's ``update`` with the run's name in its status."""
    return lambda advance=1, **status: update(advance=advance, run=run, **status)


def summarise(seeds: list[dict[str, Any]], names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Mean ± std over seeds of every test perplexity, the learned weights and the costs."""

    def stats(values: list[float]) -> dict[str, Any]:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": statistics.fmean(values), "std": std, "seeds": values}

    single = {n: stats([s["single"][n] for s in seeds]) for n in names}
    best = min(names, key=lambda n: single[n]["mean"])
    target = names[0] if args.target is None else args.target
    learned = {}
    for name in args.strategies:
        runs = [s["learned"][name] for s in seeds]
        final = [r["weights"][-1] for r in runs]
        learned[name] = {
            "label": label(name, args),
            "test_ppl": stats([r["test_ppl"] for r in runs]),
            "retrained_ppl": stats([r["retrained_ppl"] for r in runs]),
            "final_weights": {n: stats([w[k] for w in final]) for k, n in enumerate(names)},
            **{key: statistics.fmean(r[key] for r in runs) for key in ("inner_step_ms", "hyperstep_ms", "wall_time_s")},
            "hvps_per_hyperstep": runs[0]["hvps_per_hyperstep"],
            "gradients_per_hyperstep": runs[0]["gradients_per_hyperstep"],
            "skipped_hypersteps": sum(r["skipped_hypersteps"] for r in runs),
        }
    return {
        "domains": names,
        "target": target,
        "harmful": "shuffled" if args.data_dir is None else None,
        "test_ppl": {
            "uniform": stats([s["uniform"] for s in seeds]),
            "target_only": single[target],
            "best_single": {"domain": best, **single[best]},
            "single": single,
            "learned": {name: learned[name]["test_ppl"] for name in args.strategies},
            "retrained": {name: learned[name]["retrained_ppl"] for name in args.strategies},
        },
        "learned": learned,
        "n_seeds": len(seeds),
        "steps": args.steps,
        "hypersteps": args.hypersteps,
    }


def memory_case(name: str, streams: list[Tensor], val: Tensor, args: argparse.Namespace):
    """A fresh run of ``name`` one step before a hyperstep, and that step's batches (for the memory figure)."""
    args.seed = 0
    fm = fresh_model(args, streams[0].device)
    opt = bilevel.BilevelOptimizer(
        lambda p, h, b: mixture_loss(fm, p, h["logits"], b, args.weight_decay),
        lambda p, h, b: target_loss(fm, p, b),
        fm.params, {"logits": torch.zeros(len(streams), device=streams[0].device)}, inner=torchopt.adam(args.inner_lr),
        outer=torchopt.adam(args.outer_lr), strategy=strategy_for(name, args), inner_steps=args.inner_steps, seed=0,
    )  # fmt: skip
    gen, val_gen = generators(0)
    for _ in range(2 * args.inner_steps - 1):  # one whole hyper-period first: warm caches and buffers
        opt.step(windows(streams, args.batch, args.context, gen), sample(val, args.val_batch, args, val_gen))
    return opt, windows(streams, args.batch, args.context, gen), sample(val, args.val_batch, args, val_gen)


def print_first_check(streams: list[Tensor], val: Tensor, args: argparse.Namespace) -> None:
    """``--check``: bilevel.check_derivatives at the initial weights, before any training."""
    args.seed = 0
    fm = fresh_model(args, streams[0].device)
    gen, val_gen = generators(0)
    check = bilevel.check_derivatives(
        lambda p, h, b: mixture_loss(fm, p, h["logits"], b, args.weight_decay),
        lambda p, h, b: target_loss(fm, p, b),
        fm.params, {"logits": torch.zeros(len(streams), device=streams[0].device)},
        windows(streams, args.batch, args.context, gen), sample(val, args.val_batch, args, val_gen),
        strategy=strategy_for("ift", args),
    )  # fmt: skip
    print(f"check_derivatives at the initial weights (the IFT's assumptions are not expected to hold yet):\n{check}")


def report(results: dict[str, Any], names: list[str], args: argparse.Namespace) -> None:
    ppl = results["test_ppl"]

    def show(s: dict[str, Any]) -> str:
        return f"{s['mean']:.3f} ± {s['std']:.3f}"

    print(f"target test perplexity over {results['n_seeds']} seed(s) (bytes):")
    print(f"  uniform mixture        {show(ppl['uniform'])}")
    for name in names:
        print(f"  {name + ' only':<22} {show(ppl['single'][name])}")
    for name, run in results["learned"].items():
        weights = ", ".join(f"{n} {run['final_weights'][n]['mean']:.2f}" for n in names)
        print(f"  learned, {run['label']:<30} {show(run['test_ppl'])}, retrained with its final weights "
              f"{show(run['retrained_ppl'])}   weights: {weights}")  # fmt: skip
        mem = results["peak_mem_bytes"][name]
        print(
            f"      {run['inner_step_ms']:.1f} ms per inner step, {run['hyperstep_ms']:.0f} ms per hyperstep, "
            f"peak memory of a hyperstep {mem / 2**20:.1f} MiB"
            if mem is not None
            else "(memory not measured)"
        )
    print(f"wrote {args.out}/results.json, history.json and data_mixing_weights.png "
          f"({results['wall_time_s']:.0f} s wall, {results['cpu_time_s']:.0f} s CPU)")  # fmt: skip


def plot_weights(seeds: list[dict[str, Any]], names: list[str], labels: dict[str, str], path: Path) -> None:
    """The mixture weights over hypersteps, one panel per strategy: mean over seeds, band min to max."""
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.4), squeeze=False, sharey=True)
    for ax, (name, text) in zip(axes[0], labels.items()):
        traces = torch.tensor([s["learned"][name]["weights"] for s in seeds])  # (seeds, hypersteps + 1, K)
        steps = range(traces.shape[1])
        for k, domain in enumerate(names):
            ax.plot(steps, traces[:, :, k].mean(0), label=domain)
            ax.fill_between(steps, traces[:, :, k].min(0).values, traces[:, :, k].max(0).values, alpha=0.2)
        ax.axhline(1 / len(names), color="k", lw=0.6, ls=":")
        ax.set(title=text, xlabel="hyperstep", ylabel="mixture weight softmax(λ)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
