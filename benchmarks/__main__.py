"""``python -m benchmarks [--quick] [--out DIR] [--threads N] [--rounds N]``: run and write bench.json/bench.md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import memory, quadratic, report, suite


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (~3.5 min, 1 core)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds; the smoke test's size
    parser.add_argument("--out", type=Path, default=Path("runs") / "bench", help="output directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: least noise on a shared machine)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3 quick, 5 full)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads={args.threads}: must be >= 1")
    torch.set_num_threads(args.threads)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = suite.Config.make(mode, args.threads, args.device)
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds={args.rounds}: must be >= 1")
        cfg = suite.dataclasses.replace(cfg, rounds=args.rounds)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

    results: dict = {
        "meta": {
            "quick": cfg.quick,
            "rounds": cfg.rounds,
            "min_sample_seconds": cfg.min_time,
            "machine": report.machine(cfg.threads, cfg.device),
            "memory_method": memory.METHOD_CUDA if cfg.device.startswith("cuda") else memory.METHOD_CPU,
        }
    }
    results["overhead_ratio"], results["max_hparams"] = suite.overhead(cfg, log)
    results["hvps_to_accuracy"], results["time_to_accuracy_in_run"] = suite.hvps_to_accuracy(cfg, log)
    for key in report.KEYS:
        if key not in results:
            results[key] = getattr(suite, key)(cfg, log)
    results["meta"]["seconds"] = time.perf_counter() - start
    report.write(args.out, results)
    quadratic.plot(results["quadratic_bilevel"]["details"]["traces"], args.out / "quadratic.png")
    log(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.md'} and {args.out / 'quadratic.png'}")
    print((args.out / "bench.md").read_text())
    return results


if __name__ == "__main__":
    main()
