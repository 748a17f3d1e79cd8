"""One request line's problem is that line's error, never its file's: a table of poison lines, each inside a file
of good lines, through OpenAIBatchPipeline as a job's worker runs it (one stream per file). Every good line is
answered, each poison line is one error record with a code and a one-line message, and every record can be written
(it encodes as UTF-8). Also: a constrained row that did not complete is never a 200 "stop"; unseeded lines sample
independently while a seeded one is reproducible; a long legitimate line reports progress while it runs."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipelines import OpenAIBatchPipeline
from pipelines.batch_api import MAX_LINE_BYTES, MAX_LIST


def request(custom_id, url="/v1/completions", **body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"max_tokens": 3, "temperature": 0, **body}})


def chat(custom_id, content="Is it free?", **body):
    return request(custom_id, "/v1/chat/completions", messages=[{"role": "user", "content": content}], **body)


def embed(custom_id, value):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"input": value}})


def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


GOOD = [request("good-1", prompt="The software is provided"), chat("good-2"), embed("good-3", "a text"),
        request("good-4", prompt="Permission is hereby", n=2, temperature=0.8, seed=3)]
SURROGATE = "\\ud800"  # a lone surrogate escape: valid JSON, not valid Unicode
POISON = {  # name -> (the raw line, the error code it must get)
    "seed of 70 digits": (request("seed70", prompt="x", seed=10 ** 70), "invalid_request"),
    "negative seed past int64": (request("seedneg", prompt="x", seed=-(2 ** 64)), "invalid_request"),
    "integer of 5,000 digits": ('{"custom_id": "bigint", "method": "POST", "url": "/v1/completions", "body": '
                                '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}}", "invalid_json"),
    "nesting 100,000 deep": ('{"custom_id": "deep", "body": ' + "[" * 100_000 + "]" * 100_000 + "}", "invalid_json"),
    "surrogate in the prompt": (request("sur-prompt", prompt="a" + SURROGATE + "b").replace("\\\\", "\\"),
                                "invalid_request"),
    "surrogate in the custom_id": (request("sur" + SURROGATE + "id", prompt="x").replace("\\\\", "\\"),
                                   "invalid_request"),
    "surrogate in the model": (request("sur-model", prompt="x", model="m" + SURROGATE).replace("\\\\", "\\"),
                               "invalid_request"),
    "surrogate in a stop string": (request("sur-stop", prompt="x", stop=["a" + SURROGATE]).replace("\\\\", "\\"),
                                   "invalid_request"),
    "surrogate in an embedding input": (embed("sur-embed", "a" + SURROGATE).replace("\\\\", "\\"), "invalid_request"),
    "schema nested 300 deep": (chat("deep-schema", response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": nested_schema(300)}}), "invalid_request"),
    "too many embedding inputs": (embed("many-inputs", ["x"] * (MAX_LIST + 1)), "invalid_request"),
    "too many prompts": (request("many-prompts", prompt=["x"] * (MAX_LIST + 1)), "invalid_request"),
    "prompts times n past the bound": (request("many-rows", prompt=["x"] * (MAX_LIST // 4 + 1), n=4),
                                       "invalid_request"),
    "a line past the byte bound": (request("huge", prompt="word " * (MAX_LINE_BYTES // 5 + 1)), "line_too_large"),
    "a prompt far past the window": (request("long", prompt="word " * 100_000), "context_length_exceeded"),
    "an embedding input far past the window": (embed("long-embed", "word " * 100_000), "context_length_exceeded"),
    "NUL inside the JSON": ('{"custom_id": "nul",\x00 "body": {}}', "invalid_json"),
    "messages a number": (request("m5", "/v1/chat/completions", messages=5), "invalid_request"),
    "content a number": (request("c5", "/v1/chat/completions", messages=[{"role": "user", "content": 5}]),
                         "invalid_request"),
    "role missing": (request("norole", "/v1/chat/completions", messages=[{"content": "x"}]), "invalid_request"),
    "prompt an object": (request("pobj", prompt={"a": 1}), "invalid_request"),
    "max_tokens a string": (request("mts", prompt="x", max_tokens="5"), "invalid_request"),
    "max_tokens a float": (request("mtf", prompt="x", max_tokens=1e300), "invalid_request"),
    "temperature a string": (request("temp", prompt="x", temperature="hot"), "invalid_request"),
    "top_p a list": (request("topp", prompt="x", top_p=[]), "invalid_request"),
    "stop a number": (request("stop5", prompt="x", stop=5), "invalid_request"),
    "n a float": (request("nf", prompt="x", n=2.5), "invalid_request"),
    "seed a string": (request("seeds", prompt="x", seed="x"), "invalid_request"),
    "seed a bool": (request("seedb", prompt="x", seed=True), "invalid_request"),
    "logprobs a string": (chat("lps", logprobs="yes"), "invalid_request"),
    "response_format a string": (chat("rfs", response_format="json"), "invalid_request"),
    "schema a list": (chat("rfl", response_format={"type": "json_schema", "json_schema": {"schema": []}}),
                      "invalid_request"),
    "custom_id a number": (json.dumps({"custom_id": 5, "url": "/v1/completions", "body": {"prompt": "x"}}),
                           "missing_custom_id"),
    "url a number": (json.dumps({"custom_id": "u5", "url": 5, "body": {"prompt": "x"}}), "invalid_url"),
    "method a number": (json.dumps({"custom_id": "m", "method": 5, "url": "/v1/completions",
                                    "body": {"prompt": "x"}}), "invalid_url"),
    "body a list": (json.dumps({"custom_id": "bl", "url": "/v1/completions", "body": []}), "invalid_request"),
    "input a number": (embed("in5", 5), "invalid_request"),
    "encoding_format a number": (json.dumps({"custom_id": "ef", "url": "/v1/embeddings",
                                             "body": {"input": "x", "encoding_format": 5}}), "invalid_request"),
    "not UTF-8": (b'{"custom_id": "latin", "url": "/v1/completions", "body": {"prompt": "caf\xe9"}}', "invalid_utf8"),
}


@pytest.fixture(scope="module")
def pipeline(causal_model_dir):
    return OpenAIBatchPipeline(causal_model_dir, max_new_tokens=4)


@pytest.fixture(scope="module")
def causal_model_dir(tmp_path_factory, sentencepiece_model):
    from tests.conftest import build_hf_model

    path = tmp_path_factory.mktemp("batch-lines")
    build_hf_model(path, "causal", seed=5, tokenizer=sentencepiece_model, max_position_embeddings=256)
    return path


def run_file(pipeline, lines) -> list[dict]:
    """One file through the pipeline as a worker streams it; every record encodes as the sink writes it."""
    raws = [x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines]
    batch = pa.record_batch([pa.array(range(1, len(raws) + 1), pa.int64()), pa.array(raws, pa.binary())],
                            names=["line", "request"])
    records = []
    for table in pipeline.stream([batch]):
        for record in table.column("record").to_pylist():
            records.append(json.loads(record.encode("utf-8")))  # what RequestSink writes, byte for byte
    return records


@pytest.mark.parametrize("name", list(POISON))
def test_a_poison_line_is_that_lines_error(pipeline, name):
    raw, code = POISON[name]
    records = run_file(pipeline, [GOOD[0], GOOD[1], raw, GOOD[2], GOOD[3]])
    assert len(records) == 5
    for i in (0, 1, 3, 4):
        assert records[i]["error"] is None and records[i]["response"]["status_code"] == 200, records[i]
    error = records[2]["error"]
    assert records[2]["response"] is None and error is not None, records[2]
    assert error["code"] == code, error
    assert "\n" not in error["message"] and len(error["message"]) < 400, error["message"]
    assert "Traceback" not in error["message"]


def test_an_unreadable_line_keeps_the_custom_id_it_names_and_its_message_names_the_problem(pipeline):
    lines = [POISON["integer of 5,000 digits"][0], POISON["nesting 100,000 deep"][0],
             '{"custom_id": "cut-off", "url": "/v1/completions", "body": {"prompt": "x"',
             '{"custom_id": "one", "body": {"custom_id": "two"', '{"body": {"prompt": "x"']
    records = run_file(pipeline, lines)
    assert [r["custom_id"] for r in records] == ["bigint", "deep", "cut-off", None, None]
    assert [r["error"]["code"] for r in records] == ["invalid_json"] * 5
    message = records[0]["error"]["message"]
    assert "an integer of 5,000 digits" in message and "sys." not in message, message


def test_each_custom_id_is_in_the_output_once_whatever_the_lines_that_name_it(pipeline):
    """The first line that names a custom_id has it in its record; a later line naming it (readable or not) is
    an error whose record has none, so results and errors together name each id once."""
    lines = [request("a", prompt="x"), '{"custom_id": "a", "body": {"prompt": "broken',
             '{"custom_id": "b", "body": {"prompt": "broken', request("b", prompt="x"),
             request("c", prompt="x"), request("c", prompt="y"),
             b'{"custom_id": "d", "url": "/v1/completions", "body": {"prompt": "caf\xe9"}}', request("d", prompt="x")]
    records = run_file(pipeline, lines)
    assert [r["custom_id"] for r in records] == ["a", None, "b", None, "c", None, "d", None]
    assert [r["error"]["code"] if r["error"] else None for r in records] == [
        None, "invalid_json", "invalid_json", "duplicate_custom_id", None, "duplicate_custom_id", "invalid_utf8",
        "duplicate_custom_id"]
    assert "custom_id 'b' was used before, on line 3" in records[3]["error"]["message"]


def test_odd_but_valid_text_is_answered(pipeline):
    odd = [request("nul", prompt="a\x00b"), request("emoji", prompt="\U0001F600 \u202e rtl"),
           request("empty-stop", prompt="x", stop=[]), embed("ctrl", "\x07\x1b[31m red")]
    records = run_file(pipeline, odd)
    assert [r["error"] for r in records] == [None] * len(odd)


def test_a_failed_grammar_is_an_error_line_never_a_200_stop(pipeline):
    impossible = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^a{1000000}$"}},
                  "required": ["s"]}
    lines = [chat(f"grammar-{i}", max_tokens=m, response_format={"type": "json_schema",
                                                                 "json_schema": {"name": "x", "schema": s}})
             for i, (s, m) in enumerate([(impossible, 40), ({"$ref": "#"}, 20), ({"type": "object"}, 2)])]
    for record in run_file(pipeline, lines):
        if record["error"] is None:
            choice = record["response"]["body"]["choices"][0]
            assert choice["finish_reason"] == "length" or _valid_json(choice["message"]["content"]), record
        else:
            assert record["error"]["code"] in ("invalid_request", "structured_output_failed"), record


def _valid_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_unseeded_lines_sample_independently_and_a_seed_reproduces(pipeline):
    same = [request(f"free-{i}", prompt="The software is provided", temperature=1.0, max_tokens=4) for i in range(6)]
    seeded = [request(f"seeded-{i}", prompt="The software is provided", temperature=1.0, max_tokens=4, seed=11)
              for i in range(2)]
    records = run_file(pipeline, same + seeded)
    texts = [r["response"]["body"]["choices"][0]["text"] for r in records]
    assert len(set(texts[:6])) > 1  # six unseeded draws of 4 tokens from a random model: not all alike
    assert texts[6] == texts[7]
    again = run_file(pipeline, seeded)
    assert [r["response"]["body"]["choices"][0]["text"] for r in again] == texts[6:]


def test_a_long_line_reports_progress_while_it_runs(pipeline):
    beats = []
    pipeline.on_progress = lambda: beats.append(1)
    try:
        run_file(pipeline, [request("long-line", prompt=["one", "two"], n=4, max_tokens=8, temperature=0.7)])
    finally:
        pipeline.on_progress = None
    assert len(beats) >= 4  # every engine step, not only the line's end


def test_lines_are_parsed_and_checked_without_the_model(causal_model_dir):
    """Request parsing is its own part (pipelines/batch_api/requests.py): a tokenizer and the options, no model."""
    from persimmon import PersimmonTokenizer
    from pipelines.batch_api import RequestParser
    from pipelines.options import BatchAPIOptions

    parser = RequestParser(PersimmonTokenizer.from_pretrained(causal_model_dir), BatchAPIOptions(), window=256)
    good = parser.parse(1, chat("a", seed=7, max_tokens=5).encode())
    assert good.error is None and good.kind == "chat" and good.custom_id == "a"
    assert good.params.seed == 7 and good.params.max_new_tokens == 5 and "\n\nhuman:" in good.params.stop
    assert good.texts[0].endswith("\n\nadept:") and good.prompts[0] == parser.tokenizer.encode(good.texts[0])
    again = parser.parse(2, chat("a").encode())
    assert again.error[0] == "duplicate_custom_id" and again.custom_id is None
    broken = parser.parse(3, b'{"custom_id": "b", "body": ')
    assert broken.error[0] == "invalid_json" and broken.custom_id == "b"
    parser.reset()  # a new file: custom_ids start over
    assert parser.parse(4, chat("a").encode()).error is None
