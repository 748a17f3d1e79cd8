"""openai-batch vs generate on the same prompts: does the OpenAI batch format cost anything?

Both run what an actor runs for a shard, in one process, interleaved: `generate` streams record batches of
texts through GenerationPipeline into a Parquet file; `openai-batch` streams the same prompts as
`/v1/completions` request lines through OpenAIBatchPipeline (parse each line, build its SamplingParams,
serialise each response) into the two JSON Lines files. Greedy, the same max_tokens, so both generate the
same tokens (checked). Prints tokens/s of each and the ratio (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from common import build, machine, timed_pair


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-rows", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from jobs.corpus import paragraphs
    from jobs.inputs.formats import REQUEST_COLUMNS
    from jobs.output.sinks import ParquetSink, RequestSink
    from pipelines import GenerationPipeline
    from pipelines.batch_api import OpenAIBatchPipeline

    _, model = build()
    texts = [p[:400] for p in paragraphs()[: args.prompts]]
    out = Path(tempfile.mkdtemp(prefix="bench-batch-api-"))
    fs = pafs.LocalFileSystem()
    n = args.new_tokens
    text_batches = [pa.table({"id": list(range(i, i + args.batch_rows)), "text": texts[i:i + args.batch_rows]})
                    for i in range(0, len(texts), args.batch_rows)]
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "bench", "prompt": t, "max_tokens": n, "temperature": 0}}).encode()
             for i, t in enumerate(texts)]
    request_batches = [pa.table([pa.array(range(i + 1, i + 1 + len(lines[i:i + args.batch_rows])), pa.int64()),
                                 pa.array(lines[i:i + args.batch_rows], pa.binary())], schema=REQUEST_COLUMNS)
                       for i in range(0, len(lines), args.batch_rows)]

    gen = GenerationPipeline(model, prompt_template="{text}", max_new_tokens=n, dtype=args.dtype)
    api = OpenAIBatchPipeline(model, max_new_tokens=n, dtype=args.dtype)
    results = {}

    def run_generate():
        sink = ParquetSink(fs, str(out / "generate.parquet"))
        completions = []
        for table in gen.stream(text_batches):
            sink.write(table)
            completions += table.column("completion").to_pylist()
        sink.close()
        results["generate"] = completions

    def run_api():
        sink = RequestSink(fs, str(out / "requests.jsonl"))
        completions = []
        for table in api.stream(request_batches):
            sink.write(table)
            completions += [json.loads(r)["response"]["body"]["choices"][0]["text"] for r in table.column("record").to_pylist()]
        sink.close()
        results["openai-batch"] = completions

    t_gen, t_api = timed_pair(run_generate, run_api, args.repeats)
    same = results["generate"] == results["openai-batch"]
    tokens = gen.stats.generated_tokens // (args.repeats + 1)
    print(f"{machine()}; {args.prompts} prompts x {n} new tokens, greedy, {args.dtype}, batches of {args.batch_rows}")
    print(f"generate:     {t_gen:.2f} s, {tokens / t_gen:.0f} tok/s")
    print(f"openai-batch: {t_api:.2f} s, {tokens / t_api:.0f} tok/s")
    print(f"same completions: {same}")
    print(f"ratio (openai-batch / generate throughput): {t_gen / t_api:.3f}")


if __name__ == "__main__":
    main()
