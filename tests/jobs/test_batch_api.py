"""openai-batch through the real CLI on real Ray: an OpenAI batch file of chat, completion and embedding lines
plus bad lines gives one response or one error per line, every response valid under the official `openai`
package's types, the greedy text equal to `generate` on the same prompt, exact usage counts and OpenAI's
request_counts; a rerun is a no-op; a driver killed mid-file, then rerun, gives each custom_id once; a commit
cut between its two files is adopted, not refused."""

from __future__ import annotations

import base64
import json
import os
import signal
import time

import numpy as np
import pytest
from openai.types import BatchRequestCounts, Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from jobs.output.commit import TEMPORARY
from jobs.output.manifest import JOURNAL, MANIFEST, SUCCESS
from tests.jobs.conftest import cli, manifest_of, run_here

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}}, "required": ["ok"]}


def line(custom_id, url, body, method="POST"):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def chat(custom_id, messages, **body):
    return line(custom_id, "/v1/chat/completions", {"model": "persimmon-8b-chat", "messages": messages, **body})


GOOD = [
    chat("chat-1", [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "What does the license permit?"}], max_tokens=12, temperature=0),
    chat("chat-2", [{"role": "user", "content": [{"type": "text", "text": "Is it free?"}]},
                    {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Why?"}],
         max_completion_tokens=10, temperature=0.9, top_p=0.9, seed=7, n=3, logprobs=True, top_logprobs=2,
         stop=["\n"]),
    chat("chat-json", [{"role": "user", "content": "Reply in JSON."}], max_tokens=40, temperature=0,
         response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}),
    chat("chat-object", [{"role": "user", "content": "Any JSON object."}], max_tokens=30, temperature=0,
         response_format={"type": "json_object"}),
    line("complete-1", "/v1/completions", {"model": "m", "prompt": "The software is provided", "max_tokens": 9,
                                           "temperature": 0, "logprobs": 2}),
    line("complete-2", "/v1/completions", {"model": "m", "prompt": ["Permission is hereby", "Copyright"],
                                           "max_tokens": 5, "temperature": 0, "n": 2}),
    line("embed-1", "/v1/embeddings", {"model": "m", "input": "a single text to embed"}),
    line("embed-2", "/v1/embeddings", {"model": "m", "input": ["two", "texts"], "encoding_format": "base64"}),
]
BAD = {  # line -> the error code it must get
    "{not json": "invalid_json",
    json.dumps({"url": "/v1/completions", "method": "POST", "body": {"prompt": "x"}}): "missing_custom_id",
    line("chat-1", "/v1/completions", {"prompt": "x"}): "duplicate_custom_id",
    line("images", "/v1/images/generations", {"prompt": "x"}): "invalid_url",
    line("penalty", "/v1/completions", {"prompt": "x", "presence_penalty": 0.5}): "unsupported_parameter",
    line("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                           "tools": [{"type": "function"}]}): "unsupported_parameter",
    line("too-many", "/v1/completions", {"prompt": "x", "n": 9}): "invalid_request",
    line("long", "/v1/completions", {"prompt": "word " * 400, "max_tokens": 4}): "context_length_exceeded",
    line("tokens", "/v1/embeddings", {"input": [[1, 2, 3]]}): "invalid_request",
}


def write_batch(path, lines):
    path.write_text("".join(f"{x}\n" for x in lines))
    return path


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def batch(model, input, out, *extra):
    return ["openai-batch", "--model", model, "--input", input, "--output", out, *extra]


def test_a_batch_file_of_every_endpoint_and_bad_lines(ray_local, causal_model, tmp_path):
    from persimmon import PersimmonForCausalLM, PersimmonTokenizer
    from persimmon.generate import generate

    requests = tmp_path / "requests"
    requests.mkdir()
    bad = list(BAD)
    lines = [GOOD[0], bad[0], *GOOD[1:4], "", *bad[1:5], *GOOD[4:], *bad[5:]]  # a blank line is skipped
    write_batch(requests / "nightly.jsonl", lines)
    out = tmp_path / "out"
    done = run_here(*batch(causal_model, requests, out))
    assert done.returncode == 0, done.stdout + done.stderr
    results, errors = read_jsonl(out / "nightly.jsonl"), read_jsonl(out / "nightly.errors.jsonl")
    assert [r["custom_id"] for r in results] == [json.loads(x)["custom_id"] for x in GOOD]  # in input order
    assert len(errors) == len(BAD)
    for record in results:
        assert record["error"] is None and record["response"]["status_code"] == 200
        assert record["id"].startswith("batch_req_") and record["response"]["request_id"]
    bodies = {r["custom_id"]: r["response"]["body"] for r in results}
    chats = {k: ChatCompletion.model_validate(v) for k, v in bodies.items() if k.startswith("chat")}
    completions = {k: Completion.model_validate(v) for k, v in bodies.items() if k.startswith("complete")}
    encoded = bodies["embed-2"]["data"][0]["embedding"]
    assert isinstance(encoded, str)  # base64 float32, decoded by the openai client before it validates
    decoded = json.loads(json.dumps(bodies))
    for item in decoded["embed-2"]["data"]:
        item["embedding"] = np.frombuffer(base64.b64decode(item["embedding"]), "<f4").tolist()
    embeddings = {k: CreateEmbeddingResponse.model_validate(v) for k, v in decoded.items() if k.startswith("embed")}
    assert len(chats) + len(completions) + len(embeddings) == len(GOOD)

    # the codes of the bad lines, in input order, the line number where there is no custom_id
    assert [e["error"]["code"] for e in errors] == list(BAD.values())
    assert all(e["response"] is None for e in errors)
    assert errors[0]["custom_id"] is None and "line 2 " in errors[0]["error"]["message"]
    assert "line 7 has no custom_id" in errors[1]["error"]["message"]  # blank line 6 still counts
    assert "presence_penalty" in errors[4]["error"]["message"] and "tools" in errors[5]["error"]["message"]

    tok = PersimmonTokenizer.from_pretrained(causal_model)
    lm = PersimmonForCausalLM.from_pretrained(causal_model)

    def greedy(prompt, new, stop=()):
        ids, mask = tok.batch([prompt], padding_side="left")
        result = generate(lm, ids, mask, max_new_tokens=new, decode=tok.decode, stop=list(stop))
        return result.texts[0], len(result.tokens[0]), len(tok.encode(prompt))

    # chat: the documented prompt mapping, the greedy answer equal to `generate`, usage exact
    prompt = "Answer briefly.\n\nhuman: What does the license permit?\n\nadept:"
    text, _, read = greedy(prompt, 12, ["\n\nhuman:"])
    first = chats["chat-1"]
    assert first.choices[0].message.content == text.lstrip() and first.model == "persimmon-8b-chat"
    assert first.usage.prompt_tokens == read
    assert first.usage.total_tokens == read + first.usage.completion_tokens
    sampled = chats["chat-2"]
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert sampled.usage.prompt_tokens == len(tok.encode("human: Is it free?\n\nadept: Yes.\n\nhuman: Why?\n\nadept:"))
    assert sampled.usage.completion_tokens == sum(len(c.logprobs.content) for c in sampled.choices)
    for choice in sampled.choices:
        assert "\n" not in choice.message.content and len(choice.logprobs.content) <= 10
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)
    for name in ("chat-json", "chat-object"):
        choice = chats[name].choices[0]
        if choice.finish_reason == "stop":  # a random model may run out of tokens first (then: length)
            value = json.loads(choice.message.content)
            assert isinstance(value, dict) and (name == "chat-object" or isinstance(value["ok"], bool))

    # completions: the text equal to `generate`, logprobs per token, one choice per prompt and n
    text, new, read = greedy("The software is provided", 9)
    one = completions["complete-1"]
    assert one.choices[0].text == text and one.usage.prompt_tokens == read
    assert one.usage.completion_tokens == new == len(one.choices[0].logprobs.tokens)
    assert all(len(top) == 2 for top in one.choices[0].logprobs.top_logprobs)
    two = completions["complete-2"]
    assert len(two.choices) == 4 and two.choices[0].text == two.choices[1].text  # greedy: n copies agree
    assert two.usage.prompt_tokens == len(tok.encode("Permission is hereby")) + len(tok.encode("Copyright"))

    # embeddings: unit vectors of the model's width, float or base64
    single = embeddings["embed-1"]
    assert len(single.data) == 1 and len(single.data[0].embedding) == lm.config.hidden_size
    assert abs(sum(x * x for x in single.data[0].embedding) - 1) < 1e-4
    assert single.usage.prompt_tokens == len(tok.encode("a single text to embed"))
    assert [d.index for d in embeddings["embed-2"].data] == [0, 1]
    assert all(abs(sum(x * x for x in d.embedding) - 1) < 1e-4 for d in embeddings["embed-2"].data)

    manifest = manifest_of(out)
    counts = BatchRequestCounts.model_validate(manifest["summary"]["request_counts"])
    assert (counts.total, counts.completed, counts.failed) == (len(GOOD) + len(BAD), len(GOOD), len(BAD))
    assert (out / SUCCESS).exists()

    # a rerun is a no-op: nothing rewritten, the summary still the job's
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.jsonl")}
    again = run_here(*batch(causal_model, requests, out))
    assert again.returncode == 0 and "1 already committed" in again.stdout, again.stdout + again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.jsonl")} == before
    assert manifest_of(out)["summary"]["request_counts"] == manifest["summary"]["request_counts"]


