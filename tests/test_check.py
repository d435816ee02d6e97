"""check_derivatives: it flags what is wrong (PyTorch's wrong second derivatives, a perturbed product, the
nested-transform Hessian through layer_norm, negative curvature, a point far from a minimum) and passes
sound models without false alarms. The models are trained to a minimum by L-BFGS first, so that the
IFT's assumptions hold where a model is called sound."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import nn

import bilevel
from tests.model_truth import flatten, relative_error, unflatten


def _digits(n: int = 160):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float64).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target[:n])


class LSTMClassifier(nn.Module):
    """The 8 rows of a digit as a sequence of 8 features."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        out, _ = self.lstm(x.squeeze(1))
        return self.head(out[:, -1])


class Once(torch.autograd.Function):
    """tanh whose backward is @once_differentiable: PyTorch raises nothing when it is differentiated
    twice, and its part of every Hessian-vector product is silently zero."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class OnceMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.b(Once.apply(self.a(x.flatten(1))))


MODELS = {
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)),
    "bn_cnn": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 10)
    ),
    "ln_cnn": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(36, 10)
    ),
    "lstm": LSTMClassifier,
    "weight_norm": lambda: nn.Sequential(
        nn.Flatten(), nn.utils.parametrizations.weight_norm(nn.Linear(64, 16)), nn.Tanh(), nn.Linear(16, 10)
    ),
    "once_differentiable": OnceMLP,
}


def _problem(kind: str, dtype: torch.dtype = torch.float64, *, trained: bool = True, log_decay: float = -4.0):
    """(train_loss, val_loss, params, hparams, train, val) and the state, at a minimum found by L-BFGS."""
    torch.manual_seed(0)
    fm = bilevel.FunctionalModule(MODELS[kind]().to(dtype))
    x, y = _digits()
    train, val = (x[:100].to(dtype), y[:100]), (x[100:].to(dtype), y[100:])

    def train_loss(p, h, batch, state):
        out, state = fm(p, state, batch[0])
        return F.cross_entropy(out, batch[1]) + 0.5 * sum((h[k].exp() * p[k] ** 2).sum() for k in p), state

    def val_loss(p, h, batch, state):
        out, state = fm(p, state, batch[0], train=False)
        return F.cross_entropy(out, batch[1]), state

    hparams = {k: torch.full_like(v, log_decay) for k, v in fm.params.items()}
    params = fm.params
    if trained:
        w = flatten(params).detach().requires_grad_()
        lbfgs = torch.optim.LBFGS(
            [w], max_iter=400, tolerance_grad=1e-10, tolerance_change=1e-14, history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure():
            lbfgs.zero_grad()
            loss = train_loss(unflatten(w, params), hparams, train, fm.state)[0]
            loss.backward()
            return loss

        lbfgs.step(closure)
        params = {k: v.detach().clone() for k, v in unflatten(w.detach(), params).items()}
    return (train_loss, val_loss, params, hparams, train, val), fm.state


@pytest.fixture(scope="module")
def trained():
    """Trained problems, built once per (model, dtype) and shared by the tests of this module."""
    cache: dict = {}

    def get(kind: str, dtype: torch.dtype = torch.float64):
        if (kind, dtype) not in cache:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)
            try:
                cache[kind, dtype] = _problem(kind, dtype)
            finally:
                torch.set_default_dtype(previous)
        return cache[kind, dtype]

    return get


SOUND = ["mlp", "bn_cnn", "ln_cnn", "lstm"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", SOUND)
def test_sound_models_pass_without_false_alarms_over_20_seeds(trained, kind, dtype):
    problem, state = trained(kind, dtype)
    for seed in range(20):  # the seed draws the probe vectors
        check = bilevel.check_derivatives(*problem, state=state, seed=seed)
        assert check.ok, f"{kind} {dtype} seed {seed}:\n{check}"
        assert check.dtype == str(dtype).replace("torch.", "") and check.lambda_min > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_weight_norm_is_flagged_with_the_default_hvp_and_passes_with_finite_differences(dtype):
    """At the initial weights: trained with decay on the direction v (whose scale the loss ignores), the
    minimum degenerates (v → 0, curvature → ∞), so no check could pass there."""
    problem, state = _problem("weight_norm", dtype, trained=False)
    check = bilevel.check_derivatives(*problem, state=state)
    assert not check.derivatives_ok and check.symmetry > 1e-3 and check.hvp_error > 0.1
    assert any(p.startswith("Hessian-vector products are not symmetric") and "FiniteDifferenceHVP()" in p
               for p in check.problems), check
    fd = bilevel.check_derivatives(*problem, state=state, hvp=bilevel.FiniteDifferenceHVP())
    assert fd.derivatives_ok, str(fd)


def test_a_backward_that_is_silently_not_differentiable_is_flagged(trained):
    """Symmetric but incomplete products: only the finite differences see it."""
    problem, state = trained("once_differentiable")
    check = bilevel.check_derivatives(*problem, state=state)
    assert check.hvp_error > 0.1 and check.hvp_error_bar < 1e-6
    assert any("disagree with finite differences" in p and "once_differentiable" in p for p in check.problems)


class PerturbedHVP(bilevel.HVP):
    """ReverseHVP's products times (1 + 1e-3): symmetric, slightly wrong."""

    def build(self, loss, w, h, *, retain=True, eval_dtype=None):
        op = bilevel.ReverseHVP().build(loss, w, h, retain=retain, eval_dtype=eval_dtype)
        exact = op._hvp
        op._hvp = lambda v: [t * (1 + 1e-3) for t in exact(v)]
        return op


