"""bilevel.hypergradient against closed forms, finite differences and torchopt."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchopt

import bilevel
from tests.problems import Logistic, Ridge, central_difference

HVPS = [bilevel.ReverseHVP(), bilevel.ForwardOverReverseHVP(), bilevel.FiniteDifferenceHVP()]
HVP_IDS = ["reverse", "forward", "fd"]
# On a quadratic the centred difference has no truncation error, only round-off ≈ ε_mach/step.
HVP_TOL = {"reverse": 1e-12, "forward": 1e-12, "fd": 1e-8}


def run(problem, strategy, **kwargs):
    return bilevel.hypergradient(
        problem.train_loss,
        problem.val_loss,
        problem.params(),
        problem.hparams(),
        problem.train_batch if hasattr(problem, "train_batch") else (problem.X, problem.y),
        problem.val_batch if hasattr(problem, "val_batch") else (problem.Xv, problem.yv),
        strategy=strategy,
        **kwargs,
    )


# --------------------------------------------------------------------------- ridge: closed form
@pytest.mark.parametrize("direct", [0.0, 0.7], ids=["no-direct", "direct"])
@pytest.mark.parametrize(
    "strategy, tol",
    [
        (bilevel.Exact(), 1e-10),
        (bilevel.ConjugateGradient(maxiter=50, tol=1e-13), 1e-10),
        (bilevel.ConjugateGradient(maxiter=50, tol=1e-13, hvp=bilevel.ForwardOverReverseHVP()), 1e-10),
        (bilevel.Neumann(steps=800, alpha=0.3), 1e-10),
        (bilevel.Neumann(steps=800, alpha="auto"), 1e-10),
    ],
    ids=["exact", "cg-reverse", "cg-forward", "neumann-800", "neumann-auto"],
)
def test_ridge_matches_closed_form(strategy, tol, direct):
    problem = Ridge.make(direct=direct)
    grads, _ = run(problem, strategy)
    truth = problem.hypergradient()
    torch.testing.assert_close(Ridge.flat(grads), truth, atol=tol, rtol=0)
    # ... and the closed form itself agrees with finite differences of λ ↦ L_V(w*(λ), λ).
    torch.testing.assert_close(central_difference(problem.outer, problem.lam), truth, atol=1e-8, rtol=0)


@pytest.mark.parametrize("hvp", HVPS, ids=HVP_IDS)
@pytest.mark.parametrize("steps", [1, 2, 5, 17])
def test_neumann_is_the_truncated_series(steps, hvp):
    problem = Ridge.make(direct=0.3)
    grads, info = run(problem, bilevel.Neumann(steps=steps, alpha=0.3, hvp=hvp))
    expected = problem.neumann_hypergradient(steps, 0.3)
    tol = HVP_TOL[HVP_IDS[HVPS.index(hvp)]]
    torch.testing.assert_close(Ridge.flat(grads), expected, atol=tol, rtol=0)
    assert info.hvps == steps - 1 and info.alpha == 0.3 and info.strategy == "neumann"


def test_neumann_error_shrinks_to_zero_with_steps():
    problem = Ridge.make()
    truth = problem.hypergradient()
    errors = [
        (Ridge.flat(run(problem, bilevel.Neumann(steps=k, alpha=0.3))[0]) - truth).norm() for k in (1, 10, 100, 1000)
    ]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 1e-12 * truth.norm()


def test_identity_is_neumann_with_one_step():
    problem = Ridge.make(direct=0.2)
    ident, info = run(problem, bilevel.Identity(alpha=0.3))
    neu, _ = run(problem, bilevel.Neumann(steps=1, alpha=0.3))
    assert torch.equal(Ridge.flat(ident), Ridge.flat(neu))
    assert info.strategy == "identity" and info.hvps == 0
    # H⁻¹ ≈ αI, written out.
    torch.testing.assert_close(Ridge.flat(ident), problem.hypergradient(lambda v: 0.3 * v), atol=1e-14, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20])
@pytest.mark.parametrize("make", [Ridge.make, Logistic.make], ids=["ridge", "logistic"])
def test_theorem2_unrolled_sgd_from_w_star_equals_neumann(make, steps):
    """Paper's Theorem 2: i steps of SGD(lr=α) unrolled from w* give the i-term Neumann series."""
    problem = make()
    alpha = 0.25
    unrolled, info = run(problem, bilevel.Unroll(steps=steps, optimizer=torchopt.sgd(lr=alpha)))
    neumann, _ = run(problem, bilevel.Neumann(steps=steps, alpha=alpha))
    flat = Ridge.flat if isinstance(problem, Ridge) else (lambda g: g["log_l2"])
    torch.testing.assert_close(flat(unrolled), flat(neumann), atol=1e-12, rtol=0)
    assert info.strategy == "unroll" and info.residual is None


