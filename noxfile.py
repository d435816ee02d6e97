"""Developer tasks: `nox -s tests`, `lint`, `typecheck`, `docs`, `recipes`, `slow`, `bench` and `cuda`."""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
# Pin torch to the CPU wheel our machines carry (see constraints.txt).
ENV = {"PIP_CONSTRAINT": str(ROOT / "constraints.txt")}


def _install(session: nox.Session, *extras: str) -> None:
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec, env=ENV)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the default test suite (fast; slow checks live in `nox -s slow`)."""
    _install(session, "test")
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    session.run("pytest", "-m", "not slow and not cuda", *session.posargs, env=threads)


def _install_peers(session: nox.Session) -> None:
    """The peers the benchmarks compare against: higher, and Betty (betty-ml 0.1.1 is the last release for
    Python 3.11; its metadata has a `torch>=1.6.*` specifier that pip >= 24.1 rejects, hence the older pip)."""
    session.install("pip<24.1")
    session.install("higher>=0.2", "betty-ml", env=ENV)


@nox.session
def slow(session: nox.Session) -> None:
    """Run the slow, statistical and end-to-end checks (installs the benchmark peers for the harness test)."""
    _install(session, "test")
    _install_peers(session)
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def cuda(session: nox.Session) -> None:
    """On a machine with a GPU: the CUDA tests and `python -m benchmarks --device cuda --quick` (~8 minutes)."""
    session.install("-e", ".[test]")  # no CPU pin here: pip picks the CUDA build of torch
    _install_peers(session)
    session.run("python", "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')")
    session.run("pytest", "-m", "cuda", *session.posargs)
    session.run("python", "-m", "benchmarks", "--device", "cuda", "--quick", "--out", "runs/bench-cuda")


# The top-level keys each recipe's results.json must have (see the recipes' docs pages).
RECIPES = {
    "hypergradient_accuracy": ["steps", "cosine", "l2", "cosine_identity"],
    "overfit_validation": ["models"],
    "distillation": ["n_hparams", "test_acc_distilled", "test_acc_random_real", "test_acc_full_data"],
    "validation_split": ["proportions", "global", "per_weight"],
    "augmentation": ["val_acc", "test_acc", "peak_mem_bytes", "n_hparams"],
    "dropout_lstm": ["val_ppl", "test_ppl", "rates", "overfit_val_loss"],
    "hypercleaning": ["test_acc", "detection"],
    "learning_rates": ["test_acc", "learning_rates"],
    "data_mixing": ["test_ppl", "learned", "peak_mem_bytes", "domains"],
}


@nox.session
def recipes(session: nox.Session) -> None:
    """Run every recipe with --quick as a user would, and check its results.json."""
    import json
    import tempfile

    _install(session, "recipes")
    out_root = Path(tempfile.mkdtemp(prefix="bilevel-recipes-"))
    for name, keys in RECIPES.items():
        out = out_root / name
        session.run("python", f"recipes/{name}.py", "--quick", "--device", "cpu", "--out", str(out))
        results = json.loads((out / "results.json").read_text())
        missing = [key for key in keys if key not in results]
        if missing:
            session.error(f"{name}: results.json lacks {missing}")
        session.log(f"{name}: results.json OK, figures: {sorted(p.name for p in out.glob('*.png'))}")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site offline with `mkdocs build --strict` (any warning fails)."""
    _install(session, "docs")
    # Material prints a banner about MkDocs 2.0 on every build; it is advice, not a build warning.
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """Lint with ruff."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy."""
    _install(session)
    session.install("mypy")
    session.run("mypy", "bilevel")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks vs plain PyTorch, the physical limit, torchopt, higher and Betty (`nox -s bench -- --quick`)."""
    _install(session, "test")  # scikit-learn for the digits tasks
    _install_peers(session)
    session.run("python", "-m", "benchmarks", *(session.posargs or ["--out", "runs/bench"]))
