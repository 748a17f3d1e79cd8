"""Rotary position embeddings for Persimmon: partial rotary, NeoX `rotate_half` layout, linear and dynamic NTK scaling.

Angles are always computed in float32 (casting `inv_freq` to bf16 visibly changes results); only the final
cos/sin are cast to the model dtype, as the reference implementation does. Dynamic scaling is computed per
row from that row's own length, so a row's result never depends on its batch-mates (the reference takes the
length over the whole batch; the two agree whenever a batch holds one row or rows of one length).
"""

from __future__ import annotations

import torch

from .config import PersimmonConfig


def default_inv_freq(config: PersimmonConfig, device: torch.device | None = None) -> torch.Tensor:
    """inv_freq[i] = 1 / theta ** (2i / R), i < R/2 -> (R/2,) float32."""
    dim = config.rotary_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    return 1.0 / (config.rope_theta**exponent)


def inv_freq_for(config: PersimmonConfig, position_ids: torch.Tensor) -> torch.Tensor:
    """The inverse frequencies for these positions: (R/2,) or, under dynamic scaling, (B, R/2)."""
    inv_freq = default_inv_freq(config, position_ids.device)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return inv_freq / factor
    # dynamic NTK: only rows longer than max_position_embeddings get a new base; in float32 like the reference
    dim, max_pos = config.rotary_dim, config.max_position_embeddings
    seq_len = position_ids.max(dim=-1).values + 1  # (B,)
    grown = torch.clamp(seq_len, min=max_pos).to(torch.float32)
    base = config.rope_theta * ((factor * grown / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=position_ids.device).to(torch.float32) / dim
    scaled = 1.0 / (base[:, None] ** exponent)  # (B, R/2)
    return torch.where((seq_len > max_pos)[:, None], scaled, inv_freq)


def rope_cos_sin(
    config: PersimmonConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> cos, sin of shape (B, 1, T, R) in `dtype`, broadcastable over heads."""
    inv_freq = inv_freq_for(config, position_ids)
    if inv_freq.dim() == 1:
        inv_freq = inv_freq[None]
    freqs = position_ids[..., None].to(torch.float32) * inv_freq[:, None, :]  # (B, T, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of x (B, H, T, D) with NeoX pairing (i with i + R/2); the rest pass through."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot[..., : rot_dim // 2], x_rot[..., rot_dim // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)
