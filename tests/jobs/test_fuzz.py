"""Every command with a table of bad inputs (arguments, paths, job files, configs, manifests): each ends in
exactly one `error:` line and its documented exit status, never a traceback."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def place(demo_root, tmp_path_factory):
    """A folder of things to point commands at: the demo's model and input, and broken variants."""
    root = tmp_path_factory.mktemp("fuzz")
    model = demo_root / "model"
    (root / "file.txt").write_text("not a folder")
    (root / "empty").mkdir()
    for name, change in {"badjson": None, "otherarch": {"model_type": "llama"}, "zeroheads": {"num_attention_heads": 0},
                         "strlayers": {"num_hidden_layers": "4"}, "notdivisible": {"num_attention_heads": 7},
                         "hugevocab": {"vocab_size": 10 ** 9}}.items():
        shutil.copytree(model, root / name)
        if change is None:
            (root / name / "config.json").write_text("{not json")
        else:
            config = json.loads((root / name / "config.json").read_text())
            config.update(change)
            (root / name / "config.json").write_text(json.dumps(config))
    (root / "noweights").mkdir()
    shutil.copy(model / "config.json", root / "noweights")
    shutil.copy(model / "tokenizer.model", root / "noweights")
    (root / "corrupt").mkdir()
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(model / f, root / "corrupt")
    (root / "corrupt" / "model.safetensors").write_bytes(b"\xff" * 64)
    (root / "foreign").mkdir()
    (root / "foreign" / "_manifest.json").write_text('{"shards": "x"}')
    (root / "badmanifest").mkdir()
    (root / "badmanifest" / "_manifest.json").write_text("{oops")
    (root / "in").mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["a"]}), root / "in" / "a.parquet")
    for name, text in {"bad.toml": "name = ", "unknown.toml": 'name = "x"\nflavour = 1\n',
                       "types.toml": 'name = 3\ntask = "classify"\nmodel = 5\ninput = "i"\noutput = "o"\n',
                       "nan.toml": f'name = "n"\ntask = "classify"\nmodel = "{model}"\ninput = "{root / "in"}"\n'
                                   f'output = "{root / "out"}"\n[runner]\nstall_timeout = nan\n',
                       "ok.toml": f'name = "ok"\ntask = "classify"\nmodel = "{model}"\ninput = "{root / "in"}"\n'
                                  f'output = "{root / "out"}"\n'}.items():
        (root / name).write_text(text)
    return {"root": root, "model": model, "input": demo_root / "input"}


def classify(place, **values):
    args = {"--model": str(place["model"]), "--input": str(place["input"]), "--output": str(place["root"] / "out")}
    args.update({k: str(v).format(**{k2: str(v2) for k2, v2 in place.items()}) for k, v in values.items()
                 if v is not None})
    return [x for kv in args.items() for x in kv]


