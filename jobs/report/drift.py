"""Drift between two runs of a job (last night's output against tonight's): one measure per result, each a
population stability index (PSI), so one threshold reads them all.

PSI = sum over bins of (new share - base share) * ln(new share / base share), shares floored at EPSILON so an
empty bin counts as rare rather than infinite. Bins: the labels themselves; for a numeric result (a
classifier's confidence, a score, perplexity, completion length), the base run's deciles, so each bin held a
tenth of last night's rows; for errors, two bins (a row has an error or not). The usual reading: under 0.1
stable, 0.1-0.2 a shift worth a look, over 0.2 a real one (the default threshold, jobs.spec.DRIFT_THRESHOLD).
A measure has drifted when its PSI is over the threshold: at 0, any change is flagged, two identical runs never.
Each measure shows the category whose share moved most (a label, a finish reason), or the medians.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..spec import DRIFT_THRESHOLD as DEFAULT_THRESHOLD
from .figures import RunFigures

EPSILON = 1e-4
BINS = 10


def psi(base: np.ndarray, new: np.ndarray) -> float:
    """PSI of two share vectors over the same bins (each summing to 1)."""
    b, n = np.maximum(base, EPSILON), np.maximum(new, EPSILON)
    return float(np.sum((n - b) * np.log(n / b)))


def shares(counts: dict[str, int], keys: list[str]) -> np.ndarray:
    total = sum(counts.get(k, 0) for k in keys)
    return np.asarray([counts.get(k, 0) / total if total else 0.0 for k in keys])


def binned(base: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shares of both in the base's decile bins (open at both ends, so every value of either falls in one)."""
    edges = np.unique(np.quantile(base, np.linspace(0, 1, BINS + 1)[1:-1]))
    b = np.bincount(np.searchsorted(edges, base, side="right"), minlength=len(edges) + 1) / len(base)
    n = np.bincount(np.searchsorted(edges, new, side="right"), minlength=len(edges) + 1) / len(new)
    return b, n


@dataclasses.dataclass
class Measure:
    name: str
    base: str  # what it was (a share, a median), as shown
    new: str
    psi: float
    flagged: bool


@dataclasses.dataclass
class Drift:
    threshold: float
    measures: list[Measure]
    label_shares: list[tuple[str, float, float]]  # label, base share, new share

    @property
    def flagged(self) -> list[Measure]:
        return [m for m in self.measures if m.flagged]

    def as_dict(self) -> dict:
        return {"threshold": self.threshold,
                "measures": [{"name": m.name, "base": m.base, "new": m.new, "psi": round(m.psi, 4),
                              "flagged": m.flagged} for m in self.measures],
                "label_shares": [{"label": k, "base": round(b, 4), "new": round(n, 4)}
                                 for k, b, n in self.label_shares]}

    def warning(self, base_name: str) -> str | None:
        """The one line `run` and `status` print when a measure passes the threshold."""
        if not self.flagged:
            return None
        worst = max(self.flagged, key=lambda m: m.psi)
        names = ", ".join(f"{m.name} (PSI {m.psi:.2f})" for m in self.flagged)
        return (f"WARNING: results drifted from {base_name} past the threshold {self.threshold:g}: {names}; "
                f"largest: {worst.name} {worst.base} -> {worst.new}")


def recorded_warning(record: dict) -> str | None:
    """The WARNING line of a drift record a manifest holds (`status` prints it), or None when nothing drifted."""
    try:
        measures = [Measure(m["name"], m["base"], m["new"], float(m["psi"]), bool(m["flagged"]))
                    for m in record.get("measures", [])]
        drift = Drift(float(record["threshold"]), measures, [])
    except (KeyError, TypeError, ValueError):
        return None  # a record hand-edited into another shape: nothing to say
    return drift.warning(str(record.get("compared_with")))


def compare(base: RunFigures, new: RunFigures, threshold: float = DEFAULT_THRESHOLD) -> Drift:
    measures: list[Measure] = []
    label_shares: list[tuple[str, float, float]] = []
    if base.labels or new.labels:
        keys = sorted(set(base.labels) | set(new.labels), key=lambda k: (-base.labels.get(k, 0), k))
        b, n = shares(base.labels, keys), shares(new.labels, keys)
        label_shares = [(k, float(x), float(y)) for k, x, y in zip(keys, b, n)]
        moved = int(np.argmax(np.abs(n - b)))  # the label whose share changed most
        value = psi(b, n)
        measures.append(Measure("label shares", f"{keys[moved]} {b[moved]:.1%}", f"{keys[moved]} {n[moved]:.1%}",
                                value, value > threshold))
    for name in sorted(set(base.values) & set(new.values)):
        if len(base.values[name]) == 0 or len(new.values[name]) == 0:
            continue
        b, n = binned(base.values[name], new.values[name])
        value = psi(b, n)
        measures.append(Measure(name, f"median {np.median(base.values[name]):.4g}",
                                f"median {np.median(new.values[name]):.4g}", value, value > threshold))
    if base.finish_reasons or new.finish_reasons:
        keys = sorted(set(base.finish_reasons) | set(new.finish_reasons),
                      key=lambda k: (-base.finish_reasons.get(k, 0), k))
        b, n = shares(base.finish_reasons, keys), shares(new.finish_reasons, keys)
        moved = int(np.argmax(np.abs(n - b)))
        value = psi(b, n)
        measures.append(Measure("finish reasons", f"{keys[moved]} {b[moved]:.1%}", f"{keys[moved]} {n[moved]:.1%}",
                                value, value > threshold))
    if base.rows and new.rows:
        b = np.asarray([base.error_rate, 1 - base.error_rate])
        n = np.asarray([new.error_rate, 1 - new.error_rate])
        value = psi(b, n)
        measures.append(Measure("error rate", f"{base.error_rate:.2%}", f"{new.error_rate:.2%}", value,
                                value > threshold))
    return Drift(threshold, [m if math.isfinite(m.psi) else dataclasses.replace(m, psi=0.0) for m in measures],
                 label_shares)
