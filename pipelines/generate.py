"""GenerationPipeline: a record batch of texts in, the same rows with completion / finish_reason / token counts.

Each text is put into the prompt template, batched by length under a token budget that includes the
tokens to be generated (they occupy the KV cache too), and generated with persimmon.generate. Sampling is
seeded per row by its prompt, so a rerun reproduces every completion whatever the batching.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import torch

from persimmon import PersimmonForCausalLM, PersimmonTokenizer, SamplingParams
from persimmon.generate import generate

from .batching import PipelineStats, check_vocabulary, encode_rows, pad_batch, plan_batches, text_column
from .prompts import PromptTemplate
from .schema import GENERATION, append_columns


class GenerationPipeline:
    def __init__(
        self,
        model_dir: str | Path,
        prompt_template: str = "{text}",
        max_new_tokens: int = 64,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device = "cpu",
        max_length: int | None = None,
        batch_tokens: int = 16384,
        text_column: str = "text",
        truncation_side: str = "left",
        compile: bool | None = None,
    ) -> None:
        """max_length: prompt tokens per row (default and cap: the model window minus max_new_tokens); longer
        prompts lose text on truncation_side (left keeps the end of the text, next to the answer)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        self.template = PromptTemplate(prompt_template)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or SamplingParams()
        self.stop = [s for s in stop if s]
        self.text_column, self.truncation_side = text_column, truncation_side
        self.batch_tokens, self.compile = batch_tokens, compile
        self.device = torch.device(device)
        self.tokenizer = PersimmonTokenizer.from_pretrained(model_dir)
        self.model = PersimmonForCausalLM.from_pretrained(model_dir, dtype=dtype, device=self.device)
        config = self.model.config
        check_vocabulary(self.tokenizer, config)
        window = config.max_position_embeddings - max_new_tokens
        if window < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's "
                             f"window of {config.max_position_embeddings} positions")
        self.max_length = min(max_length or window, window)
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
                columns["completion"][row.index] = out.texts[j]
                columns["finish_reason"][row.index] = out.finish_reasons[j]
                columns["prompt_tokens"][row.index] = len(row.ids)
                columns["completion_tokens"][row.index] = len(out.tokens[j])
                self.stats.generated_tokens += len(out.tokens[j])
        self.stats.record(errors, rows, time.perf_counter() - start)
        return append_columns(batch, GENERATION, columns, errors)
