"""The Persimmon transformer (Adept's Persimmon-8B) in PyTorch: base model, causal LM and sequence classifier.

Module and parameter names match the HF-format checkpoints exactly, so their state dicts load unchanged.
Numerics follow HF transformers' PersimmonForCausalLM (docs/model.md): head-interleaved fused QKV,
per-head-dim q/k LayerNorm before a partial rotary embedding, relu^2 MLP, LayerNorms with bias everywhere.

Differences from the reference, both so that a padded batch behaves like its rows alone:
- position ids default to `attention_mask.cumsum(-1) - 1`, so a left-padded row gets the positions it
  would get unpadded (the reference uses 0..T-1 for every row unless given position_ids);
- the sequence classifier pools the last position the attention mask marks as real, so it works with
  left or right padding and with `pad_token_id = None` (the real checkpoints have no pad id).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, LayerCache
from .config import PersimmonConfig, ProblemType
from .rope import apply_rotary, rope_cos_sin


@dataclass
class PersimmonOutput:
    """What a forward pass returns; fields a model does not produce stay None."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    past_key_values: LayerCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class PersimmonAttention(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        # None: attention in the activations' dtype; fp32 on a CPU without bf16 units (persimmon.cpu), where
        # the keys and values are cached in fp32 too (exact copies of the bf16 values)
        self.compute_dtype: torch.dtype | None = None
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.qk_layernorm = config.qk_layernorm
        if config.qk_layernorm:
            # one LayerNorm over head_dim, shared by all heads
            self.q_layernorm = nn.LayerNorm(config.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(config.head_dim, eps=config.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: LayerCache | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        # the fused projection is head-interleaved: [h0: q k v | h1: q k v | ...]
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)  # (B, T, H, D) each
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.compute_dtype is not None and q.dtype != self.compute_dtype:
            q, k, v = q.to(self.compute_dtype), k.to(self.compute_dtype), v.to(self.compute_dtype)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, S, D)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            y, weights = self._eager_attention(q, k, v, mask, dropout)
        else:
            # mask None means plain causal over a fresh sequence (or one query over all keys). The fused
            # kernel reads a strided cache slice in place (the engine's slots), where bf16 matmuls copy it
            chunks = cache.chunks if cache is not None else None
            if chunks:  # the engine's decode step: row ranges, each reading keys only up to its longest row
                y = torch.cat([F.scaled_dot_product_attention(q[a:b], k[a:b, :, :r], v[a:b, :, :r],
                                                              attn_mask=mask[a:b, ..., :r]) for a, b, r in chunks])
            else:
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and T > 1
                )
        y = y.transpose(1, 2).reshape(B, T, C).to(x.dtype)
        return self.dense(y), weights

    def _eager_attention(self, q, k, v, mask, dropout):
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, H, T, S)
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=self.training)
        return weights @ v, weights


class PersimmonMLP(nn.Module):
    def __init__(self, config: PersimmonConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense_h_to_4h(x)
        if torch.is_grad_enabled() and h.requires_grad:
            h = torch.square(F.relu(h))
        else:  # inference: no second (tokens x intermediate) buffer, the largest activation of the model
            h = F.relu_(h).square_()
        return self.dense_4h_to_h(h)


class PersimmonDecoderLayer(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PersimmonAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PersimmonMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)  # only after the MLP, as in the reference

    def forward(self, x, cos, sin, mask, cache, output_attentions=False):
        attn, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, output_attentions)
        x = x + attn
        x = x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        return x, weights


