"""Console output of the long-running steps (training, sweeps, postprocessor, toys).

Library functions take ``console=None`` and stay silent then (tests, API use); the
CLI passes a rich ``Console``. Bars draw only on a terminal, so logs stay clean.
"""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def say(console, msg: str) -> None:
    """Print ``msg`` (rich markup allowed) when there is a console."""
    if console is not None:
        console.print(msg)


def progress_bar(console, label: str, *fields: str):
    """A rich bar: label, bar, done/total, loss, any ``fields`` (format strings on task fields), ETA."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), *(TextColumn(f) for f in fields),
                    TimeRemainingColumn(), console=console, transient=False,
                    disable=console is None or not console.is_terminal)