def test_a_commit_cut_between_its_two_files_is_adopted(ray_local, causal_model, tmp_path):
    """The state a driver killed between moving the errors file and recording the commit leaves: the journal
    says the commit was under way; the rerun takes the files as its own instead of refusing the folder."""
    requests = tmp_path / "requests"
    requests.mkdir()
    write_batch(requests / "a.jsonl", [GOOD[4], "{oops"])
    out = tmp_path / "out"
    assert run_here(*batch(causal_model, requests, out)).returncode == 0
    manifest = manifest_of(out)
    entry = manifest["shards"]["a.jsonl"]
    under_way = {k: v for k, v in entry.items() if k in ("output", "input_identity", "rows", "errors")}
    under_way["size"] = entry["size"]
    under_way["companions"] = {k: {"size": v["size"]} for k, v in entry["companions"].items()}
    manifest["shards"]["a.jsonl"] = {"state": "pending", "output": entry["output"],
                                     "input_identity": entry["input_identity"], "committing": under_way}
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / SUCCESS).unlink()
    before = (out / "a.jsonl").stat().st_mtime_ns
    rerun = run_here(*batch(causal_model, requests, out))
    assert rerun.returncode == 0 and "1 already committed" in rerun.stdout, rerun.stdout + rerun.stderr
    assert (out / "a.jsonl").stat().st_mtime_ns == before and (out / SUCCESS).exists()
    assert manifest_of(out)["shards"]["a.jsonl"]["state"] == "done"

    # the same, but the results file never made it: the shard is redone, its errors file replaced
    manifest = manifest_of(out)
    entry = manifest["shards"]["a.jsonl"]
    manifest["shards"]["a.jsonl"] = {"state": "pending", "output": entry["output"],
                                     "input_identity": entry["input_identity"],
                                     "committing": {"output": "a.jsonl", "size": entry["size"],
                                                    "companions": {"a.errors.jsonl": {"size": 1}}}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "a.jsonl").unlink()
    redo = run_here(*batch(causal_model, requests, out))
    assert redo.returncode == 0 and "0 already committed" in redo.stdout, redo.stdout + redo.stderr
    assert [r["custom_id"] for r in read_jsonl(out / "a.jsonl")] == ["complete-1"]
    assert len(read_jsonl(out / "a.errors.jsonl")) == 1


