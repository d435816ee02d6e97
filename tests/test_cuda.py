"""The same numbers on CUDA as on the CPU: run by `nox -s cuda` on a machine with a GPU (the default test
run deselects them; the session fails, not skips, when no GPU is there)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import nn

import bilevel

pytestmark = pytest.mark.cuda

STRATEGIES = [
    bilevel.Exact(damping=0.5),
    bilevel.ConjugateGradient(maxiter=30, damping=0.5),
    bilevel.Neumann(steps=10, alpha="auto"),
    bilevel.Nystrom(rank=20, damping=0.5),
]


def _problem(device):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    fm = bilevel.FunctionalModule(net.to(device))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    train, val = (X[:32].to(device), y[:32].to(device)), (X[32:].to(device), y[32:].to(device))

    def train_loss(p, h, b, s):
        out, s = fm(p, s, b[0])
        return F.cross_entropy(out, b[1]) + bilevel.weight_decay(p, h), s

    def val_loss(p, h, b, s):
        out, s = fm(p, s, b[0], train=False)
        return F.cross_entropy(out, b[1]), s

    return (train_loss, val_loss, fm.params, bilevel.log_decay_like(fm.params, 1e-2), train, val), fm.state


def _flat(tree):
    return torch.cat([t.detach().cpu().reshape(-1) for t in tree.values()])


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_every_strategy_gives_the_cpu_numbers(strategy):
    """(No dropout here: the CPU and CUDA generators draw different masks from the same seed.)"""
    cpu, s_cpu = _problem("cpu")
    gpu, s_gpu = _problem("cuda")
    a, _ = bilevel.hypergradient(*cpu, strategy=strategy, state=s_cpu, seed=0)
    b, _ = bilevel.hypergradient(*gpu, strategy=strategy, state=s_gpu, seed=0)
    assert torch.allclose(_flat(a), _flat(b), rtol=1e-8, atol=1e-12)


def test_an_optimiser_run_on_cuda_is_finite_and_resumes_bitwise():
    gpu, state = _problem("cuda")

    def make():
        return bilevel.BilevelOptimizer(*gpu[:4], state=state, inner=torchopt.adam(1e-2),
                                        strategy=bilevel.ConjugateGradient(10, damping=0.5), inner_steps=3, seed=0)

    straight, first = make(), make()
    for _ in range(9):
        straight.step(*gpu[4:])
    for _ in range(4):
        first.step(*gpu[4:])
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for _ in range(5):
        resumed.step(*gpu[4:])
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict()["params"], resumed.state_dict()["params"]))
    assert straight.skipped_inner_steps == 0


def test_attention_and_the_derivative_check_on_cuda():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).cuda()
    fm = bilevel.FunctionalModule(layer)
    x = torch.randn(4, 6, 16, device="cuda")

    def loss(p, h, b, s):
        out, s = fm(p, s, b)
        return (out**2).mean() + bilevel.weight_decay(p, h), s

    hparams = bilevel.log_decay_like(fm.params, 1e-2)
    grads, _ = bilevel.hypergradient(loss, loss, fm.params, hparams, x, x,
                                        bilevel.ConjugateGradient(5, damping=1.0), state=fm.state)
    assert torch.isfinite(_flat(grads)).all()
    check = bilevel.check_derivatives(loss, loss, fm.params, hparams, x, x, state=fm.state)
    assert check.derivatives_ok, str(check)
