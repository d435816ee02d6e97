"""Right on every model users bring: normalisation layers, attention, custom buffers, containers.

Every number compared here is checked against truth from outside the code under test: dense
double-backward matrices on flattened vectors, themselves checked against finite differences
(tests/model_truth.py); never ``torch.func.hessian`` / ``jacfwd(jacrev)`` through a norm layer.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from tests.model_truth import dense_truth, flatten, relative_error, unflatten


class FunctionalLayerNorm(nn.Module):
    """A plain ``F.layer_norm`` call with an affine weight, as custom transformer blocks write it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(width))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight)


def _per_channel(norm: nn.Module) -> nn.Module:
    """Linear(3, 8) → (N, 4, 2) → norm → flat: instance norm needs a length dimension."""
    return nn.Sequential(nn.Linear(3, 8), nn.Unflatten(1, (4, 2)), norm, nn.Flatten(), nn.Tanh(), nn.Linear(8, 1))


def _squared_error(out, target):
    """F.mse_loss written out: torch 2.13's forward-over-reverse fails through F.mse_loss itself (tested below)."""
    return ((out - target) ** 2).mean()


NORMS = {
    "batch_norm": lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)),
    "layer_norm": lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 1)),
    "F.layer_norm": lambda: nn.Sequential(nn.Linear(3, 4), FunctionalLayerNorm(4), nn.Tanh(), nn.Linear(4, 1)),
    "group_norm": lambda: nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Tanh(), nn.Linear(4, 1)),
    "instance_norm_affine": lambda: _per_channel(nn.InstanceNorm1d(4, affine=True)),
    "instance_norm": lambda: _per_channel(nn.InstanceNorm1d(4)),
}


def _norm_problem(kind: str):
    """A trainable Linear before the norm layer (the case nested transforms get wrong), one log weight
    decay per weight; train loss in train mode, validation loss in eval mode."""
    torch.manual_seed(0)
    net = NORMS[kind]()
    with torch.no_grad():  # running statistics away from their initial 0 / 1, so eval mode differs
        net(torch.randn(32, 3))
    fm = bilevel.FunctionalModule(net)
    X, y = torch.randn(40, 3), torch.randn(40)
    train, val = (X[:24], y[:24]), (X[24:], y[24:])

    def train_loss(params, hparams, batch, state):
        out, state = fm(params, state, batch[0])
        decay = sum((hparams[k].exp() * params[k] ** 2).sum() for k in params)
        return _squared_error(out.squeeze(1), batch[1]) + 0.5 * decay, state

    def val_loss(params, hparams, batch, state):
        out, state = fm(params, state, batch[0], train=False)
        return _squared_error(out.squeeze(1), batch[1]), state

    hparams = {k: torch.full_like(v, -2.0) + 0.1 * torch.randn_like(v) for k, v in fm.params.items()}

    def flat(loss, batch):
        return lambda w, h: loss(unflatten(w, fm.params), unflatten(h, hparams), batch, fm.state)[0]

    truth = dense_truth(flat(train_loss, train), flat(val_loss, val), flatten(fm.params), flatten(hparams))
    return (train_loss, val_loss, fm.params, hparams, train, val), fm.state, truth


HVPS = {
    "reverse": (bilevel.ReverseHVP(), 1e-9),
    "forward": (bilevel.ForwardOverReverseHVP(), 1e-9),
    "finite_difference": (bilevel.FiniteDifferenceHVP(), 1e-5),
}


@pytest.fixture(scope="module", params=list(NORMS))
def norm_case(request):
    with torch.random.fork_rng():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            yield request.param, *_norm_problem(request.param)
        finally:
            torch.set_default_dtype(previous)


def _damping(truth) -> float:
    """Enough damping that H + δI is positive definite (CG converges) at this random point."""
    return max(0.5, 1.5 * -float(torch.linalg.eigvalsh(truth.H)[0]))


def test_exact_is_right_through_every_norm_layer(norm_case):
    kind, problem, state, truth = norm_case
    damping = _damping(truth)
    grads, info = _quietly(problem, bilevel.Exact(damping=damping), state)
    assert relative_error(flatten(grads), truth.hypergradient(damping)) < 1e-10, kind
    assert info.hvps == len(truth.H)  # one product per column
    assert any("batched" in note for note in info.notes) == (kind == "group_norm")


