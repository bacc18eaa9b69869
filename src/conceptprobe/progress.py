"""The one progress-bar builder (rich): description, bar, done/total, elapsed, time left."""

from __future__ import annotations

from typing import Any


def progress_bar(
    console: Any = None, enabled: bool = True, unit: str = "", extra: str = "", transient: bool = False
) -> Any:
    """A rich ``Progress``: ``description  ━━━━  done/total unit  extra  elapsed  left`` (``extra`` may use
    task fields, e.g. ``"loss {task.fields[loss]}"``); disabled, it shows nothing."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    if extra:
        columns.append(TextColumn(extra))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    kwargs: dict[str, Any] = {"disable": not enabled, "transient": transient}
    if console is not None:
        kwargs["console"] = console
    return Progress(*columns, **kwargs)
