"""Fixtures for the job tests: a demo checkpoint and Parquet shards built from real text, and real Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.demo import build_demo


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), shards=4, rows_per_shard=60, vocab_size=800)


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
    """Ray for one test module: other modules start clusters of their own with `ray start`, and `ray stop`
    ends every Ray process on the machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def add_shards(input: Path, upto: int) -> None:
    """Copies of the four demo shards as part-00004 .. part-{upto - 1}, with ids of their own (1000 x shard)."""
    for i in range(4, upto):
        table = pq.read_table(input / f"part-{i % 4:05d}.parquet")
        ids = pa.array([x + 1000 * i for x in table.column("id").to_pylist()])
        pq.write_table(table.set_column(0, "id", ids), input / f"part-{i:05d}.parquet")


def node_ports() -> list[str]:
    """`ray start` flags giving a node agent ports of its own, so two nodes on one machine never clash."""
    from tests.jobs.test_cli import free_port

    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