CASES = {  # name: (command line from `place`, exit status)
    "no-model": (lambda p: ["classify", "--input", str(p["input"]), "--output", "o"], 2),
    "model-missing": (lambda p: ["classify", *classify(p, **{"--model": "{root}/nothing"})], 2),
    "model-is-file": (lambda p: ["classify", *classify(p, **{"--model": "{root}/file.txt"})], 2),
    "model-empty": (lambda p: ["classify", *classify(p, **{"--model": "{root}/empty"})], 2),
    "config-not-json": (lambda p: ["classify", *classify(p, **{"--model": "{root}/badjson"})], 2),
    "config-other-arch": (lambda p: ["classify", *classify(p, **{"--model": "{root}/otherarch"})], 2),
    "config-zero-heads": (lambda p: ["classify", *classify(p, **{"--model": "{root}/zeroheads"})], 2),
    "config-string-layers": (lambda p: ["classify", *classify(p, **{"--model": "{root}/strlayers"})], 2),
    "config-heads-not-dividing": (lambda p: ["classify", *classify(p, **{"--model": "{root}/notdivisible"})], 2),
    "config-huge-vocab": (lambda p: ["classify", *classify(p, **{"--model": "{root}/hugevocab"})], 2),
    "no-weights": (lambda p: ["classify", *classify(p, **{"--model": "{root}/noweights"})], 2),
    "corrupt-weights": (lambda p: ["classify", *classify(p, **{"--model": "{root}/corrupt"})], 2),
    "input-missing": (lambda p: ["classify", *classify(p, **{"--input": "{root}/nothing"})], 2),
    "input-empty-string": (lambda p: ["classify", *classify(p, **{"--input": ""})], 2),
    "input-empty-folder": (lambda p: ["classify", *classify(p, **{"--input": "{root}/empty"})], 2),
    "input-bad-scheme": (lambda p: ["classify", *classify(p, **{"--input": "nosuch://bucket/x"})], 2),
    "input-dev-null": (lambda p: ["classify", *classify(p, **{"--input": "/dev/null"})], 2),
    "output-is-file": (lambda p: ["classify", *classify(p, **{"--output": "{root}/file.txt"})], 2),
    "output-system": (lambda p: ["classify", *classify(p, **{"--output": "/usr"})], 2),
    "output-foreign": (lambda p: ["classify", *classify(p, **{"--output": "{root}"})], 2),
    "output-foreign-manifest": (lambda p: ["classify", *classify(p, **{"--output": "{root}/foreign"})], 2),
    "output-bad-scheme": (lambda p: ["classify", *classify(p, **{"--output": "nosuch://bucket/x"})], 2),
    "actors-zero": (lambda p: ["classify", *classify(p), "--actors", "0"], 2),
    "actors-word": (lambda p: ["classify", *classify(p), "--actors", "many"], 2),
    "dtype-unknown": (lambda p: ["classify", *classify(p), "--dtype", "float8"], 2),
    "batch-tokens-negative": (lambda p: ["classify", *classify(p), "--batch-tokens", "-5"], 2),
    "stall-timeout-zero": (lambda p: ["classify", *classify(p), "--stall-timeout", "0"], 2),
    "lease-ttl-huge": (lambda p: ["classify", *classify(p), "--lease-ttl", "1e9"], 2),
    "unknown-flag": (lambda p: ["classify", *classify(p), "--colour", "red"], 2),
    "text-column-missing": (lambda p: ["classify", *classify(p), "--text-column", "nope"], 2),
    "labels-one": (lambda p: ["classify", *classify(p), "--candidate-labels", ","], 2),
    "generate-on-classifier": (lambda p: ["generate", *classify(p)], 2),
    "generate-top-p-zero": (lambda p: ["generate", *classify(p), "--top-p", "0"], 2),
    "generate-template": (lambda p: ["generate", *classify(p), "--prompt-template", "none"], 2),
    "generate-negative-temperature": (lambda p: ["generate", *classify(p), "--temperature", "-1"], 2),
    "embed-pooling": (lambda p: ["embed", *classify(p), "--pooling", "max"], 2),
    "train-head-no-label": (lambda p: ["train-head", *classify(p)], 2),
    "train-head-holdout": (lambda p: ["train-head", *classify(p), "--label-column", "id", "--holdout", "2"], 2),
    "train-head-system-output": (lambda p: ["train-head", *classify(p, **{"--output": "/etc"}), "--label-column",
                                            "id"], 2),
    "train-head-label-missing": (lambda p: ["train-head", *classify(p), "--label-column", "nope"], 2),
    "run-missing-file": (lambda p: ["run", str(p["root"] / "nothing.toml")], 2),
    "run-bad-toml": (lambda p: ["run", str(p["root"] / "bad.toml")], 2),
    "run-unknown-key": (lambda p: ["run", str(p["root"] / "unknown.toml")], 2),
    "run-wrong-types": (lambda p: ["run", str(p["root"] / "types.toml")], 2),
    "run-bad-date": (lambda p: ["run", str(p["root"] / "ok.toml"), "--date", "someday"], 2),
    "run-from-alone": (lambda p: ["run", str(p["root"] / "ok.toml"), "--from", "2026-01-01"], 2),
    "run-to-before-from": (lambda p: ["run", str(p["root"] / "ok.toml"), "--from", "2026-01-05", "--to",
                                      "2026-01-01"], 2),
    "validate-bad-toml": (lambda p: ["validate", str(p["root"] / "bad.toml")], 2),
    "validate-nan-timeout": (lambda p: ["validate", str(p["root"] / "nan.toml")], 2),
    "run-nan-timeout": (lambda p: ["run", str(p["root"] / "nan.toml")], 2),
    "schedule-bad-time": (lambda p: ["schedule", str(p["root"] / "ok.toml"), "--at", "25:00"], 2),
    "schedule-bad-format": (lambda p: ["schedule", str(p["root"] / "ok.toml"), "--format", "xml"], 2),
    "submit-nobody-there": (lambda p: ["submit", str(p["root"] / "ok.toml"), "--address", "http://127.0.0.1:9"], 2),
    "submit-bad-date": (lambda p: ["submit", str(p["root"] / "ok.toml"), "--address", "http://x", "--date", "x"], 2),
    "status-missing": (lambda p: ["status", str(p["root"] / "nothing")], 2),
    "status-file": (lambda p: ["status", str(p["root"] / "file.txt")], 2),
    "status-foreign": (lambda p: ["status", str(p["root"] / "foreign")], 2),
    "status-bad-json": (lambda p: ["status", str(p["root"] / "badmanifest")], 2),
    "status-bad-scheme": (lambda p: ["status", "nosuch://bucket/x"], 2),
    "convert-missing": (lambda p: ["convert", str(p["root"] / "nothing"), str(p["root"] / "conv")], 2),
    "convert-empty": (lambda p: ["convert", str(p["root"] / "empty"), str(p["root"] / "conv")], 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_its_exit_status(place, case):
    build, status = CASES[case]
    result = runner.invoke(app, build(place))
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert len(lines) == 1, result.output
    assert result.exit_code == status, result.output
    assert not (place["root"] / "out").exists(), "a refused command writes nothing"
