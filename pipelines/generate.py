"""GenerationPipeline: a record batch of texts in, the same rows with completion / finish_reason / token counts.

Each text is put into the prompt template, batched by length under a token budget that includes the
tokens to be generated (they occupy the KV cache too), and generated with persimmon.generate. Sampling is
seeded per row by its prompt, so a rerun reproduces every completion whatever the batching.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pyarrow as pa
import torch

from persimmon import PersimmonForCausalLM, PersimmonTokenizer, SamplingParams
from persimmon.generate import FINISH_NONFINITE, generate

from .batching import NONFINITE, PipelineStats, check_vocabulary, encode_rows, pad_batch, plan_batches, text_column
from .options import GenerateOptions
from .prompts import PromptTemplate
from .schema import GENERATION, append_columns


class GenerationPipeline:
    def __init__(
        self,
        model_dir: str | Path,
        options: GenerateOptions | None = None,
        *,
        device: str | torch.device = "cpu",
        text_column: str = "text",
        sampling: SamplingParams | None = None,
        **overrides,
    ) -> None:
        """options (or the same names as keywords, e.g. max_new_tokens=64, stop=["\\n"]): see GenerateOptions;
        `sampling` replaces its temperature / top_k / top_p / seed. max_length: prompt tokens per row (default
        and cap: the model window minus max_new_tokens); longer prompts lose text on truncation_side (left
        keeps the end of the text, next to the answer)."""
        if sampling is not None:
            overrides.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                             seed=sampling.seed)
        o = dataclasses.replace(options or GenerateOptions(), **overrides)
        o.check()
        self.options = o
        self.template = PromptTemplate(o.prompt_template)
        self.max_new_tokens = max_new_tokens = o.max_new_tokens
        self.sampling = o.sampling
        self.stop = [s for s in o.stop if s]
        self.text_column, self.truncation_side = text_column, o.truncation_side
        self.batch_tokens, self.compile = o.batch_tokens, o.compile
        self.device = torch.device(device)
        self.tokenizer = PersimmonTokenizer.from_pretrained(model_dir)
        self.model = PersimmonForCausalLM.from_pretrained(model_dir, dtype=o.dtype, device=self.device)
        config = self.model.config
        check_vocabulary(self.tokenizer, config)
        window = config.max_position_embeddings - max_new_tokens
        if window < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's "
                             f"window of {config.max_position_embeddings} positions")
        self.max_length = min(o.max_length or window, window)
        self.template.check_fits(self.tokenizer, self.max_length)
        self.stats = PipelineStats()

    def _encode(self, text: str) -> tuple[list[int], bool]:
        return self.template.encode(self.tokenizer, text, self.max_length, self.truncation_side)

    @torch.inference_mode()
    def __call__(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        start = time.perf_counter()
        texts, errors = text_column(batch, self.text_column)
        rows = encode_rows(texts, errors, self._encode, self.max_length, self.truncation_side)
        n = len(texts)
        columns: dict[str, list] = {name: [None] * n for name in GENERATION.names}
        for group in plan_batches(rows, self.batch_tokens, extra_per_row=self.max_new_tokens):
            ids, mask = pad_batch(self.tokenizer, group, "left", self.stats.padding, self.device)
            out = generate(self.model, ids, mask, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                           stop=self.stop, decode=self.tokenizer.decode, compile=self.compile)
            for j, row in enumerate(group):
                if out.finish_reasons[j] == FINISH_NONFINITE:
                    errors[row.index] = NONFINITE
                    self.stats.nonfinite += 1
                    continue
                columns["completion"][row.index] = out.texts[j]
                columns["finish_reason"][row.index] = out.finish_reasons[j]
                columns["prompt_tokens"][row.index] = len(row.ids)
                columns["completion_tokens"][row.index] = len(out.tokens[j])
                self.stats.generated_tokens += len(out.tokens[j])
        self.stats.record(errors, rows, time.perf_counter() - start)
        return append_columns(batch, GENERATION, columns, errors)
