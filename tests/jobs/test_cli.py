"""persimmon-batch end to end: argument checks before Ray, a killed driver, and a two-node Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from tests.jobs.conftest import RayCluster, add_shards, cli, wait_for_commits
from jobs.output.manifest import MANIFEST, SUCCESS
from jobs.output.commit import TEMPORARY

BIN = Path(sys.executable).parent
runner = CliRunner()


def ids_in(out: Path) -> list[int]:
    files = sorted(p for p in out.glob("*.parquet"))
    return sorted(i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


def input_ids(input: Path) -> list[int]:
    return sorted(i for f in input.glob("*.parquet") for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


@pytest.mark.parametrize("args,message", [
    (["--model", "{missing}"], "does not exist"),
    (["--model", "{notokenizer}"], "has no tokenizer.model"),
    (["--text-column", "body"], "text column 'body' not in part-00000.parquet; its columns are ['id', 'text']"),
    (["--input", "{missing}"], "input {missing} does not exist"),
    (["--input", "{empty}"], "no Parquet, CSV or JSON Lines files in input"),
    (["--candidate-labels", "onlyone"], "--candidate-labels: needs at least two non-empty labels"),
    (["--prompt-template", "x {{text}}"], "--prompt-template: applies only to zero-shot classification"),
    (["--actors", "0"], "--actors': Input should be greater than or equal to 1"),
    (["--candidate-labels", "a,b"], "zero-shot classification (--candidate-labels) needs a causal LM, but"),
])
def test_bad_arguments_fail_before_anything_starts(demo, tmp_path, args, message):
    model, input, out = demo
    notokenizer = tmp_path / "notok"
    notokenizer.mkdir()
    shutil.copy(model / "config.json", notokenizer)
    (tmp_path / "empty").mkdir()
    values = {"missing": str(tmp_path / "missing"), "notokenizer": str(notokenizer), "empty": str(tmp_path / "empty")}
    base = {"--model": str(model), "--input": str(input), "--output": str(out)}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1].format(**values)
    result = runner.invoke(app, ["classify", *[x for kv in base.items() for x in kv]])
    assert result.exit_code == 2
    # typer draws usage errors in a box that wraps long paths: compare the words only
    flat = "".join(result.output.replace("│", " ").split())
    assert "".join(message.format(**values).split()) in flat
    assert "Traceback" not in result.output and not out.exists()


def test_status_and_generate_argument_checks(demo, tmp_path):
    model, input, out = demo
    result = runner.invoke(app, ["generate", "--model", str(model), "--input", str(input), "--output", str(out)])
    assert result.exit_code == 2 and "generate needs a causal LM" in result.output
    causal = tmp_path / "causal"  # the same files without the classifier's head
    causal.mkdir()
    shutil.copy(model / "config.json", causal)
    shutil.copy(model / "tokenizer.model", causal)
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    weights["lm_head.weight"] = weights.pop("score.weight").new_zeros(weights["model.embed_tokens.weight"].shape)
    save_file(weights, causal / "model.safetensors", metadata={"format": "pt"})
    result = runner.invoke(app, ["classify", "--model", str(causal), "--input", str(input), "--output", str(out)])
    assert result.exit_code == 2 and "has no score.weight; for a causal LM give --candidate-labels" in result.output
    result = runner.invoke(app, ["status", str(out)])
    assert result.exit_code == 2 and "no manifest" in result.output
    result = runner.invoke(app, ["generate", "--model", str(model), "--input", str(input), "--output", str(out),
                                 "--prompt-template", "no placeholder"])
    assert result.exit_code == 2 and "must contain {text} exactly once" in result.output


def test_driver_killed_then_rerun_completes_exactly_once(demo):
    model, input, out = demo
    add_shards(input, 10)
    args = ["classify", "--model", str(model), "--input", str(input), "--output", str(out), "--batch-rows", "8"]
    proc = cli(*args, start_new_session=True)
    wait_for_commits(out, proc)  # mid-run: some shards committed, others not
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    assert not (out / SUCCESS).exists()
    rerun = cli(*args)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "already committed" in stdout
    assert "took the output over from an earlier run: its process is gone" in stdout
    assert ids_in(out) == input_ids(input)
    assert (out / SUCCESS).exists() and not (out / TEMPORARY).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or TEMPORARY in p.parts]


def test_two_node_cluster_runs_across_both_nodes(demo, tmp_path):
    model, input, out = demo
    bystander = RayCluster()  # someone else's cluster on the machine: it must outlive this test
    cluster = RayCluster()
    try:
        bystander.start_head("--include-dashboard=false", "--num-cpus=1")
        cluster.start_head("--include-dashboard=false", "--num-cpus=1")
        cluster.add_node("--num-cpus=1")
        # the client is not told about token auth: the runner finds the token and uses it
        client_env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        proc = subprocess.run([str(BIN / "persimmon-batch"), "classify", "--model", str(model), "--input", str(input),
                               "--output", str(out), "--address", cluster.address, "--actors", "2"],
                              capture_output=True, text=True, timeout=300, env=client_env)
        assert proc.returncode == 0, proc.stderr
        # `ray start` nodes run their workers at Ray's niceness 15: the run says what that costs, once
        assert (proc.stdout + proc.stderr).count("note: the actors run at niceness 15") == 1, proc.stdout
        cluster.stop()
        assert not cluster.alive()
        assert bystander.alive(), "stopping this test's cluster left the other cluster alone"
    finally:
        cluster.stop()
        bystander.stop()
    manifest = json.loads((out / MANIFEST).read_text())
    nodes = {entry["node"] for entry in manifest["shards"].values()}
    assert len(nodes) == 2, f"shards ran on {nodes}"
    assert ids_in(out) == input_ids(input)
    # the same labels as the pipeline in-process
    from pipelines import ClassificationPipeline

    pipe = ClassificationPipeline(model)
    for name in ("part-00000.parquet", "part-00003.parquet"):
        got, shard = pq.read_table(out / name), pq.read_table(input / name)
        assert got.column("id").to_pylist() == shard.column("id").to_pylist()
        assert got.column("label").to_pylist() == pipe(shard).column("label").to_pylist()


def test_ctrl_c_stops_cleanly_and_rerun_resumes(demo):
    model, input, out = demo
    add_shards(input, 8)
    args = ["classify", "--model", str(model), "--input", str(input), "--output", str(out), "--batch-rows", "8"]
    proc = cli(*args)
    deadline = time.time() + 240
    while time.time() < deadline and not any(out.glob("part-*.parquet")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted: rerun the same command to resume" in stdout
    assert (stdout + stderr).count("interrupted: rerun") == 1, (stdout, stderr)  # said once, in the summary
    assert not (out / SUCCESS).exists()
    status = runner.invoke(app, ["status", str(out)])
    assert "incomplete: rerun the job to finish it" in status.output and status.exit_code == 3
    # the rerun that finishes it: test_driver_killed_then_rerun_completes_exactly_once (after a SIGKILL)


def test_the_driver_plans_without_torch(demo_root):
    """The CLI and the job driver never load torch (1.5 s of start-up and memory only the workers need):
    parsing, validation, the checkpoint's dtype and heads, the output columns."""
    code = (
        "import sys\n"
        "from jobs.cli import app\n"
        "from jobs.planning.resolve import output_columns\n"
        "from jobs.spec import JobSpec\n"
        "from persimmon.config import PersimmonConfig\n"
        "from persimmon.files import load_dtype\n"
        f"spec = JobSpec('classify', {str(demo_root / 'model')!r}, 'in', 'out')\n"
        "spec.validate()\n"
        "config = PersimmonConfig.from_pretrained(spec.model)\n"
        "print(load_dtype(spec.model), output_columns(spec, config), spec.fingerprint('x', 'float32', config))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].startswith("float32 ['label', 'score', 'probs', 'error']") and out[1] == "False"
