"""danlu (丹炉): the optimizers and training recipes of Su Jianlin's blog Scientific Spaces.

See SPEC sections cited in each docstring for the exact algorithms.
"""

from danlu import functional, lora, schedules
from danlu.optim import Lion, Tiger
from danlu.params import param_groups
from danlu.registry import REGISTRY, OptimizerInfo, create_optimizer, register

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "Lion",
    "OptimizerInfo",
    "Tiger",
    "__version__",
    "create_optimizer",
    "functional",
    "lora",
    "param_groups",
    "register",
    "schedules",
]
