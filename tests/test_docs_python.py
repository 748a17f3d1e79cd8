"""Every ```python block of the README and docs/ runs, in order per file, against tiny real checkpoints put
where the examples name the real ones (the same for the files they read), on a real Ray for the Ray Data
example. A block that stops working fails here."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import build_hf_model
from tests.persimmon.test_convert import release  # noqa: F401 - the fixture: a synthetic Adept release

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)


def test_every_page_with_python_is_covered():
    assert [p for p in PAGES if python_blocks(p)] == ["README.md", "docs/model.md"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, sentencepiece_model):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, kind in (("chat", "causal"), ("triage", "seqcls")):
        extra = {"num_labels": 3} if kind == "seqcls" else {}
        model = build_hf_model(root / name, kind, max_position_embeddings=512, **extra)  # room for the examples
        if kind == "seqcls":
            model.config.id2label = {0: "billing", 1: "bug", 2: "praise"}
            model.save_pretrained(root / name)
        shutil.copy(sentencepiece_model, root / name / "tokenizer.model")
        paths[name] = root / name
    return paths


def run_page(page: str, where: Path, names: dict[str, str], preamble: str = "") -> dict:
    code = "\n".join(python_blocks(page))
    for real, ours in sorted(names.items(), key=lambda kv: -len(kv[0])):  # longest first: no partial replace
        code = code.replace(f'"{real}"', repr(ours))
    namespace: dict = {}
    before = os.getcwd()
    os.chdir(where)
    try:
        exec(compile(preamble + "\n" + code, page, "exec"), namespace)
    finally:
        os.chdir(before)
    return namespace


@pytest.mark.slow  # starts Ray (or the CLI in a subprocess)
def test_the_readme_python_blocks_run(models, release, tmp_path):  # noqa: F811 - the fixture
    import ray

    import jobs.corpus

    texts = [t[:300] for t in jobs.corpus.paragraphs()[:40]]
    tickets = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(tickets, tmp_path / "tickets.parquet")
    (tmp_path / "tickets").mkdir()
    pq.write_table(tickets, tmp_path / "tickets" / "part-0.parquet")
    _, adept = release
    names = {"/models/persimmon-8b-triage": str(models["triage"]), "/models/persimmon-8b-chat": str(models["chat"]),
             "/models/persimmon-8b-base": str(models["chat"]), "/models/copy": str(tmp_path / "copy"),
             "8b_base_model_release/": str(adept), "persimmon-8b-base-hf/": str(tmp_path / "converted"),
             "tickets/": str(tmp_path / "tickets"), "labels/": str(tmp_path / "labels")}  # Ray's workers: absolute
    preamble = ("import torch\ninput_ids = torch.tensor([[1, 5, 9, 12]])\nattention_mask = torch.ones_like(input_ids)\n"
                "questions = ['What does the license permit?', 'Who wrote it?']\n")
    # the CPUs a 2-core laptop has: the example must run there as written
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _system_config={"worker_niceness": 0})  # as the CLI starts Ray (jobs.execution.cluster)
    try:
        ns = run_page("README.md", tmp_path, names, preamble)
    finally:
        ray.shutdown()
    assert ns["model"].config.num_labels == 3 and len(ns["out"].texts) == 2  # the last `out`: generate's
    assert (tmp_path / "copy" / "config.json").exists() and (tmp_path / "converted" / "config.json").exists()
    stats = ns["clf"].stats.as_dict()
    for key in ("rows", "errors", "truncated", "real_tokens", "padding_waste", "seconds"):  # as the comment says
        assert key in stats
    assert ns["table"].column_names == ["id", "text", "label", "score", "probs", "error"]
    labeled = pq.read_table(tmp_path / "labels")
    assert sorted(labeled.column("id").to_pylist()) == list(range(len(texts)))


def test_the_model_page_python_blocks_run(models):
    from persimmon import PersimmonForCausalLM, PersimmonTokenizer, SamplingParams

    tok = PersimmonTokenizer.from_pretrained(models["chat"])
    lm = PersimmonForCausalLM.from_pretrained(models["chat"])
    preamble = "questions = ['What does the license permit?', 'Who wrote it?']\n"
    namespace = {"tok": tok, "lm": lm, "SamplingParams": SamplingParams}
    code = preamble + "\n".join(python_blocks("docs/model.md"))
    exec(compile(code, "docs/model.md", "exec"), namespace)
    assert namespace["engine"].counters["decode_steps"] > 0