@pytest.mark.parametrize("hvp", list(HVPS))
@pytest.mark.parametrize("solver", ["cg", "nystrom", "neumann"])
def test_every_solver_and_hvp_mode_is_right_through_every_norm_layer(norm_case, solver, hvp):
    kind, problem, state, truth = norm_case
    mode, tol = HVPS[hvp]
    damping = _damping(truth)
    size = len(truth.H)
    if solver == "cg":
        strategy = bilevel.ConjugateGradient(maxiter=10 * size, tol=1e-13, damping=damping, hvp=mode)
        expected = truth.hypergradient(damping)
    elif solver == "nystrom":  # every column: the Nyström approximation is H itself
        strategy = bilevel.Nystrom(rank=size, damping=damping, hvp=mode)
        expected = truth.hypergradient(damping)
    else:
        alpha = 0.5 / float(torch.linalg.eigvalsh(truth.H).abs().max())
        strategy = bilevel.Neumann(steps=6, alpha=alpha, hvp=mode)
        expected = truth.neumann(6, alpha)
    grads, info = _quietly(problem, strategy, state)
    assert relative_error(flatten(grads), expected) < tol, (kind, solver, hvp)
    # PyTorch has no batching rule for group_norm's double backward: Nyström's one batched call of
    # products falls back to single ones, and says so.
    fell_back = kind == "group_norm" and solver == "nystrom" and hvp == "reverse"
    assert any("batched" in note for note in info.notes) == fell_back


def _quietly(problem, strategy, state):
    """The hypergradient, checking that every warning it issued is one of its ``info.notes``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads, info = bilevel.hypergradient(*problem, strategy=strategy, state=state, seed=0)
    ours = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert ours == [f"hypergradient: {note}" for note in info.notes]
    return grads, info


# ------------------------------------------------------------------------------ attention


def _transformer_problem():
    """A causal TransformerEncoderLayer (attention through F.scaled_dot_product_attention, LayerNorm)."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, activation="gelu", batch_first=True)
    fm = bilevel.FunctionalModule(layer)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    X, Y = torch.randn(6, 5, 8), torch.randn(6, 5, 8)
    train, val = (X[:4], Y[:4]), (X[4:], Y[4:])

    def train_loss(params, hparams, batch, state):
        out, state = fm(params, state, batch[0], src_mask=mask, is_causal=True)
        decay = sum((hparams[k].exp() * params[k] ** 2).sum() for k in params)
        return _squared_error(out, batch[1]) + 0.5 * decay, state

    def val_loss(params, hparams, batch, state):
        out, state = fm(params, state, batch[0], src_mask=mask, is_causal=True, train=False)
        return _squared_error(out, batch[1]), state

    hparams = {k: torch.full((), -1.0) for k in fm.params}  # one decay per tensor

    def flat(loss, batch):
        def f(w, h):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]):  # the truth needs double backward through attention too
                return loss(unflatten(w, fm.params), unflatten(h, hparams), batch, fm.state)[0]

        return f

    truth = dense_truth(flat(train_loss, train), flat(val_loss, val), flatten(fm.params), flatten(hparams))
    return (train_loss, val_loss, fm.params, hparams, train, val), fm.state, truth


def test_a_transformer_layer_works_with_every_second_order_strategy():
    """On CPU the fused attention kernel has no double backward and no forward-mode derivative; the
    library evaluates second-order products with the math kernel, which has both."""
    problem, state, truth = _transformer_problem()
    damping = _damping(truth)
    for strategy, tol in [
        (bilevel.Exact(damping=damping), 1e-10),
        (bilevel.ConjugateGradient(maxiter=2000, tol=1e-13, damping=damping), 1e-9),
        (
            bilevel.ConjugateGradient(maxiter=2000, tol=1e-13, damping=damping, hvp=bilevel.ForwardOverReverseHVP()),
            1e-9,
        ),
    ]:
        grads, _ = _quietly(problem, strategy, state)
        assert relative_error(flatten(grads), truth.hypergradient(damping)) < tol, strategy
    alpha = 0.5 / float(torch.linalg.eigvalsh(truth.H).abs().max())
    grads, _ = _quietly(problem, bilevel.Neumann(steps=4, alpha=alpha), state)
    assert relative_error(flatten(grads), truth.neumann(4, alpha)) < 1e-10


