"""Rich progress bars for long work (evaluation, calibration, generation)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True,
                 fields: str = "") -> Iterator[Callable[..., None]]:
    """Yields ``advance(n=1, **info)``; ``info`` is shown after the bar (e.g. losses).

    The bar is drawn only when ``enabled`` and stderr is a terminal or rich can render to it;
    in CI logs it stays quiet.
    """
    if not enabled or not (sys.stderr.isatty() or console.is_jupyter):
        yield lambda n=1, **info: None
        return
    columns = [TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total, info=fields)

        def advance(n: int = 1, **info) -> None:
            text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in info.items())
            prog.update(task, advance=n, **({"info": text} if info else {}))

        yield advance
