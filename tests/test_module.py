"""Real nn.Module models: FunctionalModule, model state (BatchNorm) and replayed randomness (dropout).

Truth comes from outside the code under test: a dense implicit-function-theorem hypergradient built
by double backward on the flattened weights and checked against finite differences
(tests/model_truth.py), the module's own eval-mode forward, and straight runs compared bitwise with
interrupted ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import nn

import bilevel
from tests.model_truth import dense_truth, flatten, unflatten
from tests.problems import roundtrip


def _digits(n: int = 96):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float64).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target[:n])


class SmallCNN(nn.Module):
    def __init__(self, dropout: float = 0.0, smooth: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4 * 3 * 3, 10)
        self.smooth = smooth  # tanh and average pooling: no kinks for finite differences to straddle

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = F.avg_pool2d(torch.tanh(x), 2) if self.smooth else F.max_pool2d(F.relu(x), 2)
        return self.head(self.drop(x.flatten(1)))


def _decay(params, hparams):
    return sum((hparams[k].exp() * params[k] ** 2).sum() for k in params)


def _losses(fm):
    def train_loss(params, hparams, batch, state):
        x, y = batch
        logits, state = fm(params, state, x)  # train mode: batch statistics, dropout on
        return F.cross_entropy(logits, y) + 0.5 * _decay(params, hparams), state

    def val_loss(params, hparams, batch, state):
        x, y = batch
        logits, state = fm(params, state, x, train=False)  # eval mode: running statistics
        return F.cross_entropy(logits, y), state

    return train_loss, val_loss


def _hparams(fm, value=-3.0):
    return {k: torch.full_like(v, value) for k, v in fm.params.items()}


# --------------------------------------------------------------------------------- the adapter


def test_functional_module_is_pure_and_writes_back_exactly():
    torch.manual_seed(0)
    net = SmallCNN(dropout=0.3)
    net.conv.requires_grad_(False)  # a frozen layer
    fm = bilevel.FunctionalModule(net)
    assert set(fm.params) == {"bn.weight", "bn.bias", "head.weight", "head.bias"}
    assert set(fm.state) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    module_before = {k: v.clone() for k, v in net.state_dict().items()}
    params_before = {k: v.clone() for k, v in fm.params.items()}
    state_before = {k: v.clone() for k, v in fm.state.items()}
    x, _ = _digits(16)
    out, new_state = fm(fm.params, fm.state, x)
    assert out.shape == (16, 10) and int(new_state["bn.num_batches_tracked"]) == 1
    assert not torch.equal(new_state["bn.running_mean"], fm.state["bn.running_mean"])
    _, state = fm(fm.params, fm.state, x, train=False)
    assert state is fm.state
    # nothing was mutated: not the module (values and modes), not params, not state
    assert all(torch.equal(v, module_before[k]) for k, v in net.state_dict().items()) and net.training
    assert all(torch.equal(fm.params[k], v) for k, v in params_before.items())
    assert all(torch.equal(fm.state[k], v) for k, v in state_before.items())
    # write_back: the module in eval mode computes what the functional eval mode computes
    params = {k: v + 0.1 for k, v in fm.params.items()}
    fm.write_back(params, new_state)
    net.eval()
    assert torch.equal(net(x), fm(params, new_state, x, train=False)[0])
    assert torch.equal(net.conv.weight, module_before["conv.weight"])  # frozen: untouched
    with pytest.raises(ValueError, match=r"`params` must be a dict with the keys of fm\.params"):
        fm({"head.weight": params["head.weight"]}, new_state, x)
    with pytest.raises(TypeError, match="train='yes'"):
        fm(params, new_state, x, train="yes")


def test_frozen_parameters_are_never_optimised():
    torch.manual_seed(0)
    net = SmallCNN()
    net.head.weight.requires_grad_(False)
    fm = bilevel.FunctionalModule(net)
    frozen = net.head.weight.detach().clone()
    train_loss, val_loss = _losses(fm)
    opt = bilevel.BilevelOptimizer(
        train_loss, val_loss, fm.params, _hparams(fm), state=fm.state, inner=torchopt.adam(1e-2), inner_steps=2
    )
    x, y = _digits(64)
    for _ in range(4):
        opt.step((x[:32], y[:32]), (x[32:], y[32:]))
    assert "head.weight" not in opt.params
    fm.write_back(opt.params, opt.state)  # the trained weights go back; the frozen layer keeps its value
    assert torch.equal(net.head.weight, frozen)
    assert not torch.equal(net.head.bias, fm.params["head.bias"])


# ----------------------------------------------------------------------- state moves only inner


def test_batchnorm_cnn_trains_and_only_inner_steps_move_the_running_statistics():
    torch.manual_seed(0)
    fm = bilevel.FunctionalModule(SmallCNN())
    train_loss, val_loss = _losses(fm)
    opt = bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        fm.params,
        _hparams(fm),
        state=fm.state,
        inner=torchopt.adam(1e-2),
        outer=torchopt.adam(1e-2),
        strategy=bilevel.Neumann(steps=3, alpha="auto"),
        inner_steps=5,
        seed=0,
    )
    x, y = _digits(96)
    train, val = (x[:64], y[:64]), (x[64:], y[64:])
    first = float(F.cross_entropy(fm(fm.params, fm.state, x[:64])[0], y[:64]))
    for _ in range(30):
        opt.step(train, val)
    assert int(opt.state["bn.num_batches_tracked"]) == 30 == opt.steps and opt.hypersteps == 6
    before = {k: v.clone() for k, v in opt.state.items()}
    opt.outer_step(train, val)  # a hyperstep evaluates both losses many times ...
    assert all(torch.equal(opt.state[k], v) for k, v in before.items())  # ... and changes no state
    logits, _ = fm(opt.params, opt.state, x[:64], train=False)
    assert float(F.cross_entropy(logits, y[:64])) < 0.7 * first  # it trained


# ------------------------------------------------------------- hypergradient through BatchNorm


@pytest.fixture(scope="module")
def batchnorm_case():
    """A BatchNorm CNN with every layer trainable (the convolution before the norm is the case nested
    transforms get wrong) and its IFT hypergradient from dense double-backward matrices (checked
    against finite differences by tests/model_truth.py)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(1)
        fm = bilevel.FunctionalModule(SmallCNN(smooth=True).double())
        x, y = _digits(64)
        train, val = (x[:32], y[:32]), (x[32:], y[32:])
        hparams = _hparams(fm, value=0.5)  # decay e^{0.5}: a positive definite Hessian (smallest eigenvalue > 0.5)
        train_loss, val_loss = _losses(fm)
        state = fm(fm.params, fm.state, x)[1]  # some non-trivial running statistics for L_V

        def flat(loss, batch):
            return lambda w, h: loss(unflatten(w, fm.params), unflatten(h, hparams), batch, state)[0]

        truth = dense_truth(flat(train_loss, train), flat(val_loss, val), flatten(fm.params), flatten(hparams))
        yield (train_loss, val_loss, fm.params, hparams, train, val), state, truth
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize(
    "strategy, tol",
    [
        (bilevel.Exact(), 1e-10),
        (bilevel.ConjugateGradient(maxiter=400, tol=1e-14), 1e-8),
        (bilevel.Neumann(steps=400, alpha="auto"), 1e-8),
    ],
    ids=["exact", "cg", "neumann"],
)
def test_hypergradient_through_train_mode_batchnorm_matches_a_dense_ift(batchnorm_case, strategy, tol):
    problem, state, truth = batchnorm_case
    assert float(torch.linalg.eigvalsh(truth.H)[0]) > 0.5
    grads, info = bilevel.hypergradient(*problem, strategy=strategy, state=state)
    expected = truth.hypergradient()
    assert info.failure is None
    torch.testing.assert_close(flatten(grads), expected, rtol=0, atol=tol * float(expected.abs().max()))


