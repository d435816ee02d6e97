"""No silent wrong answers, no half-changed state, clear errors: one regression test per failure found.

The problem is the reproducer of the reliability review: ridge regression with one log-penalty per
weight, L_T = mse + Σ e^{h_i} w_i², L_V = mse, on two halves of 128 examples.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import optree
import pytest
import torch
import torchopt

import bilevel
from tests.problems import roundtrip

D = 8


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(128, D, generator=g), torch.randn(128, generator=g)
    return (X[:64], y[:64]), (X[64:], y[64:])


def train_loss(p, h, batch):
    X, y = batch[0], batch[1]
    scale = batch[2] if len(batch) > 2 else 1.0  # a curvature knob carried by the batch
    return scale * ((X @ p["w"] - y) ** 2).mean() + (h["h"].exp() * p["w"] ** 2).sum()


def val_loss(p, h, batch):
    X, y = batch[0], batch[1]
    return ((X @ p["w"] - y) ** 2).mean()


def make(**kwargs):
    kwargs.setdefault("inner", torchopt.sgd(0.05))
    kwargs.setdefault("outer", torchopt.adam(0.05))
    kwargs.setdefault("strategy", bilevel.ConjugateGradient(maxiter=5))
    kwargs.setdefault("inner_steps", 3)
    kwargs.setdefault("seed", 0)
    losses = kwargs.pop("losses", (train_loss, val_loss))
    return bilevel.BilevelOptimizer(*losses, {"w": torch.zeros(D)}, {"h": torch.full((D,), -2.0)}, **kwargs)


def _same_state(a: dict, b: dict) -> bool:
    """Bitwise equality of two state dicts: the same structure, tensors equal by torch.equal (dtype
    included), every other leaf by ==."""
    leaves_a, spec_a = optree.tree_flatten(a, none_is_leaf=True)
    leaves_b, spec_b = optree.tree_flatten(b, none_is_leaf=True)
    return spec_a == spec_b and all(
        (isinstance(v, torch.Tensor) and u.dtype == v.dtype and torch.equal(u, v))
        if isinstance(u, torch.Tensor)
        else (not isinstance(v, torch.Tensor) and u == v)
        for u, v in zip(leaves_a, leaves_b)
    )


# ------------------------------------------------------------------ 1. bitwise resume, every optimiser

ALIASES = {
    "sgd": lambda: torchopt.sgd(0.05),
    "sgd-momentum": lambda: torchopt.sgd(0.05, momentum=0.9),
    "sgd-nesterov": lambda: torchopt.sgd(0.05, momentum=0.9, nesterov=True),
    "sgd-dampening": lambda: torchopt.sgd(0.05, momentum=0.9, dampening=0.3),
    "adam": lambda: torchopt.adam(0.05),
    "adamw": lambda: torchopt.adamw(0.05),
    "adamax": lambda: torchopt.adamax(0.05),
    "radam": lambda: torchopt.radam(0.05),
    "rmsprop": lambda: torchopt.rmsprop(0.01),
    "rmsprop-momentum": lambda: torchopt.rmsprop(0.01, momentum=0.9),
    "rmsprop-centered": lambda: torchopt.rmsprop(0.01, momentum=0.5, centered=True),
    "adagrad": lambda: torchopt.adagrad(0.05),
    "adadelta": lambda: torchopt.adadelta(1.0),
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_resume_is_bitwise_for_every_torchopt_alias_as_inner_and_outer(name):
    train, val = _data()

    def fresh():  # a new transformation object, as a resumed process would build
        return make(inner=ALIASES[name](), outer=ALIASES[name](), strategy=bilevel.Neumann(4, "auto"))

    straight = fresh()
    for _ in range(12):
        straight.step(train, val)
    first = fresh()
    for _ in range(6):
        first.step(train, val)
    resumed = fresh()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    for _ in range(6):
        resumed.step(train, val)
    assert straight.hypersteps == resumed.hypersteps == 4
    assert _same_state(straight.state_dict(), resumed.state_dict())


def test_a_shared_transformation_object_does_not_leak_momentum_between_optimisers():
    """torchopt's momentum keeps a first-call flag in a closure: an optimiser built with a transformation
    another optimiser already used must behave exactly like one built with a fresh transformation."""
    train, val = _data()
    shared = torchopt.sgd(0.05, momentum=0.9, dampening=0.3)  # dampening: the first call differs
    used = make(inner=shared)
    used.step(train, val)
    again, fresh = make(inner=shared), make(inner=torchopt.sgd(0.05, momentum=0.9, dampening=0.3))
    for _ in range(4):
        again.step(train, val)
        fresh.step(train, val)
    assert torch.equal(again.params["w"], fresh.params["w"])


# -------------------------------------------------------------------------- 2. a stale auto-alpha


def test_a_stale_auto_alpha_is_re_estimated_instead_of_skipping_hypersteps():
    train, val = _data()
    opt = make(strategy=bilevel.Neumann(50, "auto", refresh_every=5), inner_steps=2)
    stiff = (*train, 100.0)  # the training loss's curvature ×100 after the first hyperstep
    infos = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(40):
            result = opt.step(train if k < 2 else stiff, val)
            if result.hyper is not None:
                infos.append(result.hyper)
    assert opt.hypersteps == 20 and opt.skipped_outer_steps == 0
    # The first stiff hyperstep ran the series with the old α, found it diverging, re-estimated and redid it.
    assert infos[1].power_hvps == 20 and infos[1].hvps == 49 + 20 + 49
    assert float(infos[1].growth) <= 1.0 and infos[1].lambda_max > 50 * infos[0].lambda_max
    # Then α is reused for refresh_every hypersteps at no power-iteration cost, and refreshed.
    assert [info.power_hvps for info in infos[2:8]] == [0, 0, 0, 0, 20, 0]


def test_auto_alpha_default_refresh_costs_a_tenth_of_the_power_iterations():
    train, val = _data()
    assert bilevel.Neumann(5, "auto").refresh_every == 10
    opt = make(strategy=bilevel.Neumann(5, "auto"), inner_steps=1)
    costs = [opt.step(train, val).hyper.power_hvps for _ in range(20)]
    assert costs == [20] + [0] * 9 + [20] + [0] * 9


# ----------------------------------------------------------------------- 4. Unroll copies the batches


def test_unroll_is_not_fooled_by_a_prefetch_buffer_refilled_in_place():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, D, generator=g), torch.randn(32, generator=g)) for _ in range(12)]
    _, val = _data()

    def run(reuse_buffer: bool):
        opt = make(strategy=bilevel.Unroll(3), inner_steps=3)
        buffer = (torch.empty(32, D), torch.empty(32))
        for X, y in batches:
            if reuse_buffer:  # a loader that refills one pinned buffer in place
                buffer[0].copy_(X)
                buffer[1].copy_(y)
                opt.step(buffer, val)
            else:
                opt.step((X, y), val)
        return opt

    fresh, reused = run(False), run(True)
    assert torch.equal(fresh.hparams["h"], reused.hparams["h"])


# ------------------------------------------------------------------ 5. losses without an autograd graph


def _detached(p, h, b):
    return val_loss(p, h, b).detach()


def _from_item(p, h, b):
    return torch.tensor(val_loss(p, h, b).item())


def _no_grad(p, h, b):
    with torch.no_grad():
        return val_loss(p, h, b)


@pytest.mark.parametrize("broken", [_detached, _from_item, _no_grad], ids=["detach", "item", "no_grad"])
def test_a_loss_without_a_graph_is_an_error_naming_it(broken):
    train, val = _data()
    params, hparams = {"w": torch.zeros(D)}, {"h": torch.zeros(D)}
    with pytest.raises(ValueError, match="`val_loss` returned a tensor with no autograd graph"):
        bilevel.hypergradient(train_loss, broken, params, hparams, train, val, strategy=bilevel.Exact())
    with pytest.raises(ValueError, match="`train_loss` returned a tensor with no autograd graph"):
        bilevel.hypergradient(broken, val_loss, params, hparams, train, val, strategy=bilevel.Exact())
    opt = make(losses=(train_loss, broken), inner_steps=1)
    before = roundtrip(opt.state_dict())  # a copy: an in-place write would change a live state_dict too
    with pytest.raises(ValueError, match="`val_loss`"):
        opt.step(train, val)
    assert opt.hypersteps == 0 and torch.equal(opt.hparams["h"], before["hparams"][0])
    with pytest.raises(ValueError, match="`train_loss`"):
        make(losses=(broken, val_loss)).step(train, val)


# ------------------------------------------------------------------------- 6. auto-alpha, zero Hessian


def _linear_train_loss(p, h, batch):
    """Hinge-like: piecewise linear in w, so the Hessian is exactly zero."""
    X, y = batch
    return (X @ p["w"] - y).abs().mean() + (h["h"].exp() * p["w"].abs()).sum()


def test_auto_alpha_on_a_zero_hessian_fails_clearly_and_counts_the_skip():
    train, val = _data()
    params, hparams = {"w": torch.full((D,), 0.1)}, {"h": torch.zeros(D)}
    with pytest.warns(RuntimeWarning, match=r"spectral radius of 0\.0.*damping"):
        grads, info = bilevel.hypergradient(
            _linear_train_loss, val_loss, params, hparams, train, val, strategy=bilevel.Neumann(5, "auto")
        )
    assert torch.isnan(grads["h"]).all() and info.lambda_max == 0.0 and "zero curvature" in info.failure
    opt = make(losses=(_linear_train_loss, val_loss), strategy=bilevel.Neumann(5, "auto"), inner_steps=2)
    opt.step(train, val)
    w_before = opt.params["w"].clone()
    with pytest.warns(RuntimeWarning, match="hyperstep 1 skipped.*spectral radius"):
        result = opt.step(train, val)
    assert bool(result.inner_applied) and not torch.equal(opt.params["w"], w_before)  # the inner update counted
    assert result.outer_applied is False and opt.skipped_outer_steps == 1 and opt.steps == 2
    assert opt.state_dict()["alpha"] is None  # nothing cached from a failed estimate


def test_a_nan_spectral_radius_is_not_cached():
    train, val = _data()
    opt = make(strategy=bilevel.Neumann(5, "auto"), inner_steps=1)
    poisoned = (train[0], train[1], float("nan"))
    with pytest.warns(RuntimeWarning) as caught:
        opt.step(poisoned, val)  # inner step and hyperstep both non-finite: skipped
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("1 inner update(s) skipped") for m in messages), messages
    assert any(m.startswith("hyperstep 1 skipped") for m in messages), messages
    assert opt.skipped_outer_steps == 1 and opt.state_dict()["alpha"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert opt.step(train, val).outer_applied
    assert math.isfinite(opt.state_dict()["alpha"])


# -------------------------------------------------------------------------- 7. Exact, singular Hessian


def _singular_train_loss(p, h, batch):
    """w[0] does not enter the loss at all: a zero row and column in the Hessian."""
    X, y = batch
    return ((X[:, 1:] @ p["w"][1:] - y) ** 2).mean() + (h["h"][1:].exp() * p["w"][1:] ** 2).sum()


def test_exact_on_a_singular_hessian_names_damping_and_is_a_counted_skip():
    train, val = _data()
    params, hparams = {"w": torch.zeros(D)}, {"h": torch.zeros(D)}
    with pytest.warns(RuntimeWarning, match=r"singular.*Exact\(damping=1e-6\)"):
        grads, info = bilevel.hypergradient(
            _singular_train_loss, val_loss, params, hparams, train, val, bilevel.Exact()
        )
    assert torch.isnan(grads["h"]).all() and "singular" in info.failure
    damped, info = bilevel.hypergradient(
        _singular_train_loss, val_loss, params, hparams, train, val, bilevel.Exact(damping=1e-6)
    )
    assert info.failure is None and torch.isfinite(damped["h"]).all()
    opt = make(losses=(_singular_train_loss, val_loss), strategy=bilevel.Exact(), inner_steps=1)
    with pytest.warns(RuntimeWarning, match="hyperstep 1 skipped.*singular"):
        assert opt.step(train, val).outer_applied is False
    assert opt.skipped_outer_steps == 1
    strict = make(losses=(_singular_train_loss, val_loss), strategy=bilevel.Exact(), inner_steps=1, strict=True)
    with pytest.raises(bilevel.NonFiniteError, match="singular"):
        strict.step(train, val)
    assert strict.hypersteps == 0 and strict.skipped_outer_steps == 0


def test_exact_is_refused_up_front_when_the_dense_hessian_cannot_fit():
    big = {"w": torch.zeros(10**6)}  # 10¹² float64 entries: 7 TiB
    with pytest.raises(ValueError, match=r"Exact\(\).*1,000,000 parameters needs 7,450\.6 GiB"):
        bilevel.BilevelOptimizer(train_loss, val_loss, big, {"h": torch.zeros(10**6)}, strategy=bilevel.Exact())
    train, val = _data()
    with pytest.raises(ValueError, match="ConjugateGradient or Neumann"):
        bilevel.hypergradient(train_loss, val_loss, big, {"h": torch.zeros(10**6)}, train, val, bilevel.Exact())


# --------------------------------------------------------------- 8, 9. loading validates, then assigns


def test_load_state_dict_refuses_another_optimiser_kind_dtype_or_meta_tensors():
    train, val = _data()
    momentum = make(inner=torchopt.sgd(0.05, momentum=0.9))
    momentum.step(train, val)
    rmsprop = make(inner=torchopt.rmsprop(0.01))  # one tensor of state per weight, like the momentum trace
    with pytest.raises(ValueError, match=r"state\['inner_state'\]` was saved from another torchopt optimiser"):
        rmsprop.load_state_dict(momentum.state_dict())

    single = bilevel.BilevelOptimizer(
        train_loss, val_loss, {"w": torch.zeros(D, dtype=torch.float32)}, {"h": torch.zeros(D, dtype=torch.float32)}
    )
    with pytest.raises(ValueError, match=r"state\['params'\]\[0\]` has dtype torch.float32.*float64"):
        make(inner=torchopt.adam(1e-4), outer=torchopt.rmsprop(1e-2), inner_steps=10).load_state_dict(
            single.state_dict()
        )

    state = momentum.state_dict()
    state["params"] = [torch.empty(D, device="meta")]
    with pytest.raises(ValueError, match="meta tensor"):
        make(inner=torchopt.sgd(0.05, momentum=0.9)).load_state_dict(state)


@pytest.mark.parametrize(
    ("corrupt", "error", "match"),
    [
        (lambda s: s.pop("window"), ValueError, r"lacks the entries \['window'\]"),
        (lambda s: s.update(window=[{"params": [torch.zeros(3)]}]), ValueError, r"`state\['window'\]\[0\]` must be"),
        (lambda s: s.update(steps=-1), ValueError, r"`state\['steps'\]` must be an integer >= 0"),
        (lambda s: s.update(alpha=float("nan")), ValueError, r"`state\['alpha'\]` must be None or a finite float"),
        (lambda s: s.update(inner_started="yes"), TypeError, r"`state\['inner_started'\]` must be a bool"),
        (
            lambda s: s["outer_state"].__setitem__(0, torch.zeros(D, dtype=torch.float32)),
            ValueError,
            r"`state\['outer_state'\]\[0\]` has dtype torch.float32",
        ),
    ],
    ids=["no-window", "bad-window", "negative-steps", "nan-alpha", "started-not-bool", "outer-dtype"],
)
def test_a_bad_checkpoint_changes_nothing(corrupt, error, match, request):
    train, val = _data()
    # the cached α belongs to the IFT strategies, the window to Unroll
    strategy = bilevel.Neumann(4, "auto") if "alpha" in request.node.callspec.id else bilevel.Unroll(2)
    source = make(strategy=strategy, inner=torchopt.adam(0.05))
    for _ in range(5):
        source.step(train, val)
    target = make(strategy=strategy, inner=torchopt.adam(0.05))
    for _ in range(2):
        target.step(_data(1)[0], val)
    before = roundtrip(target.state_dict())  # a copy: a half-done load could write into live tensors
    state = source.state_dict()
    corrupt(state)
    with pytest.raises(error, match=match):
        target.load_state_dict(state)
    assert _same_state(target.state_dict(), before)


# ---------------------------------------------------------------------- 10. a diverging Neumann series


def test_a_moderately_divergent_neumann_series_is_flagged_for_free():
    train, val = _data()
    X = train[0]
    hparams = {"h": torch.full((D,), -2.0)}
    hessian = 2 * X.T @ X / len(X) + 2 * torch.diag(hparams["h"].exp())
    lam_max = float(torch.linalg.eigvalsh(hessian)[-1])
    w_star = torch.linalg.solve(hessian, 2 * X.T @ train[1] / len(X))
    strategy = bilevel.Neumann(steps=20, alpha=2.5 / lam_max)  # |1 − αλ_max| = 1.5: the series diverges
    _, info = bilevel.hypergradient(train_loss, val_loss, {"w": w_star}, hparams, train, val, strategy)
    Xv, yv = val
    v = 2 * Xv.T @ (Xv @ w_star - yv) / len(Xv)  # ∂L_V/∂w
    last = torch.linalg.matrix_power(torch.eye(D) - strategy.alpha * hessian, 19) @ v
    assert float(info.growth) == pytest.approx(float(last.norm() / v.norm()), rel=1e-10)
    assert float(info.growth) > 100 and bool(info.diverging) and info.hvps == 19  # no extra product
    _, good = bilevel.hypergradient(
        train_loss, val_loss, {"w": w_star}, hparams, train, val, bilevel.Neumann(steps=20, alpha=1 / lam_max)
    )
    assert 0 < float(good.growth) <= 1.0 and not bool(good.diverging)

    opt = make(strategy=strategy, inner_steps=1, inner=torchopt.sgd(1e-12))
    with pytest.warns(RuntimeWarning, match=r"hyperstep 1: diverging Neumann series.*applied anyway.*smaller alpha"):
        assert opt.step(train, val).outer_applied is True
    strict = make(strategy=strategy, inner_steps=1, inner=torchopt.sgd(1e-12), strict=True)
    h_before = strict.hparams["h"].clone()
    with pytest.raises(bilevel.NonFiniteError, match="diverging Neumann series"):
        strict.step(train, val)
    assert torch.equal(strict.hparams["h"], h_before) and strict.hypersteps == 0


def test_growth_from_negative_curvature_is_reported_but_not_called_divergence():
    """An indefinite Hessian makes the series grow for every α > 0; that is not a too-large α."""
    train, val = _data()

    def saddle_loss(p, h, batch):  # the first weight's decay term enters with a minus sign
        return train_loss(p, h, batch) - 3 * h["h"][0].exp() * p["w"][0] ** 2

    hparams = {"h": torch.zeros(D)}
    X = train[0]
    hessian = 2 * X.T @ X / len(X) + 2 * torch.diag(hparams["h"].exp() * torch.tensor([-2.0] + [1.0] * (D - 1)))
    assert float(torch.linalg.eigvalsh(hessian)[0]) < 0  # indefinite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = bilevel.hypergradient(
            saddle_loss, val_loss, {"w": torch.full((D,), 0.1)}, hparams, train, val, bilevel.Neumann(30, "auto")
        )
        opt = bilevel.BilevelOptimizer(
            saddle_loss, val_loss, {"w": torch.zeros(D)}, hparams, strategy=bilevel.Neumann(30, "auto"), inner_steps=1
        )
        assert opt.step(train, val).outer_applied
    assert float(info.growth) > 1.5 and not bool(info.diverging)


# ------------------------------------------------------------------------------------ 12. small ones


def test_meta_tensors_numpy_integers_huge_floats_and_non_bool_strict():
    train, val = _data()
    make_meta = {"w": torch.empty(D, device="meta")}, {"h": torch.empty(D, device="meta")}
    with pytest.raises(ValueError, match="meta tensors"):
        bilevel.BilevelOptimizer(train_loss, val_loss, *make_meta)
    opt = make(inner_steps=np.int64(2))
    opt.step(train, val)
    assert opt.step(train, val).hyper is not None and isinstance(opt.inner_steps, int)
    with pytest.raises(ValueError, match=r"Neumann\(alpha=1000000000"):
        bilevel.Neumann(steps=2, alpha=10**400)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        bilevel.Identity(alpha=10**400)


def test_non_finite_error_leaves_everything_as_documented():
    """NonFiniteError's docstring: nothing of the failing update is kept, counters included."""
    train, val = _data()
    opt = make(strict=True, inner=torchopt.adam(0.05))
    opt.step(train, val)
    before = roundtrip(opt.state_dict())  # a copy, so that an in-place write would show
    with pytest.raises(bilevel.NonFiniteError, match="inner step 2"):
        opt.step((train[0], train[1], float("inf")), val)
    assert _same_state(opt.state_dict(), before)


