"""Wrappers around any ``torch.optim.Optimizer``: gradient accumulation, lazy row updates, the
non-finite guard, several optimizers as one, and the step inside backward
(docs/reference/algorithms.md#hidden-accumulation, #embedding-drift,
docs/reference/algorithms.md#gradient-accumulation). Each keeps the optimizer interface, so lr
schedulers and checkpoints work as usual. All are built on one base and declare their
capabilities (what they can do, what they need from what they wrap), which the checks that
combine them read; a wrapper of your own subclasses :class:`OptimizerWrapper` and declares
its own."""

from danlu.wrappers._base import OptimizerWrapper
from danlu.wrappers.accumulation import GradientAccumulation, UpdateEvery, accumulation_betas
from danlu.wrappers.guard import NonFiniteGuard
from danlu.wrappers.in_backward import StepInBackward, step_in_backward
from danlu.wrappers.lazy import Lazy
from danlu.wrappers.multi import MultiOptimizer

__all__ = [
    "GradientAccumulation",
    "Lazy",
    "MultiOptimizer",
    "NonFiniteGuard",
    "OptimizerWrapper",
    "StepInBackward",
    "UpdateEvery",
    "accumulation_betas",
    "step_in_backward",
]