# -------------------------------------------------------------------------------------- dropout


def _dropout_problem():
    torch.manual_seed(2)
    X, y = torch.randn(48, 6), torch.randn(48)

    def train_loss(p, h, batch):
        X, y = batch
        hidden = F.dropout(torch.tanh(X @ p["w1"]), 0.4)  # a fresh mask on every call
        return ((hidden @ p["w2"] - y) ** 2).mean() + (h["log_decay"].exp() * p["w1"] ** 2).sum()

    def val_loss(p, h, batch):
        X, y = batch
        return ((torch.tanh(X @ p["w1"]) @ p["w2"] - y) ** 2).mean()

    params = {"w1": 0.3 * torch.randn(6, 5), "w2": 0.3 * torch.randn(5)}
    hparams = {"log_decay": torch.full((6, 5), -1.0)}
    return train_loss, val_loss, params, hparams, (X[:32], y[:32]), (X[32:], y[32:])


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_every_hvp_mode_sees_the_same_dropout_masks(solver):
    """Forward-over-reverse and finite differences re-run the forward for every product: with the
    masks replayed they differentiate the same function as the one-graph reverse mode."""
    *problem, train, val = _dropout_problem()

    def strategy(hvp):
        if solver == "cg":
            return bilevel.ConjugateGradient(maxiter=30, tol=1e-13, hvp=hvp)
        return bilevel.Neumann(steps=30, alpha=0.3, hvp=hvp)

    results = {
        name: bilevel.hypergradient(*problem, train, val, strategy=strategy(hvp), seed=5)[0]["log_decay"]
        for name, hvp in [
            ("reverse", bilevel.ReverseHVP()),
            ("forward", bilevel.ForwardOverReverseHVP()),
            ("fd", bilevel.FiniteDifferenceHVP()),
        ]
    }
    scale = float(results["reverse"].abs().max())
    torch.testing.assert_close(results["forward"], results["reverse"], rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(results["fd"], results["reverse"], rtol=0, atol=1e-6 * scale)  # ε² ≈ 4e-11·κ
    other_seed, _ = bilevel.hypergradient(*problem, train, val, strategy=strategy(bilevel.ReverseHVP()), seed=6)
    assert not torch.allclose(other_seed["log_decay"], results["reverse"])  # the masks do matter


def test_hypergradient_consumes_one_global_draw_and_is_reproducible_with_a_seed():
    *problem, train, val = _dropout_problem()
    torch.manual_seed(123)
    cg = bilevel.ConjugateGradient(10, damping=1.0)  # a random point: the Hessian is indefinite
    first, _ = bilevel.hypergradient(*problem, train, val, strategy=cg)
    after_one_call = torch.rand(())
    torch.manual_seed(123)
    torch.randint(0, 2**62, ())  # exactly one draw
    assert torch.equal(torch.rand(()), after_one_call)
    torch.manual_seed(123)
    again, _ = bilevel.hypergradient(*problem, train, val, strategy=cg)
    assert torch.equal(first["log_decay"], again["log_decay"])


def test_micro_batches_of_a_dropout_loss_equal_the_whole_batch_with_per_example_masks():
    """Masks tied to examples (a seed per example drawn from the replayed stream) do not depend on how
    the batch is cut, so micro-batching changes nothing — because every micro-batch is evaluated with
    the same replayed random numbers."""
    torch.manual_seed(3)
    X, y, index = torch.randn(40, 6), torch.randn(40), torch.arange(40)

    def masks(idx):
        base = int(torch.randint(0, 2**31, ()))  # the loss's one draw from the (replayed) global stream
        rows = [torch.rand(5, generator=torch.Generator().manual_seed(base + int(i))) > 0.4 for i in idx]
        return torch.stack(rows).double() / 0.6

    def train_loss(p, h, batch):
        X, y, idx = batch
        hidden = torch.tanh(X @ p["w1"]) * masks(idx)
        return ((hidden @ p["w2"] - y) ** 2).mean() + (h["log_decay"].exp() * p["w1"] ** 2).sum()

    def val_loss(p, h, batch):
        X, y, _ = batch
        return ((torch.tanh(X @ p["w1"]) @ p["w2"] - y) ** 2).mean()

    params = {"w1": 0.3 * torch.randn(6, 5), "w2": 0.3 * torch.randn(5)}
    hparams = {"log_decay": torch.full((6, 5), -1.0)}
    train, val = (X[:32], y[:32], index[:32]), (X[32:], y[32:], index[32:])
    micro = bilevel.MicroBatches([tuple(t[i : i + 8] for t in train) for i in range(0, 32, 8)])
    for strategy in (
        bilevel.ConjugateGradient(maxiter=100, tol=1e-13),  # converged (35 weights): round-off stays small
        bilevel.Neumann(steps=10, alpha=0.3, hvp=bilevel.ForwardOverReverseHVP()),
    ):
        whole, _ = bilevel.hypergradient(train_loss, val_loss, params, hparams, train, val, strategy, seed=9)
        cut, _ = bilevel.hypergradient(train_loss, val_loss, params, hparams, micro, val, strategy, seed=9)
        torch.testing.assert_close(cut["log_decay"], whole["log_decay"], rtol=0, atol=1e-12)


def test_unroll_replays_the_masks_each_inner_step_really_used():
    *problem, train, val = _dropout_problem()
    train_loss, val_loss, params, hparams = problem
    opt = bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        params,
        hparams,
        inner=torchopt.sgd(0.1, momentum=0.9),
        outer=torchopt.sgd(0.0),  # keep λ fixed: the reported L_V is then comparable
        strategy=bilevel.Unroll(steps=4),
        inner_steps=4,
        seed=11,
    )
    for _ in range(3):
        opt.step(train, val)
    result = opt.step(train, val)  # the hyperstep: L_V at the end of the replayed window
    direct = val_loss(opt.params, opt.hparams, val)  # ... and at the weights the real steps produced
    torch.testing.assert_close(result.hyper.val_loss, direct, rtol=0, atol=1e-12)


