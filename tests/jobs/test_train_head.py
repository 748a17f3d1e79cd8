"""persimmon-batch train-head through the real CLI (real Ray, Parquet, safetensors); transformers loads what
it writes and gives the same probabilities as our classifier."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.jobs.conftest import run_here

GREEK = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma omega".split()
COLORS = "red green blue yellow purple orange black white brown pink grey violet".split()
TOOLS = "hammer saw drill chisel wrench pliers file clamp ruler level spanner vise".split()


def labeled(folder, rows=240, shards=2, sources=(("greek", GREEK), ("color", COLORS)), seed=0, label=None):
    """Rows of words from one source each, labeled with its name (`label(i, name)` may change that)."""
    rng = random.Random(seed)
    table = []
    for i in range(rows):
        name, words = sources[i % len(sources)]
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        table.append({"id": i, "text": text, "topic": label(i, name) if label else name})
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-rows // shards)
    for s in range(shards):
        pq.write_table(pa.Table.from_pylist(table[s * step:(s + 1) * step]), folder / f"part-{s}.parquet")
    return table


def train(base, input, output, *extra, check=True):
    proc = run_here("train-head", "--model", base, "--input", input, "--label-column", "topic", "--output", output, *extra)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def hf_probs(path, tok, texts):
    import transformers

    hf = transformers.PersimmonForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.stack([torch.softmax(hf(torch.tensor([tok.encode(t)])).logits[0].float(), -1) for t in texts])


def test_train_head_on_a_causal_base_then_classify(tmp_path, causal_model, trained_head):
    from pipelines import ClassificationPipeline

    rows, root, proc = trained_head
    metrics = json.loads((root / "head" / "metrics.json").read_text())
    assert metrics["holdout"]["accuracy"] > 0.95, proc.stdout
    assert metrics["majority_baseline"]["accuracy"] < 0.6
    assert metrics["rows"]["skipped_without_label"] == 12 and metrics["labels"] == ["color", "greek"]
    assert metrics["rows"]["train"] + metrics["rows"]["holdout"] == 228
    assert "12 rows without a label are skipped" in proc.stdout and "held-out accuracy" in proc.stdout
    assert "rows: 240 processed, 12 with errors" in proc.stdout  # the unlabeled rows never reached the model
    head = root / "head"
    assert (head / "score.safetensors").is_file() and (head / "README.md").is_file()
    assert all((head / f).is_symlink() for f in json.loads((head / "model.safetensors.index.json").read_text())[
        "weight_map"].values() if f != "score.safetensors"), "the base's weights are linked, not copied"

    # transformers loads the directory unchanged and agrees with our pipeline
    texts = [r["text"] for r in rows[:24]]
    pipe = ClassificationPipeline(head, dtype="float32")
    ours = pipe(pa.table({"text": texts}))
    torch.testing.assert_close(torch.tensor(ours.column("probs").to_pylist()), hf_probs(head, pipe.tokenizer, texts),
                               atol=1e-5, rtol=0)

    # a second train-head over the same rows reuses the features (the embed job finds them committed)
    again = train(causal_model, root / "labeled", tmp_path / "head2", "--seed", "3")
    assert "(2 already committed)" in again.stdout and "rows: 0 processed" in again.stdout, again.stdout
    assert json.loads((tmp_path / "head2" / "metrics.json").read_text())["seed"] == 3

    # and it classifies (the demo's README test runs a trained head through `persimmon-batch classify`)
    truth = [r["topic"] for r in rows[:24]]
    assert sum(a == b for a, b in zip(ours.column("label").to_pylist(), truth)) >= 22


def test_multi_label_on_a_classifier_base(ray_local, tmp_path, demo_root):
    from pipelines import ClassificationPipeline

    def tags(i, name):  # greek rows, color rows, and rows of both
        return {0: ["greek"], 1: ["color"], 2: ["greek", "color"]}[i % 3]

    sources = (("greek", GREEK), ("color", COLORS), ("both", GREEK + COLORS))
    rows = labeled(tmp_path / "labeled", rows=180, sources=sources, label=tags)
    proc = train(demo_root / "model", tmp_path / "labeled", tmp_path / "head", "--multi-label", "--holdout", "0.2")
    assert "already a classifier" in proc.stdout and "head is replaced" in proc.stdout
    metrics = json.loads((tmp_path / "head" / "metrics.json").read_text())
    assert metrics["problem_type"] == "multi_label_classification" and metrics["rows"]["holdout"] == 36
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and len(config["id2label"]) == 2
    texts = [r["text"] for r in rows[:12]]
    pipe = ClassificationPipeline(tmp_path / "head", dtype="float32")
    ours = pipe(pa.table({"text": texts}))
    import transformers

    hf = transformers.PersimmonForSequenceClassification.from_pretrained(tmp_path / "head").eval()
    with torch.no_grad():
        want = torch.stack([torch.sigmoid(hf(torch.tensor([pipe.tokenizer.encode(t)])).logits[0]) for t in texts])
    torch.testing.assert_close(torch.tensor(ours.column("probs").to_pylist()), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,message", [
    ("one label", "has one label only ('greek' on 40 rows)"),
    ("rare label", "label(s) 'x' of column 'topic' have fewer than 2 rows"),
    ("all null", "has no labels: every one of its 40 rows is null or empty"),
    ("float labels", "label column 'topic' holds double; expected strings, integers or booleans"),
    ("list without --multi-label", "for a list of labels per row use --multi-label"),
    ("no label column", "has no column 'topic'"),
    ("output is the base", "must be outside the base model"),
    ("an embedding column", "the input already has column(s) ['embedding'] that the features job adds"),
    ("numbers as text", "text column 'text' of part-0.parquet holds int64, not text"),
])
def test_bad_labels_are_refused_before_any_work(tmp_path, causal_model, case, message):
    folder = tmp_path / "labeled"
    folder.mkdir()
    values = {
        "one label": ["greek"] * 40, "rare label": ["greek"] * 20 + ["color"] * 19 + ["x"],
        "all null": pa.array([None] * 40, pa.string()), "float labels": [0.5] * 40,
        "list without --multi-label": [["a"]] * 40, "no label column": None, "output is the base": ["a", "b"] * 20,
        "an embedding column": ["a", "b"] * 20, "numbers as text": ["a", "b"] * 20,
    }[case]
    table = pa.table({"text": list(range(40)) if case == "numbers as text" else ["alpha beta"] * 40})
    if case == "an embedding column":
        table = table.append_column("embedding", pa.array([1.0] * 40))
    if values is not None:
        table = table.append_column("topic", values if isinstance(values, pa.Array) else pa.array(values))
    pq.write_table(table, folder / "part-0.parquet")
    output = causal_model if case == "output is the base" else tmp_path / "head"
    from typer.testing import CliRunner

    from jobs.cli import app

    result = CliRunner().invoke(app, ["train-head", "--model", str(causal_model), "--input", str(folder),
                                      "--label-column", "topic", "--output", str(output)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "head").exists()


def test_an_unfinished_feature_job_passes_its_exit_status_on(tmp_path, causal_model):
    """Ctrl-C / SIGTERM / a busy features folder during the embed job: train-head ends with that job's status
    (130, 143, 75) and writes nothing."""
    from jobs.train_head import FeatureJobUnfinished, TrainHeadSpec, train_head

    labeled(tmp_path / "labeled", rows=40)
    spec = TrainHeadSpec(str(causal_model), str(tmp_path / "labeled"), "topic", str(tmp_path / "head"),
                         features=str(tmp_path / "features"))
    for code in (130, 143, 75):
        with pytest.raises(FeatureJobUnfinished, match=f"exit {code}.*rerun the same command") as caught:
            train_head(spec, lambda embed: code, echo=lambda line: None)
        assert caught.value.code == code
    assert not (tmp_path / "head").exists()


def test_what_train_head_may_replace(tmp_path, causal_model):
    """Its own output and features folders only: never a folder of the user's that happens to hold a
    metrics.json, files added to an earlier output, another job's output given as --features, or an output
    another train-head is writing."""
    from jobs.output.lease import OutputBusy, OutputLease
    from jobs.output.paths import resolve
    from jobs.train_head import TrainHeadError, TrainHeadSpec, train_head

    labeled(tmp_path / "labeled", rows=40)

    def attempt(output, features=None):
        spec = TrainHeadSpec(str(causal_model), str(tmp_path / "labeled"), "topic", str(output),
                             features=str(features or tmp_path / "features"))
        return train_head(spec, lambda embed: 1, echo=lambda line: None)

    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / "metrics.json").write_text("{}")
    (experiment / "results.csv").write_text("precious")
    with pytest.raises(TrainHeadError, match="exists and is not a train-head output"):
        attempt(experiment)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"written_by": "persimmon-batch train-head"}')
    (earlier / "model.safetensors.index.json").write_text('{"weight_map": {"score.weight": "score.safetensors"}}')
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(TrainHeadError, match="also holds notes.txt"):
        attempt(earlier)
    other_job = tmp_path / "labels_out"
    other_job.mkdir()
    (other_job / "_manifest.json").write_text('{"spec": {"task": "classify", "name": null}, "shards": {}}')
    with pytest.raises(TrainHeadError, match="holds the output of another job"):
        attempt(tmp_path / "head", features=other_job)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "part-0.parquet").write_text("x")
    with pytest.raises(TrainHeadError, match="not empty and holds no train-head features"):
        attempt(tmp_path / "head", features=tmp_path / "stuff")
    with pytest.raises(TrainHeadError, match="must be outside --output"):
        attempt(tmp_path / "head", features=tmp_path / "head" / "features")
    held = OutputLease(*resolve(str(tmp_path / "head")), str(tmp_path / "head"))  # in the output, as every command
    held.acquire()  # another train-head (this live process) is writing tmp_path/head
    try:
        with pytest.raises(OutputBusy):
            attempt(tmp_path / "head")
    finally:
        held.release()
    assert (experiment / "results.csv").read_text() == "precious" and (earlier / "notes.txt").exists()