def test_unroll_away_from_w_star_differs_from_neumann():
    """Theorem 2 needs w₀ = w*: from elsewhere the unrolled derivative is a different quantity."""
    problem = Ridge.make()
    params = {k: v + 0.5 for k, v in problem.params().items()}
    args = (problem.train_loss, problem.val_loss, params, problem.hparams(), problem.train_batch, problem.val_batch)
    unrolled, _ = bilevel.hypergradient(*args, strategy=bilevel.Unroll(3, torchopt.sgd(lr=0.25)))
    neumann, _ = bilevel.hypergradient(*args, strategy=bilevel.Neumann(3, 0.25))
    assert (Ridge.flat(unrolled) - Ridge.flat(neumann)).norm() > 1e-3


def test_info_reports_solver_outcome():
    problem = Ridge.make()
    v = problem.val_grad_w()
    # Neumann residual on request: H x − v = −(I − αH)^K v exactly.
    _, info = run(problem, bilevel.Neumann(steps=4, alpha=0.3), residual=True)
    expected = torch.linalg.matrix_power(torch.eye(7) - 0.3 * problem.hessian(), 4) @ v
    torch.testing.assert_close(info.residual, expected.norm(), atol=1e-13, rtol=0)
    assert info.hvps == 4  # three for the series, one for the residual
    _, info = run(problem, bilevel.Neumann(steps=4, alpha=0.3))
    assert info.residual is None
    _, info = run(problem, bilevel.ConjugateGradient(maxiter=3))
    assert info.iterations == 3 and info.hvps == 3 and info.converged is False and info.residual > 1e-6
    _, info = run(problem, bilevel.ConjugateGradient(maxiter=100, tol=1e-12))
    assert info.converged is True and info.iterations <= 7 + 2 and info.residual <= 1e-12 * v.norm()
    _, info = run(problem, bilevel.Exact())
    assert info.residual < 1e-12 and info.hvps == 7
    torch.testing.assert_close(info.val_loss, problem.outer(problem.lam))


def test_auto_alpha_uses_power_iteration_estimate():
    problem = Ridge.make()
    lam_max = float(torch.linalg.eigvalsh(problem.hessian()).max())
    _, info = run(problem, bilevel.Neumann(steps=3, alpha="auto", power_iters=30))
    # Power iteration approaches λ_max from below; α = 1/estimate then keeps α λ_max < 2.
    assert 0.9 * lam_max < info.lambda_max <= lam_max * (1 + 1e-12)
    assert info.alpha == pytest.approx(1 / info.lambda_max) and info.alpha * lam_max < 2
    assert info.hvps == 30 + 2
    _, info = run(problem, bilevel.Neumann(steps=3, alpha="auto", power_iters=400))
    assert info.lambda_max == pytest.approx(lam_max, rel=1e-9)


def test_damping_solves_the_damped_system():
    problem = Ridge.make()
    damped = lambda v: torch.linalg.solve(problem.hessian() + 0.5 * torch.eye(7), v)  # noqa: E731
    for strategy in (bilevel.Exact(damping=0.5), bilevel.ConjugateGradient(maxiter=50, tol=1e-13, damping=0.5)):
        grads, _ = run(problem, strategy)
        torch.testing.assert_close(Ridge.flat(grads), problem.hypergradient(damped), atol=1e-11, rtol=0)


# --------------------------------------------------------------------- non-quadratic: logistic
@pytest.mark.parametrize(
    "strategy, tol",
    [
        (bilevel.Exact(), 1e-8),
        (bilevel.ConjugateGradient(maxiter=50, tol=1e-13), 1e-8),
        (bilevel.Neumann(steps=2000, alpha="auto"), 1e-8),
        (bilevel.ConjugateGradient(maxiter=50, tol=1e-13, hvp=bilevel.ForwardOverReverseHVP()), 1e-8),
        # finite differences of first derivatives: O(ε^{2/3}) ≈ 4e-11 relative error, times the scale
        (bilevel.ConjugateGradient(maxiter=50, tol=1e-13, hvp=bilevel.FiniteDifferenceHVP()), 1e-7),
    ],
    ids=["exact", "cg", "neumann-auto", "cg-forward", "cg-fd"],
)
def test_logistic_matches_finite_differences_of_solved_inner_problem(strategy, tol):
    problem = Logistic.make()
    grads, _ = run(problem, strategy)
    truth = central_difference(problem.outer, problem.lam)
    torch.testing.assert_close(grads["log_l2"], truth, atol=tol, rtol=0)


