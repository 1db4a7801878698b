"""The tasks of ``danlu compare``: each module has NAME, DESCRIPTION and run(ctx) -> TaskResult."""

from __future__ import annotations

from types import ModuleType

from danlu.cli.tasks import accumulation, charlm, digits, drift, lora

TASKS: dict[str, ModuleType] = {
    module.NAME: module for module in (digits, charlm, drift, accumulation, lora)
}
#: What ``danlu compare`` runs without --task.
DEFAULT_TASKS = ("digits", "charlm", "embedding-drift", "accumulation")
