"""Live progress on the terminal and a machine-readable run log (JSON lines) next to the atlas."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class RunLog:
    """Appends one JSON object per event to `<atlas>.log.jsonl`; every line is flushed at once,
    so the log of a killed run is complete up to the kill."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a", encoding="utf-8")

    def event(self, event: str, **fields: Any) -> None:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields}
        self.fh.write(json.dumps(rec, default=str) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class PassProgress:
    """A bar per pass: slides done of total, tiles/s and ETA. Silent when `enabled` is False."""

    def __init__(self, console: Console, enabled: bool = True):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("slides"), TextColumn("{task.fields[tiles]} tiles"),
            TextColumn("{task.fields[rate]:.1f} tiles/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console, disable=not enabled, transient=False)
        self.task = None
        self.tiles = 0
        self.t0 = time.perf_counter()

    def start(self, description: str, total: int) -> None:
        self.tiles = 0
        self.t0 = time.perf_counter()
        self.task = self.progress.add_task(description, total=total, tiles=0, rate=0.0)

    def add_tiles(self, n: int) -> None:
        self.tiles += n
        rate = self.tiles / max(1e-9, time.perf_counter() - self.t0)
        self.progress.update(self.task, tiles=self.tiles, rate=rate)

    def slide_done(self) -> None:
        self.progress.advance(self.task)

    def __enter__(self) -> "PassProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def common_reason(slide_id: str, error: str) -> str:
    """A slide's failure reason without the slide's own id, so equal causes can be grouped."""
    return str(error).replace(f"slide {slide_id!r}: ", "").replace(repr(slide_id), "this slide")


def group_failures(failures: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """[(slide_id, error)] -> [(slide_ids, reason)], one entry per distinct reason, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for slide_id, error in failures:
        groups.setdefault(common_reason(slide_id, error), []).append(slide_id)
    return [(ids, reason) for reason, ids in groups.items()]


def make_console() -> Console:
    """Console on stderr, so stdout stays clean for machine-readable output (inspect --json)."""
    return Console(stderr=True, highlight=False, file=sys.stderr, soft_wrap=True)