# ------------------------------------------------- "right on every model": solves, atomic steps, Unroll skips


def _saddle(p, h, batch):
    """L_T = ½ wᵀ diag(e^λ₀, −½e^λ₁, 2e^λ₂) w: a saddle, H = diag(1, −½, 2) at λ = 0."""
    curvature = torch.stack([h["h"][0].exp(), -0.5 * h["h"][1].exp(), 2 * h["h"][2].exp()])
    return 0.5 * (curvature * p["w"] ** 2).sum()


def _distance(p, h, batch):  # L_V = ½‖w − t‖², so b = ∂L_V/∂w = w − t
    return 0.5 * ((p["w"] - batch) ** 2).sum()


def _saddle_point():  # params, hparams, train batch, val batch; b = (1, 1, 1)
    return {"w": torch.ones(3)}, {"h": torch.zeros(3)}, None, torch.zeros(3)


def _two_cg_steps_by_hand():
    """Two CG iterations on H = diag(1, −½, 2), b = (1, 1, 1): x, ‖b − Hx‖/‖b‖, and the curvatures."""
    H, b = torch.diag(torch.tensor([1.0, -0.5, 2.0])), torch.ones(3)
    x, r = torch.zeros(3), b.clone()
    p, curvatures = r.clone(), []
    for _ in range(2):
        curvatures.append(float(p @ H @ p))
        step = (r @ r) / (p @ H @ p)
        x, r_new = x + step * p, r - step * (H @ p)
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    return x, float((b - H @ x).norm() / b.norm()), curvatures


