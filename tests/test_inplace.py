"""The in-place inner update: torchopt's numbers bitwise, refusals and exceptions change nothing, and no
tensor handed out before a step changes after it (the optimiser writes into two private buffer sets)."""

from __future__ import annotations

import math

import optree
import pytest
import torch
import torchopt

import bilevel
from bilevel import _fused, _inplace
from bilevel._transform import Transformation
from tests.problems import roundtrip
from tests.test_reliability import ALIASES, _same_state

D = 6


def _data():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(128, D, generator=g), torch.randn(128, generator=g)
    return (X[:64], y[:64]), (X[64:], y[64:])


def train_loss(p, h, batch):  # two weight tensors: the flat layout (and so the in-place update) applies
    X, y = batch[0], batch[1]
    scale = batch[2] if len(batch) > 2 else 1.0
    pred = X @ p["w"] + p["b"].sum()
    return scale * ((pred - y) ** 2).mean() + bilevel.weight_decay(p, {"w": h["h"]})


def val_loss(p, h, batch):
    return ((batch[0] @ p["w"] + p["b"].sum() - batch[1]) ** 2).mean()


def make(inner, **kwargs):
    kwargs.setdefault("strategy", bilevel.ConjugateGradient(maxiter=5))
    params, hparams = {"w": torch.zeros(D), "b": torch.zeros(2)}, {"h": torch.full((D,), -2.0)}
    return bilevel.BilevelOptimizer(
        train_loss, val_loss, params, hparams, inner=inner, outer=torchopt.adam(0.05), inner_steps=3, seed=0, **kwargs
    )


# torchopt options the fused update reads off the chain (weight decay, maximize, eps_root), beside the aliases
OPTIONS = {
    "adam-decay": lambda: torchopt.adam(0.05, weight_decay=0.1),
    "adam-maximize-decay": lambda: torchopt.adam(0.05, maximize=True, weight_decay=0.1),
    "adam-eps-root": lambda: torchopt.adam(0.05, eps_root=1e-6),
    "adamw-decay": lambda: torchopt.adamw(0.05, weight_decay=0.3),
    "sgd-nesterov-decay": lambda: torchopt.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd-maximize": lambda: torchopt.sgd(0.05, momentum=0.5, maximize=True),
}
FACTORIES = {**ALIASES, **OPTIONS}
FUSED = ["sgd", "sgd-momentum", "sgd-nesterov", "sgd-dampening", "adam", "adamw", *OPTIONS]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_the_in_place_update_gives_torchopts_numbers_and_resumes_bitwise(name, monkeypatch):
    train, val = _data()
    fast = make(FACTORIES[name]())
    assert (fast._update.inplace.fused is not None) == (name in FUSED)
    for _ in range(5):
        fast.step(train, val)
    resumed = make(FACTORIES[name]())
    resumed.load_state_dict(roundtrip(fast.state_dict()))
    for _ in range(7):
        fast.step(train, val)
        resumed.step(train, val)
    monkeypatch.setattr(_inplace.InPlaceUpdate, "build", classmethod(lambda cls, *a: None))
    slow = make(FACTORIES[name]())  # torchopt out of place, as before the in-place path existed
    assert slow._update.inplace is None
    for _ in range(12):
        slow.step(train, val)
    assert _same_state(fast.state_dict(), slow.state_dict()), name
    assert _same_state(resumed.state_dict(), slow.state_dict()), name


def test_the_common_optimisers_take_the_in_place_path():
    taken = {name: make(factory())._update.inplace is not None for name, factory in ALIASES.items()}
    assert all(taken[name] for name in ("sgd", "sgd-momentum", "adam", "adamw", "rmsprop")), taken


def test_a_fused_update_that_differs_from_torchopt_by_one_rounding_is_not_used(monkeypatch):
    """The fused form is trusted only after it reproduces torchopt bitwise: an Adam whose b2 is off by one
    unit in the last place is caught, and the copy-then-torchopt path (still torchopt's numbers) taken."""
    real = _fused._adam
    monkeypatch.setattr(_fused, "_adam", lambda b1, b2, eps, eps_root: real(b1, math.nextafter(b2, 0), eps, eps_root))
    train, val = _data()
    opt = make(torchopt.adam(0.05))
    assert opt._update.inplace is not None and opt._update.inplace.fused is None
    monkeypatch.setattr(_inplace.InPlaceUpdate, "build", classmethod(lambda cls, *a: None))
    reference = make(torchopt.adam(0.05))
    for _ in range(4):
        opt.step(train, val)
        reference.step(train, val)
    assert _same_state(opt.state_dict(), reference.state_dict())


