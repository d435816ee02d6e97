"""Random numbers you can reason about: one seed per evaluation context, replayed on demand.

A loss that draws random numbers (dropout, noise) is a different function on every call. The
hypergradient differentiates one function, so every evaluation that belongs to it — the gradient,
each Hessian-vector product (forward-over-reverse and finite differences re-run the forward pass),
the mixed product, each micro-batch — must see the same random numbers. ``replay(seed)`` runs its
block with torch's default generators seeded to ``seed`` and puts the caller's generator states
back afterwards, so the user's own random stream is not advanced by anything inside.

Seeds are derived, not drawn: ``derive(base, *keys)`` mixes integers with the SplitMix64 finaliser,
so inner step k of a run always gets ``derive(base, INNER, k)`` — which is what lets ``Unroll``
replay a recorded step with the masks it really used, and a resumed run continue bitwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

INNER, TRAIN, VAL, RANK = 0, 1, 2, 3  # domains of derived seeds: inner steps, L_T / L_V of a hyperstep, ranks
_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    """The SplitMix64 finaliser: a bijection on 64-bit integers with good avalanche."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def derive(base: int, *keys: int) -> int:
    """A seed in [0, 2⁶³) determined by ``base`` and ``keys`` (order matters)."""
    z = _mix(base & _MASK)
    for key in keys:
        z = _mix(z ^ (key & _MASK))
    return z >> 1


def draw() -> int:
    """One seed from the global CPU generator (advances it by exactly one draw)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@contextmanager
def replay(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with the CPU generator (and ``device``'s, if it is an accelerator) seeded to
    ``seed``, then restore their previous states. ``seed=None`` changes nothing.

    Saves and restores the generator states directly: ``torch.random.fork_rng`` does the same but
    measured ~100× slower per call, which would show in every inner step.
    """
    if seed is None:
        yield
        return
    generators = [torch.default_generator]
    if device.type == "cuda":
        generators.append(torch.cuda.default_generators[device.index or torch.cuda.current_device()])
    saved = [g.get_state() for g in generators]
    for g in generators:
        g.manual_seed(seed)
    try:
        yield
    finally:
        for g, state in zip(generators, saved):
            g.set_state(state)
