"""Live metrics of a running job, through Ray's metrics API: each actor counts what it did, and Ray's metrics
agent exports the counters (Prometheus text at each node's metrics export port, which Ray's dashboard and a
Prometheus scraping the cluster read). Ray prefixes the names with `ray_`:

- persimmon_batch_rows_total: rows processed (a row with an error included)
- persimmon_batch_errors_total: rows whose `error` is set
- persimmon_batch_tokens_total: tokens through the model (prompt and generated)
- persimmon_batch_busy_seconds_total: seconds spent processing work units
- persimmon_batch_units_total: work units finished, tagged `outcome` ok / failed

Every series is tagged `job` (the job's name, else its output folder) and `actor` (host:pid). Rows count as
each model batch ends, the others as each unit ends, so a dashboard moves while a long unit runs.
"""

from __future__ import annotations

import os
import socket

PREFIX = "persimmon_batch_"
TAGS = ("job", "actor")
COUNTERS = {
    "rows_total": "Rows processed (rows with an error included).",
    "errors_total": "Rows whose error column is set.",
    "tokens_total": "Tokens through the model (prompt and generated).",
    "busy_seconds_total": "Seconds spent processing work units.",
}


class ActorMetrics:
    """The counters of one actor process (created there: Ray's metrics live in the process that records)."""

    def __init__(self, job: str) -> None:
        from ray.util.metrics import Counter

        self.tags = {"job": job, "actor": f"{socket.gethostname()}:{os.getpid()}"}
        self.counters = {name: Counter(PREFIX + name, description=text, tag_keys=TAGS)
                         for name, text in COUNTERS.items()}
        self.units = Counter(PREFIX + "units_total", description="Work units finished, by outcome.",
                             tag_keys=(*TAGS, "outcome"))

    def rows(self, count: int) -> None:
        if count > 0:
            self.counters["rows_total"].inc(count, tags=self.tags)

    def unit(self, ok: bool, seconds: float, stats: dict | None = None) -> None:
        stats = stats or {}
        if seconds > 0:
            self.counters["busy_seconds_total"].inc(seconds, tags=self.tags)
        for name, value in (("errors_total", stats.get("errors", 0)),
                            ("tokens_total", stats.get("real_tokens", 0) + stats.get("generated_tokens", 0))):
            if value > 0:
                self.counters[name].inc(value, tags=self.tags)
        self.units.inc(1, tags={**self.tags, "outcome": "ok" if ok else "failed"})


def job_label(name: str | None, output: str) -> str:
    return name or output.rstrip("/").rsplit("/", 1)[-1] or output
