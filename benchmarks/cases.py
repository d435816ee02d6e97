"""The computations being measured, each as a zero-argument callable on a :class:`Problem`.

Ours go through bilevel's public API exactly as a user calls it. The peers are written the way
their documentation shows: torchopt's ``custom_root`` implicit differentiation with its linear
solvers, and ``higher``'s differentiable inner loop. The "physical limit" primitives are the bare
torch.func calls a hypergradient cannot avoid.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor

import bilevel
from benchmarks.problems import Problem

# torchopt 0.7.3 calls functorch's deprecated aliases; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*functorch.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)


def flat(tree: Any) -> Tensor:
    """All leaves of a dict/tuple of tensors as one vector (for comparisons only)."""
    leaves = tree.values() if isinstance(tree, dict) else tree
    return torch.cat([t.detach().reshape(-1) for t in leaves])


def rel_diff(a: Any, b: Any) -> float:
    a, b = flat(a), flat(b)
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))


def cosine(a: Any, b: Any) -> float:
    return float(F.cosine_similarity(flat(a), flat(b), dim=0))


# ------------------------------------------------------------------------------------ ours
def ours(problem: Problem, strategy: Any) -> Callable[[], Any]:
    """bilevel.hypergradient with ``strategy``; returns the hparam gradients."""

    def run() -> Any:
        grads, _ = bilevel.hypergradient(
            problem.train_loss,
            problem.val_loss,
            problem.params,
            problem.hparams,
            problem.train_batch,
            problem.val_batch,
            strategy,
        )
        return grads

    return run


# ------------------------------------------------------------------------- physical limit
class Primitives:
    """The irreducible pieces of an IFT hypergradient, each timed on its own.

    * ``grad_val``: ∇_{w,λ} L_V, one forward and backward pass;
    * ``hvp_scratch``: one HVP from nothing: linearise w ↦ ∇_w L_T and apply it once;
    * ``mixed``: one mixed product from nothing: linearise λ ↦ ∇_w L_T and apply it once;
    * ``linearise``: the linearisation of (w, λ) ↦ ∇_w L_T alone (forward + backward, graph kept);
    * ``apply``: one application of that linearisation (one double-backward pass), giving Hv and
      the mixed product together;
    * ``graph``: ∇_w L_T by ``torch.autograd.grad(create_graph=True)`` with w and λ both requiring
      grad (one forward + backward, graph kept), after which ``graph_hvp`` (only the w-cotangent
      path) and ``graph_mixed`` (only the λ path) are separate double-backward passes: autograd,
      unlike ``torch.func.vjp``, skips the inputs a product does not ask for.
    """

    def __init__(self, problem: Problem) -> None:
        self.p, self.h = problem.params, problem.hparams
        tb, vb = problem.train_batch, problem.val_batch
        self.grad_w = lambda p, h: torch.func.grad(problem.train_loss)(p, h, tb)
        self.val = lambda p, h: problem.val_loss(p, h, vb)
        self.v = {k: torch.randn_like(t) * 1e-3 for k, t in self.p.items()}
        _, self._vjp = torch.func.vjp(self.grad_w, self.p, self.h)
        self.train = lambda p, h: problem.train_loss(p, h, tb)
        self._w, self._hl, self._g = self.graph()

    def graph(self) -> tuple[list[Tensor], list[Tensor], tuple[Tensor, ...]]:
        w = [t.detach().requires_grad_() for t in self.p.values()]
        h = [t.detach().requires_grad_() for t in self.h.values()]
        with torch.enable_grad():
            loss = self.train(dict(zip(self.p, w)), dict(zip(self.h, h)))
            return w, h, torch.autograd.grad(loss, w, create_graph=True)

    def graph_hvp(self) -> Any:
        return torch.autograd.grad(self._g, self._w, list(self.v.values()), retain_graph=True)

    def graph_mixed(self) -> Any:
        return torch.autograd.grad(self._g, self._hl, list(self.v.values()), retain_graph=True)

    def grad_val(self) -> Any:
        return torch.func.grad(self.val, argnums=(0, 1))(self.p, self.h)

    def hvp_scratch(self) -> Any:
        _, vjp = torch.func.vjp(lambda p: self.grad_w(p, self.h), self.p)
        return vjp(self.v)

    def mixed(self) -> Any:
        _, vjp = torch.func.vjp(lambda h: self.grad_w(self.p, h), self.h)
        return vjp(self.v)

    def linearise(self) -> Any:
        return torch.func.vjp(self.grad_w, self.p, self.h)

    def apply(self) -> Any:
        return self._vjp(self.v)

    def fns(self) -> dict[str, Callable[[], Any]]:
        names = ("grad_val", "hvp_scratch", "mixed", "linearise", "apply", "graph", "graph_hvp", "graph_mixed")
        return {k: getattr(self, k) for k in names}

    @staticmethod
    def limits(t: dict[str, float], hvps: int) -> dict[str, float]:
        """The cost of ``hvps`` HVPs plus the mixed product plus ∇L_V, assembled three ways."""
        return {
            "scratch": t["grad_val"] + hvps * t["hvp_scratch"] + t["mixed"],
            "linearised": t["grad_val"] + t["linearise"] + (hvps + 1) * t["apply"],
            "one_graph": t["grad_val"] + t["graph"] + hvps * t["graph_hvp"] + t["graph_mixed"],
        }

    @staticmethod
    def limit(t: dict[str, float], hvps: int) -> float:
        """The issue's physical limit: min(from scratch, one linearisation)."""
        limits = Primitives.limits(t, hvps)
        return min(limits["scratch"], limits["linearised"])

    @staticmethod
    def tight_limit(t: dict[str, float], hvps: int) -> float:
        """The smallest of the three, including the selective one-graph assembly."""
        return min(Primitives.limits(t, hvps).values())