def test_a_recommit_over_an_edited_input_never_shows_old_results_beside_new_errors(ray_local, causal_model, tmp_path,
                                                                                   monkeypatch):
    """The input is edited and rerun: at the moment between moving the new errors file and the new results file
    (where a kill would stop it), the old results are already gone, so no custom_id can show twice."""
    import jobs.runner

    requests = tmp_path / "requests"
    requests.mkdir()
    write_batch(requests / "a.jsonl", [GOOD[4], "{oops"])
    out = tmp_path / "out"
    assert run_here(*batch(causal_model, requests, out)).returncode == 0
    old_ids = [r["custom_id"] for r in read_jsonl(out / "a.jsonl")]
    edited = json.loads(GOOD[4])
    edited["custom_id"] = "edited-1"
    write_batch(requests / "a.jsonl", [json.dumps(edited), "{still oops"])
    seen = []
    real_commit = jobs.runner.commit

    def commit(fs, out_base, temp, name):
        if name == "a.jsonl":  # the main file, moved last
            seen.append(sorted(p.name for p in out.glob("*.jsonl")))
        return real_commit(fs, out_base, temp, name)

    monkeypatch.setattr(jobs.runner, "commit", commit)
    rerun = run_here(*batch(causal_model, requests, out))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert seen == [["a.errors.jsonl"]]  # the new errors file alone: the old results went before it came
    assert [r["custom_id"] for r in read_jsonl(out / "a.jsonl")] == ["edited-1"] != old_ids