def test_unroll_through_a_transformer_layer_equals_finite_differences():
    import torchopt

    problem, state, _ = _transformer_problem()
    train_loss, val_loss, params, hparams, train, val = problem
    strategy = bilevel.Unroll(steps=2, optimizer=torchopt.sgd(0.1))
    grads, _ = bilevel.hypergradient(*problem, strategy=strategy, state=state, seed=0)

    def unrolled(h_flat: torch.Tensor) -> torch.Tensor:  # two SGD steps by hand, then L_V
        h = unflatten(h_flat, hparams)
        w = {k: v.clone().requires_grad_() for k, v in params.items()}
        for _ in range(2):
            g = torch.autograd.grad(train_loss(w, h, train, state)[0], list(w.values()))
            w = {k: (v - 0.1 * gi).detach().requires_grad_() for (k, v), gi in zip(w.items(), g)}
        return val_loss(w, h, val, state)[0].detach()

    h0, step = flatten(hparams), 1e-5
    fd = torch.stack([(unrolled(h0 + step * e) - unrolled(h0 - step * e)) / (2 * step) for e in torch.eye(len(h0))])
    assert relative_error(flatten(grads), fd) < 1e-7


# ------------------------------------------------------------------------- FunctionalModule


class EMA(nn.Module):
    """Custom buffers updated by reassignment, the common idiom (not in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("ema", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        out = self.linear(x)
        if self.training:
            self.ema = 0.9 * self.ema + 0.1 * out.detach().mean(0)
            self.count = self.count + 1
        return out - self.ema


def test_buffers_updated_by_reassignment_come_back_in_new_state():
    torch.manual_seed(0)
    net = EMA()
    fm = bilevel.FunctionalModule(net)
    reference = EMA()
    reference.load_state_dict(net.state_dict())  # the module's own forward, run on a copy, is the truth
    X = torch.randn(5, 8, 3)
    state = fm.state
    for x in X:
        _, state = fm(fm.params, state, x)
        reference(x)
    assert int(state["count"]) == 5 and torch.equal(state["ema"], reference.ema)
    out, same = fm(fm.params, state, X[0], train=False)  # eval mode sees the updated statistics
    assert same is state and torch.equal(out, reference.eval()(X[0]))
    assert int(net.count) == 0 and not net.ema.any()  # the wrapped module is untouched


def test_an_optimiser_carries_reassigned_buffers_through_inner_steps_only():
    import torchopt

    torch.manual_seed(0)
    fm = bilevel.FunctionalModule(EMA())
    X, y = torch.randn(32, 3), torch.randn(32, 2)

    def train_loss(p, h, batch, state):
        out, state = fm(p, state, batch[0])
        return ((out - batch[1]) ** 2).mean() + (h["log_decay"].exp() * p["linear.weight"] ** 2).sum(), state

    def val_loss(p, h, batch, state):
        out, state = fm(p, state, batch[0], train=False)
        return ((out - batch[1]) ** 2).mean(), state

    opt = bilevel.BilevelOptimizer(
        train_loss,
        val_loss,
        fm.params,
        {"log_decay": torch.zeros(())},
        state=fm.state,
        inner=torchopt.sgd(0.1),
        strategy=bilevel.ConjugateGradient(maxiter=5, damping=1.0),
        inner_steps=3,
        seed=0,
    )
    for _ in range(6):
        opt.step((X[:16], y[:16]), (X[16:], y[16:]))
    assert int(opt.state["count"]) == 6 and opt.state["ema"].abs().sum() > 0


def test_embedding_max_norm_is_refused_and_in_place_weight_writes_are_caught():
    with pytest.raises(ValueError, match=r"`emb` is Embedding\(max_norm=1.0\).*max_norm=None"):
        bilevel.FunctionalModule(nn.ModuleDict({"emb": nn.Embedding(10, 4, max_norm=1.0)}))
    table = torch.randn(10, 4) * 3
    params, before = {"table": table}, table.clone()

    def renormalising(p, h, batch):  # what Embedding(max_norm=...) does inside forward, by hand
        with torch.no_grad():
            torch.embedding_renorm_(p["table"], batch, 1.0, 2.0)
        return (F.embedding(batch, p["table"]) ** 2).sum() + (h["l"].exp() * p["table"] ** 2).sum()

    idx = torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match=r"_loss` changed its inputs in place.*max_norm"):
        bilevel.hypergradient(renormalising, renormalising, params, {"l": torch.zeros(())}, idx, idx)
    assert torch.equal(table, before)  # the caller's tensor is never written: the library works on copies


def test_frozen_parameters_follow_the_module_and_conversions_are_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[0].requires_grad_(False)
    fm = bilevel.FunctionalModule(net)
    x = torch.randn(5, 3)
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net.load_state_dict(other.state_dict())  # frozen weights are read from the module at every call ...
    out, _ = fm(fm.params, fm.state, x)
    expected = F.linear(F.linear(x, other[0].weight, other[0].bias), fm.params["1.weight"], fm.params["1.bias"])
    assert torch.allclose(out, expected, rtol=0, atol=1e-15)  # ... the trainable ones are fm.params
    net.float()  # (the tests run in float64)
    with pytest.raises(ValueError, match=r"frozen parameter '0.weight' is now torch.float32.*build FunctionalModule"):
        fm(fm.params, fm.state, x)


# ------------------------------------------------------------------------------ containers


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor


class Encoding(collections.UserDict):
    """Like transformers' BatchEncoding: a UserDict with extra attributes."""

    def __init__(self, data):
        super().__init__(data)
        self.n_sequences = 1