class PersimmonPreTrainedModel(nn.Module):
    """Weight init, checkpoint loading/saving and the dtype rules shared by every Persimmon model class."""

    architecture: str = ""

    def __init__(self, config: PersimmonConfig) -> None:
        super().__init__()
        self.config = config

    def init_weights(self) -> None:
        """Random init as the reference does it (normal(0, initializer_range), zero biases, unit LayerNorms)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _post_init(self) -> None:
        if self.config.tie_word_embeddings and hasattr(self, "lm_head"):
            self.lm_head.weight = self.model.embed_tokens.weight
        if next(self.parameters()).device.type != "meta":
            self.init_weights()
        self.eval()  # the real configs carry hidden_dropout 0.6: inference must not be in training mode

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def kv_dtype(self) -> torch.dtype:
        """The dtype of cached keys and values: the attention's compute dtype where one is set."""
        for module in self.modules():
            if isinstance(module, PersimmonAttention):
                return module.compute_dtype or self.dtype
        return self.dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        allow_pickle: bool = False,
        config: PersimmonConfig | None = None,
    ):
        """Load a HF-format checkpoint directory.

        dtype: None -> float32 (the reference's rule), "auto" -> the checkpoint's own dtype (config's
        torch_dtype, else the stored tensors'), a name or torch.dtype -> that. The model is built on the
        meta device and the memory-mapped tensors are assigned in, so the weights exist once in memory.
        `pytorch_model*.bin` files are pickles: read only with allow_pickle=True, and then weights-only.
        """
        from .checkpoint import load_checkpoint

        return load_checkpoint(cls, Path(path), dtype=dtype, device=device, allow_pickle=allow_pickle, config=config)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and model.safetensors (sharded with an index past max_shard_size)."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, Path(path), max_shard_size=max_shard_size)


class PersimmonModel(PersimmonPreTrainedModel):
    """Embeddings, decoder layers and the final LayerNorm; returns last_hidden_state."""

    architecture = "PersimmonModel"

    def __init__(self, config: PersimmonConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(PersimmonDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if type(self) is PersimmonModel:
            self._post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: LayerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> PersimmonOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache.for_model(self.config, B, T, self.kv_dtype, x.device)
        past = cache.length if cache is not None else 0
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"past_key_values holds {cache.batch_size} rows but the input has {B}")
        if attention_mask is not None and attention_mask.dim() == 4:
            # a ready (B, 1, T, S) mask, boolean (True = attend) or additive float: used as given (slot decoding)
            if position_ids is None:
                raise ValueError("a 4-D attention_mask needs explicit position_ids")
        elif attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, past + new) = {(B, past + T)}"
            )
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, T, x.device)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]
        position_ids = position_ids.expand(B, T)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        if attention_mask is not None and attention_mask.dim() == 4:
            # boolean (True = attend) or additive float (0 / -inf), used as given
            mask = attention_mask if attention_mask.is_floating_point() else attention_mask.bool()
        else:
            mask = attention_mask_for(attention_mask, past, T, x.device)

        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            x, weights = layer(x, cos, sin, mask, cache, output_attentions)
            if attentions is not None:
                attentions.append(weights)
        x = self.final_layernorm(x)
        if hidden_states is not None:
            hidden_states.append(x)  # the last entry is the normed output, as in the reference
        if cache is not None:
            cache.advance(T)
        return PersimmonOutput(
            last_hidden_state=x,
            past_key_values=cache if use_cache or past_key_values is not None else None,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
        )