def test_a_commit_cut_off_then_its_input_removed_leaves_nothing_unnamed(ray_local, causal_model, tmp_path):
    """Killed after the errors file was moved and before the results file, then the input removed: the rerun
    removes the moved errors file (the journal names it) instead of leaving it unrecorded, and every later run
    is accepted."""
    requests = tmp_path / "requests"
    requests.mkdir()
    write_batch(requests / "a.jsonl", [GOOD[4], "{oops"])
    write_batch(requests / "b.jsonl", [GOOD[0]])
    out = tmp_path / "out"
    assert run_here(*batch(causal_model, requests, out)).returncode == 0
    manifest = manifest_of(out)
    entry = manifest["shards"]["a.jsonl"]
    manifest["shards"]["a.jsonl"] = {  # what the journal holds when the kill came between the two moves
        "state": "pending", "output": entry["output"], "input_identity": entry["input_identity"],
        "committing": {"output": "a.jsonl", "size": entry["size"],
                       "companions": {k: {"size": v["size"]} for k, v in entry["companions"].items()}}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "a.jsonl").unlink()
    (out / SUCCESS).unlink()
    (requests / "a.jsonl").unlink()
    rerun = run_here(*batch(causal_model, requests, out))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert not (out / "a.errors.jsonl").exists() and (out / SUCCESS).exists()
    assert "a.jsonl" not in manifest_of(out)["shards"]
    for extra in ([], ["--overwrite"]):
        again = run_here(*batch(causal_model, requests, out, *extra))
        assert again.returncode == 0, again.stdout + again.stderr


