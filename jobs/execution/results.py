"""What a run did, as the CLI prints it and the manifest's summary records it: shard and row counts, where the
start-up went, the layout, and what the user must not miss (warnings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import EXIT_BUSY, EXIT_FAILED, EXIT_OK, exit_for_signal
from ..inputs.discovery import Discovery
from ..inputs.formats import REQUESTS
from ..planning.plan import Plan

LISTED = 20  # shards named one by one in a summary section before "and N more"


@dataclass
class JobResult:
    shards: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    rows: int = 0
    errors: int = 0
    truncated: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    generated_tokens: int = 0
    nonfinite: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    startup_parts: dict[str, float] = field(default_factory=dict)  # plan, ray, workers: where startup went
    interrupted: int = 0  # the signal that stopped the run (0: it was not stopped)
    lost: str | None = None  # why this run lost the output to another one
    failures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the run found (changed / removed shards, takeovers)
    drift: str | None = None  # the WARNING line of results drifted from the job's previous date
    layout: str = ""  # the actors started and what each holds (Layout.describe)
    backups: dict[str, int] = field(default_factory=dict)  # backup attempts started, and won (finished first)
    kept: list[str] = field(default_factory=list)  # outputs kept whose input is gone (every run says so)

    @property
    def left(self) -> int:
        """Shards neither committed nor failed at the end (0 for a run that went to its end)."""
        return max(0, self.shards - self.done - self.failed)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.left and not self.interrupted and not self.lost

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return exit_for_signal(self.interrupted)
        if self.lost:
            return EXIT_BUSY
        return EXIT_OK if self.ok else EXIT_FAILED

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        tokens = (self.real_tokens + self.generated_tokens) / self.seconds if self.seconds else 0.0
        waste = self.padded_tokens / self.real_tokens if self.real_tokens else 1.0
        lines = [
            *self.notes,
            f"shards: {self.done} done ({self.skipped} already committed), {self.failed} failed, of {self.shards}",
            f"rows: {self.rows} processed, {self.errors} with errors, {self.truncated} truncated",
            f"throughput: {rate:.1f} rows/s, {tokens:.0f} tokens/s, padding waste {waste:.3f} "
            f"(startup {self.startup_seconds:.1f} s, processing {self.seconds:.1f} s)",
        ]
        if self.startup_parts:
            lines.append("startup: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.startup_parts.items()))
        if self.layout:
            lines.append(self.layout)
        if self.backups.get("started"):
            lines.append(f"backups: {self.backups['started']} started for units far behind their peers, "
                         f"{self.backups['won']} finished first")
        lines += [f"failed: {shard}: {reason}" for shard, reason in self.failures.items()]
        if self.left and not self.interrupted and not self.lost:
            lines.append(f"incomplete: {self.left} shards neither committed nor failed; rerun the same command "
                         "to finish them")
        if self.lost:
            lines.append(f"stopped: {self.lost}; what this run committed is kept")
        if self.interrupted:
            lines.append("interrupted: rerun the same command to resume")
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """What must not pass unnoticed in a run that otherwise succeeded."""
        found = []
        if self.nonfinite:
            found.append(f"WARNING: {self.nonfinite} of {self.rows} rows got non-finite scores from the model (NaN "
                         "or inf): their `error` says so. The checkpoint is likely corrupt or the dtype overflows.")
        if self.kept:
            shown = ", ".join(self.kept[:LISTED]) + (f" and {len(self.kept) - LISTED} more" if len(self.kept) > LISTED else "")
            found.append(f"WARNING: the output still holds {len(self.kept)} file(s) whose input is gone ({shown}): "
                         "whatever reads the whole folder (pandas, duckdb, Spark) still reads their rows; rerun "
                         "with --overwrite to remove them")
        if self.drift:
            found.append(self.drift)
        return found


def _listed(names: list[str], line: Callable[[str], str]) -> list[str]:
    shown = [line(n) for n in names[:LISTED]]
    return shown + ([f"... and {len(names) - LISTED} more"] if len(names) > LISTED else [])


def result_of(input_format: str | None, plan: Plan, discovery: Discovery, takeover: str | None) -> JobResult:
    result = JobResult(shards=len(discovery.shards), skipped=len(plan.done) + len(plan.adopted))
    result.done = result.skipped
    result.notes = [takeover] if takeover else []
    if discovery.skipped:
        kinds = ".jsonl" if input_format == REQUESTS else ".parquet, .csv or .jsonl"
        names = ", ".join(discovery.skipped_names)
        more = f" and {discovery.skipped - len(discovery.skipped_names)} more" if discovery.skipped > len(
            discovery.skipped_names) else ""
        result.notes.append(f"input: {discovery.skipped} files or folders skipped (hidden, _-prefixed, not {kinds} "
                            f"or not regular files): {names}{more}")
    result.notes += _listed(discovery.notes, lambda s: s)
    result.notes += _listed(plan.changed, lambda s: f"{s} changed since its output was committed: reprocessed")
    result.notes += _listed(list(plan.redone.values()), lambda why: f"{why}: redone")
    result.notes += _listed(plan.removed, lambda s: f"{s} is no longer in the input; its output is kept "
                                                    "(--overwrite removes it)")
    result.notes += _listed(list(plan.delete), lambda s: f"removed the output of {s} (its input is gone)")
    result.kept = list(plan.removed)
    for shard, reason in plan.rejected.items():
        result.failed += 1
        result.failures[shard] = reason
    return result
