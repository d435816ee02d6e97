"""Smoke test of the benchmark harness: a tiny configuration runs end to end and writes every key.

Timings are never asserted (they are measurements, see docs/benchmarks.md); only the shape of the
output and that every ratio is a positive finite number. Needs the peers (betty-ml, higher) that
`nox -s slow` and `nox -s bench` install.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEYS = {
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
}


def _ratios(tree, path="", inside=False):
    """Every number stored under a key named ``*_ratio``, ``ratio_*`` or ``ratios``, with its path."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            named = "ratio" in key.split("_") or key == "ratios"
            yield from _ratios(value, f"{path}.{key}", inside or named)
    elif inside:
        yield path, tree


@pytest.mark.slow  # a minute of CPU: the whole harness end to end, run by `nox -s slow`
def test_tiny_run_writes_every_key_with_positive_finite_ratios(tmp_path, monkeypatch):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert KEYS <= results.keys()
    for key in KEYS:
        value = results[key]["value"]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        # a difference of two timings (extra forward passes) may come out slightly negative
        assert value > 0 or key == "bn_dropout_overhead", (key, value)
    found = {where: v for key in KEYS for where, v in _ratios(results[key]["details"], key)}
    assert len(found) >= 10  # the per-problem and per-K ratios are there too
    for where, value in found.items():
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (where, value)
    assert (
        results["max_hparams"]["value"]
        == results["overhead_ratio"]["details"]["problems"][results["max_hparams"]["details"]["problem"]]["params"]
    )
    table = (tmp_path / "bench.md").read_text()
    for key in KEYS:
        assert f"`{key}`" in table
    # the tables can be rebuilt from bench.json alone (how docs/benchmarks.md is refreshed)
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import report

    assert report.markdown(results) == table
