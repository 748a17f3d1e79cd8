"""Extraction and scoring jobs through the real CLI on real Ray: `generate --json-schema` gives completions
that validate, a typed `parsed` column equal to them and logprobs; a rerun is a no-op; `score` equals the
pipeline; bad constraints fail in one line before anything starts, with nothing written."""

from __future__ import annotations

import json

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.jobs.conftest import ids_of, manifest_of, run_here

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "topic": {"type": "string", "pattern": "^[a-z ]{1,10}$"},
        "urgent": {"type": "boolean"},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["sentiment", "topic", "urgent"],
}


def generate(model, input, out, *extra):
    return ["generate", "--model", model, "--input", input, "--output", out, *extra]


def test_an_extraction_job_gives_valid_typed_rows(ray_local, demo, causal_model, tmp_path):
    _, input, out = demo
    for name in ("part-00002.parquet", "part-00003.parquet"):  # two shards are enough here
        (input / name).unlink()
    schema = tmp_path / "ticket.json"
    schema.write_text(json.dumps(SCHEMA))
    args = generate(causal_model, input, out, "--json-schema", schema, "--max-new-tokens", 60, "--logprobs", 2,
                    "--temperature", 0.7)
    done = run_here(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    complete = 0
    for file in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(file)
        parsed = table.schema.field("parsed").type
        assert parsed == pa.struct([pa.field("sentiment", pa.string(), False), pa.field("topic", pa.string(), False),
                                    pa.field("urgent", pa.bool_(), False), ("priority", pa.int64())])
        for row in table.to_pylist():
            assert len(row["logprobs"]) == row["completion_tokens"]
            assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in row["logprobs"])
            if row["error"] == "incomplete structured output":
                assert row["finish_reason"] == "length" and row["parsed"] is None and row["completion"]
                continue
            assert row["error"] is None and row["finish_reason"] == "stop"
            value = json.loads(row["completion"])
            jsonschema.validate(value, SCHEMA)
            assert row["parsed"] == {"priority": None, **value}
            complete += 1
    assert complete >= 0.9 * len(ids_of(out))
    assert manifest_of(out)["spec"]["options"]["json_schema"] == json.dumps(SCHEMA)  # the file's content
    again = run_here(*args)
    assert again.returncode == 0 and "2 done (2 already committed)" in again.stdout
    # the schema file changed: the outputs are another job's
    schema.write_text(json.dumps({**SCHEMA, "required": ["sentiment"]}))
    changed = run_here(*args)
    assert changed.returncode == 2 and "another" in changed.stderr, changed.stderr


def test_a_score_job_equals_the_pipeline(ray_local, demo, causal_model):
    from pipelines import ScorePipeline

    _, input, out = demo
    done = run_here("score", "--model", causal_model, "--input", input, "--output", out)
    assert done.returncode == 0, done.stdout + done.stderr
    pipe = ScorePipeline(causal_model)
    for file in sorted(out.glob("part-*.parquet")):
        got = pq.read_table(file)
        expected = pipe(pq.read_table(input / file.name))
        assert got.column_names[-4:] == ["logprob", "tokens", "perplexity", "error"]
        assert got.column("tokens").to_pylist() == expected.column("tokens").to_pylist()
        for a, b in zip(got.column("logprob").to_pylist(), expected.column("logprob").to_pylist()):
            assert (a is None and b is None) or abs(a - b) <= 1e-6 * abs(b)


