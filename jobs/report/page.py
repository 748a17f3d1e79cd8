"""The report page: one self-contained HTML file (plotly.js, the styles and every figure inside it; nothing is
fetched when it is opened, so it can be mailed, archived beside the output or opened on a machine with no
network) showing what a run did, and with a second run, both side by side and the drift table.

Plotly draws the figures: interactive (hover for exact counts, zoom a long shard axis) from one Python call
per figure, with its JavaScript inlined once per page. Distributions are binned here (numpy) and drawn as
bars, so a page stays small whatever the number of rows.
"""

from __future__ import annotations

import html
import json
import time

import numpy as np

from .drift import Drift
from .figures import RunFigures

COLOURS = ("#3366cc", "#ff9900")  # this run, the run compared with
BINS = 30
STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.8em;
       border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } tr.flagged td { background: #fde2e1; font-weight: 600; }
.note { color: #666; font-size: 0.85em; } .figure { margin: 8px 0 16px 0; }
code { background: #f5f5f5; padding: 1px 4px; }
"""


def _figure_html(fig, div_id: str) -> str:
    import plotly.io as pio

    fig.update_layout(template="plotly_white", margin=dict(l=60, r=20, t=50, b=60), height=360,
                      legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    return '<div class="figure">' + pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                                                  config={"displaylogo": False, "responsive": True}) + "</div>"


def _runs(figures: RunFigures, other: RunFigures | None) -> list[tuple[str, RunFigures]]:
    if other is None:
        return [("this run", figures)]
    return [(_run_name(figures), figures), (_run_name(other), other)]


def _run_name(figures: RunFigures) -> str:
    return str(figures.meta.get("date") or figures.output)


def _bars_of_counts(title: str, runs, counts_of, div_id: str, axis: str):
    """A bar per category (label, finish reason, error kind); shares side by side when two runs."""
    import plotly.graph_objects as go

    keys: list[str] = []
    for _, run in runs:
        for key, _ in counts_of(run).most_common():
            if key not in keys:
                keys.append(key)
    fig = go.Figure()
    for i, (name, run) in enumerate(runs):
        counts = counts_of(run)
        total = sum(counts.values()) or 1
        if len(runs) == 1:
            y, text = [counts.get(k, 0) for k in keys], [str(counts.get(k, 0)) for k in keys]
        else:
            y = [counts.get(k, 0) / total for k in keys]
            text = [f"{v:.1%}" for v in y]
        fig.add_bar(x=keys, y=y, name=name, text=text, textposition="outside", marker_color=COLOURS[i],
                    cliponaxis=False)
    fig.update_layout(title=title, barmode="group", xaxis_title=axis,
                      yaxis_title="rows" if len(runs) == 1 else "share of rows")
    return _figure_html(fig, div_id)


def _histogram(title: str, runs, values_of, div_id: str, axis: str, bounds: tuple[float, float] | None = None):
    """Binned values (the same bins for both runs), as counts, or as shares when two runs."""
    import plotly.graph_objects as go

    arrays = [np.asarray(values_of(run), dtype=np.float64) for _, run in runs]
    everything = np.concatenate([a for a in arrays if len(a)]) if any(len(a) for a in arrays) else np.zeros(1)
    low, high = bounds or (float(everything.min()), float(everything.max()))
    if high <= low:
        high = low + 1.0
    edges = np.linspace(low, high, BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for i, ((name, _), values) in enumerate(zip(runs, arrays)):
        counts, _ = np.histogram(np.clip(values, low, high), bins=edges)
        y = counts if len(runs) == 1 else counts / max(len(values), 1)
        fig.add_bar(x=centres, y=y, width=(edges[1] - edges[0]) * (0.9 if len(runs) == 1 else 0.45),
                    name=f"{name} ({len(values):,} rows)", marker_color=COLOURS[i], opacity=0.85,
                    hovertemplate="%{x:.4g}: %{y}<extra>" + html.escape(name) + "</extra>")
    fig.update_layout(title=title, barmode="group", xaxis_title=axis,
                      yaxis_title="rows" if len(runs) == 1 else "share of rows", bargap=0.05)
    return _figure_html(fig, div_id)


def _shards(figures: RunFigures) -> str:
    import plotly.graph_objects as go

    names = [s.name for s in figures.shards]
    fig = go.Figure()
    for label, values, colour in (("rows", [s.rows for s in figures.shards], COLOURS[0]),
                                  ("errors", [s.errors for s in figures.shards], "#dc3912"),
                                  ("truncated", [s.truncated for s in figures.shards], "#990099")):
        fig.add_bar(x=names, y=values, name=label, marker_color=colour, text=[str(v) for v in values],
                    textposition="outside", cliponaxis=False)
    failed = [s for s in figures.shards if s.state == "failed"]
    fig.update_layout(title=f"Rows, errors and truncated rows by shard ({len(names)} shards, {len(failed)} failed)",
                      barmode="group", xaxis_title="shard", yaxis_title="rows")
    return _figure_html(fig, "shards")


def _throughput(figures: RunFigures) -> str:
    import plotly.graph_objects as go

    timed = [s for s in figures.shards if s.committed_at and s.seconds > 0 and s.actor]
    if not timed:
        return '<p class="note">No per-shard commit times in this manifest (written before 0.11.0).</p>'
    start = min(s.committed_at - s.seconds for s in timed)
    fig = go.Figure()
    for actor in sorted({s.actor for s in timed}):
        mine = sorted((s for s in timed if s.actor == actor), key=lambda s: s.committed_at)
        fig.add_scatter(x=[round(s.committed_at - start, 2) for s in mine],
                        y=[round(s.rows / s.seconds, 2) for s in mine], mode="lines+markers", name=actor,
                        text=[s.name for s in mine],
                        hovertemplate="%{text}: %{y} rows/s at %{x} s<extra>" + html.escape(actor) + "</extra>")
    actors = len({s.actor for s in timed})
    fig.update_layout(title=f"Throughput over time per actor ({actors} actor{'s' if actors > 1 else ''})",
                      xaxis_title="seconds since the first unit began (when each unit was committed)",
                      yaxis_title="rows/s of the unit")
    return _figure_html(fig, "throughput")


def _meta_table(figures: RunFigures) -> str:
    m = figures.meta
    summary = m.get("summary") or {}
    rows = [("task", m.get("task")), ("job", f"{m.get('name')} {m.get('date')}" if m.get("name") else None),
            ("model", m.get("model")), ("checksum", m.get("checksum")), ("fingerprint", m.get("fingerprint")),
            ("options", json.dumps(m.get("options"), sort_keys=True)),
            ("layout", json.dumps(m.get("layout"), sort_keys=True) if m.get("layout") else None),
            ("input", m.get("input")), ("output", m.get("output")), ("package version", m.get("version")),
            ("started", m.get("started_at")), ("finished", m.get("finished_at")), ("runs", m.get("runs")),
            ("rows", f"{figures.rows:,} in committed files, {figures.errors:,} with errors"),
            ("processing", f"{summary.get('seconds')} s (start-up {summary.get('startup_seconds')} s)"
             if summary.get("seconds") is not None else None)]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
                   if v not in (None, ""))
    return f"<table>{body}</table>"


def _errors(runs) -> str:
    parts = []
    figures = runs[0][1]
    if not any(run.error_kinds for _, run in runs):
        return "<p>No row has an error.</p>"
    parts.append(_bars_of_counts("Errors by kind", runs, lambda r: r.error_kinds, "errors", "error kind"))
    rows = "".join(f"<tr><td>{html.escape(kind)}</td><td>{count}</td><td>"
                   + "<br>".join(html.escape(e) for e in figures.error_examples.get(kind, [])) + "</td></tr>"
                   for kind, count in figures.error_kinds.most_common())
    if rows:
        parts.append(f"<table><tr><th>kind</th><th>rows</th><th>examples</th></tr>{rows}</table>")
    return "".join(parts)


def _drift_table(drift: Drift) -> str:
    rows = "".join(
        f'<tr class="{"flagged" if m.flagged else ""}"><td>{html.escape(m.name)}</td><td>{html.escape(m.base)}</td>'
        f"<td>{html.escape(m.new)}</td><td>{m.psi:.3f}</td><td>{'DRIFT' if m.flagged else 'stable'}</td></tr>"
        for m in drift.measures)
    shares = "".join(f"<tr><td>{html.escape(k)}</td><td>{b:.1%}</td><td>{n:.1%}</td><td>{n - b:+.1%}</td></tr>"
                     for k, b, n in drift.label_shares)
    out = (f'<table id="drift"><tr><th>measure</th><th>compared run</th><th>this run</th><th>PSI</th>'
           f"<th>at threshold {drift.threshold:g}</th></tr>{rows}</table>")
    if shares:
        out += ('<table id="label-shares"><tr><th>label</th><th>compared run</th><th>this run</th><th>change</th>'
                f"</tr>{shares}</table>")
    return out + ('<p class="note">PSI: the population stability index over the labels, over the compared run\'s '
                  "deciles for numbers, over error / no error for the error rate.</p>")


def render(figures: RunFigures, other: RunFigures | None = None, drift: Drift | None = None) -> str:
    """The page, as one string."""
    from plotly.offline import get_plotlyjs

    runs = _runs(figures, other)
    sections = [f"<h2>What ran</h2>{_meta_table(figures)}"]
    if other is not None and drift is not None:
        sections.append(f"<h2>Drift from {html.escape(_run_name(other))}</h2>{_drift_table(drift)}")
    sections.append("<h2>Shards</h2>" + _shards(figures) + _throughput(figures))
    results = []
    if any(run.labels for _, run in runs):
        results.append(_bars_of_counts("Labels", runs, lambda r: r.labels, "labels", "label"))
    titles = {"score": ("Confidence (the label's probability)" if figures.labels else "Score", "score"),
              "perplexity": ("Perplexity", "perplexity"), "logprob": ("Log-probability of the text", "logprob"),
              "completion_tokens": ("Completion lengths", "tokens generated"),
              "embedding norm": ("Embedding norms", "L2 norm")}
    for key, (title, axis) in titles.items():
        if any(key in run.values for _, run in runs):
            bounds = (0.0, 1.0) if key == "score" and figures.labels else None
            results.append(_histogram(title, runs, lambda r, k=key: r.values.get(k, np.zeros(0)),
                                      key.replace(" ", "-"), axis, bounds))
    if any(run.finish_reasons for _, run in runs):
        results.append(_bars_of_counts("Finish reasons", runs, lambda r: r.finish_reasons, "finish-reasons",
                                       "finish reason"))
    sections.append("<h2>Results</h2>" + ("".join(results) or "<p>No result columns to show.</p>"))
    sections.append("<h2>Errors</h2>" + _errors(runs))
    waste = figures.padding_waste
    lengths = _histogram("Tokens per row" + (f" (padding waste {waste:.3f}: padded tokens / real tokens)"
                                             if waste else ""),
                         runs, lambda r: r.token_lengths, "token-lengths", "tokens") \
        if any(len(run.token_lengths) for _, run in runs) else ""
    note = html.escape(figures.token_lengths_note)
    sections.append(f'<h2>Token lengths</h2>{lengths}<p class="note">{note}</p>')
    title = f"persimmon-batch report: {figures.meta.get('task')} → {figures.output}"
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{STYLE}</style><script type="text/javascript">{get_plotlyjs()}</script></head><body>'
            f"<h1>{html.escape(title)}</h1><p class=\"note\">Made {made} from the output's manifest and files."
            f"</p>{''.join(sections)}</body></html>\n")
