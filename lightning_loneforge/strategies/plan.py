"""`TowerPlan`: how one tower of a multimodal model is parallelized, kept in memory and compiled."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

ShardKind = Literal["full", "hybrid", "replicate", "none"]
SHARD_KINDS: tuple[str, ...] = ("full", "hybrid", "replicate", "none")


@dataclass(kw_only=True)
class TowerPlan:
    """Parallel plan of one tower (`vision`, `projector`, `llm`, ...), written as plain YAML values.

    Example (YAML, under the strategy's `plans`)::

        vision: {shard: replicate, activation_checkpointing: full}
        llm: {shard: full, param_dtype: bfloat16, reduce_dtype: float32}
    """

    shard: ShardKind = "full"
    """`full`: FSDP2, one unit per block of `tower.blocks`; `hybrid`: HSDP, shard inside groups of
    `shard_group_size` ranks and replicate across groups; `replicate`: DDP semantics (every rank holds the
    whole tower, gradients all-reduced); `none`: frozen plain copy on every rank, no gradients, no communication."""
    reshard_after_forward: bool = True
    """Free the gathered parameters after forward (all-gather again in backward) to save memory."""
    activation_checkpointing: str | int = "none"
    """`none`, `full` (every block, or the whole tower when it has no `.blocks`), or n: every n-th block."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer states in host memory (FSDP2 `CPUOffloadPolicy`)."""
    param_dtype: str | None = None
    """Dtype the tower computes in (`bfloat16`, `float16`, `float32`); None keeps the parameters' dtype."""
    reduce_dtype: str | None = None
    """Dtype of gradient reductions; None uses `param_dtype`."""
    trainable: bool = True
    """False freezes the tower (no gradients) but keeps its sharding; `shard: none` always freezes."""
    compile: bool = False
    """`torch.compile` each block (or the whole tower when it has no `.blocks`) before sharding."""
    shard_group_size: int | None = None
    """Ranks per shard group for `hybrid`; None means the devices of one node."""

    def __post_init__(self) -> None:
        if self.shard not in SHARD_KINDS:
            raise ValueError(f"TowerPlan.shard={self.shard!r}: expected one of {', '.join(SHARD_KINDS)}.")
        ac = self.activation_checkpointing
        if isinstance(ac, str) and ac.isdigit():
            self.activation_checkpointing = ac = int(ac)
        if isinstance(ac, bool) or not (ac in ("none", "full") or (isinstance(ac, int) and ac >= 1)):
            raise ValueError(
                f"TowerPlan.activation_checkpointing={ac!r}: expected 'none', 'full' or a positive int n (every n-th block)."
            )
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None:
                parse_dtype(value, field=f"TowerPlan.{name}")
        if self.shard_group_size is not None and self.shard_group_size < 1:
            raise ValueError(f"TowerPlan.shard_group_size={self.shard_group_size}: must be >= 1.")
        if self.shard_group_size is not None and self.shard != "hybrid":
            raise ValueError(f"TowerPlan.shard_group_size is only used with shard='hybrid' (got shard={self.shard!r}).")

    @property
    def frozen(self) -> bool:
        """True when the tower gets no gradients (`shard: none` or `trainable: false`)."""
        return self.shard == "none" or not self.trainable

    @property
    def checkpoint_every(self) -> int:
        """0 for no activation checkpointing, else checkpoint every n-th block (1 = every block)."""
        ac = self.activation_checkpointing
        return 0 if ac == "none" else 1 if ac == "full" else int(ac)

    @classmethod
    def from_value(cls, value: TowerPlan | Mapping[str, Any], *, where: str) -> TowerPlan:
        """Builds a plan from a `TowerPlan` or a dict of its fields; errors name `where` (e.g. `plans.vision`)."""
        if isinstance(value, TowerPlan):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{where}: expected a TowerPlan or a mapping of its fields, got {type(value).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unknown TowerPlan field(s) {unknown}; known: {sorted(known)}.")
        try:
            return cls(**value)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from err


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def parse_dtype(name: str | torch.dtype, *, field: str = "dtype") -> torch.dtype:
    """Turns `bfloat16` / `bf16` / `torch.float32` into a floating `torch.dtype`; errors name `field`."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    dtype = getattr(torch, _DTYPE_ALIASES.get(key, key), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{field}={name!r}: not a floating torch dtype (e.g. 'bfloat16', 'float32').")
    return dtype
