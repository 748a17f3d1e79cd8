"""`persimmon-batch report`: the page of a real classify run opened in a real headless Chromium (the
distribution's package), with the run's numbers in its figures, no console error, and the same figures with
the network gone; the drift table flags a shifted run and not a rerun; the drift measures themselves."""

from __future__ import annotations

import collections
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.report.drift import DEFAULT_THRESHOLD, compare, psi
from jobs.report.figures import RunFigures, error_kind
from tests.jobs.report import browser
from tests.jobs.conftest import classify, free_port, run_here


def made_up(labels: dict[str, int], scores: np.ndarray, errors: int = 0) -> RunFigures:
    rows = sum(labels.values()) + errors
    figures = RunFigures("out", "classify", {}, [], collections.Counter(labels), {"score": scores}, rows=rows)
    figures.error_kinds["empty text"] = errors
    return figures


def test_psi_is_zero_for_one_distribution_and_grows_with_a_shift():
    even = np.full(4, 0.25)
    assert psi(even, even) == 0.0
    assert 0 < psi(even, np.array([0.3, 0.25, 0.25, 0.2])) < 0.1 < psi(even, np.array([0.7, 0.1, 0.1, 0.1]))


def test_drift_flags_a_label_shift_a_score_shift_and_an_error_jump_but_not_sampling_noise():
    rng = np.random.default_rng(0)
    base = made_up({"legal": 5000, "technical": 3000, "other": 2000}, rng.beta(5, 2, 10000), errors=100)
    again = made_up({"legal": 4950, "technical": 3040, "other": 2010}, rng.beta(5, 2, 10000), errors=110)
    drift = compare(base, again)
    assert drift.flagged == [], drift.measures
    assert drift.warning("yesterday") is None
    shifted = made_up({"legal": 2000, "technical": 3000, "other": 5000}, rng.beta(2, 5, 10000), errors=1500)
    drift = compare(base, shifted)
    assert {m.name for m in drift.flagged} == {"label shares", "score", "error rate"}
    assert drift.threshold == DEFAULT_THRESHOLD
    line = drift.warning("yesterday")
    assert line.startswith("WARNING: results drifted from yesterday") and "\n" not in line
    assert [round(b, 2) for _, b, _ in drift.label_shares] == [0.5, 0.3, 0.2]
    assert compare(base, shifted, threshold=50.0).flagged == []  # the threshold is the job's to set
    label = next(m for m in drift.measures if m.name == "label shares")
    assert (label.base, label.new) == ("legal 50.0%", "legal 20.0%")  # a label whose share moved most
    assert compare(base, base, threshold=0.0).flagged == []  # at 0 any change is drift; no change never is


def test_an_error_kind_is_its_message_without_the_rows_specifics():
    assert error_kind("empty text") == "empty text"
    assert error_kind("model produced non-finite scores") == "model produced non-finite scores"
    assert error_kind("text too long: 900 tokens (limit 512)") == "text too long"


@pytest.fixture(scope="module")
def ray_metrics():
    """Ray for this module, exporting its metrics (Prometheus text) at a port of its own every half second."""
    import ray

    from jobs.execution.cluster_auth import refresh_ray_config

    refresh_ray_config()
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _metrics_export_port=port, _system_config={"worker_niceness": 0, "metrics_report_interval_ms": 500})
    yield f"http://{ray.util.get_node_ip_address()}:{port}/metrics"
    ray.shutdown()


def series(endpoint: str, name: str, job: str) -> dict[tuple, float]:
    """The job's samples of one metric, by their labels."""
    import urllib.request

    text = urllib.request.urlopen(endpoint, timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(f"ray_{name}{{") and f'job="{job}"' in line:
            labels, value = line[len(name) + 5:].rsplit("} ", 1)
            found[tuple(sorted(labels.split(",")))] = float(value)
    return found


@pytest.fixture(scope="module")
def chromium():
    found, why = browser.find()
    if found is None:
        print(f"SKIPPED: {why}")
        pytest.skip(why)
    return found


def with_bad_rows(input) -> None:
    """A shard whose rows include null and empty texts: error rows in the output."""
    table = pq.read_table(input / "part-00001.parquet")
    texts = table.column("text").to_pylist()
    texts[3], texts[7], texts[11] = None, "", None
    pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts)),
                   input / "part-00001.parquet")