class Holder:
    def __init__(self, x, y):
        self.x, self.y = x, y


CONTAINERS = {
    "dataclass": (lambda x, y: Batch(x, y), lambda b: (b.inputs, b.targets)),
    "UserDict": (lambda x, y: Encoding({"x": x, "y": y}), lambda b: (b["x"], b["y"])),
    "object": (lambda x, y: Holder(x, y), lambda b: (b.x, b.y)),
}


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_unroll_records_private_copies_of_any_batch_container(container):
    """A loader that refills one batch object in place must not change the steps Unroll replays."""
    import torchopt

    make, read = CONTAINERS[container]
    torch.manual_seed(0)
    X, y = torch.randn(4, 16, 3), torch.randn(4, 16)

    def train_loss(p, h, batch):
        inputs, targets = read(batch)
        return ((inputs @ p["w"] - targets) ** 2).mean() + (h["log_decay"].exp() * p["w"] ** 2).sum()

    def val_loss(p, h, batch):
        inputs, targets = read(batch)
        return ((inputs @ p["w"] - targets) ** 2).mean()

    def run(refill: bool):
        opt = bilevel.BilevelOptimizer(
            train_loss,
            val_loss,
            {"w": torch.zeros(3)},
            {"log_decay": torch.zeros(3)},
            inner=torchopt.sgd(0.1),
            strategy=bilevel.Unroll(steps=3),
            inner_steps=3,
            seed=0,
        )
        buffer = make(X[0].clone(), y[0].clone())
        for k in range(3):
            if refill:  # the same object, refilled in place
                tensors = read(buffer)
                tensors[0].copy_(X[k]), tensors[1].copy_(y[k])
                batch = buffer
            else:
                batch = make(X[k].clone(), y[k].clone())
            result = opt.step(batch, make(X[3], y[3]))
        return result.hyper.grad_norm, opt.hparams["log_decay"]

    fresh, refilled = run(False), run(True)
    assert torch.equal(fresh[0], refilled[0]) and torch.equal(fresh[1], refilled[1])


