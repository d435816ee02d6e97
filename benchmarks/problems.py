"""The benchmark problems: seeded synthetic classification with one weight decay per weight.

L_T(w, λ) = CE(f_w(x_T), y_T) + ½ Σ_i e^{λ_i} w_i²,   L_V(w) = CE(f_w(x_V), y_V),

so the hyperparameters have exactly the structure (and count) of the parameters. The model is an
``nn.Module`` called as a pure function of its weights through ``bilevel.FunctionalModule``, as the
docs write it (``torch.func.functional_call`` does the same with more work per call).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel

Batch = tuple[Tensor, Tensor]


@dataclasses.dataclass
class Problem:
    """A model, its params/hparams as dicts keyed by parameter name, and a train and val batch."""

    name: str
    module: nn.Module
    params: dict[str, Tensor]
    hparams: dict[str, Tensor]
    train_batch: Batch
    val_batch: Batch
    _functional: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        return sum(t.numel() for t in self.params.values())

    def logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        if self._functional is None:
            self._functional = bilevel.FunctionalModule(self.module)
        return self._functional(params, {}, x)[0]

    def train_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Batch) -> Tensor:
        x, y = batch
        decay = sum((hparams[k].exp() * params[k] ** 2).sum() for k in params)
        return F.cross_entropy(self.logits(params, x), y) + 0.5 * decay

    def val_loss(self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(params, x), y)


def _mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _cnn() -> nn.Module:
    """A LeNet-like CNN for 1×28×28 inputs (≈ 18k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def make(
    kind: str,
    widths: tuple[int, ...] = (784, 128, 10),
    batch: int = 256,
    log_decay: float = math.log(1e-3),
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Problem:
    """Build an ``"mlp"`` (layer ``widths``) or ``"cnn"`` problem with seeded synthetic data.

    Labels come from a fixed random teacher (argmax of a linear map of the inputs), so the task is
    learnable and training reaches a meaningful stationary point.
    """
    if kind not in ("mlp", "cnn"):
        raise ValueError(f"`kind={kind!r}`: expected 'mlp' or 'cnn'.")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = _mlp(widths) if kind == "mlp" else _cnn()
    module = module.to(device=device, dtype=dtype)
    shape = (widths[0],) if kind == "mlp" else (1, 28, 28)
    classes = widths[-1] if kind == "mlp" else 10
    features = math.prod(shape)
    teacher = torch.randn(features, classes, generator=gen)

    def data() -> Batch:
        x = torch.randn(batch, *shape, generator=gen)
        y = (x.reshape(batch, -1) @ teacher).argmax(1)
        return x.to(device=device, dtype=dtype), y.to(device)

    params = {k: v.detach() for k, v in module.named_parameters()}
    hparams = {k: torch.full_like(v, log_decay) for k, v in params.items()}
    name = f"cnn-{_human(sum(v.numel() for v in params.values()))}" if kind == "cnn" else _mlp_name(widths)
    return Problem(name, module, params, hparams, data(), data())


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _mlp_name(widths: tuple[int, ...]) -> str:
    sizes = sum(a * b + b for a, b in itertools.pairwise(widths))
    return f"mlp-{'-'.join(map(str, widths))} ({_human(sizes)})"


def train(problem: Problem, steps: int, lr: float = 1e-3) -> Problem:
    """Run ``steps`` full-batch Adam steps on L_T so that params approach w*(λ) (in place)."""
    import torchopt

    opt = torchopt.adam(lr)
    params = problem.params
    state = opt.init(params)
    grad = torch.func.grad(problem.train_loss)
    for _ in range(steps):
        g = grad(params, problem.hparams, problem.train_batch)
        updates, state = opt.update(g, state, params=params, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
    problem.params = {k: v.detach() for k, v in params.items()}
    return problem


def spec(problem: Problem) -> dict[str, Any]:
    """Name and size of a problem, for the report."""
    return {"name": problem.name, "params": problem.size, "hparams": problem.size, "batch": len(problem.train_batch[1])}