def test_the_fused_update_only_reads_the_gradient_and_takes_an_expanded_one():
    """autograd may hand back an expanded (stride-0) or shared gradient: it must not be written."""
    like = torch.linspace(-1.0, 1.0, 7)
    transformation = Transformation(torchopt.adam(0.1, weight_decay=0.1), optree.tree_structure((like,)), (like,))
    update = _inplace.InPlaceUpdate.build(transformation, like)
    assert update is not None and update.fused is not None
    w, state = update.adopt(like, transformation.init((like,)))
    grad = torch.full((1,), 0.5).expand(7)  # what autograd returns for the gradient of w.sum()
    new_w, new_state = update.update(grad, state, w, started=False)
    (step,), reference = transformation._update((grad.clone(),), transformation.init((like,)), (like,), False)
    assert torch.equal(grad, torch.full((7,), 0.5)) and torch.equal(new_w, like + step)
    assert _same_state({"s": new_state}, {"s": reference})


def test_an_update_that_makes_only_the_optimiser_state_infinite_is_refused():
    """g finite, g² = inf in Adam's second moment, the weights' update finite (μ̂ / √inf = 0): the guard
    screens the state too (it lives in the same buffer as the weights)."""
    train, val = _data()
    opt = make(torchopt.adam(0.1))
    for _ in range(2):
        opt.step(train, val)
    before = roundtrip(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="inner update"):
        opt.inner_step((train[0], train[1], 1e160))
    assert opt.skipped_inner_steps == 1
    assert _same_state(_without_counts(opt.state_dict()), _without_counts(before))


def test_nothing_handed_out_changes_after_later_steps():
    train, val = _data()
    opt = make(torchopt.adam(0.1))
    for _ in range(3):
        opt.step(train, val)
    params, state = opt.params, opt.state_dict()
    kept = ({k: v.clone() for k, v in params.items()}, roundtrip(state))
    result = opt.step(train, val)
    assert result.hyper is None or result.hyper.solution is None
    for _ in range(5):  # the two buffer sets are each written again
        opt.step(train, val)
    assert all(torch.equal(params[k], kept[0][k]) for k in params)
    assert _same_state(state, kept[1])
    assert not torch.equal(opt.params["w"], params["w"])  # (the run did move on)


def test_a_refused_update_changes_nothing():
    train, val = _data()
    opt = make(torchopt.adam(0.1))
    assert opt._update.inplace is not None
    for _ in range(2):
        opt.step(train, val)
    before = roundtrip(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="inner update"):
        opt.inner_step((train[0], train[1], float("inf")))  # written into the spare set, refused
    assert opt.skipped_inner_steps == 1
    after = opt.state_dict()
    assert after["steps"] == before["steps"] + 1 and int(after["skipped_inner"]) == 1  # counted, nothing else
    assert _same_state(_without_counts(after), _without_counts(before))


def test_an_exception_after_the_in_place_update_changes_nothing_and_a_retry_continues_bitwise():
    train, val = _data()
    armed = {"on": False}

    def flaky_val(p, h, b):
        if armed["on"]:
            raise KeyboardInterrupt
        return val_loss(p, h, b)

    def build():
        params, hparams = {"w": torch.zeros(D), "b": torch.zeros(2)}, {"h": torch.full((D,), -2.0)}
        return bilevel.BilevelOptimizer(train_loss, flaky_val, params, hparams, inner=torchopt.adam(0.1),
                                        outer=torchopt.adam(0.05), strategy=bilevel.ConjugateGradient(5),
                                        inner_steps=3, seed=0)

    straight, interrupted = build(), build()
    for _ in range(9):
        straight.step(train, val)
    for _ in range(2):
        interrupted.step(train, val)
    before = roundtrip(interrupted.state_dict())
    armed["on"] = True
    with pytest.raises(KeyboardInterrupt):
        interrupted.step(train, val)  # step 3: the inner update is written in place, then the hyperstep raises
    armed["on"] = False
    assert _same_state(interrupted.state_dict(), before)
    for _ in range(7):  # the retried call and the rest
        interrupted.step(train, val)
    assert _same_state(interrupted.state_dict(), straight.state_dict())


def _without_counts(state):
    return {k: v for k, v in state.items() if k not in ("steps", "skipped_inner", "skipped_inner_warned")}
