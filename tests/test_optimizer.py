"""BilevelOptimizer: convergence to the validation optimum, scheduling, resume, safety, unroll."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchopt

import bilevel
from tests.problems import roundtrip


class ScalarRidge:
    """Ridge regression with one scalar log-penalty; L_V(w*(λ)) is known in closed form."""

    def __init__(self, n: int = 30, d: int = 8, noise: float = 3.0, scale: float = 1.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        w_true = torch.randn(d, generator=g)
        self.X = scale * torch.randn(n, d, generator=g)
        self.y = self.X @ w_true + noise * torch.randn(n, generator=g)
        self.Xv = scale * torch.randn(4 * n, d, generator=g)
        self.yv = self.Xv @ w_true + noise * torch.randn(4 * n, generator=g)
        self.d = d

    def train_loss(self, p, h, batch):
        X, y = batch
        return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.5 * h["log_l2"].exp() * (p["w"] ** 2).sum()

    def val_loss(self, p, h, batch):
        X, y = batch
        return 0.5 * ((X @ p["w"] - y) ** 2).mean()

    def outer(self, lam):
        A = self.X.T @ self.X / len(self.X) + lam.exp() * torch.eye(self.d)
        w = torch.linalg.solve(A, self.X.T @ self.y / len(self.X))
        return 0.5 * ((self.Xv @ w - self.yv) ** 2).mean()

    def best_log_l2(self) -> float:
        """Independent 1-D search: a dense grid, then golden-section refinement."""
        grid = torch.linspace(-10, 5, 3001)
        values = torch.stack([self.outer(v) for v in grid])
        i = int(values.argmin())
        assert 0 < i < len(grid) - 1, "the optimum must be interior for this test to mean anything"
        lo, hi = float(grid[i - 1]), float(grid[i + 1])
        ratio = (5**0.5 - 1) / 2
        for _ in range(60):
            a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            if self.outer(torch.tensor(a)) < self.outer(torch.tensor(b)):
                hi = b
            else:
                lo = a
        return (lo + hi) / 2

    def optimizer(self, **kwargs):
        kwargs.setdefault("inner", torchopt.sgd(lr=0.3))
        kwargs.setdefault("outer", torchopt.adam(0.05))
        kwargs.setdefault("inner_steps", 20)
        return bilevel.BilevelOptimizer(
            self.train_loss, self.val_loss, {"w": torch.zeros(self.d)}, {"log_l2": torch.tensor(0.0)}, **kwargs
        )

    @property
    def batches(self):
        return (self.X, self.y), (self.Xv, self.yv)


@pytest.mark.parametrize(
    "strategy",
    [bilevel.ConjugateGradient(maxiter=20), bilevel.Exact(), bilevel.Neumann(steps=200, alpha="auto", refresh_every=5)],
    ids=["cg", "exact", "neumann-auto"],
)
def test_converges_to_the_validation_optimal_hyperparameter(strategy):
    problem = ScalarRidge()
    best = problem.best_log_l2()
    opt = problem.optimizer(strategy=strategy)
    for _ in range(300 * opt.inner_steps):
        opt.step(*problem.batches)
    assert opt.hparams["log_l2"].item() == pytest.approx(best, abs=2e-3)
    assert opt.skipped_outer_steps == 0 and opt.skipped_inner_steps == 0


def test_hypersteps_happen_on_exactly_every_nth_call():
    problem = ScalarRidge()
    val_calls = []

    def val_loss(p, h, batch):
        val_calls.append(opt.steps)
        return problem.val_loss(p, h, batch)

    opt = bilevel.BilevelOptimizer(
        problem.train_loss,
        val_loss,
        {"w": torch.zeros(problem.d)},
        {"log_l2": torch.tensor(0.0)},
        inner=torchopt.sgd(0.1),
        outer=torchopt.sgd(0.1),
        strategy=bilevel.Identity(0.1),
        inner_steps=3,
    )
    hyper_calls = []
    for call in range(1, 11):
        result = opt.step(*problem.batches)
        assert isinstance(result.loss, torch.Tensor) and result.loss.ndim == 0
        if result.hyper is not None:
            hyper_calls.append(call)
            assert result.outer_applied is True and result.hyper.strategy == "identity"
        else:
            assert result.outer_applied is None
    assert hyper_calls == [3, 6, 9]
    assert val_calls == [3, 6, 9]  # val_batch is used on hyperstep calls only
    assert opt.steps == 10 and opt.hypersteps == 3


def test_manual_schedule_with_inner_and_outer_step():
    problem = ScalarRidge()
    opt = problem.optimizer(strategy=bilevel.Exact(), outer=torchopt.sgd(1.0))
    for _ in range(5):
        opt.inner_step(problem.batches[0])
    params, hparams = opt.params, opt.hparams
    expected, _ = bilevel.hypergradient(
        problem.train_loss, problem.val_loss, params, hparams, *problem.batches, strategy=bilevel.Exact()
    )
    info = opt.outer_step(*problem.batches)
    assert info.strategy == "exact" and opt.hypersteps == 1 and opt.steps == 5
    torch.testing.assert_close(hparams["log_l2"] - opt.hparams["log_l2"], expected["log_l2"], rtol=0, atol=1e-15)
    assert torch.equal(opt.params["w"], params["w"])  # an outer step leaves the weights alone


STRATEGIES_FOR_RESUME = [
    bilevel.Neumann(steps=4, alpha="auto", refresh_every=3),
    bilevel.ConjugateGradient(maxiter=5),
    bilevel.Unroll(steps=3),
]


@pytest.mark.parametrize("strategy", STRATEGIES_FOR_RESUME, ids=["neumann-auto", "cg", "unroll"])
@pytest.mark.parametrize("split", [7, 9])
def test_resume_from_state_dict_is_bitwise_identical(strategy, split):
    problem = ScalarRidge()
    g = torch.Generator().manual_seed(3)
    batches = [(problem.X[idx], problem.y[idx]) for idx in torch.randint(0, 30, (40, 16), generator=g)]

    def make():
        return problem.optimizer(
            strategy=strategy, inner=torchopt.adam(0.05), outer=torchopt.rmsprop(0.01), inner_steps=4
        )

    reference = make()
    for batch in batches:
        reference.step(batch, problem.batches[1])

    first = make()
    for batch in batches[:split]:
        first.step(batch, problem.batches[1])
    saved = roundtrip(first.state_dict())  # weights_only=True: the state is plain tensors and containers
    del first
    resumed = make()
    resumed.load_state_dict(saved)
    for batch in batches[split:]:
        resumed.step(batch, problem.batches[1])

    assert torch.equal(resumed.params["w"], reference.params["w"])
    assert torch.equal(resumed.hparams["log_l2"], reference.hparams["log_l2"])
    ref_state, res_state = reference.state_dict(), resumed.state_dict()
    for key in ("inner_state", "outer_state"):
        ref_leaves = torchopt.pytree.tree_leaves(ref_state[key])
        res_leaves = torchopt.pytree.tree_leaves(res_state[key])
        assert all(torch.equal(a, b) for a, b in zip(ref_leaves, res_leaves, strict=True))
    assert (resumed.steps, resumed.hypersteps) == (reference.steps, reference.hypersteps) == (40, 10)
    assert ref_state.get("alpha") == res_state.get("alpha")  # (IFT only: the cached step size of alpha="auto")


def test_load_state_dict_rejects_a_mismatched_state():
    problem = ScalarRidge()
    state = problem.optimizer().state_dict()
    other = bilevel.BilevelOptimizer(
        problem.train_loss, problem.val_loss, {"w": torch.zeros(3)}, {"log_l2": torch.tensor(0.0)}
    )
    with pytest.raises(ValueError, match=r"state\['params'\].*shapes"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"state\['inner_state'\].*torchopt"):
        problem.optimizer(inner=torchopt.adam(0.1)).load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict"):
        problem.optimizer().load_state_dict({"params": []})


def _all_finite(opt):
    state = opt.state_dict()
    leaves = [
        *state["params"],
        *state["hparams"],
        *torchopt.pytree.tree_leaves(state["inner_state"]),
        *torchopt.pytree.tree_leaves(state["outer_state"]),
    ]
    return all(torch.isfinite(t).all() for t in leaves if t.is_floating_point())


def test_divergent_neumann_is_skipped_and_state_stays_finite():
    # α λ_max ≈ 20: the series grows like 19^j and overflows float64 within 250 terms.
    problem = ScalarRidge(scale=3.0)
    opt = problem.optimizer(strategy=bilevel.Neumann(steps=300, alpha=2.0), inner=torchopt.sgd(0.02), inner_steps=5)
    start = opt.hparams["log_l2"].clone()
    with pytest.warns(RuntimeWarning, match="skipped.*non-finite.*alpha='auto'"):
        for _ in range(25):
            result = opt.step(*problem.batches)
            assert _all_finite(opt)
    assert result.outer_applied is False
    assert opt.skipped_outer_steps == opt.hypersteps == 5
    assert torch.equal(opt.hparams["log_l2"], start)
    assert opt.skipped_inner_steps == 0  # the weights kept training normally


def test_auto_alpha_converges_where_a_fixed_bad_alpha_diverges():
    problem = ScalarRidge(scale=3.0)
    best = problem.best_log_l2()
    bad = problem.optimizer(strategy=bilevel.Neumann(steps=300, alpha=2.0), inner=torchopt.sgd(0.02))
    auto = problem.optimizer(
        strategy=bilevel.Neumann(steps=100, alpha="auto", refresh_every=10), inner=torchopt.sgd(0.02)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20 * 20):
            bad.step(*problem.batches)
    assert bad.skipped_outer_steps == bad.hypersteps == 20 and bad.hparams["log_l2"].item() == 0.0
    # Warned on the 1st, 2nd, 4th, 8th and 16th skip (each says how many so far), not 20 times.
    assert len(caught) == 5 and all("alpha='auto'" in str(w.message) for w in caught)
    assert "16 such hypersteps so far; the next warning comes at 32" in str(caught[-1].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a single skip
        for _ in range(300 * 20):
            auto.step(*problem.batches)
    assert auto.skipped_outer_steps == 0
    assert auto.hparams["log_l2"].item() == pytest.approx(best, abs=2e-3)


def test_strict_mode_raises_and_leaves_state_unchanged():
    problem = ScalarRidge(scale=3.0)
    opt = problem.optimizer(
        strategy=bilevel.Neumann(steps=300, alpha=2.0), inner=torchopt.sgd(0.02), inner_steps=2, strict=True
    )
    opt.step(*problem.batches)
    before = opt.state_dict()
    before = {"w": before["params"][0].clone(), "h": before["hparams"][0].clone()}
    with pytest.raises(bilevel.NonFiniteError, match="hyperstep 1: non-finite"):
        opt.step(*problem.batches)
    # step() is all or nothing: neither the hyperstep nor the call's inner update was kept.
    assert torch.equal(opt.hparams["log_l2"], before["h"]) and torch.equal(opt.params["w"], before["w"])
    assert (opt.steps, opt.hypersteps, opt.skipped_outer_steps) == (1, 0, 0)


def test_strict_mode_inner_failure_changes_nothing():
    problem = ScalarRidge()
    opt = bilevel.BilevelOptimizer(
        _nan_on_flag(problem),
        problem.val_loss,
        {"w": torch.zeros(problem.d)},
        {"log_l2": torch.tensor(0.0)},
        inner=torchopt.adam(0.1),
        strategy=bilevel.Identity(0.1),
        inner_steps=3,
        strict=True,
    )
    opt.step((problem.X, problem.y, False), problem.batches[1])
    before = opt.state_dict()
    with pytest.raises(bilevel.NonFiniteError, match="inner step 2: non-finite"):
        opt.step((problem.X, problem.y, True), problem.batches[1])
    after = opt.state_dict()
    assert after["steps"] == before["steps"] == 1 and opt.skipped_inner_steps == 0
    assert torch.equal(after["params"][0], before["params"][0])


def _nan_on_flag(problem):
    def train_loss(p, h, batch):
        X, y, poison = batch
        loss = problem.train_loss(p, h, (X, y))
        return loss * float("nan") if poison else loss

    return train_loss


@pytest.mark.parametrize("device_select", [False, True], ids=["host-branch", "device-select"])
def test_non_finite_inner_update_is_skipped(device_select):
    problem = ScalarRidge()
    opt = bilevel.BilevelOptimizer(
        _nan_on_flag(problem),
        problem.val_loss,
        {"w": torch.zeros(problem.d)},
        {"log_l2": torch.tensor(0.0)},
        inner=torchopt.adam(0.1),
        outer=torchopt.adam(0.01),
        strategy=bilevel.ConjugateGradient(maxiter=5),
        inner_steps=4,
    )
    # The path accelerators take (torch.where on device, warning deferred to the hyperstep), run on CPU.
    opt._update.device_select = device_select
    good, poisoned = (problem.X, problem.y, False), (problem.X, problem.y, True)
    opt.step(good, problem.batches[1])
    before = opt.state_dict()
    with pytest.warns(RuntimeWarning, match="1 inner update.*skipped"):
        result = opt.step(poisoned, problem.batches[1])
        assert not bool(result.inner_applied)
        opt.step(good, problem.batches[1])
        opt.step(good, problem.batches[1])  # a hyperstep: the deferred warning comes here at the latest
    assert opt.skipped_inner_steps == 1 and _all_finite(opt)
    # The poisoned step changed nothing: replaying the good steps from the saved state gives the same weights.
    replay = bilevel.BilevelOptimizer(
        problem.train_loss,
        problem.val_loss,
        {"w": torch.zeros(problem.d)},
        {"log_l2": torch.tensor(0.0)},
        inner=torchopt.adam(0.1),
        outer=torchopt.adam(0.01),
        strategy=bilevel.ConjugateGradient(maxiter=5),
        inner_steps=4,
    )
    replay.load_state_dict(before)
    replay.inner_step(good[:2])
    replay.inner_step(good[:2])
    torch.testing.assert_close(opt.params["w"], replay.params["w"], rtol=0, atol=0)


def test_unroll_mode_matches_a_hand_written_unrolled_reference():
    """Truncated backprop through the optimiser's own last K SGD-with-momentum updates."""
    problem = ScalarRidge(n=12, d=3)
    lr, momentum, K, N = 0.1, 0.9, 3, 5
    opt = problem.optimizer(
        strategy=bilevel.Unroll(steps=K),
        inner=torchopt.sgd(lr, momentum=momentum),
        outer=torchopt.sgd(1.0),
        inner_steps=N,
    )
    g = torch.Generator().manual_seed(1)
    batches = [(problem.X[idx], problem.y[idx]) for idx in torch.randint(0, 12, (N, 6), generator=g)]
    # Reference, plain autograd; the graph is cut before the last K steps (truncation).
    lam = torch.tensor(0.0, requires_grad=True)
    w, buf = torch.zeros(3), torch.zeros(3)
    for k, (X, y) in enumerate(batches):
        if k <= N - K:
            w, buf = w.detach().requires_grad_(), buf.detach()
        loss = problem.train_loss({"w": w}, {"log_l2": lam}, (X, y))
        grad = torch.autograd.grad(loss, w, create_graph=True)[0]
        buf = grad if k == 0 else momentum * buf + grad  # torch.optim.SGD's momentum convention
        w = w - lr * buf
    problem.val_loss({"w": w}, {}, problem.batches[1]).backward()

    for batch in batches:
        result = opt.step(batch, problem.batches[1])
    assert result.hyper.strategy == "unroll"
    torch.testing.assert_close(opt.params["w"], w.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(-opt.hparams["log_l2"], lam.grad, rtol=0, atol=1e-14)


def test_unroll_outer_step_needs_enough_inner_steps():
    problem = ScalarRidge()
    opt = problem.optimizer(strategy=bilevel.Unroll(steps=3), inner_steps=4)
    opt.inner_step(problem.batches[0])
    with pytest.raises(ValueError, match=r"Unroll\(steps=3\).*only 1"):
        opt.outer_step(*problem.batches)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"inner": torch.optim.Adam}, TypeError, "`inner`.*torchopt"),
        ({"outer": "adam"}, TypeError, "`outer`.*torchopt"),
        ({"inner_steps": 0}, ValueError, "inner_steps=0"),
        ({"inner_steps": 2.0}, ValueError, "inner_steps=2.0"),
        ({"strategy": bilevel.Unroll(5), "inner_steps": 4}, ValueError, "steps <= inner_steps"),
        ({"strategy": bilevel.Unroll(3, torchopt.sgd(0.1))}, ValueError, r"Pass Unroll\(steps=3\)"),
        ({"strict": "yes"}, TypeError, "strict='yes'"),
        ({"inner_steps": -1}, ValueError, "inner_steps=-1"),
        ({"strategy": "neumann"}, TypeError, "strategy"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    problem = ScalarRidge()
    with pytest.raises(error, match=match):
        problem.optimizer(**kwargs)


def test_initial_trees_are_copied_not_mutated():
    problem = ScalarRidge()
    w0, h0 = torch.zeros(problem.d), torch.tensor(0.0)
    opt = bilevel.BilevelOptimizer(
        problem.train_loss, problem.val_loss, {"w": w0}, {"log_l2": h0}, inner=torchopt.sgd(0.1), inner_steps=2
    )
    for _ in range(4):
        opt.step(*problem.batches)
    assert torch.equal(w0, torch.zeros(problem.d)) and h0.item() == 0.0
    w0.fill_(5.0)  # the user's tensor is not the optimiser's state
    assert not torch.equal(opt.params["w"], w0)
    assert opt.hparams["log_l2"].item() != 0.0


def test_finite_checks_are_exact():
    """The sum screen may only err towards "check again"; the exact check decides."""
    from bilevel import _tree

    big = torch.full((4,), torch.finfo(torch.float32).max, dtype=torch.float32)  # finite, but its sum overflows
    assert not bool(_tree.sum_is_finite([big])) and bool(_tree.all_finite([big]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(5)
        t[3] = bad
        assert not bool(_tree.all_finite([torch.zeros(2), t])) and not bool(_tree.sum_is_finite([t]))
    assert bool(_tree.all_finite([torch.zeros(0), torch.ones(3)])) and bool(_tree.sum_is_finite([torch.zeros(0)]))


def _run(problem, opt, steps=12):
    g = torch.Generator().manual_seed(5)
    for idx in torch.randint(0, 30, (steps, 16), generator=g):
        opt.step((problem.X[idx], problem.y[idx]), problem.batches[1])
    return opt


@pytest.mark.parametrize(
    "inner",
    [torchopt.adam(0.05), torchopt.sgd(0.05, momentum=0.9, nesterov=True), torchopt.rmsprop(0.01, centered=True)],
    ids=["adam", "nesterov", "rmsprop-centered"],
)
def test_flat_layout_changes_no_number(inner, monkeypatch):
    """Elementwise optimisers update the weights as one vector (fewer, larger operations); the run must be
    bitwise the one the per-leaf layout gives."""

    class TwoLeaves(ScalarRidge):
        def train_loss(self, p, h, batch):
            return super().train_loss({"w": torch.cat([p["a"], p["b"]])}, h, batch)

        def val_loss(self, p, h, batch):
            return super().val_loss({"w": torch.cat([p["a"], p["b"]])}, h, batch)

    problem = TwoLeaves()

    def make():
        return bilevel.BilevelOptimizer(
            problem.train_loss,
            problem.val_loss,
            {"a": torch.zeros(3), "b": torch.zeros(problem.d - 3)},
            {"log_l2": torch.tensor(0.0)},
            inner=inner,
            strategy=bilevel.Unroll(2),
            inner_steps=4,
            seed=0,
        )

    flat = _run(problem, make())
    assert flat.inner.flat is not None
    monkeypatch.setattr(bilevel._transform.Transformation, "_flat_equivalent", lambda self, like: False)
    tree = _run(problem, make())
    assert tree.inner.flat is None
    for name in ("a", "b"):
        assert torch.equal(flat.params[name], tree.params[name])
    assert torch.equal(flat.hparams["log_l2"], tree.hparams["log_l2"])


def test_a_mask_keeps_the_per_leaf_layout():
    problem = ScalarRidge()
    mask = {"a": True, "b": False}
    decay = torchopt.transform.masked(torchopt.transform.add_decayed_weights(0.5), mask)
    inner = torchopt.chain(decay, torchopt.sgd(0.05))
    opt = bilevel.BilevelOptimizer(
        lambda p, h, b: problem.train_loss({"w": torch.cat([p["a"], p["b"]])}, h, b),
        lambda p, h, b: problem.val_loss({"w": torch.cat([p["a"], p["b"]])}, h, b),
        {"a": torch.ones(3), "b": torch.ones(problem.d - 3)},
        {"log_l2": torch.tensor(0.0)},
        inner=inner,
        inner_steps=100,
    )
    assert opt.inner.flat is None  # the mask is written against the params' own tree
    opt.inner_step((torch.zeros(4, problem.d), torch.zeros(4)))  # zero data: only decay and the penalty act
    a, b = opt.params["a"], opt.params["b"]
    # zero data leave ∇ = e^0 w = 1 everywhere: "a" also gets the masked decay 0.5 w, "b" does not
    torch.testing.assert_close(a, torch.full_like(a, 1 - 0.05 * (1 + 0.5)), rtol=0, atol=1e-15)
    torch.testing.assert_close(b, torch.full_like(b, 1 - 0.05), rtol=0, atol=1e-15)
