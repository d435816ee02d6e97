"""Offline data for the recipes: bundled scikit-learn sets and real loaders for standard formats.

Nothing here downloads. The defaults use datasets that ship inside scikit-learn (8×8 digits,
diabetes); MNIST (IDX files) and CIFAR-10 (python pickle batches) are read from a directory the
user points ``--data-dir`` at, in exactly the formats the original distributions use.

Every loader returns float32 image tensors shaped (N, C, H, W) scaled to [0, 1] and int64 labels.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

# ------------------------------------------------------------------------------ bundled sets


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1 797 8×8 handwritten digits: images (N, 1, 8, 8) in [0, 1], labels (N,)."""
    from sklearn.datasets import load_digits as _load

    data = _load()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.int64)


def load_diabetes() -> tuple[Tensor, Tensor]:
    """scikit-learn's diabetes regression set (442 × 10), features and target standardised."""
    from sklearn.datasets import load_diabetes as _load

    X, y = _load(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


# ------------------------------------------------------------------------------------ MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzip-compressed.

    Layout: two zero bytes, a dtype code, the number of dimensions d, then d big-endian uint32
    sizes, then the data in row-major order. A truncated or corrupt file raises ``ValueError``
    naming it.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            header = f.read(4)
            if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES:
                raise ValueError(f"{path} is not an IDX file (bad magic number {header!r}).")
            ndim = header[3]
            sizes = f.read(4 * ndim)
            if len(sizes) != 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header ({len(sizes)} of {4 * ndim} size bytes).")
            shape = struct.unpack(f">{ndim}I", sizes)
            dtype = np.dtype(_IDX_DTYPES[header[2]])
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # gzip raises these for cut or damaged streams
        raise ValueError(f"{path}: truncated or corrupt file ({type(err).__name__}: {err}).") from None
    expected = int(np.prod(shape))
    if len(raw) != expected * dtype.itemsize:
        raise ValueError(
            f"{path}: header promises {expected} values of shape {shape} ({expected * dtype.itemsize} bytes), "
            f"found {len(raw)} bytes; the file is truncated or not what it claims."
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def check_labels(labels: np.ndarray, classes: int, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless every label is an integer in [0, classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)]
        raise ValueError(
            f"{where}: labels must lie in 0..{classes - 1}, found {sorted(set(bad.tolist()))[:5]}; "
            f"is this the right file?"
        )


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(f"{stem}[.gz] not found in {data_dir}; point --data-dir at your MNIST copy.")


def load_mnist(data_dir: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST from the four standard IDX files in ``data_dir`` (``train-images-idx3-ubyte[.gz]`` ...).

    Returns images (N, 1, 28, 28) in [0, 1] and labels (N,).
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split={split!r}`: expected 'train' or 'test'.")
    prefix = "train" if split == "train" else "t10k"
    data_dir = Path(data_dir)
    images = read_idx(_find(data_dir, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(data_dir, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST {split} files in {data_dir} disagree: images {images.shape}, labels {labels.shape}.")
    check_labels(labels, 10, f"MNIST {split} labels in {data_dir}")
    x = torch.tensor(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.tensor(labels.astype(np.int64))


# --------------------------------------------------------------------------------- CIFAR-10


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (EOFError, pickle.UnpicklingError, ValueError) as err:
        raise ValueError(f"{path}: truncated or corrupt CIFAR-10 batch ({type(err).__name__}: {err}).") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (expected a dict with b'data' and b'labels').")
    return batch


def load_cifar10(data_dir: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """CIFAR-10 from the python pickle batches (``data_batch_1`` … ``data_batch_5``, ``test_batch``).

    ``data_dir`` may be the ``cifar-10-batches-py`` folder or its parent. Returns images
    (N, 3, 32, 32) in [0, 1] and labels (N,).
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split={split!r}`: expected 'train' or 'test'.")
    data_dir = Path(data_dir)
    if (data_dir / "cifar-10-batches-py").is_dir():
        data_dir = data_dir / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (data_dir / n).exists()]
    if missing:
        raise FileNotFoundError(f"{missing} not found in {data_dir}; point --data-dir at your CIFAR-10 copy.")
    xs, ys = [], []
    for name in names:
        batch = _unpickle(data_dir / name)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{data_dir / name}: expected data of shape (N, 3072), got {data.shape}.")
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if labels.shape != (len(data),):
            raise ValueError(f"{data_dir / name}: {len(data)} images but labels of shape {labels.shape}.")
        check_labels(labels, 10, str(data_dir / name))
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    x = torch.tensor(np.concatenate(xs).astype(np.float32) / 255.0)
    return x, torch.tensor(np.concatenate(ys))


# ----------------------------------------------------------------------------------- choosing


def load_images(name: str, data_dir: str | Path | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x, train_y, test_x, test_y) for ``name`` in {"digits", "mnist", "cifar10"}.

    ``digits`` has no official test split; a fixed, seeded 70/30 split is used.
    """
    if name == "digits":
        x, y = load_digits()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        cut = int(0.7 * len(x))
        return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    if data_dir is None:
        raise ValueError(f"`--dataset {name}` reads files from disk: pass --data-dir pointing at your copy.")
    loader = {"mnist": load_mnist, "cifar10": load_cifar10}.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; expected 'digits', 'mnist' or 'cifar10'.")
    return (*loader(data_dir, "train"), *loader(data_dir, "test"))


def stratified_subset(y: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Indices of ``per_class`` random examples of every class in ``y``."""
    picks = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.cat(picks)


def hold_out(y: Tensor, per_class: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(remaining indices, validation indices): ``per_class`` random examples of every class held out.

    Raises ``ValueError`` naming ``--val-per-class`` when a class has no example left over.
    """
    counts = torch.bincount(y)
    if int(counts.min()) <= per_class:
        raise ValueError(
            f"--val-per-class {per_class}: every class needs more training images than that, found class "
            f"counts {counts.tolist()}; lower --val-per-class."
        )
    val_idx = stratified_subset(y, per_class, generator)
    left = torch.ones(len(y), dtype=torch.bool)
    left[val_idx] = False
    return torch.nonzero(left).flatten(), val_idx


def clean_split(
    dataset: str, data_dir: str | Path | None, val_per_class: int, generator: torch.Generator
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(train, val, test) as (x, y) pairs: ``val_per_class`` validation images of each class held
    out of the training split (stratified, drawn with ``generator``), the rest, and the test split."""
    x, y, test_x, test_y = load_images(dataset, data_dir)
    rest, val_idx = hold_out(y, val_per_class, generator)
    return (x[rest], y[rest]), (x[val_idx], y[val_idx]), (test_x, test_y)


def default_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------- fitting to convergence


def fit_lbfgs(
    train_loss, params: dict[str, Tensor], hparams: dict[str, Tensor], batch, max_iter: int, **options: Any
) -> dict[str, Tensor]:
    """w*(λ) at fixed hyperparameters: ``train_loss(w, hparams, batch)`` (``bilevel.BilevelOptimizer``'s
    signature) minimised from ``params`` by L-BFGS with a strong-Wolfe line search. For a convex loss,
    such as a regularised logistic regression, this reaches its unique minimiser. ``options`` override
    ``torch.optim.LBFGS``'s settings below."""
    hparams = {k: v.detach() for k, v in hparams.items()}
    w = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    settings = {"tolerance_grad": 1e-5, "tolerance_change": 1e-10, "history_size": 20, **options}
    opt = torch.optim.LBFGS(list(w.values()), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", **settings)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = train_loss(w, hparams, batch)
        loss.backward()
        return loss

    opt.step(closure)
    return {k: v.detach() for k, v in w.items()}
