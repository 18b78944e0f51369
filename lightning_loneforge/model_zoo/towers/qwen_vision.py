"""Qwen2-VL / Qwen2.5-VL vision transformer and its 2x2 patch merger.

Input: flattened patches `[P, C * temporal_patch * patch * patch]` ordered by merge window, plus `grid_thw [I, 3]`.
Each image (each temporal frame) attends only to itself through varlen attention; Qwen2.5-VL's non-`fullatt`
layers attend within windows of `window_size` pixels (tokens reordered into windows, restored on output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_loneforge.model_zoo.attention import attention
from lightning_loneforge.model_zoo.config import ProjectorConfig, VisionConfig
from lightning_loneforge.model_zoo.rope import apply_rotary
from lightning_loneforge.model_zoo.towers.decoder import GatedMLP, RMSNorm


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class VisionMLP(nn.Module):
    """`fc2(act(fc1(x)))`, Qwen2-VL's ViT MLP."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        total = x.shape[0]
        q, k, v = self.qkv(x).view(total, 3, self.num_heads, -1).unbind(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q, k, v, cu_seqlens, max_seqlen, causal=False)
        return self.proj(out.reshape(total, -1))


class QwenVisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        qwen25 = config.kind == "qwen2_5_vl"
        self.norm1 = RMSNorm(dim, 1e-6) if qwen25 else nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = RMSNorm(dim, 1e-6) if qwen25 else nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, config.num_heads)
        if qwen25:
            self.mlp = GatedMLP(dim, config.intermediate_size, act="silu", bias=True)
        else:
            self.mlp = VisionMLP(dim, config.intermediate_size, config.act)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class QwenVisionTower(nn.Module):
    """Patch embedding (the bias-free Conv3d as one linear map), 2-D rotary, `blocks`.

    `forward(pixel_values, grid_thw) -> [P, hidden]` patch features in input order (merge-window order).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.kind not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"QwenVisionTower: vision kind {config.kind!r} is not qwen2_vl / qwen2_5_vl")
        self.config = config
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
        self.patch_embed = nn.Linear(patch_dim, config.hidden_size, bias=False)
        self.blocks = nn.ModuleList(QwenVisionBlock(config) for _ in range(config.num_layers))
        head_dim = config.hidden_size // config.num_heads
        rotary_dim = head_dim // 2
        self.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, device="cpu").float() / rotary_dim))

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        config = self.config
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw needs {expected}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        cos, sin = self._rotary(grids, x.device)
        frames = [h * w for t, h, w in grids for _ in range(t)]
        full_cu = _cumulative(frames, x.device)
        window_order = None
        if config.window_size:
            window_order, window_lengths = _window_order(grids, config.spatial_merge_size, config.window_size // config.patch_size)
            window_cu = _cumulative(window_lengths, x.device)
            unit = config.spatial_merge_size**2
            window_order = window_order.to(x.device)
            x = _permute_units(x, window_order, unit)
            cos, sin = _permute_units(cos, window_order, unit), _permute_units(sin, window_order, unit)
        for index, block in enumerate(self.blocks):
            if window_order is None or index in config.fullatt_block_indexes:
                x = block(x, cos, sin, full_cu, max(frames))
            else:
                x = block(x, cos, sin, window_cu, max(window_lengths))
        if window_order is not None:
            x = _permute_units(x, torch.argsort(window_order), config.spatial_merge_size**2)
        return x

    def _rotary(self, grids: list[tuple[int, int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        merge = self.config.spatial_merge_size
        positions = []
        for t, h, w in grids:
            hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            shape = (h // merge, merge, w // merge, merge)
            hpos = hpos.reshape(shape).transpose(1, 2).flatten()
            wpos = wpos.reshape(shape).transpose(1, 2).flatten()
            positions.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
        pos = torch.cat(positions).to(device)
        freqs = (pos[..., None].float() * self.inv_freq.to(device)).flatten(1)  # [P, head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def _cumulative(lengths: list[int], device: torch.device) -> Tensor:
    return F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)).to(device)


def _permute_units(x: Tensor, order: Tensor, unit: int) -> Tensor:
    return x.reshape(-1, unit, *x.shape[1:])[order].reshape(x.shape)


def _window_order(grids: list[tuple[int, int, int]], merge: int, window_patches: int) -> tuple[Tensor, list[int]]:
    """Merge-unit permutation that groups each frame's units into windows, and the windows' lengths in patches."""
    window = window_patches // merge
    orders, lengths, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = -gh % window, -gw % window
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
        padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
        counts = (padded >= 0).sum(-1).flatten()
        flat = padded.flatten()
        orders.append(flat[flat >= 0] + offset)
        lengths.extend(int(c) * merge * merge for c in counts if c > 0)
        offset += t * gh * gw
    return torch.cat(orders), lengths


class PatchMerger(nn.Module):
    """Qwen2-VL projector: norm (`ln_q`) per patch, concatenate each 2x2 merge window, 2-layer GELU MLP."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        unit = config.merge_size**2
        width = config.in_dim
        self.ln_q = RMSNorm(width, 1e-6) if config.norm == "rms" else nn.LayerNorm(width, eps=1e-6)
        hidden = config.hidden_dim or width * unit
        self.mlp = nn.Sequential(nn.Linear(width * unit, hidden), nn.GELU(), nn.Linear(hidden, config.out_dim))
        self.unit = unit

    def forward(self, features: Tensor, grid_thw: Tensor | None = None) -> Tensor:
        return self.mlp(self.ln_q(features).reshape(-1, self.unit * self.ln_q.weight.shape[0]))
