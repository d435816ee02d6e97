"""Benchmarks of bilevel: cost of a hypergradient against its physical limit and against peers.

Run ``python -m benchmarks --quick --out DIR`` (or ``nox -s bench``). Everything here is a
measurement, never a test: ratios are printed and saved to ``DIR/bench.json`` and ``DIR/bench.md``,
and nothing asserts a timing. See docs/benchmarks.md for the method and the last full run.
"""
