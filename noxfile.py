"""Developer tasks: `nox -s tests`, `nox -s lint`, `nox -s typecheck`."""

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
    session.run("pytest", "-m", "not slow", *session.posargs, env=threads)


@nox.session
def slow(session: nox.Session) -> None:
    """Run the slow, statistical and end-to-end checks."""
    _install(session, "test")
    session.run("pytest", "-m", "slow", *session.posargs)


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
