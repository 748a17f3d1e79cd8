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
                 threshold: float = DEFAULT_THRESHOLD) -> tuple[Path, Drift | None]:
    """Write the page for `output` (compared with the output `other`) to `destination`, whole or not at all."""
    from .page import render

    figures = collect(output)
    base = collect(other) if other else None
    drift = compare(base, figures, threshold) if base is not None else None
    page = render(figures, base, drift)
    destination = Path(destination).expanduser().absolute()
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # as any file the user writes (mkstemp's are private)
        os.replace(temp, destination)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return destination, drift
