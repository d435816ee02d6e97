"""The user's own loop: common hyperparameters in one line, readable info, per-group rates, honest defaults."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
import torchopt

import bilevel
from tests.problems import roundtrip


def _tree(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"conv": torch.randn(4, 3, 3, generator=g), "bias": torch.zeros(4), "head": torch.randn(2, 4, generator=g)}


# ----------------------------------------------------------------------------- weight decay


def test_weight_decay_equals_the_hand_written_sum_per_tensor_per_weight_and_for_a_subset():
    params = _tree()
    per_tensor = {k: torch.tensor(0.3 * i - 1) for i, k in enumerate(params)}
    per_weight = {k: torch.linspace(-2, 1, v.numel()).view_as(v) for k, v in params.items()}
    for log_decay in (per_tensor, per_weight, {"conv": per_tensor["conv"], "head": per_weight["head"]}):
        by_hand = 0.5 * sum((log_decay[k].exp() * params[k] ** 2).sum() for k in log_decay)
        assert abs(float(bilevel.weight_decay(params, log_decay)) - float(by_hand)) < 1e-12


def test_weight_decay_gradient_is_torch_optims_decay_term():
    """torch.optim's (coupled) weight_decay=wd adds wd·w to the gradient: the same SGD step as adding
    bilevel.weight_decay(params, log wd) to the loss."""
    params, wd = _tree(), 3e-2
    X = torch.randn(5, 4)

    def data_loss(p):
        return ((X @ p["head"].T) ** 2).mean() + (p["conv"].sum() + p["bias"].sum()) ** 2

    torch_params = [v.clone().requires_grad_() for v in params.values()]
    sgd = torch.optim.SGD(torch_params, lr=0.1, weight_decay=wd)
    data_loss(dict(zip(params, torch_params))).backward()
    sgd.step()
    ours = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss = data_loss(ours) + bilevel.weight_decay(ours, bilevel.log_decay_like(ours, wd))
    grads = torch.autograd.grad(loss, list(ours.values()))
    stepped = [v.detach() - 0.1 * g for v, g in zip(ours.values(), grads)]
    assert all(torch.allclose(a.detach(), b, rtol=0, atol=1e-15) for a, b in zip(torch_params, stepped))


def test_weight_decay_second_derivatives_are_exact_also_at_zero_weights():
    """H v = e^λ ⊙ v and the mixed product (∂²R/∂w∂λ)ᵀx = e^λ ⊙ w ⊙ x (summed per tensor for one decay per
    tensor), in every HVP mode; the zero bias is where a norm-based shortcut would go wrong."""
    params = _tree()
    log_decay = {"conv": torch.tensor(-1.0), "bias": torch.tensor(0.5), "head": torch.randn(2, 4)}
    v = {k: torch.randn_like(t) for k, t in params.items()}
    scale = {k: log_decay[k].exp() for k in params}
    w = {k: t.clone().requires_grad_() for k, t in params.items()}
    lam = {k: t.clone().requires_grad_() for k, t in log_decay.items()}
    g = torch.autograd.grad(bilevel.weight_decay(w, lam), list(w.values()), create_graph=True)
    hv = torch.autograd.grad(g, list(w.values()), list(v.values()), retain_graph=True)
    mixed = torch.autograd.grad(g, list(lam.values()), list(v.values()))
    for (k, t), a, m in zip(params.items(), hv, mixed):
        assert torch.allclose(a, scale[k] * v[k], rtol=0, atol=1e-14)
        expected = scale[k] * t * v[k]
        assert torch.allclose(m, expected if log_decay[k].ndim else expected.sum(), rtol=0, atol=1e-14)
    fo = torch.func.jvp(lambda ww: torch.func.grad(bilevel.weight_decay)(ww, log_decay), (params,), (v,))[1]
    assert all(torch.allclose(fo[k], scale[k] * v[k], rtol=0, atol=1e-14) for k in params)


def test_log_decay_like_and_bad_input():
    params = _tree()
    h = bilevel.log_decay_like(params, 1e-4, per="weight", keys=["conv"])
    assert list(h) == ["conv"] and h["conv"].shape == params["conv"].shape
    assert torch.allclose(h["conv"].exp(), torch.full_like(params["conv"], 1e-4))
    with pytest.raises(ValueError, match=r"`weight_decay=0`: must be a finite number > 0"):
        bilevel.log_decay_like(params, 0)
    with pytest.raises(ValueError, match=r"`keys`: \['nope'\] are not keys"):
        bilevel.log_decay_like(params, 1e-4, keys=["nope"])
    with pytest.raises(ValueError, match=r"`per='layer'`"):
        bilevel.log_decay_like(params, 1e-4, per="layer")
    with pytest.raises(ValueError, match=r"`log_decay` leaf 0 has shape \(3,\); it must be 0-dim .* or \(4,\)"):
        bilevel.weight_decay({"b": torch.zeros(4)}, {"b": torch.zeros(3)})


def test_weighted_mean_is_the_hypercleaning_normalisation():
    losses, logits = torch.tensor([1.0, 2.0, 6.0]), torch.tensor([0.0, 2.0, -2.0])
    weights = torch.sigmoid(logits)
    by_hand = float((weights * losses).sum() / weights.sum())
    assert float(bilevel.weighted_mean(losses, logits)) == pytest.approx(by_hand)
    assert float(bilevel.weighted_mean(losses, logits + 100.0)) == pytest.approx(3.0)  # all weights → 1
    with pytest.raises(ValueError, match=r"`logits` must be a tensor shaped like `losses` \(3,\)"):
        bilevel.weighted_mean(losses, torch.zeros(2))


# ------------------------------------------------------------------------------------- info


def _ridge(n: int = 60, d: int = 6, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * n, d, generator=g, dtype=dtype)
    y = X @ torch.randn(d, generator=g, dtype=dtype) + 0.1 * torch.randn(2 * n, generator=g, dtype=dtype)

    def train_loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean() + bilevel.weight_decay(p, h)

    def val_loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    hparams = {"w": torch.full((d,), -2.0, dtype=dtype)}
    H = 2 * X[:n].T @ X[:n] / n + torch.diag(hparams["w"].exp())
    w_star = torch.linalg.solve(H, 2 * X[:n].T @ y[:n] / n)
    return train_loss, val_loss, {"w": w_star}, hparams, (X[:n], y[:n]), (X[n:], y[n:])


def test_info_logs_as_plain_numbers_and_prints_short_for_a_million_weights():
    problem = _ridge()
    _, info = bilevel.hypergradient(*problem, strategy=bilevel.ConjugateGradient(maxiter=10))
    plain = info.to_dict()
    assert not any(isinstance(v, torch.Tensor) for v in plain.values()) and "solution" not in plain
    json.dumps(plain)  # a log line
    assert plain["strategy"] == "cg" and plain["converged"] is True and plain["relative_residual"] < 1e-10
    big = {"w": torch.zeros(1_000_000)}

    def loss(p, h, b):
        return (p["w"] ** 2).sum() * h["l"].exp() + p["w"].sum()

    _, big_info = bilevel.hypergradient(loss, loss, big, {"l": torch.zeros(())}, None, None, bilevel.Neumann(3, 0.1))
    text = repr(big_info)
    assert len(text) < 300 and "solution=<1,000,000 values>" in text and "tensor(" not in text


def test_warm_started_says_whether_the_start_was_used():
    problem = _ridge()
    _, cold = bilevel.hypergradient(*problem, strategy=bilevel.ConjugateGradient(maxiter=3))
    assert cold.warm_started is None
    good, bad = cold.solution, {"w": 1e6 * torch.ones(6, dtype=torch.float64)}  # bad: residual far above ‖b‖
    for strategy in (bilevel.ConjugateGradient(maxiter=3), bilevel.Neumann(steps=3, alpha=0.1)):
        _, kept = bilevel.hypergradient(*problem, strategy=strategy, init=good)
        _, dropped = bilevel.hypergradient(*problem, strategy=strategy, init=bad)
        assert bool(kept.warm_started) is True and bool(dropped.warm_started) is False, strategy


def test_float32_cg_converges_with_default_arguments():
    problem = _ridge(dtype=torch.float32)
    _, info = bilevel.hypergradient(*problem, strategy=bilevel.ConjugateGradient(maxiter=50))
    assert info.converged and float(info.relative_residual) <= 100 * torch.finfo(torch.float32).eps
    assert bilevel.ConjugateGradient(maxiter=5).tolerance(torch.float64) == 1e-10


def test_reused_alpha_reports_where_it_came_from():
    problem = _ridge()
    opt = bilevel.BilevelOptimizer(*problem[:4], inner=torchopt.sgd(0.01), inner_steps=1, seed=0)
    sources = [opt.step(*problem[4:]).hyper for _ in range(3)]
    assert [i.alpha_source for i in sources] == ["estimated", "reused", "reused"]
    assert all(i.lambda_max == pytest.approx(1 / i.alpha) and not i.redone for i in sources)
    assert sources[0].power_hvps == 20 and sources[1].power_hvps == 0
    assert all(i.solution is None for i in sources)  # the optimiser's records keep no params-sized tensor


def test_defaults_are_the_documented_ones_and_read_well():
    signature = inspect.signature(bilevel.BilevelOptimizer)
    assert all(signature.parameters[k].default is None for k in ("inner", "outer", "strategy"))
    problem = _ridge()
    opt = bilevel.BilevelOptimizer(*problem[:4])
    assert opt.strategy == bilevel.Neumann(steps=5, alpha="auto")
    assert inspect.signature(bilevel.hypergradient).parameters["strategy"].default is None


# --------------------------------------------------------------------------- per-group rates


def _two_groups():
    """Ridge with a decay per weight and one weight per example: two hyperparameter groups."""
    g = torch.Generator().manual_seed(1)
    n, d = 40, 5
    X, y = torch.randn(2 * n, d, generator=g), torch.randn(2 * n, generator=g)

    def train_loss(p, h, b):
        losses = (b[0] @ p["w"] - b[1]) ** 2
        return bilevel.weighted_mean(losses, h["example_logits"]) + bilevel.weight_decay(p, {"w": h["decay"]})

    def val_loss(p, h, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    hparams = {"decay": torch.full((d,), -2.0), "example_logits": torch.zeros(n)}
    return train_loss, val_loss, {"w": torch.zeros(d)}, hparams, (X[:n], y[:n]), (X[n:], y[n:])


def test_a_dict_of_outer_optimisers_equals_each_group_with_its_own_and_resumes_bitwise():
    train_loss, val_loss, params, hparams, train, val = _two_groups()
    groups = {"decay": torchopt.adam(0.05), "example_logits": torchopt.sgd(0.5, momentum=0.9)}
    strategy, inner = bilevel.ConjugateGradient(maxiter=10), torchopt.sgd(0.1)

    def make():
        return bilevel.BilevelOptimizer(train_loss, val_loss, params, hparams, inner=inner, outer=groups,
                                        strategy=strategy, inner_steps=3, seed=0)

    opt = make()
    # by hand: the same inner SGD steps, then each group's own torchopt optimiser on its hypergradient
    w, h = dict(params), dict(hparams)
    states = {k: t.init(h[k]) for k, t in groups.items()}
    for step in range(1, 13):
        opt.step(train, val)
        grad = torch.func.grad(train_loss)(w, h, train)
        w = {"w": w["w"] - 0.1 * grad["w"]}
        if step % 3 == 0:
            hyper, _ = bilevel.hypergradient(train_loss, val_loss, w, h, train, val, strategy)
            for k, t in groups.items():
                update, states[k] = t.update(hyper[k], states[k], params=h[k], inplace=False)
                h[k] = h[k] + update
    assert all(torch.allclose(opt.hparams[k], h[k], rtol=0, atol=1e-6) for k in h)
    assert not torch.equal(opt.hparams["example_logits"], hparams["example_logits"])
    # resume mid-run
    straight, first = make(), make()
    for _ in range(7):
        straight.step(train, val)
        first.step(train, val)
    resumed = make()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    for _ in range(8):
        straight.step(train, val)
        resumed.step(train, val)
    assert all(torch.equal(straight.hparams[k], resumed.hparams[k]) for k in hparams)


def test_a_dict_of_optimisers_must_cover_the_keys():
    train_loss, val_loss, params, hparams, _, _ = _two_groups()
    with pytest.raises(ValueError, match=r"`outer`: a dict of optimisers .* for \['decay'\], the tree has"):
        bilevel.BilevelOptimizer(train_loss, val_loss, params, hparams, outer={"decay": torchopt.adam(0.1)})
    with pytest.raises(TypeError, match=r"`outer`: a dict of optimisers .* the entries \['decay'\] are not"):
        bilevel.BilevelOptimizer(train_loss, val_loss, params, hparams, outer={"decay": 0.1})
    inner = bilevel.BilevelOptimizer(train_loss, val_loss, params, hparams, inner={"w": torchopt.sgd(0.1)})
    assert inner.inner.flat is None  # per-group optimisers keep the per-leaf layout


def test_a_mini_batch_of_example_weights_reaches_only_its_examples():
    """Indices ride in the batch; a hyperstep changes the logits of the examples it saw and no other."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 3, generator=g), torch.randn(40, generator=g)

    def train_loss(p, h, b):
        idx, xb, yb = b
        return bilevel.weighted_mean((xb @ p["w"] - yb) ** 2, h["logits"][idx]) + 0.5 * (p["w"] ** 2).sum()

    def val_loss(p, h, b):
        return ((b[1] @ p["w"] - b[2]) ** 2).mean()

    opt = bilevel.BilevelOptimizer(train_loss, val_loss, {"w": torch.zeros(3)}, {"logits": torch.zeros(30)},
                                   inner=torchopt.sgd(0.1), outer=torchopt.sgd(1.0),
                                   strategy=bilevel.ConjugateGradient(5), inner_steps=1)
    idx = torch.arange(10, 20)
    opt.step((idx, X[idx], y[idx]), (None, X[30:], y[30:]))
    moved = (opt.hparams["logits"] != 0).nonzero().flatten()
    assert set(moved.tolist()) <= set(idx.tolist()) and len(moved) > 0
    assert math.isfinite(float(opt.hparams["logits"].sum()))