@pytest.mark.slow  # starts Ray
def test_the_report_of_a_run_shows_its_numbers_in_a_real_browser_with_and_without_network(ray_metrics, demo,
                                                                                          chromium, tmp_path):
    model, input, out = demo
    with_bad_rows(input)
    result = run_here(*classify(model, input, out, "--batch-rows", "16"))
    assert result.returncode == 0, result.stderr
    # the run's counters, as Ray's metrics agent exports them to Prometheus and the dashboard
    deadline, rows = time.time() + 60, {}
    while time.time() < deadline and sum(rows.values()) < 240:
        rows = series(ray_metrics, "persimmon_batch_rows_total", out.name)
        time.sleep(0.5)
    assert sum(rows.values()) == 240, rows
    assert sum(series(ray_metrics, "persimmon_batch_errors_total", out.name).values()) == 3
    assert sum(series(ray_metrics, "persimmon_batch_tokens_total", out.name).values()) > 240
    assert sum(series(ray_metrics, "persimmon_batch_busy_seconds_total", out.name).values()) > 0
    units = series(ray_metrics, "persimmon_batch_units_total", out.name)
    assert units and all('outcome="ok"' in key for labels in units for key in labels if key.startswith("outcome"))
    page = tmp_path / "report.html"
    made = run_here("report", out, "--output", page)
    assert made.returncode == 0 and f"report: {page}" in made.stdout, made.stdout + made.stderr
    text = page.read_text()
    # self-contained: no script, style sheet or image comes from elsewhere
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)=", text)

    loaded = browser.load(chromium, page)
    assert loaded.errors == [], loaded.log[-3000:]
    for div in ("shards", "throughput", "labels", "score", "errors", "token-lengths"):
        assert 'class="main-svg"' in browser.figure(loaded.dom, div), div
    table = pq.read_table(out)
    labels = collections.Counter(x for x in table.column("label").to_pylist() if x is not None)
    drawn = browser.figure(loaded.dom, "labels")
    for label, count in labels.items():  # each label's bar, with its count written on it
        assert f">{label}<" in drawn and f">{count}<" in drawn, (label, count)
    errors = collections.Counter(x for x in table.column("error").to_pylist() if x is not None)
    assert sum(errors.values()) == 3
    drawn = browser.figure(loaded.dom, "errors")
    for kind, count in collections.Counter(error_kind(e) for e in errors.elements()).items():
        assert f">{kind}<" in drawn and f">{count}<" in drawn, (kind, count)
    shards = browser.figure(loaded.dom, "shards")
    assert shards.count(">60<") >= 4  # the rows of each of the four shards
    assert "part-00001.parquet row 3" in loaded.dom  # an error's example row

    offline = browser.load(chromium, page, offline=True)
    assert offline.errors == [], offline.log[-3000:]
    assert offline.dom.count('class="main-svg"') == loaded.dom.count('class="main-svg"') > 6


@pytest.mark.slow  # starts Ray
def test_drift_is_flagged_for_a_shifted_run_and_not_for_a_rerun_of_the_same_rows(ray_metrics, demo, chromium,
                                                                                  tmp_path):
    model, input, out = demo
    assert run_here(*classify(model, input, out)).returncode == 0
    # the same rows, cut into other shards: other batches, the same results
    rows = pq.read_table(input)
    again_in = tmp_path / "again"
    again_in.mkdir()
    for i, start in enumerate(range(0, rows.num_rows, 80)):
        pq.write_table(rows.slice(start, 80), again_in / f"rows-{i}.parquet")
    assert run_here(*classify(model, again_in, tmp_path / "again-out")).returncode == 0
    # rows of one kind only: a shifted population
    shifted_in = tmp_path / "shifted"
    shifted_in.mkdir()
    one = rows.column("text")[5].as_py()
    pq.write_table(rows.set_column(rows.schema.get_field_index("text"), "text", pa.array([one] * rows.num_rows)),
                   shifted_in / "rows.parquet")
    assert run_here(*classify(model, shifted_in, tmp_path / "shifted-out")).returncode == 0

    calm = run_here("report", tmp_path / "again-out", "--compare", out, "--output", tmp_path / "calm.html")
    assert calm.returncode == 0 and "WARNING" not in calm.stderr and "past the threshold" not in calm.stdout
    drifted = run_here("report", tmp_path / "shifted-out", "--compare", out, "--output", tmp_path / "drift.html")
    assert drifted.returncode == 0
    [warning] = [line for line in drifted.stderr.splitlines() if line.startswith("WARNING")]
    assert f"drifted from {out}" in warning and "score (PSI" in warning
    for name, flagged in (("calm.html", False), ("drift.html", True)):
        loaded = browser.load(chromium, tmp_path / name)
        assert loaded.errors == [], loaded.log[-3000:]
        table = loaded.dom[loaded.dom.index('id="drift"'):]
        table = table[:table.index("</table>")]
        assert ('class="flagged"' in table) is flagged and ("DRIFT" in table) is flagged, table
        assert 'class="main-svg"' in browser.figure(loaded.dom, "labels")  # both runs side by side


