"""danlu (丹炉): the optimizers and training recipes of Su Jianlin's blog Scientific Spaces.

See docs/reference/algorithms.md sections cited in each docstring for the exact algorithms.
"""

from danlu import (
    diagnostics,
    distributed,
    functional,
    init,
    lora,
    nn,
    recipes,
    scaling,
    schedules,
    wrappers,
)
from danlu.optim import AdaFactor, AdamW, AdaX, Amos, Lion, Tiger
from danlu.params import param_groups
from danlu.registry import REGISTRY, OptimizerInfo, create_optimizer, register
from danlu.wrappers import (
    GradientAccumulation,
    Lazy,
    MultiOptimizer,
    NonFiniteGuard,
    StepInBackward,
    UpdateEvery,
    accumulation_betas,
    step_in_backward,
)

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "AdaFactor",
    "AdaX",
    "AdamW",
    "Amos",
    "GradientAccumulation",
    "Lazy",
    "Lion",
    "MultiOptimizer",
    "NonFiniteGuard",
    "OptimizerInfo",
    "StepInBackward",
    "Tiger",
    "UpdateEvery",
    "__version__",
    "accumulation_betas",
    "create_optimizer",
    "diagnostics",
    "distributed",
    "functional",
    "init",
    "lora",
    "nn",
    "param_groups",
    "recipes",
    "register",
    "scaling",
    "schedules",
    "step_in_backward",
    "wrappers",
]