def test_logistic_matches_torchopt_implicit_differentiation():
    problem = Logistic.make()

    def inner_loss(w, lam):
        return problem.train_loss({"w": w}, {"log_l2": lam}, (problem.X, problem.y))

    optimality = torch.func.grad(inner_loss, argnums=0)  # the stationarity condition ∇_w L_T = 0

    @torchopt.diff.implicit.custom_root(
        optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=100, atol=1e-14, rtol=0)
    )
    def solve(w0, lam):
        return problem.w_star(lam.detach())

    lam = problem.lam.clone().requires_grad_()
    w = solve(torch.zeros_like(problem.lam), lam)
    problem.val_loss({"w": w}, {}, (problem.Xv, problem.yv)).backward()
    ours, _ = run(problem, bilevel.ConjugateGradient(maxiter=50, tol=1e-13))
    torch.testing.assert_close(ours["log_l2"], lam.grad, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------ structure and inputs
def test_output_matches_hparams_structure_dtype_and_device():
    problem = Ridge.make()
    hparams = problem.hparams()
    grads, _ = run(problem, bilevel.Neumann(steps=3, alpha=0.1))
    assert grads.keys() == hparams.keys() and grads["decay"].keys() == hparams["decay"].keys()
    for key in ("a", "b"):
        g, h = grads["decay"][key], hparams["decay"][key]
        assert g.shape == h.shape and g.dtype == h.dtype and g.device == h.device
        assert not g.requires_grad


def test_float32_inputs_give_float32_grads_close_to_float64():
    problem = Logistic.make()
    ref, _ = run(problem, bilevel.ConjugateGradient(maxiter=50))
    p32 = {"w": problem.w_star().float()}
    h32 = {"log_l2": problem.lam.float()}
    batch32 = (problem.X.float(), problem.y.float())
    val32 = (problem.Xv.float(), problem.yv.float())
    grads, info = bilevel.hypergradient(
        problem.train_loss,
        problem.val_loss,
        p32,
        h32,
        batch32,
        val32,
        strategy=bilevel.ConjugateGradient(maxiter=50, tol=1e-6),
    )
    assert grads["log_l2"].dtype == torch.float32 and info.val_loss.dtype == torch.float32
    torch.testing.assert_close(grads["log_l2"].double(), ref["log_l2"], atol=1e-5, rtol=1e-4)


def test_inputs_are_not_mutated_and_module_parameters_are_accepted():
    problem = Ridge.make()
    params = {k: torch.nn.Parameter(v.clone()) for k, v in problem.params().items()}
    hparams = problem.hparams()
    before = [t.clone() for t in (*params.values(), *hparams["decay"].values())]
    grads, _ = bilevel.hypergradient(
        problem.train_loss,
        problem.val_loss,
        params,
        hparams,
        problem.train_batch,
        problem.val_batch,
        strategy=bilevel.ConjugateGradient(maxiter=20),
    )
    after = [*params.values(), *hparams["decay"].values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in params.values())
    torch.testing.assert_close(Ridge.flat(grads), problem.hypergradient(), atol=1e-10, rtol=0)


def _args(**overrides):
    problem = Logistic.make()
    args = dict(
        train_loss=problem.train_loss,
        val_loss=problem.val_loss,
        params=problem.params(),
        hparams=problem.hparams(),
        train_batch=(problem.X, problem.y),
        val_batch=(problem.Xv, problem.yv),
        strategy=bilevel.Neumann(steps=2, alpha=0.1),
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"train_loss": lambda p, h, b: (b[0] @ p["w"]) ** 2}, ValueError, "train_loss.*scalar"),
        ({"val_loss": lambda p, h, b: b[0] @ p["w"]}, ValueError, "val_loss.*scalar"),
        ({"val_loss": lambda p, h, b: 1.0}, TypeError, "val_loss.*scalar torch.Tensor"),
        ({"train_loss": "loss"}, TypeError, "train_loss.*callable"),
        ({"hparams": {"log_l2": torch.zeros(5, dtype=torch.int64)}}, TypeError, r"hparams\['log_l2'\].*dtype.*float"),
        ({"params": {"w": torch.zeros(5, dtype=torch.int32)}}, TypeError, r"params\['w'\].*float"),
        ({"hparams": {"log_l2": [0.0] * 5}}, TypeError, r"hparams\['log_l2'\].*torch.Tensor"),
        ({"params": {"w": 3.0}}, TypeError, r"params\['w'\].*torch.Tensor"),
        ({"hparams": {}}, ValueError, "hparams.*no tensors"),
        ({"hparams": {"log_l2": torch.zeros(5, device="meta")}}, ValueError, "one device.*meta"),
        ({"strategy": "neumann"}, TypeError, "strategy.*bilevel.Neumann"),
    ],
    ids=[
        "train-not-scalar",
        "val-not-scalar",
        "val-not-tensor",
        "loss-not-callable",
        "hparams-int",
        "params-int",
        "hparams-list",
        "params-float",
        "hparams-empty",
        "devices",
        "strategy-type",
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        bilevel.hypergradient(**_args(**overrides))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: bilevel.Neumann(steps=0, alpha=0.1), r"Neumann\(steps=0\).*integer >= 1"),
        (lambda: bilevel.Neumann(steps=2.5, alpha=0.1), r"Neumann\(steps=2.5\)"),
        (lambda: bilevel.Neumann(steps=True, alpha=0.1), r"Neumann\(steps=True\)"),
        (lambda: bilevel.Neumann(steps=3, alpha=-0.1), r"Neumann\(alpha=-0.1\).*> 0.*auto"),
        (lambda: bilevel.Neumann(steps=3, alpha=float("nan")), r"Neumann\(alpha=nan\)"),
        (lambda: bilevel.Neumann(steps=3, alpha="big"), r"Neumann\(alpha='big'\)"),
        (lambda: bilevel.Neumann(steps=3, alpha="auto", power_iters=0), r"power_iters=0"),
        (lambda: bilevel.Neumann(steps=3, alpha="auto", refresh_every=0), r"refresh_every=0"),
        (lambda: bilevel.Identity(alpha=0), r"Identity\(alpha=0\)"),
        (lambda: bilevel.ConjugateGradient(maxiter=0), r"ConjugateGradient\(maxiter=0\)"),
        (lambda: bilevel.ConjugateGradient(maxiter=5, tol=-1), r"ConjugateGradient\(tol=-1\)"),
        (lambda: bilevel.ConjugateGradient(maxiter=5, damping=-1e-3), r"damping=-0.001"),
        (lambda: bilevel.ConjugateGradient(maxiter=5, damping=float("inf")), r"damping=inf"),
        (lambda: bilevel.Exact(damping=-1), r"Exact\(damping=-1\)"),
        (lambda: bilevel.Unroll(steps=0, optimizer=torchopt.sgd(0.1)), r"Unroll\(steps=0\)"),
        (lambda: bilevel.FiniteDifferenceHVP(rel_step=2.0), r"rel_step=2.0"),
    ],
)
def test_invalid_strategy_options_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: bilevel.Unroll(steps=2, optimizer=torch.optim.SGD), r"Unroll\(optimizer=.*torchopt"),
        (lambda: bilevel.Neumann(steps=2, alpha=0.1, hvp="fd"), r"Neumann\(hvp='fd'\)"),
        (lambda: bilevel.ConjugateGradient(maxiter=2, hvp=None), r"ConjugateGradient\(hvp=None\)"),
    ],
)
def test_wrong_types_in_strategies(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_strategies_are_frozen():
    strategy = bilevel.Neumann(steps=3, alpha=0.1)
    with pytest.raises(AttributeError):
        strategy.steps = 4  # type: ignore[misc]


def test_public_api_is_documented():
    for name in set(bilevel.__all__) - {"Strategy"}:  # a type alias carries no __doc__ of its own
        obj = getattr(bilevel, name)
        assert obj.__doc__ and len(obj.__doc__.strip()) > 40, name


@pytest.mark.parametrize(
    "strategy",
    [bilevel.Neumann(3, 0.2), bilevel.ConjugateGradient(5), bilevel.Exact(), bilevel.Unroll(3, torchopt.sgd(0.2))],
    ids=["neumann", "cg", "exact", "unroll"],
)
def test_works_inside_no_grad(strategy):
    """Users often evaluate in torch.no_grad(); the hypergradient must not silently change or fail."""
    problem = Ridge.make(direct=0.2)
    expected, _ = run(problem, strategy)
    with torch.no_grad():
        got, _ = run(problem, strategy)
    torch.testing.assert_close(Ridge.flat(got), Ridge.flat(expected), atol=0, rtol=0)


def test_info_grad_norm_is_the_norm_of_the_whole_hypergradient():
    problem = Ridge.make(direct=0.3)
    for strategy in (bilevel.Neumann(4, 0.3), bilevel.Unroll(2, torchopt.sgd(0.3))):
        grads, info = run(problem, strategy)
        torch.testing.assert_close(info.grad_norm, Ridge.flat(grads).norm(), atol=1e-15, rtol=1e-14)


def test_cg_residual_on_request_is_the_true_residual():
    problem = Ridge.make()
    grads, info = run(problem, bilevel.ConjugateGradient(maxiter=3, damping=0.1), residual=True)
    _, free = run(problem, bilevel.ConjugateGradient(maxiter=3, damping=0.1))
    assert info.hvps == free.hvps + 1
    # Recover x from the closed form: the hypergradient is −Mᵀx with M = diag(e^λ ⊙ w*) invertible here.
    x = torch.linalg.solve(problem.mixed().T, -Ridge.flat(grads))
    true = ((problem.hessian() + 0.1 * torch.eye(7)) @ x - problem.val_grad_w()).norm()
    torch.testing.assert_close(info.residual, true, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(free.residual, true, atol=1e-12, rtol=1e-6)  # float64: the recursion is accurate


# A parameter that enters the loss only through a sum (a shared offset): autograd hands back its
# gradient and its Hessian-vector products as expanded, stride-0 tensors, which an in-place update
# (CG's damping term, the average over micro-batches) cannot write into.
def _offset_problem():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 3, generator=g), torch.randn(40, generator=g)
    Xv, yv = torch.randn(30, 3, generator=g), torch.randn(30, generator=g)

    def train_loss(p, h, b):
        return ((b[0] @ p["w"] + p["b"].sum() - b[1]) ** 2).mean() + bilevel.weight_decay(p, {"w": h["h"]})

    def val_loss(p, h, b):
        return ((b[0] @ p["w"] + p["b"].sum() - b[1]) ** 2).mean()

    params = {"w": torch.tensor([0.3, -0.2, 0.1]), "b": torch.tensor([0.05, -0.02])}
    return train_loss, val_loss, params, {"h": torch.tensor(-1.0)}, (X, y), (Xv, yv)


def _offset_reference(damping):
    """dL_V/dh = −(∂²L_T/∂h∂w)ᵀ (H + δI)⁻¹ ∂L_V/∂w from the quadratic's matrices, written out: with
    A = [X, 1, 1] the model is A θ, H = 2AᵀA/n + diag(e^h, e^h, e^h, 0, 0) and ∂²L_T/∂h∂w = e^h (w, 0, 0)."""
    _, _, params, hparams, (X, y), (Xv, yv) = _offset_problem()
    theta = torch.cat([params["w"], params["b"]])
    A, Av = (torch.cat([M, torch.ones(len(M), 2)], 1) for M in (X, Xv))
    e = hparams["h"].exp()
    H = 2 * A.T @ A / len(y) + torch.diag(torch.cat([e.repeat(3), torch.zeros(2)])) + damping * torch.eye(5)
    grad_val = 2 * Av.T @ (Av @ theta - yv) / len(yv)
    mixed = e * torch.cat([params["w"], torch.zeros(2)])
    # (the two offsets enter as one sum: H is singular along b₁ − b₂ without damping, a direction that
    # ∂L_V/∂w and the mixed term have no part in, so the pseudo-inverse gives the limit of the series)
    return -(mixed @ torch.linalg.pinv(H) @ grad_val)


@pytest.mark.parametrize("micro", [False, True])
@pytest.mark.parametrize(
    "strategy",
    [bilevel.ConjugateGradient(maxiter=50, tol=1e-12, damping=0.5), bilevel.Exact(damping=0.5),
     bilevel.Neumann(steps=400, alpha=0.1),
     bilevel.ConjugateGradient(maxiter=50, tol=1e-12, damping=0.5, hvp=bilevel.ForwardOverReverseHVP()),
     bilevel.ConjugateGradient(maxiter=50, tol=1e-12, damping=0.5, hvp=bilevel.FiniteDifferenceHVP())],
    ids=["cg", "exact", "neumann", "cg-forward-over-reverse", "cg-finite-differences"],
)
def test_a_parameter_used_through_a_sum_works_with_damping_and_micro_batches(strategy, micro):
    train_loss, val_loss, params, hparams, train, val = _offset_problem()
    if micro:  # two halves, equal weights: the same mean
        train = bilevel.MicroBatches([(train[0][:20], train[1][:20]), (train[0][20:], train[1][20:])])
        val = bilevel.MicroBatches([(val[0][:15], val[1][:15]), (val[0][15:], val[1][15:])])
    grads, info = bilevel.hypergradient(train_loss, val_loss, params, hparams, train, val, strategy=strategy)
    expected = _offset_reference(getattr(strategy, "damping", 0.0))
    assert info.failure is None
    assert torch.allclose(grads["h"], expected, rtol=1e-8, atol=0), (grads["h"], expected)
