"""What users already have, written the way they would write it: plain PyTorch training steps, a
hand-written Algorithm 1 (autograd double backward + ``torch.optim``), and Betty's Neumann
hypergradient on the same task. Each case is a zero-argument callable, for :mod:`benchmarks.timing`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn

import bilevel
from benchmarks.problems import Problem


def _decay(params: dict[str, Tensor] | list[Tensor], hparams: dict[str, Tensor] | list[Tensor]) -> Tensor:
    """½ Σ e^λ w², the benchmark problems' per-weight decay."""
    p = params.values() if isinstance(params, dict) else params
    h = hparams.values() if isinstance(hparams, dict) else hparams
    return 0.5 * sum((lam.exp() * w**2).sum() for w, lam in zip(p, h))


class PlainTraining:
    """``loss.backward()`` + ``torch.optim.Adam(foreach=True)`` on the module itself: the user's loop."""

    def __init__(self, problem: Problem, lr: float = 1e-4) -> None:
        self.module = copy.deepcopy(problem.module)
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(problem.params[name])
        self.hparams = [problem.hparams[name] for name, _ in self.module.named_parameters()]
        self.opt = torch.optim.Adam(self.module.parameters(), lr=lr, foreach=True)
        self.batch = problem.train_batch

    def step(self) -> Tensor:
        x, y = self.batch
        loss = F.cross_entropy(self.module(x), y) + _decay(list(self.module.parameters()), self.hparams)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def plain_steps(problem: Problem, n: int, lr: float = 1e-4) -> Callable[[], Any]:
    """``n`` plain PyTorch training steps."""
    trainer = PlainTraining(problem, lr)

    def run() -> Tensor:
        for _ in range(n):
            loss = trainer.step()
        return loss

    return run


