"""Averaging over micro-batches and over torch.distributed ranks.

Both reductions rest on one fact: for losses that are means over examples and shards of equal size,
the full-batch gradient, every Hessian-vector product and the mixed product are the average of the
per-shard ones. Averaging each of them is therefore exactly the single-process full-batch computation
(up to floating-point summation order).

What is averaged, and why not less: the validation gradient once, every HVP inside the solve, and the
mixed product once. The solve itself is *not* separable — Neumann's α Σ (I − αH)^j v and CG are
nonlinear in H through powers and dot products, so averaging per-rank solutions would give a different
answer. With every HVP averaged, all ranks hold identical vectors and run identical deterministic
solves, so the hypergradient comes out the same on every rank without a further collective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from collections.abc import Sequence
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from bilevel import _tree


@dataclasses.dataclass(frozen=True)
class MicroBatches:
    r"""Mark a batch as a list of micro-batches whose losses, gradients and HVPs are averaged.

    Pass it wherever a ``train_batch`` or ``val_batch`` goes. Peak memory is that of one micro-batch
    (Hessian-vector products are then recomputed per micro-batch instead of reusing one
    linearisation). Every loss, gradient and product is the weighted mean over micro-batches,

    $$
    \nabla L = \sum_{i=1}^k \omega_i\, \nabla L(\cdot\,; b_i), \qquad
    Hv = \sum_{i=1}^k \omega_i\, H(b_i)\, v, \qquad \omega_i = \frac{n_i}{\sum_j n_j},
    $$

    with ``weights`` \(n_i\) (equal by default). For losses that are means over examples, the result
    equals the concatenated batch exactly when \(n_i\) is micro-batch i's number of examples. So
    micro-batches of different shapes are refused unless ``weights`` says how to weight them: an equal
    average of a 48-example mean and a 2-example mean would count each example of the small one 24×.

    Args:
        batches: the micro-batches (a non-empty sequence of whatever your losses accept).
        weights: each micro-batch's share (e.g. its number of examples, for losses that are means);
            ``None`` weights them equally and requires the tensors of every micro-batch to have the
            same shapes.

    Example:
        >>> import torch, bilevel
        >>> X, y = torch.randn(50, 2), torch.randn(50)
        >>> bilevel.MicroBatches([(X[:25], y[:25]), (X[25:], y[25:])]).size
        2
        >>> pieces = list(zip(X.split(48), y.split(48)))  # 48 + 2 examples
        >>> bilevel.MicroBatches(pieces, weights=[len(p[1]) for p in pieces]).weights
        (48.0, 2.0)
    """

    batches: Sequence[Any]
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.batches, (str, bytes)) or not isinstance(self.batches, Sequence) or not self.batches:
            raise ValueError(f"`MicroBatches(batches={self.batches!r})`: batches must be a non-empty list of batches.")
        object.__setattr__(self, "batches", tuple(self.batches))
        if self.weights is not None:
            weights = self.weights
            ok = isinstance(weights, Sequence) and not isinstance(weights, (str, bytes))
            ok = ok and len(weights) == len(self.batches)
            ok = ok and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in weights)
            ok = ok and all(math.isfinite(float(x)) and float(x) > 0 for x in weights)
            if not ok:
                raise ValueError(
                    f"`MicroBatches(weights={weights!r})`: weights must be {len(self.batches)} finite numbers > 0, "
                    f"one per micro-batch (e.g. its number of examples)."
                )
            object.__setattr__(self, "weights", tuple(float(x) for x in weights))
            return
        shapes = [[tuple(t.shape) for t in _tree.batch_tensors(piece)] for piece in self.batches]
        odd = next((i for i, s in enumerate(shapes) if s != shapes[0]), None)
        if odd is not None:
            raise ValueError(
                f"MicroBatches: micro-batch {odd} has tensors of shapes {shapes[odd]}, micro-batch 0 {shapes[0]}. "
                f"Their equal average would not be the mean over the whole batch (each example of a smaller "
                f"micro-batch would count more). Split into equal sizes, or pass weights=[...] with each "
                f"micro-batch's number of examples (for losses that are means over examples)."
            )

    @property
    def size(self) -> int:
        """Number of micro-batches."""
        return len(self.batches)


def parts(batch: Any) -> tuple[Any, ...]:
    """The micro-batches of ``batch`` (a single batch is one part)."""
    return tuple(batch.batches) if isinstance(batch, MicroBatches) else (batch,)


def coefficients(batch: Any) -> tuple[tuple[float, ...], float]:
    """How to average per-micro-batch results: the mean is ``scale · Σ_i coefficient_i · value_i``.

    Equal micro-batches sum with coefficient 1 and scale by 1/k at the end; weighted ones by ωᵢ, scale 1.
    """
    pieces = parts(batch)
    weights = batch.weights if isinstance(batch, MicroBatches) else None
    if weights is None:
        return (1.0,) * len(pieces), 1.0 / len(pieces)
    norm = sum(weights)
    return tuple(w / norm for w in weights), 1.0


def average(batch: Any, values: Sequence[list[Tensor]]) -> list[Tensor]:
    """The weighted mean (see :func:`coefficients`) of per-micro-batch tensor lists, one per part of ``batch``."""
    coefs, scale = coefficients(batch)
    total = _tree.scale(values[0], coefs[0]) if coefs[0] != 1.0 else list(values[0])
    for coef, value in zip(coefs[1:], values[1:]):
        _tree.add_(total, value, coef)
    return total if scale == 1.0 else _tree.scale(total, scale)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Data parallelism over a torch.distributed process group (launch with ``torchrun``).

    Each rank passes its own shard of the training and validation batches; gradients,
    Hessian-vector products and mixed products are averaged across ranks with ``all_reduce``. For
    losses that are means over examples this is exactly the single-process full-batch computation
    **when every rank's shard has the same size**: the average of per-shard means is the full mean
    only then (an 80/20 split would weight the small shard's examples 4× too much). So every batch is
    checked: the shapes of its tensors are compared across ranks with one tiny collective, and
    unequal shards raise ``ValueError`` on every rank (pad or drop examples to equal sizes, as
    ``DistributedSampler`` does). Works with the gloo backend on CPU and NCCL on CUDA; initialise the
    group yourself (``dist.init_process_group``).

    Args:
        group: the process group (``None``: the default group).
        check_sync: debug mode — after every update, verify with one small collective that params
            and hparams are bitwise identical on all ranks, raising ``RuntimeError`` if not (catches
            ranks that started from different weights or run different code).
        check_shards: compare the shapes of every batch's tensors across ranks (default). Turn it off
            only if your losses already weight each rank's mean so that the average over ranks is the
            full-batch mean (multiply rank r's loss by n_r · world / n), or to save the collective.

    Example:
        >>> import bilevel
        >>> bilevel.DataParallel(check_sync=True).check_sync
        True
    """

    group: Any = None
    check_sync: bool = False
    check_shards: bool = True

    def validate(self) -> None:
        """Raise a clear error when torch.distributed is not initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "`distributed=DataParallel()` needs an initialised torch.distributed process group: launch with "
                "`torchrun --nproc_per_node=N script.py` and call torch.distributed.init_process_group() first."
            )

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Average tensors over ranks in a single all-reduce of one flat buffer per dtype."""
        out: list[Tensor] = list(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            members = [tensors[i] for i in idx]
            flat = _tree.ravel(members)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.world_size)
            for i, piece in zip(idx, _tree.unravel(flat, members)):
                out[i] = piece
        return out

    def assert_in_sync(self, tensors: Sequence[Tensor], what: str) -> None:
        """Raise ``RuntimeError`` unless ``tensors`` are bitwise identical on every rank."""
        fingerprint = torch.stack([_fingerprint(t) for t in tensors]).reshape(1, -1)
        gathered = [torch.empty_like(fingerprint) for _ in range(self.world_size)]
        dist.all_gather(gathered, fingerprint, group=self.group)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(
                f"DataParallel(check_sync=True): {what} differ across ranks. Make sure every rank starts from the "
                f"same params/hparams and passes shards of equal size."
            )

    def check_equal_shards(self, batch: Any, name: str) -> None:
        """Raise ``ValueError`` on every rank unless ``batch`` has the same tensor shapes on all ranks.

        One all-reduce of two int64 numbers (the max of a hash of the shapes and of its negation);
        only when they disagree are the shapes gathered, to say which rank has which.
        """
        if not self.check_shards:
            return
        shapes = [tuple(t.shape) for piece in parts(batch) for t in optree.tree_leaves(piece) if isinstance(t, Tensor)]
        device = _collective_device(self.group)
        code = int.from_bytes(hashlib.blake2b(repr(shapes).encode(), digest_size=7).digest(), "little")
        extremes = torch.tensor([code, -code], dtype=torch.int64, device=device)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.group)
        if int(extremes[0]) == -int(extremes[1]):
            return
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, shapes, group=self.group)
        listing = "; ".join(f"rank {r}: {s}" for r, s in enumerate(gathered))
        raise ValueError(
            f"DataParallel: `{name}` has different shapes on different ranks ({listing}). Averaging per-rank "
            f"means equals the full-batch mean only for equal shards, so the result would be silently wrong. "
            f"Give every rank the same number of examples (pad or drop, as DistributedSampler does), or, if "
            f"your losses already weight each rank by its share, pass DataParallel(check_shards=False)."
        )


def _collective_device(group: Any) -> torch.device:
    """Where a collective on this group must live: CUDA for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fingerprint(t: Tensor) -> Tensor:
    """An int64 checksum of a tensor's bytes (wrap-around sum of its bit patterns, position-weighted)."""
    t = t.detach().contiguous().reshape(-1)
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    words = t.view(bits).to(torch.int64)
    weights = torch.arange(1, words.numel() + 1, device=t.device, dtype=torch.int64)
    return (words * weights).sum()
