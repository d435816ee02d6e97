"""Worker run in each spawned process by tests/test_distributed.py (2 gloo ranks on loopback)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torchopt

import bilevel
from tests.problems import Logistic

N = 64  # examples per set; each of the 2 ranks takes one half


def strategies():
    return {
        "neumann": bilevel.Neumann(steps=30, alpha=0.5),
        "neumann_auto": bilevel.Neumann(steps=10, alpha="auto"),
        "cg": bilevel.ConjugateGradient(maxiter=20, tol=1e-12),
        "exact": bilevel.Exact(),
        "penalty": bilevel.Penalty(penalty=50.0, steps=20, optimizer=torchopt.sgd(0.5)),
    }


def make_optimizer(problem, distributed=None, hparams=None, strategy=None):
    return bilevel.BilevelOptimizer(
        problem.train_loss,
        problem.val_loss,
        {"w": torch.zeros(problem.X.shape[1])},
        hparams if hparams is not None else problem.hparams(),
        inner=torchopt.adam(0.05),
        outer=torchopt.adam(0.05),
        strategy=strategy or bilevel.ConjugateGradient(maxiter=10),
        inner_steps=3,
        distributed=distributed,
    )


def penalty_strategy():
    """Penalty in an optimiser: auxiliary weights with their own SGD state, a growing σ."""
    return bilevel.Penalty(penalty=20.0, steps=5, growth=0.5, optimizer=torchopt.sgd(0.3, momentum=0.5))


def batchnorm_optimizer(distributed=None):
    """Logistic regression behind a BatchNorm1d layer, through FunctionalModule."""
    torch.manual_seed(0)
    fm = bilevel.FunctionalModule(torch.nn.Sequential(torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 1)).double())

    def train_loss(p, h, batch, state):
        X, y = batch
        out, state = fm(p, state, X)
        penalty = (h["log_l2"].exp() * p["1.weight"].squeeze(0) ** 2).sum()
        return torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), y) + penalty, state

    def val_loss(p, h, batch, state):
        X, y = batch
        out, state = fm(p, state, X, train=False)
        return torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), y), state

    return bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        fm.params,
        {"log_l2": torch.full((5,), -2.0)},
        state=fm.state,
        inner=torchopt.adam(0.05),
        strategy=bilevel.ConjugateGradient(maxiter=5),
        inner_steps=2,
        distributed=distributed,
        seed=0,
    )


def shard(problem, rank: int, world: int):
    size = N // world
    part = slice(rank * size, (rank + 1) * size)
    return (problem.X[part], problem.y[part]), (problem.Xv[part], problem.yv[part])


def run(rank: int, world: int, store: str, out: str) -> None:
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        problem = Logistic.make(n=N)
        train, val = shard(problem, rank, world)
        results: dict = {}
        parallel = bilevel.DataParallel(check_sync=True)
        for name, strategy in strategies().items():
            grads, info = bilevel.hypergradient(
                problem.train_loss,
                problem.val_loss,
                problem.params(),
                problem.hparams(),
                train,
                val,
                strategy=strategy,
                distributed=parallel,
            )
            results[name] = (grads["log_l2"], info.val_loss, info.hvps)
        opt = make_optimizer(problem, parallel)
        for _ in range(7):
            opt.step(train, val)
        results["optimizer"] = (opt.params["w"], opt.hparams["log_l2"], opt.hypersteps)
        opt = make_optimizer(problem, parallel, strategy=penalty_strategy())
        for _ in range(7):
            opt.step(train, val)
        results["penalty_optimizer"] = (opt.params["w"], opt.hparams["log_l2"], opt.state_dict()["aux"][0])
        # Out of sync on purpose: rank 1 starts from other hparams; check_sync must notice.
        opt = make_optimizer(problem, parallel, {"log_l2": problem.lam + rank})
        try:
            opt.step(train, val)
            results["sync_error"] = None
        except RuntimeError as err:
            results["sync_error"] = str(err)
        # Unequal shards (40/24 examples): every rank must raise, naming the batch, instead of averaging
        # per-rank means as if they were equal.
        cut = 40
        uneven = (problem.X[:cut], problem.y[:cut]) if rank == 0 else (problem.X[cut:], problem.y[cut:])
        results["uneven"] = []
        for call in (
            lambda: bilevel.hypergradient(
                problem.train_loss,
                problem.val_loss,
                problem.params(),
                problem.hparams(),
                uneven,
                val,
                strategy=bilevel.ConjugateGradient(maxiter=5),
                distributed=parallel,
            ),
            lambda: make_optimizer(problem, parallel).step(uneven, val),
        ):
            try:
                call()
                results["uneven"].append(None)
            except ValueError as err:
                results["uneven"].append(str(err))
        # The same shards with each rank's mean loss weighted by its share n_r · world / n: exactly the
        # full-batch loss, which DataParallel(check_shards=False) then averages correctly.
        weight = (cut if rank == 0 else N - cut) * world / N

        def weighted(p, h, batch):
            return weight * problem.train_loss(p, h, batch)

        grads, _ = bilevel.hypergradient(
            weighted,
            problem.val_loss,
            problem.params(),
            problem.hparams(),
            uneven,
            val,
            strategy=bilevel.Exact(),
            distributed=bilevel.DataParallel(check_shards=False),
        )
        results["weighted"] = grads["log_l2"]
        # Model state under DataParallel: BatchNorm's running statistics are averaged over ranks after
        # every inner step (in the gradient's all-reduce), so every rank holds the same state.
        opt = batchnorm_optimizer(parallel)
        opt.step(train, val)
        results["bn_one_step"] = dict(opt.state)
        for _ in range(2):
            opt.step(train, val)
        results["bn_three_steps"] = dict(opt.state)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
