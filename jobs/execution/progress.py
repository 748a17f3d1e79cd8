"""What a run shows while it works: a progress line on a terminal, or a plain log line per committed shard."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """A progress line on a terminal, or a plain log line per committed shard elsewhere."""

    def __init__(self, total_rows: int, total_shards: int, stream=None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total_rows, self.total_shards = total_rows, total_shards
        self.rows = self.done = self.failed = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def update(self, rows: int) -> None:
        """Rows processed so far, all units together."""
        self.rows = max(self.rows, rows)
        self.draw()

    def note(self, line: str) -> None:
        """Something the user should see as it happens (an actor stalled and replaced, a unit redone)."""
        self.stream.write(("\n" if self.tty else "") + line + "\n")
        self.stream.flush()
        self.draw(force=True)

    def shard_done(self, shard: str, entry: dict[str, Any]) -> None:
        self.done += 1
        if not self.tty:
            self.stream.write(f"committed {shard}: {entry.get('rows', 0)} rows, {entry.get('errors', 0)} errors, "
                              f"{entry.get('seconds', 0.0):.1f} s on node {str(entry.get('node', ''))[:12]}\n")
        self.draw(force=True)

    def shard_failed(self, shard: str, reason: str) -> None:
        self.failed += 1
        if not self.tty:
            self.stream.write(f"FAILED {shard}: {reason}\n")
        self.draw(force=True)

    def draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.tty or (not force and now - self.last_draw < 0.5):
            return
        self.last_draw = now
        elapsed = now - self.start
        rate = self.rows / elapsed if elapsed else 0.0
        left = max(self.total_rows - self.rows, 0)
        eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate else "--:--:--"
        width = 24
        filled = min(width, int(width * self.rows / self.total_rows)) if self.total_rows else width
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.rows}/{self.total_rows} rows "
                          f"{rate:.1f} rows/s | shards {self.done}/{self.total_shards} done, {self.failed} failed "
                          f"| ETA {eta} ")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.draw(force=True)
            self.stream.write("\n")