def test_a_seeded_run_is_reproducible_whatever_the_global_generator_does():
    *problem, train, val = _dropout_problem()

    def run(global_seed):
        torch.manual_seed(global_seed)
        opt = bilevel.BilevelOptimizer(*problem, inner=torchopt.adam(0.05), inner_steps=3, seed=42)
        for _ in range(9):
            opt.step(train, val)
        return opt

    a, b = run(0), run(1)
    assert torch.equal(a.params["w1"], b.params["w1"]) and torch.equal(a.hparams["log_decay"], b.hparams["log_decay"])
    c = bilevel.BilevelOptimizer(*problem, inner=torchopt.adam(0.05), inner_steps=3, seed=43)
    for _ in range(9):
        c.step(train, val)
    assert not torch.equal(c.params["w1"], a.params["w1"])  # the seed decides the masks


# ------------------------------------------------------------------------------ bitwise resume


@pytest.mark.parametrize(
    "strategy", [bilevel.Unroll(steps=3), bilevel.ConjugateGradient(maxiter=5, damping=1.0)], ids=str
)
def test_resume_with_batchnorm_and_dropout_is_bitwise_mid_window(strategy):
    x, y = _digits(96)
    train, val = (x[:64], y[:64]), (x[64:], y[64:])

    def make():
        torch.manual_seed(0)  # same initial weights
        fm = bilevel.FunctionalModule(SmallCNN(dropout=0.3).double())
        train_loss, val_loss = _losses(fm)
        return bilevel.BilevelOptimizer(
            train_loss,
            val_loss,
            fm.params,
            _hparams(fm),
            state=fm.state,
            inner=torchopt.sgd(0.05, momentum=0.9),
            outer=torchopt.adam(0.01),
            strategy=strategy,
            inner_steps=4,
            seed=7,
        )

    straight = make()
    for _ in range(12):
        straight.step(train, val)
    first = make()
    for _ in range(6):  # stops mid-window: 2 steps recorded since hyperstep 1
        first.step(train, val)
    saved = roundtrip(first.state_dict())
    torch.manual_seed(999)  # the global generator is irrelevant to a seeded run
    resumed = make()
    resumed.load_state_dict(saved)
    for _ in range(6):
        resumed.step(train, val)
    for name in ("params", "hparams", "state"):
        a, b = getattr(straight, name), getattr(resumed, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
