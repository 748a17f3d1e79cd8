"""Fixtures for the job tests (a demo checkpoint and Parquet shards built from real text, real Ray) and helpers
that run the real CLI in a child process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.demo import build_demo
from jobs.output.manifest import MANIFEST


# the demo's model, narrower and shallower (its output differs, its code paths do not): most job tests run it
# through the real CLI, and at the demo's own size (256 x 4) computing its rows took most of their time
TEST_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), shards=4, rows_per_shard=60, vocab_size=800, shape=TEST_SHAPE)


@pytest.fixture(scope="session")
def full_size_model(demo_root, tmp_path_factory) -> Path:
    """The demo's classifier at the demo's own size (256 x 4): for a test that needs a unit to take a while."""
    import torch

    from jobs.demo import SHAPE
    from persimmon import PersimmonConfig, PersimmonForSequenceClassification

    path = tmp_path_factory.mktemp("full-size")
    config = PersimmonConfig.from_pretrained(demo_root / "model")
    torch.manual_seed(0)
    PersimmonForSequenceClassification(PersimmonConfig(**{**config.__dict__, **SHAPE})).save_pretrained(path)
    shutil.copy(demo_root / "model" / "tokenizer.model", path)
    return path


@pytest.fixture(scope="session")
def causal_model(demo_root, tmp_path_factory) -> Path:
    """A causal LM with the demo's tokenizer and shapes (random weights), for generate and zero-shot jobs."""
    import torch

    from persimmon import PersimmonConfig, PersimmonForCausalLM

    path = tmp_path_factory.mktemp("causal")
    config = PersimmonConfig.from_pretrained(demo_root / "model")
    config = PersimmonConfig(**{**config.__dict__, "id2label": None, "label2id": None, "num_labels": 2})
    torch.manual_seed(1)
    PersimmonForCausalLM(config).save_pretrained(path)
    shutil.copy(demo_root / "model" / "tokenizer.model", path)
    return path


@pytest.fixture
def demo(demo_root, tmp_path):
    """A private copy of the demo input (tests add bad shards to it) and the shared model."""
    shutil.copytree(demo_root / "input", tmp_path / "input")
    return demo_root / "model", tmp_path / "input", tmp_path / "out"


@pytest.fixture(scope="module")
def ray_local():
    """Ray for one test module (a cluster of its own: address="local" never joins another one)."""
    import ray

    from jobs.execution.cluster_auth import refresh_ray_config

    refresh_ray_config()  # an in-process CLI run before may have set RAY_AUTH_MODE
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _system_config={"worker_niceness": 0})  # as the CLI starts Ray (jobs.execution.cluster)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_shards(input: Path, upto: int) -> None:
    """Copies of the four demo shards as part-00004 .. part-{upto - 1}, with ids of their own (1000 x shard)."""
    for i in range(4, upto):
        table = pq.read_table(input / f"part-{i % 4:05d}.parquet")
        ids = pa.array([x + 1000 * i for x in table.column("id").to_pylist()])
        pq.write_table(table.set_column(0, "id", ids), input / f"part-{i:05d}.parquet")


def node_ports() -> list[str]:
    """`ray start` flags giving a node agent ports of its own, so two nodes on one machine never clash."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@pytest.fixture(scope="session")
def tiny_classifier(demo_root, tmp_path_factory) -> Path:
    """A one-layer classifier with the demo's tokenizer: fast enough for 250,000 rows in a test."""
    import torch

    from persimmon import PersimmonConfig, PersimmonForSequenceClassification

    path = tmp_path_factory.mktemp("tiny")
    config = PersimmonConfig.from_pretrained(demo_root / "model")
    config = PersimmonConfig(**{**config.__dict__, "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2})
    torch.manual_seed(2)
    PersimmonForSequenceClassification(config).save_pretrained(path)
    shutil.copy(demo_root / "model" / "tokenizer.model", path)
    return path


@pytest.fixture(scope="session")
def trained_head(causal_model, tmp_path_factory):
    """One train-head run through the CLI on labeled word rows (a few without a label): (rows, the folder holding
    `labeled/` and the new checkpoint `head/`, the finished process). Tests only read `head/`."""
    from tests.jobs.test_train_head import labeled, train

    root = tmp_path_factory.mktemp("trained")
    rows = labeled(root / "labeled", label=lambda i, name: None if i % 40 == 7 else ("" if i % 40 == 9 else name))
    return rows, root, train(causal_model, root / "labeled", root / "head")


def descendants(pid: int) -> list[int]:
    """Processes below `pid` (children, grandchildren...), read from /proc: only what this test started."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


BIN = Path(sys.executable).parent


def default_signals() -> None:
    """In a child before exec: Ctrl-C delivered as it is to a terminal's program, even when the suite itself
    runs with SIGINT ignored (nohup, a background job), which a child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "persimmon-batch"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=default_signals, **kwargs)


def run(*args, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    proc = cli(*args, **kwargs)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_here(*args, cwd: Path | str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The same CLI (jobs.cli.app), called in this process: on the test module's Ray (the ray_local fixture)
    when it is up, so a run costs no Ray start. For runs where the process boundary plays no part (nobody
    signals or kills the driver)."""
    from typer.testing import CliRunner

    from jobs.cli import app

    before = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def classify(model, input, out, *extra) -> list[str]:
    return ["classify", "--model", model, "--input", input, "--output", out, *extra]


def ids_of(folder: Path, pattern: str = "*.parquet") -> list[int]:
    return sorted(i for f in folder.glob(pattern) if not f.name.startswith(("_", "."))
                  for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


def manifest_of(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def wait_for_commits(out: Path, proc: subprocess.Popen, at_least: int = 1, timeout: float = 240) -> None:
    """Until the run has committed some shards (it is mid-run: model loaded, work under way)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if len([p for p in out.glob("part-*.parquet")]) >= at_least:
            return
        time.sleep(0.1)
    raise AssertionError("the run committed nothing in time")


class RayCluster:
    """A Ray cluster this test starts with `ray start`, under a temporary folder of its own; `stop()` ends only
    its processes (those naming its folder or its GCS port, and their descendants), never another user's
    cluster on the machine (`ray stop` would end every Ray process of the user)."""

    def __init__(self, env: dict | None = None) -> None:
        self.temp = tempfile.mkdtemp(prefix="pbr-", dir="/tmp")  # short: Ray's socket paths live under it
        self.port = free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", **(env or {})}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_head(self, *flags: str, timeout: int = 180) -> None:
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp}",
                        f"--ray-client-server-port={free_port()}", "--node-ip-address=127.0.0.1",
                        "--disable-usage-stats", *node_ports(), *flags], env=self.env, check=True,
                       capture_output=True, timeout=timeout)

    def add_node(self, *flags: str) -> None:
        subprocess.run([str(BIN / "ray"), "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                        "--disable-usage-stats", *node_ports(), *flags], env=self.env, check=True,
                       capture_output=True, timeout=120)

    def pids(self) -> list[int]:
        mine = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                title = process_title(int(entry.name))
                if self.temp in title or f":{self.port} " in f"{title} ":
                    mine.append(int(entry.name))
        return sorted({p for pid in mine for p in (pid, *descendants(pid))})

    def alive(self) -> bool:
        return bool(self.pids())

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while time.time() < deadline and self.pids():
                time.sleep(0.2)
        for _ in range(3):  # a process on its way out may still write a log file
            shutil.rmtree(self.temp, ignore_errors=True)
            if not os.path.exists(self.temp):
                break
            time.sleep(0.5)
