"""Rotary position embeddings: 1-D RoPE (incl. llama3 scaling) and 3-D M-RoPE (positions come from the data
pipeline: `datamodules.encoder.mrope_positions`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """`[head_dim / 2]` float32 inverse frequencies, with `llama3` or `linear` scaling when asked."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("default", None):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise ValueError(f"rope_scaling: unsupported rope_type {kind!r} (supported: default, linear, llama3)")


def _llama3_scale(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    positions: Tensor, inv_freq: Tensor, mrope_section: list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin tables `[T, head_dim]` (float32) for `positions` `[T]`, or `[3, T]` with `mrope_section`."""
    inv_freq = inv_freq.to(positions.device)
    if positions.dim() == 1:
        freqs = positions.float()[:, None] * inv_freq[None, :]
    else:
        if mrope_section is None:
            if not torch.equal(positions[0], positions[-1]):
                raise ValueError("3-D position_ids given to a model without mrope_section")
            return rope_cos_sin(positions[0], inv_freq)
        if sum(mrope_section) != inv_freq.numel():
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {inv_freq.numel()}")
        axis_freqs = positions.float()[:, :, None] * inv_freq[None, None, :]  # [3, T, d/2]
        pieces = axis_freqs.split(mrope_section, dim=-1)
        freqs = torch.cat([piece[i % 3] for i, piece in enumerate(pieces)], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` `[T, heads, head_dim]` by the tables `[T, head_dim]` (rotate-half convention), in float32."""
    dtype = x.dtype
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, None, :] + rotated * sin[:, None, :]).to(dtype)
