"""`PackedBatch`: the contract between the data pipeline and the models."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """Several whole samples packed into one token row, ready for varlen attention.

    Lightning moves it to the device like any dataclass of tensors.
    """

    input_ids: Tensor
    """`[T]` int64 token ids of all samples, back to back; image/video placeholders hold the image token id."""
    labels: Tensor
    """`[T]` int64 targets aligned with `input_ids` (not shifted); `IGNORE_INDEX` where no loss is taken."""
    position_ids: Tensor
    """`[T]` int64 positions restarting at 0 for every sample, or `[3, T]` for M-RoPE models."""
    cu_seqlens: Tensor
    """`[S + 1]` int32 cumulative sample lengths in the row (`cu_seqlens[-1] == T`)."""
    max_seqlen: int
    """Longest sample in the row."""
    pixel_values: Tensor | None = None
    """`[P, C * temporal_patch * patch * patch]` float patches of every image/video of the row, in order."""
    image_grid_thw: Tensor | None = None
    """`[I, 3]` int64 grid (t, h, w) in patches of each image/video, in order of appearance."""
    actions: Tensor | None = None
    """`[A, horizon, action_dim]` float action chunks of the VLA samples of the row, in order."""
    proprio: Tensor | None = None
    """`[A, proprio_dim]` float robot state of the VLA samples of the row, in order."""
    action_sample_index: Tensor | None = None
    """`[A]` int64 index (into the row's samples) of the sample each action chunk belongs to."""
    num_real_tokens: int = 0
    """Tokens that belong to samples (the row may end with padding counted out here)."""
    sample_keys: list[str] = field(default_factory=list)
    """`__key__` of each sample, in order (padding excluded)."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def num_samples(self) -> int:
        return len(self.sample_keys)

    def sample_lengths(self) -> Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).to(torch.int64)
