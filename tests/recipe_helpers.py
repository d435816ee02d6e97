"""Shared by the recipe tests: import a recipe as its script runs, and write tiny dataset files in
the exact on-disk formats the real loaders read (MNIST IDX, CIFAR-10 python pickle batches)."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def load_recipe(name: str) -> ModuleType:
    """Import recipes/<name>.py as ``python recipes/<name>.py`` sees it: its folder on sys.path, so
    its own ``import recipe_common`` / ``recipe_data`` work; registered under its plain name."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks.<name>`` as ``python -m benchmarks`` sees it, from the repository root
    (pytest's importlib mode does not put the root on ``sys.path``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """IDX: bytes 0, 0, type 0x08 (ubyte), ndim; big-endian uint32 sizes; raw data. ``compress``
    writes ``<path>.gz``. Returns the path written."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_cifar_batch(path: Path, pixels: np.ndarray, labels: list[int], **extra: object) -> None:
    """A CIFAR-10 python batch: a pickled dict with bytes keys, b"data" (N, 3072) uint8, b"labels"."""
    batch = {b"data": pixels.astype(np.uint8), b"labels": [int(v) for v in labels]}
    batch.update({k.encode(): v for k, v in extra.items()})
    with open(path, "wb") as f:
        pickle.dump(batch, f)