def positions_from_mask(attention_mask: torch.Tensor | None, past: int, T: int, device) -> torch.Tensor:
    """Position ids (B|1, T) for the T new tokens: count of real tokens before each one (pads clamped to 0)."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -T:]


def attention_mask_for(attention_mask: torch.Tensor | None, past: int, T: int, device) -> torch.Tensor | None:
    """Boolean (B, 1, T, past+T) mask, True = may attend; None when plain causal attention is exact.

    Every query also sees its own position, so a pad query never has an all-masked row: softmax over
    nothing would give NaN, and a NaN value vector poisons real rows in the next layer (0 * NaN = NaN).
    """
    if attention_mask is None or bool(attention_mask.all()):
        if past == 0 or T == 1:
            return None
        attention_mask = torch.ones(1, past + T, dtype=torch.bool, device=device)
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    keep = attention_mask.bool()[:, None, :] | (k_pos == q_pos)[None]  # (B, T, S)
    return (causal[None] & keep)[:, None]


class PersimmonForCausalLM(PersimmonPreTrainedModel):
    architecture = "PersimmonForCausalLM"

    def __init__(self, config: PersimmonConfig) -> None:
        super().__init__(config)
        self.model = PersimmonModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: LayerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        logits_to_keep: int = 0,
    ) -> PersimmonOutput:
        """labels (B, T): next-token cross-entropy, positions labelled -100 ignored.
        logits_to_keep > 0 computes logits for the last that many positions only (e.g. 1 during prefill)."""
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_hidden_states, output_attentions)
        h = out.last_hidden_state
        if logits_to_keep:
            if labels is not None:
                raise ValueError("labels need logits at every position; do not combine them with logits_to_keep")
            h = h[:, -logits_to_keep:]
        out.logits = self.lm_head(h)
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, labels)
        return out


    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Greedy (default) or sampled continuation of a padded batch -> LongTensor (B, T + new), left-padded
        prompts followed by the new tokens; rows that stop early are padded after their stop token.
        persimmon.generate.generate returns more (per-row tokens, finish reasons, stop strings)."""
        from .generate import generate
        from .sampling import SamplingParams

        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed) if do_sample else SamplingParams()
        return generate(self, input_ids, attention_mask, max_new_tokens, params, eos_token_id).sequences


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t's logits against label t+1, in float32; -100 labels are ignored."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}; expected (batch, seq_len) = {tuple(logits.shape[:2])}")
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shifted, targets, ignore_index=-100)


class PersimmonForSequenceClassification(PersimmonPreTrainedModel):
    """Scores the last real token of each row with `score` (no bias): logits (B, num_labels)."""

    architecture = "PersimmonForSequenceClassification"

    def __init__(self, config: PersimmonConfig) -> None:
        super().__init__(config)
        self.model = PersimmonModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self._post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: LayerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> PersimmonOutput:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_hidden_states, output_attentions)
        h = out.last_hidden_state
        last = self.last_token_index(input_ids, attention_mask, h)
        # the head is linear per position, so scoring only the pooled positions equals pooling the scores
        pooled = h[torch.arange(h.shape[0], device=h.device), last]
        out.logits = self.score(pooled)
        if labels is not None:
            out.loss = sequence_classification_loss(out.logits, labels, self.config)
        return out

    def last_token_index(self, input_ids, attention_mask, hidden: torch.Tensor) -> torch.Tensor:
        """Index of each row's last real token: from the mask when given (any padding side, no pad id needed),
        else the reference's rule: the rightmost id that is not pad_token_id."""
        B, T = hidden.shape[:2]
        if attention_mask is not None:
            real = attention_mask[:, -T:].long()
        elif self.config.pad_token_id is not None and input_ids is not None:
            real = (input_ids != self.config.pad_token_id).long()
        elif B == 1 or input_ids is None:
            return torch.full((B,), T - 1, dtype=torch.long, device=hidden.device)
        else:
            raise ValueError(
                f"cannot find the last token of {B} rows: the config has no pad_token_id; pass attention_mask"
            )
        positions = torch.arange(T, device=real.device)
        return (positions * real).argmax(-1)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: PersimmonConfig) -> torch.Tensor:
    """MSE for regression, cross-entropy for single-label, BCE-with-logits for multi-label.
    problem_type None is inferred per call: 1 label -> regression, integer labels -> single-label, else multi."""
    num_labels = config.num_labels
    labels = labels.to(logits.device)
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = ProblemType.REGRESSION
        elif labels.dtype in (torch.long, torch.int):
            problem = ProblemType.SINGLE_LABEL
        else:
            problem = ProblemType.MULTI_LABEL
    if problem == ProblemType.REGRESSION:
        if num_labels == 1:
            return F.mse_loss(logits.squeeze().float(), labels.squeeze().float())
        return F.mse_loss(logits.float(), labels.float())
    if problem == ProblemType.SINGLE_LABEL:
        return F.cross_entropy(logits.view(-1, num_labels).float(), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.to(torch.float32))