def test_a_driver_killed_mid_file_then_rerun_gives_each_custom_id_once(causal_model, tmp_path):
    requests = tmp_path / "requests"
    requests.mkdir()
    ids = [f"req-{i:04d}" for i in range(400)]
    write_batch(requests / "big.jsonl", [
        line(i, "/v1/completions", {"prompt": f"Line {n} of the license", "max_tokens": 24, "temperature": 0.5,
                                    "seed": n}) for n, i in enumerate(ids)])
    out = tmp_path / "out"
    args = batch(causal_model, requests, out, "--batch-rows", 16)
    proc = cli(*args, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not any(p.stat().st_size for p in (out / TEMPORARY).rglob("*.jsonl") if p.is_file()):
            assert proc.poll() is None, "the run ended before it could be killed mid-file"
            assert time.time() < deadline, "no line written in time"
            time.sleep(0.05)  # mid-file: the first lines are in the attempt's temporary file, the rest to come
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    assert not (out / "big.jsonl").exists()
    rerun = cli(*args)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    got = [r["custom_id"] for r in read_jsonl(out / "big.jsonl")]
    assert got == ids and (out / "big.errors.jsonl").read_text() == ""
    assert not (out / TEMPORARY).exists() and not (out / JOURNAL).exists()


@pytest.mark.parametrize("content, message", [
    (None, "no OpenAI batch request files in input"),
    (b"", None),  # an empty file: nothing to do, two empty outputs
])
def test_an_empty_input(ray_local, causal_model, tmp_path, content, message):
    requests = tmp_path / "requests"
    requests.mkdir()
    if content is not None:
        (requests / "empty.jsonl").write_bytes(content)
    out = tmp_path / "out"
    done = run_here(*batch(causal_model, requests, out))
    if message:
        assert done.returncode == 2 and message in done.stderr and not out.exists()
    else:
        assert done.returncode == 0, done.stderr
        assert (out / "empty.jsonl").read_text() == "" and (out / "empty.errors.jsonl").read_text() == ""
        assert manifest_of(out)["summary"]["request_counts"] == {"total": 0, "completed": 0, "failed": 0}


def test_poison_lines_through_the_cli_are_their_own_errors(ray_local, causal_model, tmp_path):
    """The lines that used to fail their whole file, permanently: each is now its line's error, every other
    line is answered, exit 0, and the rerun is a no-op."""
    surrogate = line("sur\\ud800id", "/v1/completions", {"prompt": "a\\ud800b"}).replace("\\\\", "\\")
    poison = {
        line("seed70", "/v1/completions", {"prompt": "x", "seed": 10 ** 70}): "invalid_request",
        '{"custom_id": "bigint", "url": "/v1/completions", "body": {"max_tokens": ' + "9" * 5000 + "}}": "invalid_json",
        '{"custom_id": "deep", "body": ' + "[" * 100_000 + "]" * 100_000 + "}": "invalid_json",
        surrogate: "invalid_request",
        line("huge", "/v1/completions", {"prompt": "word " * (2 << 20)}): "line_too_large",
        line("many", "/v1/embeddings", {"input": ["x"] * 5000}): "invalid_request",
        chat("schema-deep", [{"role": "user", "content": "x"}], response_format={"type": "json_schema", "json_schema": {
            "schema": json.loads('{"type": "object", "properties": {"a": ' * 300 + '{"type": "string"}'
                                 + "}}" * 300)}}): "invalid_request",
    }
    requests = tmp_path / "requests"
    requests.mkdir()
    write_batch(requests / "mixed.jsonl", [GOOD[4], *poison, GOOD[0]])
    out = tmp_path / "out"
    done = run_here(*batch(causal_model, requests, out))
    assert done.returncode == 0, done.stdout + done.stderr
    results, errors = read_jsonl(out / "mixed.jsonl"), read_jsonl(out / "mixed.errors.jsonl")
    assert [r["custom_id"] for r in results] == ["complete-1", "chat-1"]
    assert [e["error"]["code"] for e in errors] == list(poison.values())
    assert errors[3]["custom_id"] == "sur\\ud800id"  # escaped: the file stays valid UTF-8
    assert all("Traceback" not in e["error"]["message"] and "\n" not in e["error"]["message"] for e in errors)
    rerun = run_here(*batch(causal_model, requests, out))
    assert rerun.returncode == 0 and "1 already committed" in rerun.stdout, rerun.stdout + rerun.stderr


def test_a_glob_over_a_file_and_its_errors_file_is_refused_before_any_work(causal_model, tmp_path):
    """The natural retry, `--input 'out/*.jsonl'`-style, takes a file and this tool's own errors file of it: both
    would write `a.errors.jsonl`, one destroying the other's committed lines. Refused, one line, nothing written."""
    requests = tmp_path / "requests"
    requests.mkdir()
    write_batch(requests / "a.jsonl", [GOOD[4]])
    write_batch(requests / "a.errors.jsonl", [GOOD[6]])
    out = tmp_path / "out"
    done = run_here(*batch(causal_model, str(requests / "*.jsonl"), out))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "input shards a.errors.jsonl and a.jsonl would both write output a.errors.jsonl" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
