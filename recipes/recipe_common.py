"""Small shared pieces of the recipes: the common command-line flags, a rich progress bar, and output.

Each recipe is a standalone script; copy this file next to it when you copy a recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every recipe takes: --quick, --device, --seed, --out."""
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=description)
    parser.add_argument("--quick", action="store_true", help="small run (well under a minute on 2 CPU cores)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="torch device (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", type=Path, default=Path("runs") / name, help=f"output directory (default runs/{name})")
    return parser


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a CPU generator for data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def progress(description: str, total: int) -> Iterator[Any]:
    """A rich progress bar with a live ``status`` field; yields ``update(advance=1, **status)``."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, status="")

        def update(advance: int = 1, **status: float) -> None:
            text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in status.items())
            bar.update(task, advance=advance, status=text)

        yield update


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf
    return value


def write_results(out: Path, results: dict[str, Any]) -> Path:
    """Write ``results`` as ``out/results.json`` (plain numbers and lists) and return the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(_plain(results), indent=2) + "\n")
    return path
