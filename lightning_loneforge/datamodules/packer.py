"""`TokenBudgetPacker`: online best-fit-decreasing packing of whole samples into rows of `max_tokens`.

The packer keeps a bounded look-ahead buffer of encoded samples sorted by length. Once it holds `lookahead`
samples it builds one pack: the longest sample opens it (or the oldest, once that one has waited
`max_wait` packs), then the longest sample that still fits (tokens, optional cost budget, image and patch
caps) is added until none fits. Memory stays bounded; samples are never split.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import get_worker_info

from lightning_loneforge.datamodules.balancer import CostModel
from lightning_loneforge.datamodules.batch import IGNORE_INDEX, PackedBatch
from lightning_loneforge.datamodules.encoder import EncodedSample, SampleError

_POLICIES = ("raise", "skip")


class Packable(Protocol):
    """What the packer reads from a sample (`EncodedSample` has it all)."""

    key: str
    index: int

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_images(self) -> int: ...

    @property
    def num_patches(self) -> int: ...


class TokenBudgetPacker:
    """Packs a stream of samples into rows of at most `max_tokens` tokens (a webdataset-style stage).

    Args:
        max_tokens: Token budget of one row.
        lookahead: Samples buffered before a pack is built (larger packs tighter, holds more memory).
        max_images: At most this many images/videos per pack (None: no cap).
        max_patches: At most this many vision patches per pack (None: no cap).
        oversize: A sample over `max_tokens` (or over a cap on its own): "raise" (naming shard and key) or
            "skip" (counted in `skipped["oversize"]`).
        pad_to_budget: End every row with a padding segment up to `max_tokens` (static shapes for compile).
        pad_token_id: Token id of that padding.
        cost_model: Per-sample cost used with `cost_budget`.
        cost_budget: Close a pack once adding a sample would exceed this cost (the balancer's lever;
            see `balancer.py`). None: tokens only.
        max_wait: A sample that has waited this many packs opens the next one (bounds latency).
    """

    def __init__(
        self,
        max_tokens: int,
        *,
        lookahead: int = 128,
        max_images: int | None = None,
        max_patches: int | None = None,
        oversize: str = "raise",
        pad_to_budget: bool = False,
        pad_token_id: int = 0,
        cost_model: CostModel | None = None,
        cost_budget: float | None = None,
        max_wait: int = 64,
    ) -> None:
        if max_tokens < 1 or lookahead < 1:
            raise ValueError(f"max_tokens and lookahead must be >= 1, got {max_tokens}, {lookahead}")
        if oversize not in _POLICIES:
            raise ValueError(f"oversize must be one of {_POLICIES}, got {oversize!r}")
        if cost_budget is not None and cost_model is None:
            cost_model = CostModel()
        self.max_tokens = max_tokens
        self.lookahead = lookahead
        self.max_images = max_images
        self.max_patches = max_patches
        self.oversize = oversize
        self.pad_to_budget = pad_to_budget
        self.pad_token_id = pad_token_id
        self.cost_model = cost_model
        self.cost_budget = cost_budget
        self.max_wait = max_wait
        self.skipped: Counter[str] = Counter()
        self.packs = 0
        self._seq = 0
        self._pending: dict[int, tuple[Packable, int]] = {}
        self._by_length: list[tuple[int, int]] = []
        self._restoring: dict[int, int] = {}

    # ---- buffer ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._pending)

    def _fits_alone(self, sample: Packable) -> str | None:
        if sample.num_tokens > self.max_tokens:
            return f"{sample.num_tokens} tokens > max_tokens={self.max_tokens}"
        if self.max_images is not None and sample.num_images > self.max_images:
            return f"{sample.num_images} images > max_images={self.max_images}"
        if self.max_patches is not None and sample.num_patches > self.max_patches:
            return f"{sample.num_patches} patches > max_patches={self.max_patches}"
        return None

    def add(self, sample: Packable) -> bool:
        """Buffer one sample; returns False if it was skipped as oversize.

        Raises:
            SampleError: If the sample cannot fit any pack and the policy is "raise".
        """
        problem = self._fits_alone(sample)
        if problem is not None:
            if self.oversize == "raise":
                where = getattr(sample, "source", "") or "?"
                raise SampleError(f"sample {where}:{sample.key}: {problem}", "oversize")
            self.skipped["oversize"] += 1
            return False
        born = self._restoring.pop(sample.index, self.packs)
        self._insert(sample, born)
        return True

    def _insert(self, sample: Packable, born: int) -> None:
        seq = self._seq
        self._seq += 1
        self._pending[seq] = (sample, born)
        bisect.insort(self._by_length, (sample.num_tokens, seq))

    def _take(self, pos: int) -> Packable:
        _, seq = self._by_length.pop(pos)
        return self._pending.pop(seq)[0]

    # ---- packing --------------------------------------------------------------------------------------

    def pop_pack(self) -> list[Packable]:
        """Build one pack from the buffer (best-fit decreasing); empty list if the buffer is empty."""
        if not self._pending:
            return []
        oldest_seq = next(iter(self._pending))
        oldest, born = self._pending[oldest_seq]
        if self.packs - born >= self.max_wait:
            opener = self._take(bisect.bisect_left(self._by_length, (oldest.num_tokens, oldest_seq)))
        else:
            opener = self._take(len(self._by_length) - 1)
        pack = [opener]
        tokens, images, patches = opener.num_tokens, opener.num_images, opener.num_patches
        cost = self.cost_model(tokens) if self.cost_budget is not None else 0.0
        while self._by_length:
            limit = self.max_tokens - tokens
            if self.cost_budget is not None:
                limit = min(limit, self.cost_model.max_tokens_within(self.cost_budget - cost))
            pos = bisect.bisect_right(self._by_length, (limit, self._seq)) - 1
            while pos >= 0 and not self._caps_allow(self._by_length[pos][1], images, patches):
                pos -= 1
            if pos < 0:
                break
            sample = self._take(pos)
            pack.append(sample)
            tokens += sample.num_tokens
            images += sample.num_images
            patches += sample.num_patches
            if self.cost_budget is not None:
                cost += self.cost_model(sample.num_tokens)
        self.packs += 1
        return pack

    def _caps_allow(self, seq: int, images: int, patches: int) -> bool:
        if self.max_images is None and self.max_patches is None:
            return True
        sample = self._pending[seq][0]
        if self.max_images is not None and images + sample.num_images > self.max_images:
            return False
        return self.max_patches is None or patches + sample.num_patches <= self.max_patches

    def iter_packs(self, samples: Iterable[Packable]) -> Iterator[list[Packable]]:
        """The stage without collation: yields lists of samples (whole packs), draining at the end."""
        for sample in samples:
            self.add(sample)
            if self._restoring:
                continue
            while len(self._pending) >= self.lookahead:
                yield self.pop_pack()
        self.check_restored()
        while self._pending:
            yield self.pop_pack()

    def __call__(self, samples: Iterable[EncodedSample]) -> Iterator[PackedBatch]:
        for pack in self.iter_packs(samples):
            yield self.collate(pack)

    def collate(self, samples: Sequence[EncodedSample]) -> PackedBatch:
        return collate_packed(samples, self.max_tokens if self.pad_to_budget else None, self.pad_token_id)

    # ---- exact resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Buffered samples by stream index (they are re-read on resume), counters."""
        pending = [[s.index, born, s.key] for s, born in self._pending.values()]
        return {"pending": pending, "packs": self.packs, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start over from a saved state; the buffered samples must then be fed again (`restoring`)."""
        self._pending.clear()
        self._by_length.clear()
        self.packs = int(state["packs"])
        self.skipped = Counter(state["skipped"])
        self._restoring = {int(index): int(born) for index, born, _ in state["pending"]}

    @property
    def restoring(self) -> frozenset[int]:
        """Stream indices of buffered samples still to be fed back after `load_state_dict`."""
        return frozenset(self._restoring)

    def check_restored(self) -> None:
        if self._restoring:
            raise RuntimeError(
                f"resume: {len(self._restoring)} buffered samples (stream indices {sorted(self._restoring)[:5]}...) "
                "were not found again; the shards or their order changed since the checkpoint"
            )


def collate_packed(
    samples: Sequence[EncodedSample], pad_to: int | None = None, pad_token_id: int = 0
) -> PackedBatch:
    """Concatenate whole samples into one `PackedBatch` row (optionally padded to `pad_to` tokens)."""
    lengths = [s.num_tokens for s in samples]
    input_ids = [s.input_ids for s in samples]
    labels = [s.labels for s in samples]
    positions = [s.position_ids for s in samples]
    real = sum(lengths)
    if pad_to is not None and pad_to > real:
        pad = pad_to - real
        input_ids.append(torch.full((pad,), pad_token_id, dtype=torch.int64))
        labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.int64))
        pad_pos = torch.arange(pad, dtype=torch.int64)
        positions.append(pad_pos.expand(3, pad).clone() if positions[0].dim() == 2 else pad_pos)
        lengths = [*lengths, pad]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    vision = [s for s in samples if s.pixel_values is not None]
    acting = [(i, s) for i, s in enumerate(samples) if s.actions is not None]
    return PackedBatch(
        input_ids=torch.cat(input_ids),
        labels=torch.cat(labels),
        position_ids=torch.cat(positions, dim=-1),
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        pixel_values=_cat_shared([s.pixel_values for s in vision]) if vision else None,
        image_grid_thw=torch.cat([s.image_grid_thw for s in vision]) if vision else None,
        actions=torch.stack([s.actions for _, s in acting]) if acting else None,
        proprio=torch.stack([s.proprio for _, s in acting])
        if acting and acting[0][1].proprio is not None
        else None,
        action_sample_index=torch.tensor([i for i, _ in acting], dtype=torch.int64) if acting else None,
        num_real_tokens=real,
        sample_keys=[s.key for s in samples],
    )


def _cat_shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat`, written straight into shared memory inside a DataLoader worker (saves the copy that
    sending a large tensor to the main process would otherwise make)."""
    if get_worker_info() is None:
        return torch.cat(tensors)
    rows = sum(t.shape[0] for t in tensors)
    out = torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype).share_memory_()
    return torch.cat(tensors, out=out)


__all__ = ["TokenBudgetPacker", "collate_packed"]