@pytest.mark.parametrize("extra,message", [
    (["--json-schema", "{missing}"], "--json-schema: no such file"),
    (["--json-schema", "{{\"type\": "], "--json-schema: the JSON schema is not valid JSON"),
    (["--regex", "[a-"], "--regex: the regex does not compile"),
    (["--regex", "a+", "--choices", "x,y"], "--choices: give one constraint at most, got regex, choices"),
    (["--grammar", "{lark}"], "--grammar: the Lark grammar does not compile"),
    (["--logprobs", "21"], "--logprobs': Input should be less than or equal to 20"),
    # what only the model's vocabulary shows, still before Ray starts
    (["--choices", ",".join(f"c{i}" for i in range(10_000))], "choices: the choices cannot be followed: Parser Error"),
    (["--json-schema", "{deep}"], "json-schema: the JSON schema does not compile"),
    (["--grammar", "{token}"], "grammar: the Lark grammar does not compile"),
])
def test_bad_constraints_fail_before_anything_starts(demo, causal_model, tmp_path, extra, message):
    _, input, out = demo
    lark = tmp_path / "bad.lark"
    lark.write_text("start: missing_rule\n")
    token = tmp_path / "token.lark"
    token.write_text("start: <|no_such_token|>\n")
    deep: dict = {"type": "string"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    values = {"missing": str(tmp_path / "nope.json"), "lark": str(lark), "token": str(token),
              "deep": json.dumps(deep)}
    done = run_here(*generate(causal_model, input, out, *[e.format(**values) for e in extra]))
    assert done.returncode == 2, done.stdout + done.stderr
    flat = " ".join((done.stdout + done.stderr).replace("│", " ").split())
    assert message.format(**values) in flat and "Traceback" not in flat
    assert not out.exists()


def test_score_needs_a_causal_lm(demo):
    model, input, out = demo  # the demo's model is a classifier
    done = run_here("score", "--model", model, "--input", input, "--output", out)
    assert done.returncode == 2 and "score needs a causal LM" in done.stderr and not out.exists()


def test_a_template_past_the_window_is_refused_before_ray_and_the_corrected_command_runs(ray_local, demo, causal_model):
    _, input, out = demo
    long = "word " * 5000 + "{text}"
    done = run_here("score", "--model", causal_model, "--input", input, "--output", out, "--prompt-template", long)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "prompt_template: the prompt template alone takes" in done.stderr and not out.exists()
    fixed = run_here("score", "--model", causal_model, "--input", input, "--output", out, "--prompt-template",
                     "Ticket: {text}")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr


def test_a_spec_built_in_python_with_a_schema_that_is_not_json_is_a_usage_error(causal_model):
    """The Python API's JobSpec: a bad inline schema is refused with the usage problem (exit 2 from the CLI),
    not raised as the grammar's own exception from the vocabulary check."""
    from jobs.errors import UsageError
    from jobs.spec import JobSpec
    from pipelines.options import GenerateOptions

    spec = JobSpec("generate", str(causal_model), "in", "out", options=GenerateOptions(json_schema="{not json"))
    with pytest.raises(UsageError, match="json_schema: the JSON schema is not valid JSON"):
        spec.validate()



def test_a_backfill_builds_the_constraints_vocabulary_once_per_tokenizer_file(causal_model, tmp_path, monkeypatch):
    """Each date of a backfill validates its own job, probing the constraint against the model's vocabulary:
    the vocabulary is built once per tokenizer and config file in a process (a changed file is read again:
    the config holds the special token ids)."""
    import os
    import shutil

    from jobs import spec as spec_module
    from jobs.spec import JobSpec
    from persimmon import grammar
    from pipelines.options import GenerateOptions

    built = []
    real = grammar.Vocabulary.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(grammar.Vocabulary, "__init__", counting)
    spec_module._vocabulary.cache_clear()
    model = tmp_path / "model"
    shutil.copytree(causal_model, model)
    schema = tmp_path / "ticket.schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"topic": {"type": "string"}}}))
    for day in range(3):
        options = GenerateOptions(json_schema=str(schema), max_new_tokens=8)
        JobSpec("generate", str(model), str(tmp_path / "in"), str(tmp_path / f"out-{day}"), options=options).validate()
    assert len(built) == 1
    tokenizer = model / "tokenizer.model"
    os.utime(tokenizer, ns=(tokenizer.stat().st_atime_ns, tokenizer.stat().st_mtime_ns + 10**9))
    JobSpec("generate", str(model), str(tmp_path / "in"), str(tmp_path / "out-again"),
            options=GenerateOptions(json_schema=str(schema), max_new_tokens=8)).validate()
    assert len(built) == 2
    config = model / "config.json"
    config.write_text(config.read_text() + "\n")  # its special ids could have changed
    JobSpec("generate", str(model), str(tmp_path / "in"), str(tmp_path / "out-config"),
            options=GenerateOptions(json_schema=str(schema), max_new_tokens=8)).validate()
    assert len(built) == 3