def test_batch_copies_reach_every_tensor():
    from bilevel import _tree

    batch = {
        "a": Batch(torch.ones(2), torch.zeros(2)),
        "b": Encoding({"ids": torch.arange(3)}),
        "c": Holder(1, [torch.ones(1)]),
    }
    copy = _tree.copy_batch(batch)
    originals, copies = _tree.batch_tensors(batch), _tree.batch_tensors(copy)
    assert len(originals) == len(copies) == 4
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(originals, copies))
    assert type(copy["b"]) is Encoding and copy["b"].n_sequences == 1 and copy["c"].x == 1


# ---------------------------------------------------------------------------- micro-batches


def _ridge():
    torch.manual_seed(0)
    X, y = torch.randn(50, 4), torch.randn(50)

    def train_loss(p, h, batch):
        return ((batch[0] @ p["w"] - batch[1]) ** 2).mean() + (h["log_decay"].exp() * p["w"] ** 2).sum()

    return train_loss, X, y


def test_unequal_micro_batches_are_refused_unless_weighted_and_then_equal_the_whole_batch():
    train_loss, X, y = _ridge()
    pieces = list(zip(X.split(48), y.split(48)))  # 48 + 2 examples
    with pytest.raises(ValueError, match=r"micro-batch 1 has tensors of shapes \[\(2, 4\), \(2,\)\].*weights="):
        bilevel.MicroBatches(pieces)
    micro = bilevel.MicroBatches(pieces, weights=[48, 2])
    params, hparams = {"w": 0.1 * torch.randn(4)}, {"log_decay": torch.zeros(4)}
    for strategy in [bilevel.ConjugateGradient(maxiter=10), bilevel.Exact(), bilevel.Nystrom(rank=4, damping=1e-3)]:
        whole, _ = bilevel.hypergradient(train_loss, train_loss, params, hparams, (X, y), (X, y), strategy)
        split, _ = bilevel.hypergradient(train_loss, train_loss, params, hparams, micro, micro, strategy)
        assert relative_error(split["log_decay"], whole["log_decay"]) < 1e-12
    import torchopt

    runs = [
        bilevel.BilevelOptimizer(train_loss, train_loss, params, hparams, inner=torchopt.sgd(0.1), inner_steps=5)
        for _ in range(2)
    ]
    for _ in range(50):
        runs[0].step((X, y), (X, y))
        runs[1].step(micro, micro)
    assert relative_error(runs[1].params["w"], runs[0].params["w"]) < 1e-12
    with pytest.raises(ValueError, match=r"weights=\[48, -2\].*2 finite numbers > 0"):
        bilevel.MicroBatches(pieces, weights=[48, -2])


# -------------------------------------------------------------------------------- precision


