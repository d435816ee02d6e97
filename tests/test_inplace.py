"""The in-place inner update: torchopt's numbers bitwise, refusals and exceptions change nothing, and no
tensor handed out before a step changes after it (the optimiser writes into two private buffer sets)."""

from __future__ import annotations

import pytest
import torch
import torchopt

import bilevel
from bilevel import _inplace
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


@pytest.mark.parametrize("name", list(ALIASES))
def test_the_in_place_update_gives_torchopts_numbers_and_resumes_bitwise(name, monkeypatch):
    train, val = _data()
    fast = make(ALIASES[name]())
    for _ in range(5):
        fast.step(train, val)
    resumed = make(ALIASES[name]())
    resumed.load_state_dict(roundtrip(fast.state_dict()))
    for _ in range(7):
        fast.step(train, val)
        resumed.step(train, val)
    monkeypatch.setattr(_inplace.InPlaceUpdate, "matches", staticmethod(lambda *a: False))
    slow = make(ALIASES[name]())  # torchopt out of place, as before the in-place path existed
    assert slow._update.inplace is None
    for _ in range(12):
        slow.step(train, val)
    assert _same_state(fast.state_dict(), slow.state_dict()), name
    assert _same_state(resumed.state_dict(), slow.state_dict()), name


def test_the_common_optimisers_take_the_in_place_path():
    taken = {name: make(factory())._update.inplace is not None for name, factory in ALIASES.items()}
    assert all(taken[name] for name in ("sgd", "sgd-momentum", "adam", "adamw", "rmsprop")), taken


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
