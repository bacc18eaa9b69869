"""Concept tasks: the interface, the registry and the built-in families."""

from conceptprobe.tasks.base import NULL_CONCEPT, ConceptTask, Example
from conceptprobe.tasks.registry import (
    ENTRY_POINT_GROUP,
    PluginWarning,
    UnknownTaskError,
    discover,
    get_task,
    get_task_class,
    register_task,
    task_names,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "NULL_CONCEPT",
    "ConceptTask",
    "Example",
    "PluginWarning",
    "UnknownTaskError",
    "discover",
    "get_task",
    "get_task_class",
    "register_task",
    "task_names",
]
