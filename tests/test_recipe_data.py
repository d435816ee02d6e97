"""The recipes' data loaders on tiny files written here in the exact on-disk formats."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.recipe_helpers import load_recipe, write_cifar_batch, write_idx

ROOT = Path(__file__).resolve().parents[1]


data = load_recipe("recipe_data")


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_mnist_idx_files_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels, compress)
        x, y = data.load_mnist(tmp_path, "train" if prefix == "train" else "test")
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
        np.testing.assert_array_equal((x.squeeze(1) * 255).round().numpy().astype(np.uint8), images)
        np.testing.assert_array_equal(y.numpy(), labels)


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    truncated = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 4
    (tmp_path / "short").write_bytes(truncated)
    with pytest.raises(ValueError, match="promises 10"):
        data.read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        data.load_mnist(tmp_path)


def test_truncated_or_out_of_range_files_name_themselves(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    images = np.zeros((10, 28, 28), dtype=np.uint8)
    gz = write_idx(tmp_path / "train-images-idx3-ubyte", images, compress=True)
    gz.write_bytes(gz.read_bytes()[:30])  # a download cut short
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: truncated or corrupt"):
        data.read_idx(gz)
    raw = write_idx(tmp_path / "raw-idx1-ubyte", labels)
    raw.write_bytes(raw.read_bytes()[:6])  # cut inside the header
    with pytest.raises(ValueError, match="raw-idx1-ubyte: truncated IDX header"):
        data.read_idx(raw)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"MNIST train labels in .*: labels must lie in 0\.\.9, found \[12\]"):
        data.load_mnist(tmp_path, "train")
    folder = tmp_path / "cifar"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        write_cifar_batch(folder / name, np.zeros((2, 3072)), [0, 1])
    write_cifar_batch(folder / "data_batch_3", np.zeros((2, 3072)), [0, 10])
    with pytest.raises(ValueError, match=r"data_batch_3: labels must lie in 0\.\.9, found \[10\]"):
        data.load_cifar10(folder, "train")
    (folder / "data_batch_2").write_bytes((folder / "data_batch_2").read_bytes()[:100])
    with pytest.raises(ValueError, match="data_batch_2: truncated or corrupt"):
        data.load_cifar10(folder, "train")


def test_cifar10_pickle_batches_round_trip(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=2)]
        write_cifar_batch(folder / name, pixels, labels, batch_label=name.encode(), filenames=[])
        written[name] = (pixels, labels)
    x, y = data.load_cifar10(tmp_path, "train")  # the parent folder works too
    assert x.shape == (10, 3, 32, 32) and y.tolist() == [v for i in range(1, 6) for v in written[f"data_batch_{i}"][1]]
    first = written["data_batch_1"][0][0].reshape(3, 32, 32)
    np.testing.assert_array_equal((x[0] * 255).round().numpy().astype(np.uint8), first)
    xt, yt = data.load_cifar10(folder, "test")
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == written["test_batch"][1]


def test_bundled_sets_and_split_helpers():
    x, y = data.load_digits()
    assert x.shape == (1797, 1, 8, 8) and 0 <= x.min() and x.max() <= 1 and set(y.tolist()) == set(range(10))
    X, t = data.load_diabetes()
    assert X.shape == (442, 10) and abs(float(t.mean())) < 1e-5
    tr_x, tr_y, te_x, te_y = data.load_images("digits")
    assert len(tr_x) + len(te_x) == 1797 and len(tr_y) == len(tr_x) and len(te_y) == len(te_x)
    idx = data.stratified_subset(tr_y, 5, torch.Generator().manual_seed(0))
    assert len(idx) == 50 and torch.bincount(tr_y[idx]).tolist() == [5] * 10
    with pytest.raises(ValueError, match="--data-dir"):
        data.load_images("mnist")
