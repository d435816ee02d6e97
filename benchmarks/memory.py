"""Peak memory of one case, measured in a fresh process.

CPU: the process runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every tensor buffer
larger than 64 KiB with its own mmap and returns it to the OS as soon as it is freed; the peak
resident set size then tracks the peak of live tensor memory. We report the growth of the peak
RSS (``VmHWM``, the counter behind ``getrusage(RUSAGE_SELF).ru_maxrss``; see :func:`_maxrss_mib`)
over a baseline taken after the problem's inputs
exist and the same code path has been warmed up on a tiny copy of the problem (imports, lazily
compiled decompositions, allocator pools). Just before the case the peak mark is reset to the
current RSS (``echo 5 > /proc/self/clear_refs``), so the baseline is the live memory then.

CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the case.

Usage (internal): ``python -m benchmarks.memory '<json case>'`` prints one JSON line.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

METHOD_CPU = (
    "growth of peak RSS (VmHWM = ru_maxrss of the process itself) over a warmed-up baseline "
    "(peak reset via /proc/self/clear_refs), "
    "fresh process, MALLOC_MMAP_THRESHOLD_=65536"
)
METHOD_CUDA = "torch.cuda.max_memory_allocated() growth over the pre-case allocation"
ROOT = Path(__file__).resolve().parent.parent


def measure(case: dict[str, Any], timeout: float = 600.0) -> float:
    """Peak memory growth of ``case`` in MiB, run in a subprocess."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", json.dumps(case)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory case {case} failed:\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["mib"])


def _maxrss_mib() -> float:
    """Peak RSS of this process's own address space, in MiB.

    On Linux we read ``VmHWM`` from /proc/self/status: it is the counter behind ``ru_maxrss``, but
    ``getrusage`` also reports the peak carried over from the parent across fork+exec, which hides
    the child's growth whenever the (benchmark) parent is larger than the child.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0), so that an earlier peak
    (importing torch, building the inputs) cannot hide the case's growth; a no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _child(case: dict[str, Any]) -> float:
    import torch

    from benchmarks import cases, problems

    torch.set_num_threads(case.get("threads", 1))
    device = torch.device(case.get("device", "cpu"))
    shape = case["problem"]
    problem = problems.make(shape["kind"], tuple(shape["widths"]), shape["batch"], device=device)
    tiny_widths = (shape["widths"][0], 4, shape["widths"][-1])
    tiny = problems.make(shape["kind"], tiny_widths, 2, device=device)
    cases.build(tiny, case)()  # warm the code path up
    run = cases.build(problem, case)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    gc.collect()
    _reset_peak()
    before = _maxrss_mib()
    run()
    return _maxrss_mib() - before


if __name__ == "__main__":
    print(json.dumps({"mib": _child(json.loads(sys.argv[1]))}))