def bilevel_inner_steps(problem: Problem, n: int, lr: float = 1e-4) -> Callable[[], Any]:
    """``n`` ``BilevelOptimizer.inner_step`` calls (Adam), no hyperstep, on the module as the docs write it:
    through ``FunctionalModule``, with the same loss and decay as :class:`PlainTraining`."""
    fm = bilevel.FunctionalModule(copy.deepcopy(problem.module))

    def train_loss(params: dict, hparams: dict, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(fm(params, {}, x)[0], y) + _decay(params, hparams)

    params = {k: problem.params[k] for k in fm.params}
    opt = bilevel.BilevelOptimizer(
        train_loss,
        train_loss,
        params,
        {k: problem.hparams[k] for k in fm.params},
        inner=torchopt.adam(lr),
        inner_steps=10**9,
        seed=0,
    )

    def run() -> Tensor:
        for _ in range(n):
            loss = opt.inner_step(problem.train_batch)
        return loss

    return run


class HandWritten:
    """Algorithm 1 as a user writes it without a library: torch.optim for both levels and the Neumann
    hypergradient by autograd double backward (the paper's Algorithm 2 and 3)."""

    def __init__(self, problem: Problem, steps: int, alpha: float, lr: float, hlr: float) -> None:
        self.trainer = PlainTraining(problem, lr)
        self.module, self.batch, self.val = self.trainer.module, problem.train_batch, problem.val_batch
        self.lam = [t.clone().requires_grad_() for t in self.trainer.hparams]
        # the inner steps see λ as constants; detached views share its storage, so they follow RMSprop's updates
        self.trainer.hparams = [t.detach() for t in self.lam]
        self.outer = torch.optim.RMSprop(self.lam, lr=hlr, alpha=0.99, eps=1e-8, foreach=True)
        self.steps, self.alpha = steps, alpha

    def inner_step(self) -> Tensor:
        return self.trainer.step()

    def hyperstep(self) -> None:
        params = list(self.module.parameters())
        xv, yv = self.val
        v = torch.autograd.grad(F.cross_entropy(self.module(xv), yv), params)
        x, y = self.batch
        g = torch.autograd.grad(
            F.cross_entropy(self.module(x), y) + _decay(params, self.lam), params, create_graph=True
        )
        term, total = list(v), [t.clone() for t in v]
        for _ in range(self.steps - 1):  # α Σ_j (I − αH)^j v with steps − 1 HVPs
            hv = torch.autograd.grad(g, params, term, retain_graph=True)
            term = [t - self.alpha * h for t, h in zip(term, hv)]
            total = [a + t for a, t in zip(total, term)]
        mixed = torch.autograd.grad(g, self.lam, [self.alpha * t for t in total])
        for lam, m in zip(self.lam, mixed):
            lam.grad = -m
        self.outer.step()


def handwritten_run(problem: Problem, hypersteps: int, inner: int, steps: int, alpha: float) -> Callable[[], Any]:
    def run() -> Tensor:
        hand = HandWritten(problem, steps, alpha, lr=1e-3, hlr=1e-2)
        for _ in range(hypersteps):
            for _ in range(inner):
                hand.inner_step()
            hand.hyperstep()
        return hand.lam[0].detach()

    return run


def bilevel_run(problem: Problem, hypersteps: int, inner: int, steps: int, alpha: float) -> Callable[[], Any]:
    def run() -> Tensor:
        opt = bilevel.BilevelOptimizer(
            problem.train_loss,
            problem.val_loss,
            problem.params,
            problem.hparams,
            inner=torchopt.adam(1e-3),
            outer=torchopt.rmsprop(1e-2),
            strategy=bilevel.Neumann(steps=steps, alpha=alpha),
            inner_steps=inner,
            seed=0,
        )
        for _ in range(hypersteps * inner):
            opt.step(problem.train_batch, problem.val_batch)
        return next(iter(opt.hparams.values()))

    return run


def hyperstep_only(problem: Problem, steps: int, alpha: float) -> dict[str, Callable[[], Any]]:
    """One hyperstep (hypergradient + outer update) at fixed weights, ours and hand-written. The outer
    learning rate is 0, so that the thousands of timed repeats are the same hyperstep: with a real rate
    λ walks on at fixed weights until the Neumann series diverges (and ours then also diagnoses and
    warns, which the hand-written loop does not)."""
    hand = HandWritten(problem, steps, alpha, lr=1e-3, hlr=0.0)
    opt = bilevel.BilevelOptimizer(
        problem.train_loss,
        problem.val_loss,
        problem.params,
        problem.hparams,
        outer=torchopt.rmsprop(0.0),
        strategy=bilevel.Neumann(steps=steps, alpha=alpha),
        seed=0,
    )
    return {
        "ours": lambda: opt.outer_step(problem.train_batch, problem.val_batch),
        "hand": hand.hyperstep,
    }


# ----------------------------------------------------------------------------------- BatchNorm


def bn_dropout_problem(batch: int) -> tuple[nn.Module, nn.Module, tuple[Tensor, Tensor]]:
    """A small CNN for 1×28×28 inputs, with and without BatchNorm + dropout (same convolutions)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

    def cnn(norm: bool) -> nn.Module:
        torch.manual_seed(0)
        extra = (lambda c: [nn.BatchNorm2d(c)]) if norm else (lambda c: [])
        return nn.Sequential(
            nn.Conv2d(1, 16, 5), *extra(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), *extra(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), *([nn.Dropout(0.2)] if norm else []), nn.Linear(32 * 4 * 4, 10),
        )  # fmt: skip

    return cnn(False), cnn(True), (x, y)


def _plain_cross_entropy_steps(
    module: nn.Module, batch: tuple[Tensor, Tensor], n: int, **adam: float
) -> tuple[Callable[[], Tensor], nn.Module]:
    """``n`` steps of the user's loop on a copy of ``module`` (cross-entropy, ``loss.backward()``,
    ``torch.optim.Adam(foreach=True, **adam)``), and that copy."""
    plain = copy.deepcopy(module).train()
    opt = torch.optim.Adam(plain.parameters(), foreach=True, **adam)
    x, y = batch

    def run() -> Tensor:
        for _ in range(n):
            loss = F.cross_entropy(plain(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    return run, plain


def module_cases(module: nn.Module, batch: tuple[Tensor, Tensor], n: int) -> dict[str, Callable[[], Any]]:
    """``n`` inner steps of ``module``: plain PyTorch, and BilevelOptimizer through FunctionalModule."""
    plain_run, plain = _plain_cross_entropy_steps(module, batch, n, lr=1e-4)
    x = batch[0]

    fm = bilevel.FunctionalModule(copy.deepcopy(module))
    stateful = bool(fm.state)

    def loss_fn(params: dict, hparams: dict, b: Any, *state: dict) -> Any:
        if stateful:
            logits, new_state = fm(params, state[0], b[0])
            return F.cross_entropy(logits, b[1]), new_state
        return F.cross_entropy(fm(params, {}, b[0])[0], b[1])

    opt = bilevel.BilevelOptimizer(
        loss_fn,
        loss_fn,
        fm.params,
        {"unused": torch.zeros(())},
        state=fm.state if stateful else None,
        inner=torchopt.adam(1e-4),
        inner_steps=10**9,
        seed=0,
    )

    def ours_run() -> Tensor:
        for _ in range(n):
            loss = opt.inner_step(batch)
        return loss

    def forward() -> Tensor:  # one forward pass of the plain module, the unit of "extra passes"
        with torch.no_grad():
            return plain(x)

    return {"plain": plain_run, "ours": ours_run, "forward": forward}


# ------------------------------------------------------------------------------------------ Betty


def digits_task(hidden: int, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, Any]:
    """scikit-learn's 8×8 digits, an MLP 64-hidden-10, 1 000 training / 797 validation images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(dtype)
    return module, (x[:1000], y[:1000]), (x[1000:], y[1000:])


