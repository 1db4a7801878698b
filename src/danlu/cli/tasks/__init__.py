"""The tasks of ``danlu compare``: each module has a ``TASK`` (a :class:`danlu.cli.sweep.Task`)."""

from __future__ import annotations

from danlu.cli.sweep import Task
from danlu.cli.tasks import accumulation, charlm, digits, drift, lora

TASKS: dict[str, Task] = {
    module.TASK.name: module.TASK for module in (digits, charlm, drift, accumulation, lora)
}
#: What ``danlu compare`` runs without --task.
DEFAULT_TASKS = ("digits", "charlm", "embedding-drift", "accumulation")