def test_a_solve_worse_than_no_solve_is_refused_with_its_relative_residual():
    """Two CG steps on an indefinite H meet negative curvature and end further from H⁻¹b than x = 0."""
    params, hparams, train, val = _saddle_point()
    _, expected, curvatures = _two_cg_steps_by_hand()
    assert expected > 1 and min(curvatures) < 0  # (1.24, and the second direction's pᵀHp < 0)
    cg = bilevel.ConjugateGradient(2, tol=0.0)
    refused = r"worse than no solve: relative residual .* = 1.24 > 1.*negative curvature met.*damping"
    with pytest.warns(RuntimeWarning, match=refused):
        grads, info = bilevel.hypergradient(_saddle, _distance, params, hparams, train, val, cg)
    assert torch.isnan(grads["h"]).all() and abs(float(info.relative_residual) - expected) < 1e-12
    # an exact solve of the same system is fine: the IFT holds at a saddle, and its residual is 0
    _, exact = bilevel.hypergradient(_saddle, _distance, params, hparams, train, val, bilevel.Exact())
    assert exact.failure is None and float(exact.relative_residual) < 1e-15


def test_cg_whose_residual_rises_on_a_positive_definite_system_is_not_refused():
    """On a positive definite but ill-conditioned H, CG's residual can exceed ‖b‖ on the way while the
    iterate still improves on x = 0 in the H-norm (CG minimises it): that is no failure."""
    curv = torch.tensor([1.0, 1e-3, 1e-3, 50.0])

    def stiff(p, h, batch):
        return 0.5 * (curv * h["h"].exp() * p["w"] ** 2).sum()

    params, hparams, b = {"w": torch.tensor([1.0, 1.0, 1.0, 0.05])}, {"h": torch.zeros(4)}, torch.zeros(4)
    _, info = bilevel.hypergradient(stiff, _distance, params, hparams, None, b, bilevel.ConjugateGradient(1, tol=0.0))
    H, v = torch.diag(curv), params["w"]
    x = float(v @ v / (v @ H @ v)) * v  # one CG step by hand
    assert float((v - H @ x).norm() / v.norm()) > 1 and float(0.5 * x @ H @ x - v @ x) < 0
    assert info.failure is None and float(info.relative_residual) > 1