def ours_digits(hypersteps: int, inner: int, neumann_hvps: int, alpha: float, hidden: int) -> Callable[[], Any]:
    module, train, val = digits_task(hidden)
    fm = bilevel.FunctionalModule(module)

    def train_loss(p: dict, h: dict, b: Any) -> Tensor:
        return F.cross_entropy(fm(p, {}, b[0])[0], b[1]) + _decay(p, h)

    def val_loss(p: dict, h: dict, b: Any) -> Tensor:
        return F.cross_entropy(fm(p, {}, b[0])[0], b[1])

    def run() -> Tensor:
        opt = bilevel.BilevelOptimizer(
            train_loss,
            val_loss,
            fm.params,
            {k: torch.full_like(v, math.log(1e-3)) for k, v in fm.params.items()},
            inner=torchopt.adam(1e-3),
            outer=torchopt.adam(1e-2),
            strategy=bilevel.Neumann(steps=neumann_hvps + 1, alpha=alpha),
            inner_steps=inner,
            seed=0,
        )
        for _ in range(hypersteps * inner):
            result = opt.step(train, val)
        return result.loss

    return run


def betty_digits(hypersteps: int, inner: int, neumann_hvps: int, alpha: float, hidden: int) -> Callable[[], Any]:
    """The same task with Betty's ImplicitProblem / Engine and its Neumann hypergradient."""
    import logging

    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    logging.getLogger("betty").setLevel(logging.WARNING)  # Betty logs its problem graph at INFO on every run

    module, train, val = digits_task(hidden)

    class Decays(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log = nn.ParameterList([nn.Parameter(torch.full_like(p, math.log(1e-3))) for p in module.parameters()])

    class Inner(ImplicitProblem):
        def training_step(self, batch: Any) -> Tensor:
            x, y = batch
            decays = list(self.outer.module.log)  # type: ignore[attr-defined]
            return F.cross_entropy(self.module(x), y) + _decay(list(self.module.parameters()), decays)

    class Outer(ImplicitProblem):
        def training_step(self, batch: Any) -> Tensor:
            x, y = batch
            return F.cross_entropy(self.inner(x), y)  # type: ignore[attr-defined]

    def run() -> Tensor:
        inner_module = copy.deepcopy(module)
        decays = Decays()
        inner_problem = Inner(
            name="inner",
            module=inner_module,
            optimizer=torch.optim.Adam(inner_module.parameters(), lr=1e-3),
            train_data_loader=itertools.repeat(train),
            config=Config(type="neumann", unroll_steps=inner, neumann_iterations=neumann_hvps, neumann_alpha=alpha),
            device="cpu",
        )
        outer_problem = Outer(
            name="outer",
            module=decays,
            optimizer=torch.optim.Adam(decays.parameters(), lr=1e-2),
            train_data_loader=itertools.repeat(val),
            config=Config(),
            device="cpu",
        )
        engine = Engine(
            problems=[outer_problem, inner_problem],
            config=EngineConfig(train_iters=hypersteps * inner, valid_step=10**9),
            dependencies={"l2u": {inner_problem: [outer_problem]}, "u2l": {outer_problem: [inner_problem]}},
        )
        engine.run()
        return decays.log[0].detach()

    return run


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class DigitsResNet(nn.Module):
    """The user's model of the "your training loop" report: a 3-block BatchNorm + dropout ResNet on 8×8
    digits, 26 parameter tensors (stem conv and BN, 3 blocks of 2 convs and 2 BNs, a final BN, a head)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(3)])
        self.final, self.drop, self.head = nn.BatchNorm1d(width), nn.Dropout(0.2), nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(self.drop(self.final(x.mean((2, 3)))))


def decay_cases(batch: int, n: int, weight_decay: float = 5e-4) -> dict[str, Callable[[], Any]]:
    """``n`` inner steps of :class:`DigitsResNet` with one weight decay per tensor: plain PyTorch with
    ``torch.optim.Adam(weight_decay=wd)``, and BilevelOptimizer with ``bilevel.weight_decay`` (λ = log wd:
    the same gradient) or the naive hand-written sum, on the same batch of digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:batch], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:batch])
    torch.manual_seed(0)
    module = DigitsResNet()
    plain_run, _ = _plain_cross_entropy_steps(module, (x, y), n, lr=1e-3, weight_decay=weight_decay)

    def ours(decay: Callable[[dict, dict], Tensor]) -> Callable[[], Any]:
        fm = bilevel.FunctionalModule(copy.deepcopy(module))

        def train_loss(params: dict, hparams: dict, b: Any, state: dict) -> Any:
            logits, state = fm(params, state, b[0])
            return F.cross_entropy(logits, b[1]) + decay(params, hparams), state

        opt = bilevel.BilevelOptimizer(
            train_loss, train_loss, fm.params, bilevel.log_decay_like(fm.params, weight_decay), state=fm.state,
            inner=torchopt.adam(1e-3), inner_steps=10**9, seed=0,
        )  # fmt: skip

        def run() -> Tensor:
            for _ in range(n):
                loss = opt.inner_step((x, y))
            return loss

        return run

    def naive(params: dict, hparams: dict) -> Tensor:
        return 0.5 * sum((hparams[k].exp() * p**2).sum() for k, p in params.items())

    return {"plain": plain_run, "ours": ours(bilevel.weight_decay), "ours_naive": ours(naive)}
