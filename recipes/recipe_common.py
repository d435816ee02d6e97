"""Small shared pieces of the recipes: the common command-line flags, a rich progress bar, and output.

Each recipe is a standalone script; copy this file next to it when you copy a recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch.device, or a ValueError naming the flag."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: not a torch device ({err}); try 'cpu' or 'cuda'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu.")
    return device


# ----------------------------------------------------------------------- running under torchrun


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) — initialising torch.distributed when launched by ``torchrun``.

    Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) this is (0, 1, device) and nothing
    is initialised. Under torchrun: gloo on CPU, NCCL on CUDA with one GPU per local rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's slice of (x, y) and the weight that makes per-rank mean losses average to the full mean.

    ``bilevel.DataParallel`` averages gradients over ranks, which equals the full-batch gradient of a
    mean loss only for equal shards. Multiplying rank r's mean loss by ``weight = n_r · world / n``
    makes the average over ranks exactly (1/n) Σ ℓ_i for any shard sizes; with one process it is 1.
    """
    x_r, y_r = torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]
    return x_r, y_r, len(y_r) * world / len(y)


# ------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path | None, state: dict) -> None:
    """torch.save to a temporary file, then an atomic os.replace (a kill never leaves half a file)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | None, fingerprint: dict) -> dict | None:
    """The checkpoint at ``path`` (None if there is none), refusing one written with other flags.

    Recipe checkpoints hold RNG states and results besides ``BilevelOptimizer.state_dict()``; they
    are files the recipe wrote itself, hence ``weights_only=False``.
    """
    if path is None or not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"`--checkpoint {path}` was written by a run with different flags ({state.get('fingerprint')}); "
            f"use the same flags to resume, or another path."
        )
    return state


class Stop(Exception):
    """Raised by --stop-after K after K hyper-periods, simulating a kill (tests of --checkpoint)."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a CPU generator for data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def progress(description: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar with a live ``status`` field; yields ``update(advance=1, **status)``.

    ``enabled=False`` (e.g. on ranks other than 0 under torchrun) shows nothing.
    """
    if not enabled:
        yield lambda advance=1, **status: None
        return
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
