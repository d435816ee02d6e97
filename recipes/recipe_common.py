"""Small shared pieces of the recipes: the common command-line flags, a rich progress bar, and output.

Each recipe is a standalone script; copy this file next to it when you copy a recipe.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optree
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every recipe takes: --quick, --device, --seed, --out."""
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=description)
    parser.add_argument("--quick", action="store_true", help="small run (well under a minute on 2 CPU cores)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="torch device (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", type=Path, default=Path("runs") / name, help=f"output directory (default runs/{name})")
    parser.add_argument(
        "--check", action="store_true", help="check the derivatives at the first hyperstep and print the report"
    )
    return parser


def print_check(opt: Any, label: str = "") -> None:
    """``--check``: print what ``BilevelOptimizer(check=True)`` measured at the first hyperstep (its
    problems were also warned about when they were found)."""
    check = getattr(opt, "derivative_check", None)
    if check is not None:
        print(f"{label}{check}", flush=True)


def require(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    counts: tuple[str, ...] = (),
    positive: tuple[str, ...] = (),
) -> None:
    """``parser.error`` naming the flag unless every ``counts`` flag is an integer >= 1 and every
    ``positive`` flag a finite number > 0 (flags by their ``args`` attribute names)."""
    for flag in counts:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be an integer >= 1.")
    for flag in positive:
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{flag.replace('_', '-')} {value}: must be a finite number > 0.")


def subset_flag(parser: argparse.ArgumentParser, flag: str, text: str, choices: tuple[str, ...]) -> list[str]:
    """``--flag a,b``: the comma-separated names, each one of ``choices`` and none twice, or
    ``parser.error`` naming the flag."""
    picked = [s.strip() for s in text.split(",") if s.strip()]
    if not picked or any(s not in choices for s in picked) or len(set(picked)) != len(picked):
        parser.error(f"--{flag} {text!r}: expected a comma-separated subset of {','.join(choices)}")
    return picked


def numbers_flag(text: str) -> list[float]:
    """``--flag 0.1,0.3``: the comma-separated numbers, or a ValueError saying what was expected."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise ValueError(f"{text!r}: expected at least one number")
    return values


def main(run: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The recipes' entry point: check ``--out`` and ``--device`` before any work, then
    ``run(args, device)`` with one torch thread on CPU."""
    device = prepare(args)
    with one_thread(device.type == "cpu"):
        return run(args, device)


@torch.no_grad()
def accuracy(predict: Any, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """Fraction of rows of ``x`` whose ``predict(x_chunk).argmax(-1)`` equals ``y`` (in chunks)."""
    correct = sum(
        int((predict(x[i : i + chunk]).argmax(-1) == y[i : i + chunk]).sum()) for i in range(0, len(x), chunk)
    )
    return correct / len(x)


def prepare(args: argparse.Namespace) -> torch.device:
    """Check ``--out`` and ``--device`` before any work (a bad flag fails at once, not after training)."""
    check_out(args.out)
    return resolve_device(args.device)


def check_out(path: Path) -> None:
    """Create the ``--out`` directory now, or raise a ValueError naming the flag."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path}: is a file; pass a directory for results.json and the figures.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {path}: cannot create the directory ({err.strerror}).") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--out {path}: the directory is not writable.")


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch.device, or a ValueError naming the flag."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: not a torch device ({err}); try 'cpu' or 'cuda'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu.")
    return device


@contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block with one torch thread (restored afterwards; ``main()`` may be called in-process).

    The recipes' default models are tiny (8×8 digits, a few thousand weights): every operation is
    per-op overhead, and on a small shared CPU one thread measured several times faster than two
    contending ones. ``enabled=False`` (a GPU, or a large dataset) leaves the setting alone.
    """
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


@contextmanager
def distributed(device: torch.device) -> Iterator[tuple[int, int, torch.device]]:
    """:func:`setup_distributed` for the block, and the process group destroyed after it however the
    block ends: a rank that exits with its gloo group alive can abort at interpreter shutdown
    ("terminate called without an active exception")."""
    rank, world, device = setup_distributed(device)
    try:
        yield rank, world, device
    finally:
        teardown_distributed()


def shard(x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's slice of (x, y) and the weight that makes per-rank mean losses average to the full mean.

    ``bilevel.DataParallel`` averages gradients over ranks, which equals the full-batch gradient of a
    mean loss only for equal shards. Multiplying rank r's mean loss by ``weight = n_r · world / n``
    makes the average over ranks exactly (1/n) Σ ℓ_i for any shard sizes; with one process it is 1.
    Losses weighted this way go with ``bilevel.DataParallel(check_shards=False)``, which otherwise
    refuses shards of unequal sizes.
    """
    x_r, y_r = torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]
    return x_r, y_r, len(y_r) * world / len(y)


# ------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path | None, state: dict) -> None:
    """torch.save to a fresh temporary file beside ``path``, then an atomic ``os.replace``: a kill
    never leaves half a file, and two writers never share a temporary file."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_LOCKS: dict[Path, Any] = {}  # open lock files, held for the life of the process


def load_checkpoint(path: Path | None, fingerprint: dict) -> dict | None:
    """Claim ``path`` for this run and return the checkpoint there (None if there is none).

    Refuses a checkpoint written with other flags, and a path another running process has claimed
    (two runs writing one checkpoint would resume from each other's state). Checkpoints hold only
    tensors, numbers, strings and containers, so they load with ``weights_only=True``.
    """
    if path is None:
        return None
    _claim(path)
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"`--checkpoint {path}` was written by a run with different flags ({state.get('fingerprint')}); "
            f"use the same flags to resume, or another path."
        )
    return state


def _claim(path: Path) -> None:
    """An exclusive advisory lock on ``PATH.lock`` (POSIX; elsewhere nothing is locked)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks in the standard library
        return
    key = path.resolve()
    if key in _LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path.with_name(path.name + ".lock"), "a+")  # held open: the lock lasts as long as the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(
            f"`--checkpoint {path}` is in use by another running process; give each run its own checkpoint."
        ) from None
    _LOCKS[key] = handle


def release_checkpoint(path: Path) -> None:
    """Give up the claim :func:`load_checkpoint` took on ``path`` (also done at exit)."""
    handle = _LOCKS.pop(path.resolve(), None)
    if handle is not None:
        handle.close()


@atexit.register
def _release_all() -> None:
    for key in list(_LOCKS):
        release_checkpoint(key)


class Stop(Exception):
    """Raised by --stop-after K after K hyper-periods, simulating a kill (tests of --checkpoint)."""


def step_peak_memory(opt: Any, train_batch: Any, val_batch: Any) -> int:
    """Peak extra memory of one ``opt.step(train_batch, val_batch)`` (make it one that does a hyperstep).

    CUDA: ``max_memory_allocated`` above the memory allocated before. CPU: the peak, over the step, of
    the bytes torch's allocator handed out minus those it took back, from the allocation events
    ``torch.profiler`` records (``profile_memory=True``): what the step's tensors needed, independent
    of how the C allocator caches pages, so it is the same from run to run.
    """
    device = optree.tree_leaves(opt.params)[0].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        opt.step(train_batch, val_batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step(train_batch, val_batch)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence what C libraries write to file descriptor 2 (the profiler's start/stop log lines)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a CPU generator for data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def progress(description: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """Progress with a live ``status`` field; yields ``update(advance=1, **status)``.

    In a terminal, a rich progress bar. When stdout is not a terminal (piped to a log file, a
    cluster job), one plain line every 5 % and at the end, which reads well in a file.
    ``enabled=False`` (e.g. on ranks other than 0 under torchrun) shows nothing.
    """
    if not enabled:
        yield lambda advance=1, **status: None
        return
    if not Console().is_terminal:
        yield _LogLines(description, total).update
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
            bar.update(task, advance=advance, status=_status(status))

        yield update


def _status(status: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in status.items())


class _LogLines:
    """Progress as plain lines: ``description  120/300 (40%)  0:01:05 elapsed, ~0:01:38 left  status``."""

    def __init__(self, description: str, total: int, every: float = 0.05) -> None:
        self.description, self.total, self.every = description, max(total, 1), every
        self.done, self.next, self.start = 0, every, time.monotonic()

    def update(self, advance: int = 1, **status: Any) -> None:
        self.done += advance
        fraction = self.done / self.total
        if fraction + 1e-12 < self.next and self.done < self.total:
            return
        while self.next <= fraction + 1e-12:
            self.next += self.every
        elapsed = time.monotonic() - self.start
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        line = (
            f"{self.description}  {self.done}/{self.total} ({100 * fraction:.0f}%)  {_clock(elapsed)} elapsed, "
            f"~{_clock(left)} left  {_status(status)}"
        )
        print(line.rstrip(), flush=True)


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


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


# ------------------------------------------------------------------ resumable experiments (--checkpoint)


def given(value: Any, default: Any) -> Any:
    """A flag's value, or ``default`` where it was left at None (a default that depends on --quick)."""
    return default if value is None else value


def check_counts(values: dict[str, Any], keys: tuple[str, ...], minimum: int = 1) -> None:
    """A ValueError naming the flag unless each ``values[key]`` is an integer >= ``minimum``."""
    for key in keys:
        if not isinstance(values[key], int) or values[key] < minimum:
            raise ValueError(f"`--{key.replace('_', '-')} {values[key]}`: must be an integer >= {minimum}.")


def checkpoint_flags(parser: argparse.ArgumentParser, every: int) -> None:
    """``--checkpoint PATH``, ``--checkpoint-every K`` (hyper-periods) and the tests' hidden ``--stop-after``."""
    parser.add_argument("--checkpoint", type=Path, default=None, help="save/resume file")
    parser.add_argument("--checkpoint-every", type=int, default=every, help="hyper-periods between checkpoint saves")
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill


def check_stop_after(args: argparse.Namespace) -> None:
    if args.stop_after is not None and (args.stop_after < 1 or args.checkpoint is None):
        raise ValueError(f"`--stop-after {args.stop_after}`: must be an integer >= 1 and needs --checkpoint.")


def resume(args: argparse.Namespace, *ignore: str) -> dict[str, Any]:
    """The progress record of an experiment made of named runs, as ``--checkpoint`` holds it (fresh
    without one): ``periods`` (hyper-periods done), ``done`` (results of finished runs by name),
    ``current`` (the running run's state at the last save) and ``path``. The flags, except the
    checkpoint flags, ``--out`` and ``ignore``, must be those of the run that wrote it."""
    skip = {"checkpoint", "stop_after", "out", "checkpoint_every", *ignore}
    fingerprint = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}
    ckpt: dict[str, Any] = {"fingerprint": fingerprint, "periods": 0, "done": {}, "current": None}
    ckpt.update(load_checkpoint(args.checkpoint, fingerprint) or {})
    ckpt["path"] = args.checkpoint
    return ckpt


def save_progress(ckpt: dict[str, Any]) -> None:
    """Write the record of :func:`resume` to its ``--checkpoint`` path (nothing without one)."""
    save_checkpoint(ckpt["path"], {k: ckpt[k] for k in ("fingerprint", "periods", "done", "current")})


def end_period(ckpt: dict[str, Any], args: argparse.Namespace, current: Any) -> None:
    """Count a finished hyper-period; every ``--checkpoint-every`` periods save, with ``current()`` (the
    running run's state) as ``current``; raise Stop once ``--stop-after`` periods are done (a simulated
    kill: what was not saved is lost)."""
    ckpt["periods"] += 1
    if ckpt["path"] is not None and ckpt["periods"] % args.checkpoint_every == 0:
        ckpt["current"] = current()
        save_progress(ckpt)
    if args.stop_after is not None and ckpt["periods"] >= args.stop_after:
        raise Stop


def run_pending(ckpt: dict[str, Any], runs: dict[str, Any]) -> bool:
    """Call, in order, each of ``runs`` (name → function of no arguments) not yet ``done``, saving its
    result; False if ``--stop-after`` stopped one."""
    try:
        for name, run in runs.items():
            if name not in ckpt["done"]:
                ckpt["done"][name] = run()
                ckpt["current"] = None
                save_progress(ckpt)
    except Stop:
        return False
    return True
