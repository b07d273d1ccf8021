"""Progress of long loops: a rich bar on a terminal, a plain line now and then otherwise (logs, CI, `nohup`),
nothing with PREFALIGN_NO_PROGRESS=1."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
PLAIN_LINE_SECONDS = 30.0  # without a terminal: one progress line every this many seconds of work


def progress_enabled() -> bool:
    return os.environ.get("PREFALIGN_NO_PROGRESS", "") in ("", "0")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` showing progress on stderr: a bar on a terminal, plain lines otherwise."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not progress_enabled():
        yield from items
    elif sys.stderr.isatty():
        yield from _bar(items, description, total)
    else:
        yield from _plain_lines(items, description, total)


def _bar(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def _plain_lines(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    """`description: 120/500 (24%) 1m05s elapsed, ~3m26s left` on stderr every PLAIN_LINE_SECONDS, and a last
    line at the end of work that printed any (short loops stay silent)."""
    start = last = time.monotonic()
    printed = False
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= PLAIN_LINE_SECONDS or (printed and done == total):
            print(_line(description, done, total, now - start), file=sys.stderr, flush=True)
            last, printed = now, True


def _line(description: str, done: int, total: int | None, elapsed: float) -> str:
    if not total:
        return f"{description}: {done} done, {_clock(elapsed)} elapsed"
    left = elapsed / done * (total - done)
    return f"{description}: {done}/{total} ({done / total:.0%}) {_clock(elapsed)} elapsed, ~{_clock(left)} left"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
