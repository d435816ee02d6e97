"""bench.json and the markdown table bench.md."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

KEYS = (
    "overhead_ratio",
    "torchopt_ratio",
    "time_to_accuracy",
    "time_to_accuracy_in_run",
    "hvps_to_accuracy",
    "unroll_vs_higher",
    "neumann_mem_ratio",
    "step_overhead_ratio",
    "decay_step_ratio",
    "algorithm1_vs_handwritten",
    "betty_ratio",
    "bn_dropout_overhead",
    "hvp_modes",
    "max_hparams",
    "bilevel_vs_plain_training",
    "quadratic_bilevel",
)


def machine(threads: int, device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "device": device,
        "cuda": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchopt": version("torchopt"),
        "higher": version("higher"),
        "platform": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": os.getloadavg(),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return {True: "yes", False: "**no**", None: "–"}[x]
    if isinstance(x, float):
        if not math.isfinite(x):  # printed like the None it becomes in bench.json
            return "–"
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        if x.is_integer():
            return f"{x:.0f}"
        # four decimals near 1, so that a ratio of 1.0005 against a goal of 1.0 does not print as "1"
        return f"{x:.4f}" if 0.1 <= abs(x) < 10 else f"{x:.3g}"
    return str(x)


def _cosine(c: float | None) -> str:
    """A median cosine, "nan" where none was defined (NaN in a run, None once through JSON)."""
    return "nan" if c is None or not math.isfinite(c) else f"{c:.3f}"


def _reached(hvps: float | None) -> str:
    """A median count of HVPs, or "not reached" (inf in a run, None once through JSON)."""
    return "not reached" if hvps is None or not math.isfinite(hvps) else _fmt(float(hvps))


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# bilevel benchmarks ({'quick' if meta['quick'] else 'full'} run)",
        "",
        f"{meta['machine']['cpu']}, {meta['machine']['threads']} thread(s) of {meta['machine']['logical_cpus']} "
        f"logical CPUs, torch {meta['machine']['torch']}, torchopt {meta['machine']['torchopt']}, "
        f"higher {meta['machine']['higher']}, {meta['machine']['date_utc']}; {meta['seconds']:.0f} s.",
        f"Times: medians over {meta['rounds']} interleaved rounds of torch.utils.benchmark.Timer samples; "
        f"ratios formed within each round. Memory: {meta['memory_method']}.",
        "",
        "| key | value | unit | goal | met |",
        "|---|---|---|---|---|",
    ]
    for key in KEYS:
        r = results[key]
        lines.append(f"| `{key}` | {_fmt(r['value'])} | {r['unit']} | {r['goal'] or '–'} | {_fmt(r['met'])} |")

    lines += [
        "",
        "## Overhead against the physical limit (K = 20)",
        "",
        "| problem | params = hparams | Neumann / limit | CG / limit | Neumann / one-graph limit "
        "| CG / one-graph limit | Neumann(20) ms | fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["overhead_ratio"]["details"]["problems"].items():
        lines.append(
            f"| {name} | {row['params']:,} | {row['neumann']:.3f} | {row['cg']:.3f} | "
            f"{row['neumann_over_tight']:.3f} | {row['cg_over_tight']:.3f} | "
            f"{row['ms']['neumann']:.1f} | {row['ms']['grad_val']:.1f} |"
        )

    t = results["torchopt_ratio"]["details"]
    lines += [
        "",
        f"## torchopt at equal iterations ({t['problem']['name']})",
        "",
        "| comparison | torchopt time / ours | relative difference of hypergradients |",
        "|---|---|---|",
    ]
    for (rk, rv), dv in zip(t["ratios"].items(), t["rel_diff"].values()):
        lines.append(f"| {rk} | {rv:.3f} | {dv:.2e} |")

    a = results["time_to_accuracy"]["details"]
    lines += [
        "",
        f"## Time to cosine ≥ 0.99 ({a['problem']['name']})",
        "",
        "| method | cheapest config reaching 0.99 | cosine | ms |",
        "|---|---|---|---|",
    ]
    for family, hit in a["families"].items():
        if hit is None:
            lines.append(f"| {family} | not reached in the grid | – | – |")
        else:
            lines.append(f"| {family} | {hit['config']} | {hit['cosine']:.4f} | {hit.get('ms', math.nan):.1f} |")

    u = results["unroll_vs_higher"]["details"]
    lines += [
        "",
        f"## Unroll vs higher ({u['problem']['name']}, batch {u['problem']['batch']}; peer: {u.get('peer', 'higher')})",
        "",
        "| K | ours/higher time | ours/higher memory | autograd/higher time | autograd/higher memory | "
        "peak MiB ours / higher / autograd | rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, row in u["steps"].items():
        m = row["peak_mib"]
        lines.append(
            f"| {k} | {row['time_ratio']:.3f} | {row['memory_ratio']:.3f} | {row['autograd_time_ratio']:.3f} "
            f"| {row['autograd_memory_ratio']:.3f} | {m['ours']:.0f} / {m['higher']:.0f} / "
            f"{m['autograd']:.0f} | {row['rel_diff_vs_higher']:.1e} |"
        )

    n = results["neumann_mem_ratio"]["details"]
    lines += [
        "",
        f"## Peak memory against K (Table 2; {n['problem']}, batch {n['batch']})",
        "",
        "| strategy | K | peak growth MiB |",
        "|---|---|---|",
    ]
    for strategy, by_k in n["peak_mib"].items():
        for k, mib in by_k.items():
            lines.append(f"| {strategy} | {k} | {mib:.1f} |")

    s = results["step_overhead_ratio"]["details"]["problems"]
    lines += [
        "",
        "## BilevelOptimizer.inner_step vs plain PyTorch (loss.backward() + torch.optim.Adam(foreach=True))",
        "",
        "| problem | ours / plain | goal | met | ms/step ours | ms/step plain |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in s.items():
        ms = row["ms_per_step"]
        goal = f"≤ {row['goal']}" if row["goal"] else "–"
        lines.append(
            f"| {name} | {row['ratio']:.3f} | {goal} | {_fmt(row['met'])} | {ms['ours']:.3f} | {ms['plain']:.3f} |"
        )

    d = results["decay_step_ratio"]["details"]
    ms = d["ms_per_step"]
    lines += [
        "",
        "## One weight decay per tensor: bilevel.weight_decay vs torch.optim's weight_decay (26-tensor ResNet)",
        "",
        f"Inner step with `bilevel.weight_decay` / plain step with `torch.optim.Adam(weight_decay=...)`: "
        f"{results['decay_step_ratio']['value']:.3f} ({ms['ours']:.3f} vs {ms['plain']:.3f} ms); with the "
        f"naive hand-written sum: {d['naive_sum_ratio']:.3f} ({ms['ours_naive']:.3f} ms).",
    ]

    a1 = results["algorithm1_vs_handwritten"]
    lines += [
        "",
        f"## Algorithm 1 vs the same loop hand-written ({a1['details']['problem']['name']})",
        "",
        f"Whole run: ours / hand-written = {_fmt(a1['value'])} ({a1['details']['ms']['ours']:.0f} ms vs "
        f"{a1['details']['ms']['hand']:.0f} ms); one hyperstep alone: {_fmt(a1['details']['hyperstep_ratio'])}. "
        f"Relative difference of the resulting hyperparameters: {a1['details']['rel_diff_of_first_hparam']:.1e} "
        f"(torchopt's and torch.optim's Adam differ in rounding).",
    ]

    b = results["betty_ratio"]
    lines += ["", "## Betty on the digits per-weight-decay task", ""]
    if "ms" in b["details"]:
        ms = b["details"]["ms"]
        lines.append(f"{b['unit']}: {_fmt(b['value'])} ({ms['betty']:.0f} ms vs {ms['ours']:.0f} ms).")
        if "hand" in ms:
            d = b["details"]
            lines.append(
                f"The same run hand-written (torch.optim + double backward) took {ms['hand']:.0f} ms: Betty / "
                f"hand-written = {_fmt(d['betty_over_hand'])}, ours / hand-written = {_fmt(d['ours_over_hand'])}."
            )
    else:
        lines.append(f"Not measured: {b['details'].get('peer')}.")

    bn = results["bn_dropout_overhead"]["details"]["models"]
    lines += [
        "",
        "## Model state: a BatchNorm + dropout CNN against the same CNN without state",
        "",
        "| model | ours / plain PyTorch | extra forward passes per step | ms/step ours | ms/step plain "
        "| one forward ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in bn.items():
        ms = row["ms_per_step"]
        lines.append(
            f"| {name} | {row['ratio']:.3f} | {row['extra_forward_passes']:.2f} | {ms['ours']:.2f} | "
            f"{ms['plain']:.2f} | {ms['one_forward']:.2f} |"
        )

    hv = results["hvps_to_accuracy"]["details"]
    lines += [
        "",
        f"## HVPs per hyperstep to cosine ≥ {inrun_target()} inside a run (digits)",
        "",
        "| problem | method | median HVPs | per hyperstep | median cosine at a budget of HVPs (where computed) |",
        "|---|---|---|---|---|",
    ]
    for kind, row in hv["problems"].items():
        for family, hit in row["hvps_to_0.99"].items():
            per = ", ".join("–" if v is None or not math.isfinite(v) else str(int(v)) for v in hit["per_hyperstep"])
            at = ", ".join(f"{b}: {_cosine(c)}" for b, c in hit["median_cosine_at"].items()) or "–"
            lines.append(
                f"| {kind} ({row['params']:,} weights, {row['hypersteps']} hypersteps) | {family} | "
                f"{_reached(hit['median'])} | {per} | {at} |"
            )
    tr = results["time_to_accuracy_in_run"]["details"]
    lines += ["", "Time to that accuracy at the run's last hyperstep (ms):", ""]
    for kind, row in tr.items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in row.get("ms", {}).items())
        if not parts:
            parts = "no method reached the target within the budget grid, so nothing to time"
        lines.append(f"- {kind}: torchopt's best / ours = {_fmt(row['ratio'])}; {parts}")

    h = results["hvp_modes"]["details"]
    lines += [
        "",
        f"## HVP modes, Neumann(20) ({h['problem']['name']})",
        "",
        "| mode | ms | time / reverse | rel. diff to reverse |",
        "|---|---|---|---|",
    ]
    for mode, r in h["ratio_to_reverse"].items():
        lines.append(f"| {mode} | {h['ms'][mode]:.1f} | {r:.3f} | {h['rel_diff_to_reverse'][mode]:.1e} |")
    q = results["quadratic_bilevel"]["details"]
    lines += [
        "",
        f"## benchopt's quadratic bilevel problem (n = {q['n']}, d = {q['d']}, {q['hypersteps']} hypersteps × 10 "
        f"inner steps, median of {q['seeds']} seeds)",
        "",
        "‖∇h‖² at the budget (the wall time of the fastest run) and after all hypersteps.",
        "",
        "| mode | strategy | at the budget | final | seconds | gradients + HVPs | outer step |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in q["summary"].items():
        for name in row["ranking"]:
            lines.append(
                f"| {mode} ({row['budget_seconds']:.2f} s) | {name} | {_fmt(row['at_budget'][name])} | "
                f"{_fmt(row['final_metric'][name])} | {row['seconds'][name]:.2f} | {row['oracles'][name]:.0f} | "
                f"{row['outer_lr'][name]} |"
            )
    lines.append("")
    for mode, row in q["summary"].items():
        lines.append(
            f"- {mode}: {row['winner']} wins, {_fmt(row['margin'])}× below {row['runner_up']} at the budget; it "
            f"reached {row['runner_up']}'s value there {_fmt(row['speedup'])}× sooner."
        )
    mh = results["max_hparams"]["details"]
    lines += [
        "",
        f"Largest problem: {mh['problem']}: Neumann(20) {mh['neumann20_ms']:.0f} ms, CG(20) "
        f"{mh['cg20_ms']:.0f} ms, one forward+backward of L_V {mh['forward_backward_ms']:.1f} ms.",
        "",
    ]
    return "\n".join(lines)


def inrun_target() -> float:
    from benchmarks import inrun

    return inrun.TARGET


def write(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(_plain(results), indent=2) + "\n")
    (out / "bench.md").write_text(markdown(results))