@pytest.mark.slow  # starts Ray
def test_a_job_files_date_is_compared_with_the_previous_date_and_a_drift_is_one_warning(ray_metrics, demo_root,
                                                                                        tmp_path):
    from tests.jobs.test_jobfile import good, partition, write_job

    for day in ("2026-11-20", "2026-11-22"):
        partition(tmp_path, demo_root, day)
    # 11-23: the rows of one text only
    folder = tmp_path / "input" / "dt=2026-11-23"
    folder.mkdir(parents=True)
    rows = pq.read_table(tmp_path / "input" / "dt=2026-11-22")
    one = rows.column("text")[5].as_py()
    pq.write_table(rows.set_column(rows.schema.get_field_index("text"), "text", pa.array([one] * rows.num_rows)),
                   folder / "rows.parquet")
    job = write_job(tmp_path, good(demo_root / "model", tmp_path).replace(
        'task = "classify"', 'task = "classify"\ndrift_threshold = 0.25'))
    first = run_here("run", job, "--date", "2026-11-20")
    assert first.returncode == 0 and "WARNING" not in first.stderr, first.stderr  # nothing before it: no drift
    assert "drift" not in json.loads((tmp_path / "out" / "dt=2026-11-20" / "_manifest.json").read_text())
    calm = run_here("run", job, "--date", "2026-11-22")  # the same rows as 11-20, a day (11-21) missing between
    assert calm.returncode == 0 and "WARNING" not in calm.stderr, calm.stderr
    record = json.loads((tmp_path / "out" / "dt=2026-11-22" / "_manifest.json").read_text())["drift"]
    assert record["compared_with"] == str(tmp_path / "out" / "dt=2026-11-20") + "/"
    assert record["threshold"] == 0.25 and not any(m["flagged"] for m in record["measures"])
    shifted = run_here("run", job, "--date", "2026-11-23")
    assert shifted.returncode == 0  # a drift is a warning: the run itself succeeded
    [warning] = [line for line in shifted.stderr.splitlines() if line.startswith("WARNING")]
    assert "dt=2026-11-22" in warning and "past the threshold 0.25" in warning
    out = tmp_path / "out" / "dt=2026-11-23"
    record = json.loads((out / "_manifest.json").read_text())["drift"]
    assert any(m["flagged"] and m["name"] == "score" for m in record["measures"]), record
    status = run_here("status", out)
    assert status.returncode == 0 and [l for l in status.stderr.splitlines() if l.startswith("WARNING")] == [warning]
    made = run_here("report", out, "--output", tmp_path / "r.html")  # compared with 11-22 without being told
    assert made.returncode == 0 and "drift: score:" in made.stdout
    [line] = [l for l in made.stderr.splitlines() if l.startswith("WARNING")]
    assert "drifted from " + str(tmp_path / "out" / "dt=2026-11-22") in line  # the date it was compared with
    # 11-22 removed since (a retention policy): the page is still made, without the comparison, and says why
    (tmp_path / "out" / "dt=2026-11-22").rename(tmp_path / "archived")
    made = run_here("report", out, "--output", tmp_path / "r2.html")
    assert made.returncode == 0 and (tmp_path / "r2.html").exists(), made.stderr
    [note] = made.stderr.splitlines()
    assert note.startswith("note: ") and "dt=2026-11-22" in note and "no drift table" in note
    assert 'id="drift"' not in (tmp_path / "r2.html").read_text()
    named = run_here("report", out, "--compare", tmp_path / "out" / "dt=2026-11-22", "--output", tmp_path / "r3.html")
    assert named.returncode == 2 and "no manifest in" in named.stderr  # named by the user: an error


@pytest.mark.slow  # starts Ray
def test_a_page_that_cannot_be_written_is_one_error_line_before_anything_is_drawn(ray_metrics, demo, tmp_path):
    model, input, out = demo
    assert run_here(*classify(model, input / "part-00000.parquet", out)).returncode == 0
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    cases = {tmp_path: "is a folder: name the page's file", tmp_path / "ro" / "r.html": "cannot write the report to",
             Path("/proc/r.html"): "cannot write the report to"}
    try:
        for page, message in cases.items():
            if page.parent.name == "ro" and os.access(page.parent, os.W_OK):
                continue  # root writes anywhere: the read-only folder is no case there
            done = run_here("report", out, "--output", page)
            lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (page, done.stderr)
            assert "Traceback" not in done.stderr and "unexpected" not in done.stderr
        assert not list(tmp_path.glob(".*.html.*")) and not list((tmp_path / "ro").iterdir())
    finally:
        (tmp_path / "ro").chmod(0o700)


@pytest.mark.slow  # starts Ray
def test_generate_score_and_embed_reports_show_their_own_results(ray_metrics, demo, causal_model, chromium, tmp_path):
    _, input, _ = demo
    runs = {"generate": ["--max-new-tokens", "6", "--prompt-template", "{text}"], "score": [], "embed": []}
    figures = {"generate": ("completion_tokens", "finish-reasons", "token-lengths"),
               "score": ("perplexity", "logprob", "token-lengths"), "embed": ("embedding-norm", "token-lengths")}
    for task, extra in runs.items():
        out = tmp_path / task
        done = run_here(task, "--model", causal_model, "--input", input / "part-00000.parquet", "--output", out, *extra)
        assert done.returncode == 0, done.stderr
        page = tmp_path / f"{task}.html"
        assert run_here("report", out, "--output", page).returncode == 0
        loaded = browser.load(chromium, page)
        assert loaded.errors == [], loaded.log[-3000:]
        for div in figures[task]:
            assert 'class="main-svg"' in browser.figure(loaded.dom, div), (task, div)
    reasons = collections.Counter(pq.read_table(tmp_path / "generate").column("finish_reason").to_pylist())
    drawn = browser.figure(browser.load(chromium, tmp_path / "generate.html").dom, "finish-reasons")
    for reason, count in reasons.items():
        assert f">{reason}<" in drawn and f">{count}<" in drawn