# -------------------------------------------------------------------------------- torchopt
def torchopt_implicit(problem: Problem, solve: Any) -> Callable[[], tuple[Tensor, ...]]:
    """torchopt's implicit differentiation: ``custom_root`` on ∇_w L_T = 0 with linear solver ``solve``.

    The inner solver is the identity on the given params (they play w*), so only the backward
    pass (the implicit hypergradient) is measured, as for ours.
    """
    names = list(problem.params)
    w_star = tuple(problem.params.values())
    h0 = tuple(problem.hparams.values())

    def tree(leaves: tuple[Tensor, ...]) -> dict[str, Tensor]:
        return dict(zip(names, leaves))

    def optimality(w: tuple[Tensor, ...], h: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        grads = torch.func.grad(problem.train_loss)(tree(w), tree(h), problem.train_batch)
        return tuple(grads[k] for k in names)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def inner_solution(w_init: tuple[Tensor, ...], h: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return w_star

    def run() -> tuple[Tensor, ...]:
        h = tuple(t.detach().requires_grad_() for t in h0)
        w = inner_solution(w_star, h)
        loss = problem.val_loss(tree(w), tree(h), problem.val_batch)
        return torch.autograd.grad(loss, h)

    return run


# ------------------------------------------------------------------------------- unrolling
def load_params(problem: Problem) -> None:
    """Copy ``problem.params`` into the module (higher and autograd unrolls read the module)."""
    with torch.no_grad():
        for k, p in problem.module.named_parameters():
            p.copy_(problem.params[k])


def higher_unroll(problem: Problem, steps: int, lr: float) -> Callable[[], tuple[Tensor, ...]]:
    """``higher.innerloop_ctx`` with a differentiable SGD, ``steps`` updates, then ∇_λ L_V."""
    import higher

    load_params(problem)
    names = [k for k, _ in problem.module.named_parameters()]
    x, y = problem.train_batch

    def run() -> tuple[Tensor, ...]:
        lam = [problem.hparams[k].detach().requires_grad_() for k in names]
        opt = torch.optim.SGD(problem.module.parameters(), lr=lr)
        with higher.innerloop_ctx(problem.module, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for _ in range(steps):
                decay = sum((decay_log.exp() * p**2).sum() for decay_log, p in zip(lam, fmodel.parameters()))
                diffopt.step(F.cross_entropy(fmodel(x), y) + 0.5 * decay)
            xv, yv = problem.val_batch
            return torch.autograd.grad(F.cross_entropy(fmodel(xv), yv), lam)

    return run


def autograd_unroll(problem: Problem, steps: int, lr: float) -> Callable[[], tuple[Tensor, ...]]:
    """The same unrolled SGD written with plain ``torch.autograd.grad(create_graph=True)``."""
    names = list(problem.params)

    def run() -> tuple[Tensor, ...]:
        lam = {k: problem.hparams[k].detach().requires_grad_() for k in names}
        w = {k: problem.params[k].detach().requires_grad_() for k in names}
        for _ in range(steps):
            loss = problem.train_loss(w, lam, problem.train_batch)
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            w = {k: p - lr * g for (k, p), g in zip(w.items(), grads)}
        return torch.autograd.grad(problem.val_loss(w, lam, problem.val_batch), list(lam.values()))

    return run


# ------------------------------------------------------------------------------ training
def plain_steps(problem: Problem, n: int, inner: Any) -> Callable[[], Any]:
    """``n`` training steps written directly with torch.func and torchopt (no bilevel)."""
    params = dict(problem.params)
    state = [inner.init(params)]
    grad = torch.func.grad_and_value(problem.train_loss)
    box = [params]

    def run() -> Tensor:
        params, st = box[0], state[0]
        for _ in range(n):
            g, loss = grad(params, problem.hparams, problem.train_batch)
            updates, st = inner.update(g, st, params=params, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        box[0], state[0] = params, st
        return loss

    return run


def optimizer_steps(problem: Problem, n: int, inner: Any, strategy: Any, inner_steps: int) -> Callable[[], Any]:
    """``n`` calls of ``BilevelOptimizer.step``; every ``inner_steps``-th is a hyperstep."""
    opt = bilevel.BilevelOptimizer(
        problem.train_loss,
        problem.val_loss,
        problem.params,
        problem.hparams,
        inner=inner,
        outer=torchopt.rmsprop(1e-2),
        strategy=strategy,
        inner_steps=inner_steps,
    )

    def run() -> Any:
        for _ in range(n):
            result = opt.step(problem.train_batch, problem.val_batch)
        return result

    return run


# ----------------------------------------------------------------- cases by name (memory)
def build(problem: Problem, case: dict[str, Any]) -> Callable[[], Any]:
    """A case described by a JSON-able dict, for the memory subprocess."""
    name, k = case["case"], case.get("steps", 20)
    if name == "neumann":
        return ours(problem, bilevel.Neumann(steps=k, alpha=case.get("alpha", 1e-3)))
    if name == "cg":
        return ours(problem, bilevel.ConjugateGradient(maxiter=k, tol=0.0))
    if name == "unroll":
        return ours(problem, bilevel.Unroll(steps=k, optimizer=torchopt.sgd(lr=case.get("lr", 0.1))))
    if name == "higher":
        return higher_unroll(problem, k, case.get("lr", 0.1))
    if name == "autograd_unroll":
        return autograd_unroll(problem, k, case.get("lr", 0.1))
    if name == "torchopt_ns":
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=k - 1, alpha=case.get("alpha", 1e-3))
        return torchopt_implicit(problem, solve)
    raise ValueError(f"unknown case {name!r}")
