"""bilevel: gradient-based hyperparameter optimisation with millions of hyperparameters.

Implements Lorraine, Vicol & Duvenaud (2020), "Optimizing Millions of Hyperparameters by
Implicit Differentiation", on torch.func and torchopt.
"""

from bilevel._check import DerivativeCheck, check_derivatives
from bilevel._distributed import DataParallel, MicroBatches
from bilevel._hvp import HVP, DerivativeError, FiniteDifferenceHVP, ForwardOverReverseHVP, ReverseHVP
from bilevel._hypergradient import HypergradInfo, hypergradient
from bilevel._hyperparams import log_decay_like, weight_decay, weighted_mean
from bilevel._module import FunctionalModule
from bilevel._optimizer import BilevelOptimizer, NonFiniteError, StepResult
from bilevel._strategies import ConjugateGradient, Exact, Identity, Neumann, Nystrom, Penalty, Strategy, Unroll

__all__ = [
    "HVP",
    "BilevelOptimizer",
    "ConjugateGradient",
    "DataParallel",
    "DerivativeCheck",
    "DerivativeError",
    "Exact",
    "FiniteDifferenceHVP",
    "ForwardOverReverseHVP",
    "FunctionalModule",
    "HypergradInfo",
    "Identity",
    "MicroBatches",
    "Neumann",
    "NonFiniteError",
    "Nystrom",
    "Penalty",
    "ReverseHVP",
    "StepResult",
    "Strategy",
    "Unroll",
    "check_derivatives",
    "hypergradient",
    "log_decay_like",
    "weight_decay",
    "weighted_mean",
]

__version__ = "0.1.0"
