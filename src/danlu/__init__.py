"""danlu (丹炉): the optimizers and training recipes of Su Jianlin's blog Scientific Spaces.

See SPEC sections cited in each docstring for the exact algorithms.
"""

from danlu import functional, schedules
from danlu.optim import Lion, Tiger
from danlu.params import param_groups
from danlu.registry import REGISTRY, OptimizerInfo, create_optimizer, register

__version__ = "0.1.0"

register(
    "lion",
    Lion,
    spec_section="§1",
    summary="sign of an interpolated momentum, decoupled decay (Chen et al. 2023)",
    state_bytes="4",
    state_bytes_accum="8",
)
register(
    "tiger",
    Tiger,
    spec_section="§2",
    summary="Lion with β1 = β2, RMS-relative lr, accumulation inside the momentum",
    state_bytes="4",
    state_bytes_accum="4",
)

__all__ = [
    "REGISTRY",
    "Lion",
    "OptimizerInfo",
    "Tiger",
    "__version__",
    "create_optimizer",
    "functional",
    "param_groups",
    "register",
    "schedules",
]
