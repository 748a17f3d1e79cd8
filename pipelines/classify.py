"""ClassificationPipeline: a record batch of texts in, the same rows with label / score / probs / error out.

With a fine-tuned PersimmonForSequenceClassification it pools each row's last real token (single-label,
multi-label or regression, from the config). With `candidate_labels` and a causal LM it classifies zero-shot:
each candidate is scored by the log-likelihood of its tokens after the prompt, all candidates sharing one
prefill of the prompt (its KV cache is repeated across candidates, not recomputed).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import torch

from persimmon import PersimmonForCausalLM, PersimmonForSequenceClassification
from persimmon.config import ProblemType
from persimmon.engine import prefill_prefix, prefill_rows, shares_prefix

from .batching import (EncodedRow, ModelPipeline, checked_options, drop_nonfinite, encode_rows, pad_batch,
                       plan_batches, text_column)
from .options import ZERO_SHOT_TEMPLATE, ClassifyOptions
from .prompts import PromptTemplate
from .schema import ZERO_SHOT, append_columns, classification_kind, classification_schema

class ClassificationPipeline(ModelPipeline):
    def __init__(
        self,
        model_dir: str | Path,
        options: ClassifyOptions | None = None,
        *,
        device: str | torch.device = "cpu",
        text_column: str = "text",
        padding_side: str = "right",
        **overrides,
    ) -> None:
        """options (or the same names as keywords, e.g. dtype="bfloat16", max_length=2048): see ClassifyOptions.
        max_length: tokens per text (default: the model's max_position_embeddings); longer texts are cut on
        truncation_side. batch_tokens: padded tokens per forward pass. threshold: multi-label cut-off."""
        o = checked_options(options or ClassifyOptions(), overrides)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.candidate_labels = list(o.candidate_labels) if o.candidate_labels else None
        self._load(model_dir, o, PersimmonForSequenceClassification if self.candidate_labels is None
                   else PersimmonForCausalLM, device, text_column)
        self.truncation_side, self.padding_side = o.truncation_side, padding_side
        self.batch_tokens, self.threshold = o.batch_tokens, o.threshold
        if self.candidate_labels is not None:
            template = o.prompt_template or ZERO_SHOT_TEMPLATE
            self.template = PromptTemplate(template, labels=", ".join(self.candidate_labels))
            # the question and labels before {text}: prefilled once (its last piece may merge with the text)
            self.prefix_ids = self.tokenizer.encode(self.template.prefix)[:-1]
            self.prefix_cache = None
            self.label_ids = [self.tokenizer.encode_continuation(label) for label in self.candidate_labels]
            self.schema = ZERO_SHOT
            self.kind = "zero_shot"
        else:
            self.label_ids = []
            self.kind = classification_kind(self.config)
            self.schema = classification_schema(self.config)
        self._limit(reserved=max((len(ids) for ids in self.label_ids), default=0))
        if self.candidate_labels is not None:
            self.template.check_fits(self.tokenizer, self.max_length)

    def _encode(self, text: str) -> tuple[list[int], bool]:
        if self.candidate_labels is not None:
            return self.template.encode(self.tokenizer, text, self.max_length, self.truncation_side)
        enc = self.tokenizer.encode_truncated(text, self.max_length, self.truncation_side)
        return enc.ids, enc.truncated

    @torch.inference_mode()
    def __call__(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        start = time.perf_counter()
        texts, errors = text_column(batch, self.text_column)
        rows = encode_rows(texts, errors, self._encode, self.max_length, self.truncation_side)
        n = len(texts)
        columns: dict[str, list] = {name: [None] * n for name in self.schema.names}
        for group in plan_batches(rows, self.batch_tokens):
            self._report(len(group))
            if self.candidate_labels is not None:
                scores = self._zero_shot_probs(group)
            else:
                scores = self._logits(group)
            group, scores = drop_nonfinite(group, scores, errors, self.stats)
            if not group:
                continue
            if self.candidate_labels is not None:
                self._fill_probs(columns, group, scores)
            elif self.kind == ProblemType.REGRESSION:
                for row, value in zip(group, scores[:, 0].tolist()):
                    columns["score"][row.index] = value
            elif self.kind == ProblemType.MULTI_LABEL:
                probs = torch.sigmoid(scores)
                names = self.model.config.id2label
                for row, p in zip(group, probs.tolist()):
                    columns["probs"][row.index] = p
                    columns["labels"][row.index] = [names[i] for i, v in enumerate(p) if v > self.threshold]
            else:
                self._fill_probs(columns, group, torch.softmax(scores, dim=-1))
        self.stats.record(errors, rows, time.perf_counter() - start)
        self._report(n - len(rows))  # rows that never reached the model
        return append_columns(batch, self.schema, columns, errors)

    def stream(self, batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[pa.Table]:
        """Each input batch's output table, in order (the same interface as GenerationPipeline.stream)."""
        for batch in batches:
            yield self(batch)

    def _fill_probs(self, columns: dict[str, list], group: list[EncodedRow], probs: torch.Tensor) -> None:
        names = self.candidate_labels or [self.model.config.id2label[i] for i in range(probs.shape[-1])]
        best = probs.argmax(dim=-1).tolist()
        for row, p, b in zip(group, probs.tolist(), best):
            columns["probs"][row.index] = p
            columns["label"][row.index] = names[b]
            columns["score"][row.index] = p[b]

    def _logits(self, group: list[EncodedRow]) -> torch.Tensor:
        ids, mask = pad_batch(self.tokenizer, group, self.padding_side, self.stats.padding, self.device)
        return self.model(ids, attention_mask=mask).logits.float()

    def _zero_shot_probs(self, group: list[EncodedRow]) -> torch.Tensor:
        """(rows, candidates) probabilities: softmax over each candidate's summed token log-likelihood. The
        template's text before `{text}` (the question and the labels) is prefilled once per pipeline; rows
        whose tokens start with it prefill only the rest."""
        probs = torch.empty(len(group), len(self.label_ids), device=self.device)
        for shared in (True, False):
            members = [i for i, r in enumerate(group) if shares_prefix(r.ids, self.prefix_ids) == shared]
            if members:
                start = len(self.prefix_ids) if shared else 0
                probs[members] = self._zero_shot_part([group[i] for i in members], start)
        return probs

    def _zero_shot_part(self, group: list[EncodedRow], start: int) -> torch.Tensor:
        B, K = len(group), len(self.label_ids)
        width = max(len(l) for l in self.label_ids)
        if start and self.prefix_cache is None:
            self.prefix_cache = prefill_prefix(self.model, self.prefix_ids)
        ids = [r.ids for r in group]
        cache, mask, first = prefill_rows(self.model, ids, start, self.prefix_cache if start else None,
                                          self.tokenizer.padding_id, room=width)
        self.stats.padding.add(B, mask.shape[1] - start, sum(len(i) - start for i in ids))
        first = torch.log_softmax(first, dim=-1)  # (B, V): the first label token's log-probability
        labels = torch.tensor([l + [0] * (width - len(l)) for l in self.label_ids], device=self.device)  # (K, W)
        label_mask = torch.tensor([[1] * len(l) + [0] * (width - len(l)) for l in self.label_ids], device=self.device)
        scores = first[:, labels[:, 0]]  # (B, K)
        if width > 1:
            # every row's prompt cache, once per candidate; the candidates' tokens go through in one pass
            cache.select_rows(torch.arange(B, device=self.device).repeat_interleave(K))
            cont_ids = labels[:, :-1].repeat(B, 1)  # (B*K, W-1): each token predicts the next label token
            cont_mask = torch.cat([mask.repeat_interleave(K, dim=0), label_mask[:, :-1].repeat(B, 1)], dim=1)
            logits = self.model(cont_ids, attention_mask=cont_mask, past_key_values=cache).logits.float()
            targets = labels[:, 1:].repeat(B, 1)  # (B*K, W-1)
            token_logp = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
            token_logp = token_logp * label_mask[:, 1:].repeat(B, 1)
            scores = scores + token_logp.sum(-1).view(B, K)
        return torch.softmax(scores, dim=-1)