def test_a_deliberately_wrong_hvp_is_flagged(trained):
    problem, state = trained("mlp")
    check = bilevel.check_derivatives(*problem, state=state, hvp=PerturbedHVP())
    assert not check.ok and abs(check.hvp_error - 1e-3) < 2e-4
    assert check.problems[0].startswith("Hessian-vector products disagree with finite differences")


def test_the_nested_transform_hessian_through_layer_norm_is_flagged(monkeypatch):
    """A test double puts the old jacfwd(jacrev(·)) columns back into Exact's path: Exact goes wrong, and
    check_derivatives(strategy=Exact()) says so."""
    from bilevel import _hypergradient, _tree

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1))
    fm = bilevel.FunctionalModule(net)
    X, y = torch.randn(30, 3), torch.randn(30)

    def loss(p, h, b, s):
        out, s = fm(p, s, b[0])
        return ((out.squeeze(1) - b[1]) ** 2).mean() + sum((h[k].exp() * p[k] ** 2).sum() for k in p), s

    problem = (loss, loss, fm.params, {k: torch.full_like(v, -1.0) for k, v in fm.params.items()}, (X, y), (X, y))
    assert bilevel.check_derivatives(*problem, state=fm.state, strategy=bilevel.Exact()).strategy_error < 1e-12

    def nested_columns(op, w, indices):  # the pre-fix implementation, column by column
        def on_flat(flat):
            return op.loss(tuple(_tree.unravel(flat, w)), op.h)

        hessian = torch.func.jacfwd(torch.func.jacrev(on_flat), randomness="same")(_tree.ravel(w))
        op.hvps += len(indices)
        return hessian[indices]

    monkeypatch.setattr(_hypergradient, "dense_columns", nested_columns)
    exact, _ = bilevel.hypergradient(*problem, strategy=bilevel.Exact(damping=1.0), state=fm.state)
    cg, _ = bilevel.hypergradient(*problem, strategy=bilevel.ConjugateGradient(200, damping=1.0), state=fm.state)
    assert relative_error(flatten(exact), flatten(cg)) > 0.01  # the double reproduces the bug
    check = bilevel.check_derivatives(*problem, state=fm.state, strategy=bilevel.Exact(damping=1.0))
    assert not check.ok and check.strategy_error > 0.01
    assert any(p.startswith("Exact's dense Hessian columns disagree with single products") for p in check.problems)


def test_negative_curvature_and_a_point_far_from_a_minimum_are_flagged():
    problem, state = _problem("mlp", trained=False)  # the random initial weights
    check = bilevel.check_derivatives(*problem, state=state)
    assert check.lambda_min < 0 and not check.ok
    assert any("negative curvature" in p and "damping=" in p for p in check.problems), check
    # logistic regression (convex) at w = 0: positive definite, but far from its minimum
    X, y = torch.randn(50, 4), torch.randint(0, 2, (50,)).double()

    def logistic(p, h, b):
        return F.binary_cross_entropy_with_logits(b[0] @ p["w"], b[1]) + 0.5 * (h["l"].exp() * p["w"] ** 2).sum()

    near_zero = {"w": torch.full((4,), 0.01)}
    start = bilevel.check_derivatives(logistic, logistic, near_zero, {"l": torch.zeros(4)}, (X, y), (X, y))
    assert start.lambda_min > 0 and start.newton_step > 0.5
    assert any(p.startswith("w is far from a stationary point") for p in start.problems)


