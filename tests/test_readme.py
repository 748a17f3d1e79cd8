"""The README's commands that need no real Persimmon-8B checkpoint, run as written: the demo, then the quick
start block, in a copy of the checkout (its own demo-data/), with the suite's .venv."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(readme: str, heading: str) -> list[str]:
    """The ```bash blocks under a `## heading`, in order."""
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def checkout_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / ".venv").symlink_to(Path(sys.executable).parents[1])  # the suite's environment, already set up
    return dest


def installed_from() -> Path:
    """Where the suite's environment imports the package from (its editable install's folder)."""
    found = subprocess.run([sys.executable, "-c", "import jobs; print(jobs.__file__)"], cwd="/", capture_output=True,
                           text=True, check=True).stdout.strip()
    return Path(found).resolve().parents[1]


def current_environment() -> None:
    """The copy shares the suite's .venv, and scripts/setup_env.sh reinstalls the package (editable, from the
    folder it runs in) whenever the environment's stamp is stale, e.g. after pyproject.toml changed under a
    developer's pytest. Done from the copy, that would leave the suite importing a temporary folder; so the
    set-up runs here first, in this checkout, where a reinstall is the right one."""
    subprocess.run(["bash", "-c", "source scripts/setup_env.sh"], cwd=ROOT, check=True, capture_output=True,
                   timeout=900, env={**os.environ, "VENV": str(Path(sys.executable).parents[1])})


@pytest.mark.seconds(200)
def test_readme_demo_and_quick_start_run_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    current_environment()
    repo = checkout_copy(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if k not in ("VENV", "PYTHONPATH")}

    blocks = bash_blocks(readme, "Commands")
    assert blocks[0].strip() == "bash scripts/test.sh"  # the suite itself: what runs this
    commands = "\n".join(blocks[1:])
    assert "scripts/demo.sh" in commands
    demo = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=400)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = demo.stdout
    assert "base model: random weights; head: trained on" in out
    accuracy, baseline = map(float, re.search(r"true source: ([\d.]+) \(majority class '\w+': ([\d.]+)\)", out).groups())
    assert accuracy > baseline + 0.2, out[-2000:]
    assert "stopping at the first full stop" in out and "finish" in out
    report = (repo / "demo-data" / "report.html").read_text()
    assert f"report: {repo / 'demo-data' / 'report.html'}" in out and 'id="labels"' in report
    named = re.search(r"# writes demo-data/\{(.*?)\}", commands).group(1).split(",")
    named += re.findall(r"`([\w./]+)`", readme.split(commands, 1)[1].split("\n## ", 1)[0].split("\n\n")[1])
    assert {"completions", "report.html", "tickets.parquet", "requests.jsonl"} <= set(named)
    assert [n for n in named if not (repo / "demo-data" / n.strip()).exists()] == []  # what the README says it writes
    completions = pq.read_table(repo / "demo-data" / "completions")
    assert set(completions.column("finish_reason").to_pylist()) <= {"eos", "stop", "length"}
    assert "Token authentication" not in demo.stderr

    quick = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(bash_blocks(readme, "Quick start"))], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=300)
    assert quick.returncode == 0, quick.stdout[-3000:] + quick.stderr[-3000:]
    assert "Usage: persimmon-batch" in quick.stdout and "complete" in quick.stdout
    vectors = pq.read_table(repo / "demo-data" / "vectors")
    assert vectors.num_rows == 900 and vectors.schema.field("embedding").type.list_size == 256
    assert (repo / "demo-data" / "daily" / "dt=2026-11-24" / "_SUCCESS").exists()
    fields = pq.read_table(repo / "demo-data" / "fields").to_pylist()
    valid = [r for r in fields if r["error"] is None]  # a random-weight model may run out of its 128 tokens
    assert valid and all(json.loads(r["completion"]) == r["parsed"] for r in valid)
    assert {r["error"] for r in fields} <= {None, "incomplete structured output"}
    responses = [json.loads(x) for x in (repo / "demo-data" / "batch-results" / "requests.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in responses] == [f"ticket-{i}" for i in range(6)]
    assert (repo / "demo-data" / "batch-results" / "requests.errors.jsonl").read_text() == ""
    scores = pq.read_table(repo / "demo-data" / "scores", columns=["tokens", "perplexity"]).to_pylist()
    assert len(scores) == 900 and all(r["perplexity"] > 1 for r in scores if r["tokens"])
    assert installed_from() == ROOT  # the copy's set-up left the suite's environment as it was
