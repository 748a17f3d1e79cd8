"""Shared fixtures: tiny random Persimmon checkpoints built and saved by transformers (the numerical oracle)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=48,
)

# under scripts/test.sh's two pytest processes, each computes on one thread: two of torch's 2-thread pools
# spinning on 2 cores slow each other more than they gain
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
# model checksums are cached per user; the suite (and the CLI processes it starts) keeps its own cache
os.environ["PERSIMMON_BATCH_CACHE"] = tempfile.mkdtemp(prefix="persimmon-batch-test-cache-")


def hf_config(rope_theta: float = 25000.0, partial_rotary_factor: float = 0.5, rope_scaling: dict | None = None,
              **overrides):
    """A transformers PersimmonConfig in whichever layout the installed transformers speaks."""
    kwargs = {**TINY, **overrides}
    if int(transformers.__version__.split(".")[0]) >= 5:
        params = {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": partial_rotary_factor}
        if rope_scaling:
            params.update(rope_type=rope_scaling["type"], factor=rope_scaling["factor"])
        kwargs["rope_parameters"] = params
    else:
        kwargs.update(rope_theta=rope_theta, partial_rotary_factor=partial_rotary_factor, rope_scaling=rope_scaling)
    return transformers.PersimmonConfig(**kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (biases and LayerNorms included) random values, so no loading slip hides behind
    a zero bias or a unit LayerNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def build_hf_model(path: Path, kind: str = "causal", seed: int = 0, tokenizer: Path | None = None, **config_kwargs):
    """Build a tiny random transformers Persimmon model, save it to `path` (with `tokenizer`, a sentencepiece
    model, as its tokenizer.model when given), return it in eval mode."""
    torch.manual_seed(seed)
    cls = {
        "causal": transformers.PersimmonForCausalLM,
        "seqcls": transformers.PersimmonForSequenceClassification,
        "base": transformers.PersimmonModel,
    }[kind]
    model = cls(hf_config(**config_kwargs)).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, Path(path) / "tokenizer.model")
    return model


def train_sentencepiece(prefix: Path, vocab_size: int = TINY["vocab_size"], extra_symbols=("|ENDOFTEXT|",)) -> Path:
    """A small Unigram model with byte fallback, trained on real prose; returns the .model path."""
    import sentencepiece as spm

    from jobs.corpus import paragraphs

    corpus = prefix.parent / "corpus.txt"
    corpus.write_text("\n".join(paragraphs()))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
        byte_fallback=True, user_defined_symbols=list(extra_symbols), hard_vocab_limit=False,
        # identity normalization keeps every input byte, so decode(encode(x)) == x for any text
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer")


# The fast lane (`bash scripts/test.sh -m "not slow"`, a few minutes): everything but the modules that drive the
# real CLI through subprocesses, clusters, kills and the README demo, the tests that start a Ray of their own
# (the ray_local fixture), and the tests marked `slow` by hand (a Ray started in the test itself).
SLOW_MODULES = {"test_adversary", "test_readme", "test_safety", "test_submit", "test_s3", "test_pool", "test_runner",
                "test_cli", "test_batch_api"}
SLOW_FIXTURES = {"ray_local"}


# The longest files first: scripts/test.sh runs the files on two pytest processes, a whole file each, handed
# out in collection order (with --no-loadscope-reorder: xdist's own order is by number of tests, which put the
# README demo, one test of 3-4 minutes, last, to run on alone at the end). A file's weight is the sum of its
# tests' seconds in the last run here (the pytest cache), else an estimate: a `seconds(n)` mark, else 12 s for a
# slow test and 0.3 s for another.
SECONDS_KEY = "persimmon/test-seconds"
GUESS = {True: 12.0, False: 0.3}


def _guess(item) -> float:
    mark = item.get_closest_marker("seconds")
    return float(mark.args[0]) if mark else GUESS[item.get_closest_marker("slow") is not None]


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    seen = cache.get(SECONDS_KEY, {}) if cache is not None else {}
    weight: dict[str, float] = {}
    for item in items:
        file = item.nodeid.split("::")[0]
        weight[file] = weight.get(file, 0.0) + seen.get(item.nodeid, _guess(item))
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])  # stable: a file's tests keep their order


_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _SECONDS[report.nodeid] = _SECONDS.get(report.nodeid, 0.0) + report.duration  # setup, call and teardown


def pytest_sessionfinish(session):
    """Each test's seconds into the cache for the next run's order (from the main process only: xdist's
    workers report to it)."""
    config = session.config
    cache = getattr(config, "cache", None)
    if cache is None or hasattr(config, "workerinput") or not _SECONDS:
        return
    seen = cache.get(SECONDS_KEY, {})
    seen.update({k: round(v, 2) for k, v in _SECONDS.items()})
    cache.set(SECONDS_KEY, seen)