def test_the_check_changes_nothing_and_reports_its_cost(trained):
    problem, state = trained("ln_cnn")
    params_before = {k: v.clone() for k, v in problem[2].items()}
    state_before = {k: v.clone() for k, v in state.items()}
    rng = torch.get_rng_state()
    check = bilevel.check_derivatives(*problem, state=state, strategy=bilevel.Nystrom(rank=8, damping=0.1))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(problem[2][k], v) for k, v in params_before.items())
    assert all(torch.equal(state[k], v) for k, v in state_before.items())
    # 2 probe products, 10 Lanczos steps, 2 batched products for Nyström; gradients: L_T and L_V at w, 4 per
    # probe and 4 for the mixed product (a smooth model: no retries with smaller steps)
    assert (check.hvps, check.gradients) == (14, 14) and check.seconds > 0
    assert check.strategy_error is not None and check.strategy_error < 1e-12
    text = str(check)
    head = "check_derivatives: ok — ReverseHVP for nystrom, losses in float64; 14 HVPs + 14 gradients"
    assert text.splitlines()[0] == head
    for row in ("HVP symmetry", "HVP vs finite differences", "mixed product vs FD in λ", "λ_min of H", "Newton step"):
        assert row in text


def test_bad_arguments_are_named():
    X = torch.randn(5, 2)

    def loss(p, h, b):
        return ((b @ p["w"]) ** 2).mean() + (h["l"].exp() * p["w"] ** 2).sum()

    args = (loss, loss, {"w": torch.randn(2)}, {"l": torch.zeros(2)}, X, X)
    with pytest.raises(ValueError, match=r"`probes=1`: must be an integer >= 2"):
        bilevel.check_derivatives(*args, probes=1)
    with pytest.raises(ValueError, match=r"`hvp=FiniteDifferenceHVP.*differs from the products"):
        bilevel.check_derivatives(*args, hvp=bilevel.FiniteDifferenceHVP(), strategy=bilevel.Neumann(5, 0.1))
    with pytest.raises(TypeError, match=r"`hvp=3`"):
        bilevel.check_derivatives(*args, hvp=3)


def _counting(problem):
    calls = {"n": 0}
    train_loss = problem[0]

    def counted(*args):
        calls["n"] += 1
        return train_loss(*args)

    return (counted, *problem[1:]), calls


def test_the_optimiser_checks_once_at_the_first_hyperstep_and_strict_refuses(trained):
    problem, state = trained("weight_norm")
    kwargs = dict(state=state, inner=torchopt.sgd(1e-3), strategy=bilevel.ConjugateGradient(5, damping=1.0),
                  inner_steps=2, seed=0)
    opt = bilevel.BilevelOptimizer(*problem[:4], check=True, **kwargs)
    opt.step(problem[4], problem[5])
    assert opt.derivative_check is None
    with pytest.warns(RuntimeWarning, match=r"check=True at hyperstep 1 found problems:\ncheck_derivatives: \d"):
        opt.step(problem[4], problem[5])
    assert opt.derivative_check is not None and not opt.derivative_check.ok and opt.hypersteps == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once only
        for _ in range(2):
            opt.step(problem[4], problem[5])
    strict = bilevel.BilevelOptimizer(*problem[:4], check=True, strict=True, **kwargs)
    strict.step(problem[4], problem[5])
    with pytest.raises(bilevel.DerivativeError, match="nothing was changed") as raised:
        strict.step(problem[4], problem[5])
    assert raised.value.check is not None and not raised.value.check.ok
    assert (strict.steps, strict.hypersteps) == (1, 0)
    # without check=True the losses are evaluated exactly as often as before the check existed
    counted, calls = _counting(problem)
    plain = bilevel.BilevelOptimizer(*counted[:4], **kwargs)
    for _ in range(4):
        plain.step(problem[4], problem[5])
    assert calls["n"] == 4 + 2 and plain.derivative_check is None  # 4 inner steps, one linearisation per hyperstep


def test_the_check_runs_under_autocast_with_bf16_tolerances(trained):
    problem, state = trained("ln_cnn", torch.float32)
    check = bilevel.check_derivatives(*problem, state=state, autocast=torch.bfloat16)
    assert check.dtype == "bfloat16" and check.tolerances.symmetry == 5e-2
    assert check.symmetry < check.tolerances.symmetry


def test_unroll_assumes_no_minimum_and_hparams_outside_the_loss_give_a_vacuous_mixed_check():
    problem, state = _problem("mlp", trained=False)  # negative curvature here
    unroll = bilevel.check_derivatives(*problem, state=state, strategy=bilevel.Unroll(3))
    assert unroll.lambda_min < 0 and unroll.ok and unroll.strategy == "unroll"
    assert "FAIL" not in str(unroll)
    # hyperparameters that act only through the inner optimiser (learning rates): ∂²L_T/∂w∂λ = 0
    train_loss, val_loss, params, _, train, val = problem

    def no_hparams(p, h, b, s):
        return train_loss(p, {k: torch.full_like(v, -4.0) for k, v in p.items()}, b, s)[0] + 0 * h["lr"], s

    check = bilevel.check_derivatives(no_hparams, val_loss, params, {"lr": torch.zeros(())}, train, val, state=state)
    assert check.mixed_error == 0.0 and check.mixed_error_bar <= 1.0
