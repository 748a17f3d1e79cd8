"""`persimmon-batch report`: what a job's output says about its run, as one HTML page (page.py), from figures
read out of the output (figures.py), with the drift from another run of the job (drift.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .drift import DEFAULT_THRESHOLD, Drift, compare
from .figures import RunFigures, collect

__all__ = ["DEFAULT_THRESHOLD", "Drift", "RunFigures", "collect", "compare", "write_report"]


def recorded_baseline(output: str) -> str | None:
    """The output a job file's run of this date was compared with (its manifest's `drift`), if any."""
    from ..output.manifest import Manifest
    from ..output.paths import resolve

    fs, base = resolve(output)
    manifest = Manifest.load(fs, base)
    drift = manifest.data.get("drift") if manifest is not None else None
    return drift.get("compared_with") if isinstance(drift, dict) else None


def write_report(output: str, destination: str | Path, other: str | None = None,
                 threshold: float = DEFAULT_THRESHOLD, recorded: bool = False) -> tuple[Path, Drift | None, str]:
    """Write the page for `output` (compared with the output `other`) to `destination`, whole or not at all.
    Returns the page's path, the drift (None without `other`) and a note. `recorded`: `other` is the date a job
    file's run was compared with, not the user's choice: when it is gone (a retention policy removed it), the
    page is made without the comparison, and the note says so."""
    from ..errors import BatchError, UsageError
    from .page import render

    destination = Path(destination).expanduser().absolute()
    if destination.is_dir():
        raise UsageError(f"--output {destination} is a folder: name the page's file "
                         f"(e.g. {destination / 'report.html'})")
    figures = collect(output)
    base, note = None, ""
    if other:
        try:
            base = collect(other)
        except BatchError as exc:
            if not recorded:
                raise
            note = f"note: {other}, the run this date was compared with, cannot be read ({exc}): no drift table"
    drift = compare(base, figures, threshold) if base is not None else None
    try:  # the destination is checked before the page is drawn
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    except OSError as exc:
        raise UsageError(f"cannot write the report to {destination}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(render(figures, base, drift))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # as any file the user writes (mkstemp's are private)
        os.replace(temp, destination)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise UsageError(f"cannot write the report to {destination}: {exc.strerror or exc}") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return destination, drift, note
