"""Counts the bytes that c10d collectives move, seen from one rank (for tests and benchmarks/comm_volume.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_c10d = torch.ops.c10d
_ALL_REDUCE = {_c10d.allreduce_, _c10d.allreduce_coalesced_}
_ALL_GATHER = {_c10d._allgather_base_, _c10d.allgather_, _c10d.allgather_into_tensor_coalesced_}
_REDUCE_SCATTER = {_c10d._reduce_scatter_base_, _c10d.reduce_scatter_, _c10d.reduce_scatter_tensor_coalesced_}
_OTHER = {_c10d.broadcast_, _c10d.alltoall_base_, _c10d.alltoall_, _c10d.gather_, _c10d.scatter_, _c10d.reduce_}
_KINDS = {
    **{op.default: "all_reduce" for op in _ALL_REDUCE},
    **{op.default: "all_gather" for op in _ALL_GATHER},
    **{op.default: "reduce_scatter" for op in _REDUCE_SCATTER},
    **{op.default: op.default.name().split("::")[-1].rstrip("_") for op in _OTHER},
}


@dataclass
class Collective:
    """One collective call: its kind, the payload bytes and the size of its process group."""

    kind: str
    payload_bytes: int
    group_size: int

    @property
    def ring_bytes(self) -> float:
        """Bytes this rank sends with a ring algorithm: all-reduce 2(n-1)/n x payload, gathers/scatters (n-1)/n."""
        share = (self.group_size - 1) / self.group_size if self.group_size else 0.0
        return (2 if self.kind == "all_reduce" else 1) * share * self.payload_bytes

    @property
    def bus_bytes(self) -> float:
        """Payload in NCCL bus-bandwidth units: 2x for all-reduce, 1x for the rest (0 on a one-rank group)."""
        return 0.0 if self.group_size <= 1 else (2 if self.kind == "all_reduce" else 1) * self.payload_bytes


def _tensor_bytes(tensors: Any) -> int:
    flat, _ = tree_flatten(tensors)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def _group_size(args: tuple) -> int:
    flat, _ = tree_flatten(args)
    for item in flat:
        if isinstance(item, torch.ScriptObject) and item._type().qualified_name().endswith("c10d.ProcessGroup"):
            return int(torch.distributed.ProcessGroup.unbox(item).size())
    raise RuntimeError("c10d collective without a ProcessGroup argument")


def _payload(kind: str, args: tuple) -> int:
    # c10d op schemas: outputs first for gathers (all-gather counts the gathered output), inputs for the rest
    if kind == "all_gather":
        return _tensor_bytes(args[0])
    if kind == "reduce_scatter":
        return _tensor_bytes(args[1])
    return _tensor_bytes(args[0])


class CollectiveCounter(TorchDispatchMode):
    """`with CollectiveCounter() as counter:` records every c10d collective issued on this rank."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Collective] = []
        self.enabled = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kind = _KINDS.get(func)
        if kind is not None and self.enabled:
            self.calls.append(Collective(kind, _payload(kind, args), _group_size(args)))
        return func(*args, **(kwargs or {}))

    def total(self, unit: str = "bus_bytes", kinds: tuple[str, ...] | None = None) -> float:
        """Sum of `bus_bytes`, `ring_bytes` or `payload_bytes` over calls (optionally of some kinds only)."""
        return float(sum(getattr(c, unit) for c in self.calls if kinds is None or c.kind in kinds))

    def clear(self) -> None:
        self.calls.clear()
