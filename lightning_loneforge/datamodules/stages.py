"""Pipeline stages in the webdataset style: generators over iterables, testable on plain `iter([...])`.

    shard urls -> (split by rank, split_by_worker) -> tarfile_to_samples -> shuffle -> number_samples
      -> decode -> encode_samples -> TokenBudgetPacker

webdataset does the reading, splitting, shuffling and decoding; these stages add what it lacks: the
bad-input policy with counted skips, stream positions for exact resume, and the model's sample encoder.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

import webdataset as wds

from lightning_loneforge.datamodules.encoder import EncodedSample, SampleError

log = logging.getLogger(__name__)
POLICIES = ("raise", "skip")
INDEX_KEY = "__index__"


def skip_reason(exn: BaseException) -> str:
    """A short counter name for why a sample or shard was dropped."""
    if isinstance(exn, SampleError):
        return exn.reason
    if isinstance(exn, wds.autodecode.DecodingError):
        return "bad_image" if isinstance(exn.__cause__, OSError) else "undecodable"
    if isinstance(exn, (OSError, EOFError)) or "tar" in type(exn).__module__:
        return "corrupt_shard"
    return type(exn).__name__


class BadInputHandler:
    """A webdataset exception handler that implements the bad-input policy.

    "raise": re-raise (the message names shard, key and field where webdataset or the encoder knows them).
    "skip": count the drop under `skipped[reason]`, log a warning, continue with the next sample/shard.
    """

    def __init__(self, policy: str = "raise") -> None:
        if policy not in POLICIES:
            raise ValueError(f"bad_sample policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.skipped: Counter[str] = Counter()

    def __call__(self, exn: BaseException) -> bool:
        reason = skip_reason(exn)
        if self.policy == "raise":
            if isinstance(exn, wds.autodecode.DecodingError):
                raise SampleError(describe(exn), reason) from exn
            raise exn
        self.skipped[reason] += 1
        log.warning("skipped (%s, total %d): %s", reason, self.skipped[reason], describe(exn))
        return True


def describe(exn: BaseException) -> str:
    """One line naming what failed; webdataset's DecodingError keeps shard, key and field as attributes."""
    if isinstance(exn, wds.autodecode.DecodingError):
        return f"cannot decode field {exn.k!r} of sample {exn.url}:{exn.key}: {exn.__cause__!r}"
    return f"{type(exn).__name__}: {exn}"


def split_by_rank(urls: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Every `world_size`-th url starting at `rank` (webdataset's `split_by_node`, with the rank passed in,
    because DataLoader worker processes may not see the process group)."""
    for i, url in enumerate(urls):
        if i % world_size == rank:
            yield url


def number_samples(
    src: Iterable[dict[str, Any]], start: int = 0, keep: Container[int] = (), counter: list[int] | None = None
) -> Iterator[dict[str, Any]]:
    """Tag each sample with its position in the stream (`__index__`) and fast-forward a resumed stream.

    Samples before position `start` were consumed before the checkpoint: they are dropped undecoded, except
    the ones in `keep` (still in the packer's buffer then). `counter[0]` tracks the position.
    """
    counter = counter if counter is not None else [0]
    for index, sample in enumerate(src):
        counter[0] = index + 1
        if index < start and index not in keep:
            continue
        sample[INDEX_KEY] = index
        yield sample


def encode_samples(
    src: Iterable[dict[str, Any]],
    encoder: Callable[[dict[str, Any]], EncodedSample],
    handler: BadInputHandler,
) -> Iterator[EncodedSample]:
    """Apply the model's `SampleEncoder`; failures go to the bad-input policy."""
    for sample in src:
        try:
            encoded = encoder(sample)
        except SampleError as exn:
            if handler(exn):
                continue
            break
        encoded.index = int(sample.get(INDEX_KEY, -1))
        yield encoded


__all__ = ["BadInputHandler", "encode_samples", "number_samples", "skip_reason", "split_by_rank"]