def test_the_fused_per_tensor_decay_passes_pytorchs_derivative_checks():
    """The one-node decay (a custom autograd.Function) against finite differences: gradcheck (first
    derivatives, forward mode included), gradgradcheck (second), at a zero tensor too; batched double
    backward (Nyström's products) equals single products; torch.func.vmap over it works."""
    from bilevel._hyperparams import _PerTensorDecay

    g = torch.Generator().manual_seed(0)
    lam = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    w = [torch.randn(2, 3, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
         torch.randn(5, generator=g, dtype=torch.float64)]  # fmt: skip
    w = [t.requires_grad_() for t in w]
    assert torch.autograd.gradcheck(_PerTensorDecay.apply, (lam, *w), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(_PerTensorDecay.apply, (lam, *w))
    grads = torch.autograd.grad(_PerTensorDecay.apply(lam, *w), w, create_graph=True)
    vs = [torch.randn(4, *t.shape, generator=g, dtype=torch.float64) for t in w]
    batched = torch.autograd.grad(grads, w, vs, retain_graph=True, is_grads_batched=True)
    for k in range(4):
        single = torch.autograd.grad(grads, w, [v[k] for v in vs], retain_graph=True)
        assert all(torch.allclose(b[k], s, rtol=0, atol=1e-14) for b, s in zip(batched, single))
    rows = torch.randn(6, 4, generator=g, dtype=torch.float64)
    per_row = torch.func.vmap(lambda r: _PerTensorDecay.apply(lam.detach(), r, w[1].detach(), w[2].detach()))(rows)
    expected = 0.5 * lam.detach().exp()[0] * (rows**2).sum(1) + 0.5 * lam.detach().exp()[2] * (w[2].detach() ** 2).sum()
    assert torch.allclose(per_row, expected, rtol=1e-14, atol=0)