def test_an_optimiser_skips_and_counts_solves_worse_than_none_and_strict_refuses_them():
    params, hparams, train, val = _saddle_point()
    cg = bilevel.ConjugateGradient(2, tol=0.0)
    opt = bilevel.BilevelOptimizer(_saddle, _distance, params, hparams, strategy=cg)
    with pytest.warns(RuntimeWarning, match=r"hyperstep 1 skipped: the linear solve ended worse than no solve"):
        info = opt.outer_step(train, val)
    assert info.failure is not None and opt.skipped_outer_steps == 1 and torch.equal(opt.hparams["h"], torch.zeros(3))
    strict = bilevel.BilevelOptimizer(_saddle, _distance, params, hparams, strategy=cg, strict=True)
    before = roundtrip(strict.state_dict())
    with pytest.raises(bilevel.NonFiniteError, match="worse than no solve"):
        strict.outer_step(train, val)
    assert _same_state(strict.state_dict(), before)


class _Interrupt(BaseException):
    """Stands for KeyboardInterrupt (not caught by `except Exception`)."""


@pytest.mark.parametrize("where", ["val_loss", "hvp", "inner"])
def test_an_exception_anywhere_in_step_changes_nothing_and_a_retry_continues_bitwise(where):
    train, val = _data()
    calls = {"n": 0, "armed": False}

    def flaky_train(p, h, batch):
        if calls["armed"] and where in ("hvp", "inner"):
            calls["n"] += 1
            if where == "inner" or calls["n"] == 2:  # inner: the inner step's own evaluation; hvp: the hyperstep's
                raise _Interrupt
        return train_loss(p, h, batch)

    def flaky_val(p, h, batch):
        if calls["armed"] and where == "val_loss":
            raise _Interrupt
        return val_loss(p, h, batch)

    straight, interrupted = (make(losses=(flaky_train, flaky_val), inner=torchopt.adam(0.05)) for _ in range(2))
    for _ in range(5):
        straight.step(train, val)
    for _ in range(2):
        interrupted.step(train, val)
    before = roundtrip(interrupted.state_dict())
    calls["armed"] = True
    with pytest.raises(_Interrupt):
        interrupted.step(train, val)  # step 3: inner update, then the hyperstep
    calls["armed"] = False
    assert _same_state(interrupted.state_dict(), before)
    for _ in range(3):  # the retried call and the rest
        interrupted.step(train, val)
    assert _same_state(interrupted.state_dict(), straight.state_dict())


def test_unroll_after_a_skipped_inner_step_is_a_counted_skip_not_a_crash():
    """Unroll(K) with inner_steps=K (the learning-rates recipe's setting) after one non-finite inner step."""
    train, val = _data()
    opt = make(strategy=bilevel.Unroll(steps=3), inner_steps=3)
    with pytest.warns(RuntimeWarning, match="inner update"):
        opt.step((train[0], train[1], float("inf")), val)  # skipped: non-finite
    opt.step(train, val)
    with pytest.warns(RuntimeWarning, match=r"hyperstep 1 skipped: Unroll\(steps=3\) needs 3 applied .* only 2"):
        result = opt.step(train, val)
    assert result.outer_applied is False and (opt.hypersteps, opt.skipped_outer_steps) == (1, 1)
    for _ in range(3):  # the next window is complete again
        result = opt.step(train, val)
    assert result.outer_applied and opt.skipped_outer_steps == 1