def _logistic(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    n, d = 200, 10
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = (torch.rand(n, generator=g, dtype=dtype) < torch.sigmoid(X @ torch.randn(d, generator=g, dtype=dtype))).to(
        dtype
    )

    def train_loss(p, h, b):
        return F.binary_cross_entropy_with_logits(b[0] @ p["w"], b[1]) + 0.5 * (h["l"].exp() * p["w"] ** 2).sum()

    def val_loss(p, h, b):
        return F.binary_cross_entropy_with_logits(b[0] @ p["w"], b[1])

    params = {"w": 0.5 * torch.randn(d, generator=g, dtype=dtype)}
    return train_loss, val_loss, params, {"l": torch.full((d,), -2.0, dtype=dtype)}, (X, y), (X, y)


def test_finite_difference_hvps_choose_their_step_for_the_autocast_dtype():
    train_loss, val_loss, params, hparams, train, val = _logistic()
    as64 = [{k: v.double() for k, v in t.items()} for t in (params, hparams)]
    batches64 = [tuple(t.double() for t in b) for b in (train, val)]
    truth, _ = bilevel.hypergradient(train_loss, val_loss, *as64, *batches64, strategy=bilevel.Exact())
    errors = {}
    for hvp in [bilevel.ReverseHVP(), bilevel.FiniteDifferenceHVP()]:
        strategy = bilevel.ConjugateGradient(maxiter=10, tol=0.0, hvp=hvp)
        g, _ = bilevel.hypergradient(
            train_loss, val_loss, params, hparams, train, val, strategy, autocast=torch.bfloat16
        )
        errors[type(hvp).__name__] = relative_error(g["l"].double(), truth["l"])
    # bf16 itself costs the reverse mode 3e-3 here; with a step chosen for float32 finite differences were
    # 0.58 off, with the bf16 step 1.3e-2.
    assert errors["FiniteDifferenceHVP"] < 6 * errors["ReverseHVP"], errors


@pytest.mark.parametrize("damping", [1e-2, 1e-4, 1e-6])
def test_nystrom_in_float32_keeps_its_accuracy_at_small_damping(damping):
    """Dividing a near-cancellation by ρ amplified float32 round-off by 1/ρ (1.3 relative error at 1e-6)."""
    train_loss, val_loss, params, hparams, train, val = _logistic()
    size = params["w"].numel()
    as64 = [{k: v.double() for k, v in t.items()} for t in (params, hparams)]
    batches64 = [tuple(t.double() for t in b) for b in (train, val)]
    truth, _ = bilevel.hypergradient(train_loss, val_loss, *as64, *batches64, strategy=bilevel.Exact(damping=damping))
    g, _ = bilevel.hypergradient(train_loss, val_loss, params, hparams, train, val, bilevel.Nystrom(size, damping))
    assert relative_error(g["l"].double(), truth["l"]) < 1e-5


def test_nystrom_and_exact_take_params_of_mixed_dtypes():
    torch.manual_seed(0)
    X, y = torch.randn(30, 3), torch.randn(30)

    def loss(p, h, b):
        pred = b[0] @ p["a"] + (b[0].double() @ p["b"]).float()
        return ((pred - b[1]) ** 2).mean() + (h["l"].exp() * (p["a"] ** 2 + p["b"].float() ** 2)).sum()

    params = {"a": torch.randn(3, dtype=torch.float32), "b": torch.randn(3, dtype=torch.float64)}
    hparams = {"l": torch.zeros(3, dtype=torch.float32)}
    exact, _ = bilevel.hypergradient(
        loss, loss, params, hparams, (X.float(), y.float()), (X.float(), y.float()), bilevel.Exact(damping=0.1)
    )
    nystrom, _ = bilevel.hypergradient(
        loss, loss, params, hparams, (X.float(), y.float()), (X.float(), y.float()), bilevel.Nystrom(6, damping=0.1)
    )
    cg, _ = bilevel.hypergradient(
        loss,
        loss,
        params,
        hparams,
        (X.float(), y.float()),
        (X.float(), y.float()),
        bilevel.ConjugateGradient(50, tol=0.0, damping=0.1),
    )
    assert relative_error(exact["l"], cg["l"]) < 1e-5 and relative_error(nystrom["l"], cg["l"]) < 1e-5


def test_exact_runs_under_bf16_autocast_through_batch_norm():
    """It raised "expected scalar type BFloat16 but found Float" from nested forward AD; its batched
    columns must equal bf16 double backward taken one product at a time."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).float()
    fm = bilevel.FunctionalModule(net)
    X, y = torch.randn(16, 3, dtype=torch.float32), torch.randn(16, dtype=torch.float32)

    def loss(p, h, b, s):
        out, s = fm(p, s, b[0])
        return ((out.squeeze(1).float() - b[1]) ** 2).mean() + sum((h[k].exp() * p[k] ** 2).sum() for k in p), s

    hparams = {k: torch.full_like(v, -1.0) for k, v in fm.params.items()}
    got, _ = bilevel.hypergradient(
        loss,
        loss,
        fm.params,
        hparams,
        (X, y),
        (X, y),
        bilevel.Exact(damping=1.0),
        state=fm.state,
        autocast=torch.bfloat16,
        seed=0,
    )

    def flat(w, h):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss(unflatten(w, fm.params), unflatten(h, hparams), (X, y), fm.state)[0].float()

    truth = dense_truth(flat, flat, flatten(fm.params), flatten(hparams), fd_tolerance=None)
    assert relative_error(flatten(got), truth.hypergradient(1.0)) < 1e-5


# ------------------------------------------------------------------- derivatives PyTorch lacks


def test_forward_over_reverse_failures_name_the_modes_that_work():
    _, _, params, hparams, train, val = _logistic(torch.float64)
    for reduction in (F.mse_loss, F.huber_loss):

        def loss(p, h, b, reduction=reduction):
            return reduction(b[0] @ p["w"], b[1]) + (h["l"].exp() * p["w"] ** 2).sum()

        strategy = bilevel.ConjugateGradient(maxiter=3, hvp=bilevel.ForwardOverReverseHVP())
        with pytest.raises(
            RuntimeError, match=r"ForwardOverReverseHVP.*hvp=bilevel.ReverseHVP\(\).*FiniteDifferenceHVP"
        ):
            bilevel.hypergradient(loss, loss, params, hparams, train, val, strategy)
        reverse, _ = bilevel.hypergradient(
            loss, loss, params, hparams, train, val, bilevel.ConjugateGradient(maxiter=3)
        )
        assert torch.isfinite(reverse["l"]).all()


def test_compiled_losses_and_modules_say_what_works_and_finite_differences_do():
    torch.manual_seed(0)
    train_loss, val_loss, params, hparams, train, val = _logistic(torch.float64)
    compiled = torch.compile(train_loss, backend="aot_eager")  # AOTAutograd, as every compile backend uses
    cg = bilevel.ConjugateGradient(maxiter=10, tol=0.0, damping=0.1)
    with pytest.raises(RuntimeError, match=r"torch.compile'd.*FiniteDifferenceHVP"):
        bilevel.hypergradient(compiled, val_loss, params, hparams, train, val, cg)
    eager, _ = bilevel.hypergradient(train_loss, val_loss, params, hparams, train, val, cg)
    fd = dataclasses.replace(cg, hvp=bilevel.FiniteDifferenceHVP())
    through_compile, _ = bilevel.hypergradient(compiled, val_loss, params, hparams, train, val, fd)
    assert relative_error(through_compile["l"], eager["l"]) < 1e-6

    net = torch.compile(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), backend="aot_eager")
    fm = bilevel.FunctionalModule(net)
    X, y = torch.randn(16, 3), torch.randn(16)

    def module_loss(p, h, b, s):
        out, s = fm(p, s, b[0])
        return ((out.squeeze(1) - b[1]) ** 2).mean() + sum((h[k].exp() * p[k] ** 2).sum() for k in p), s

    hp = {k: torch.full((), -1.0) for k in fm.params}
    with pytest.raises(RuntimeError, match=r"torch.compile'd.*uncompiled module"):
        bilevel.hypergradient(module_loss, module_loss, fm.params, hp, (X, y), (X, y), cg, state=fm.state)
    got, _ = bilevel.hypergradient(module_loss, module_loss, fm.params, hp, (X, y), (X, y), fd, state=fm.state)
    assert torch.isfinite(flatten(got)).all()


def test_an_op_without_double_backward_names_finite_differences():
    """torch.cdist's exact (non-matmul) path, in an RBF-kernel model, has no double backward in torch 2.13."""
    torch.manual_seed(0)
    X, y, centres = torch.randn(30, 3), torch.randn(30), torch.randn(4, 3)

    def loss(p, h, b):
        features = torch.exp(-(torch.cdist(b[0], p["centres"], compute_mode="donot_use_mm_for_euclid_dist") ** 2))
        return ((features @ p["w"] - b[1]) ** 2).mean() + (h["l"].exp() * p["w"] ** 2).sum()

    params, hparams = {"centres": centres, "w": torch.randn(4)}, {"l": torch.zeros(4)}
    with pytest.raises(RuntimeError, match=r"_cdist_backward.*FiniteDifferenceHVP"):
        bilevel.hypergradient(loss, loss, params, hparams, (X, y), (X, y), bilevel.ConjugateGradient(maxiter=3))
    fd = bilevel.ConjugateGradient(maxiter=3, damping=1.0, hvp=bilevel.FiniteDifferenceHVP())
    got, _ = bilevel.hypergradient(loss, loss, params, hparams, (X, y), (X, y), fd)
    assert torch.isfinite(got["l"]).all()
