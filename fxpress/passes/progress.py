"""Progress bars for long passes (rich, on stderr; silent when FXPRESS_QUIET is set)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """Yield a function `advance(n=1)` driving a progress bar of `total` steps."""
    quiet = bool(os.environ.get("FXPRESS_QUIET"))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True, disable=quiet) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
