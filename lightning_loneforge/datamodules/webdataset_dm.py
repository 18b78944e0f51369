"""`WebDatasetDataModule`: WebDataset shards -> model sample encoder -> token-budget packs, one per rank per step."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
import webdataset as wds
from typing_extensions import override

from lightning_loneforge.datamodules.balancer import CostModel
from lightning_loneforge.datamodules.batch import PackedBatch
from lightning_loneforge.datamodules.encoder import SampleEncoder
from lightning_loneforge.datamodules.packer import TokenBudgetPacker
from lightning_loneforge.datamodules.stages import POLICIES
from lightning_loneforge.datamodules.stream import PackedLoader, PackedStream


def expand_shards(shards: str | list[str], what: str = "shards") -> list[str]:
    """Expand a path, brace pattern (`train-{000000..000099}.tar`), `pipe:` command, `::`-joined list or list.

    Raises:
        ValueError: If nothing is left after expansion.
        FileNotFoundError: If a local shard does not exist.
        PermissionError: If a local shard cannot be read.
    """
    urls: list[str] = []
    for item in [shards] if isinstance(shards, str) else list(shards):
        urls.extend(wds.shardlists.expand_urls(item))
    if not urls:
        raise ValueError(f"{what}: empty shard list from {shards!r}")
    local = [url[len("file:") :] if url.startswith("file:") else url for url in urls]
    local = [path for path in local if not (path.startswith("pipe:") or "://" in path)]
    missing = [path for path in local if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"{what}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[:3]} (from {shards!r})"
        )
    unreadable = [path for path in local if not os.access(path, os.R_OK)]
    if unreadable:
        raise PermissionError(f"{what}: {len(unreadable)} shards are not readable, e.g. {unreadable[:3]}")
    return urls


class WebDatasetDataModule(pl.LightningDataModule):
    """Streams WebDataset shards through the model's `SampleEncoder` into packed rows of `max_tokens`.

    The train loader yields one `PackedBatch` per step per rank and resumes exactly (its state and the
    datamodule's are saved in Lightning checkpoints). Per-step numbers for logging: `metrics()`, or add
    `PackingMetricsCallback`.

    Ranks should be started as fresh interpreters (torchrun, Lightning's "ddp"). In rank processes started
    by `multiprocessing` spawn ("ddp_spawn"), DataLoader workers with torch's default "file_descriptor"
    tensor sharing stalled in our probe; `torch.multiprocessing.set_sharing_strategy("file_system")` fixed it.

    Args:
        train_shards: Path, brace pattern, `pipe:` command, or a list of them.
        val_shards: The same for validation (no shuffling), or None.
        max_tokens: Token budget of one packed row.
        num_workers: DataLoader workers per rank (shards are split by rank, then by worker).
        shuffle_buffer: Samples in each worker's shuffle buffer.
        lookahead: Samples the packer buffers before it builds a pack.
        seed: Shared seed of shard order and shuffling.
        bad_sample: "raise" (default; the error names shard and key) or "skip" (counted, logged).
        balance: Close packs at an equal estimated cost (`cost_a * n**2 + cost_b * n + cost_c` per sample),
            so every rank's step costs about the same.
        cost_a, cost_b, cost_c: Per-sample cost coefficients (see `balancer.py` for fitting them).
        typical_tokens: Sample length that defines the cost budget: a full row of such samples.
        max_images, max_patches: Per-pack caps on images/videos and vision patches.
        pad_to_budget: Pad every row to `max_tokens` (static shapes for `torch.compile`).
        pin_memory: Pin batches in the DataLoader.
        steps_per_epoch: Train batches per epoch on every rank, continuing into the next pass over the
            shards when a rank runs out (ranks' shards rarely give equal pack counts; unequal counts stall
            DDP at the end of an epoch). None: one pass per epoch, as many batches as the rank's shards give.
        encoder: The model's `SampleEncoder`; None asks `trainer.lightning_module.sample_encoder()` in `setup`.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        max_tokens: int = 16384,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        lookahead: int = 128,
        seed: int = 0,
        bad_sample: str = "raise",
        balance: bool = False,
        cost_a: float = 2.8e-5,
        cost_b: float = 1.0,
        cost_c: float = 0.0,
        typical_tokens: int = 1024,
        max_images: int | None = None,
        max_patches: int | None = None,
        pad_to_budget: bool = False,
        pin_memory: bool = False,
        steps_per_epoch: int | None = None,
        encoder: SampleEncoder | None = None,
    ) -> None:
        super().__init__()
        if bad_sample not in POLICIES:
            raise ValueError(f"bad_sample must be one of {POLICIES}, got {bad_sample!r}")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.max_tokens = max_tokens
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.lookahead = lookahead
        self.seed = seed
        self.bad_sample = bad_sample
        self.balance = balance
        self.cost_model = CostModel(cost_a, cost_b, cost_c)
        self.typical_tokens = typical_tokens
        self.max_images = max_images
        self.max_patches = max_patches
        self.pad_to_budget = pad_to_budget
        self.pin_memory = pin_memory
        self.steps_per_epoch = steps_per_epoch
        self.encoder = encoder
        self._train_urls: list[str] = []
        self._val_urls: list[str] = []
        self._train_loader: PackedLoader | None = None
        self._pending_state: dict[str, Any] | None = None

    # ---- setup ----------------------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        self._train_urls = expand_shards(self.train_shards, "train_shards")
        if self.val_shards is not None:
            self._val_urls = expand_shards(self.val_shards, "val_shards")
        if self.encoder is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not hasattr(module, "sample_encoder"):
                raise ValueError("no encoder given and the LightningModule has no sample_encoder() to ask")
            self.encoder = module.sample_encoder()

    def _rank(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def packer_factory(self) -> Callable[[], TokenBudgetPacker]:
        """A picklable factory of this config's packer (each DataLoader worker pass builds a fresh one)."""
        budget = self.cost_model.budget_for(self.max_tokens, self.typical_tokens) if self.balance else None
        pad_id = getattr(getattr(self.encoder, "tokenizer", None), "pad_id", 0)
        return functools.partial(
            TokenBudgetPacker,
            self.max_tokens,
            lookahead=self.lookahead,
            max_images=self.max_images,
            max_patches=self.max_patches,
            oversize=self.bad_sample,
            pad_to_budget=self.pad_to_budget,
            pad_token_id=pad_id,
            cost_model=self.cost_model,
            cost_budget=budget,
        )

    def _loader(self, urls: list[str], shuffle: bool, steps_per_epoch: int | None = None) -> PackedLoader:
        if not urls:
            raise RuntimeError("call setup() before asking for dataloaders")
        if self.encoder is None:
            raise RuntimeError("no SampleEncoder: pass encoder= or call setup() with a trainer attached")
        rank, world_size = self._rank()
        stream = PackedStream(
            urls,
            self.encoder,
            self.packer_factory(),
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer if shuffle else 0,
            bad_sample=self.bad_sample,
        )
        return PackedLoader(
            stream, num_workers=self.num_workers, pin_memory=self.pin_memory, steps_per_epoch=steps_per_epoch
        )

    @override
    def train_dataloader(self) -> PackedLoader:
        loader = self._loader(self._train_urls, shuffle=True, steps_per_epoch=self.steps_per_epoch)
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    @override
    def val_dataloader(self) -> PackedLoader | list:
        return self._loader(self._val_urls, shuffle=False) if self._val_urls else []

    # ---- resume and metrics ---------------------------------------------------------------------------

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if (
            self._train_loader is not None
            and isinstance(batch, PackedBatch)
            and trainer is not None
            and trainer.training
        ):
            self._train_loader.mark_consumed(batch)
        return batch

    @override
    def state_dict(self) -> dict[str, Any]:
        """The train loader's resume state (every rank's; a collective under torch.distributed)."""
        if self._train_loader is not None:
            return {"train": self._train_loader.state_dict()}
        return {"train": self._pending_state} if self._pending_state is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        train = state_dict.get("train")
        if train is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(train)
        else:
            self._pending_state = train

    def metrics(self, batch: PackedBatch | None = None) -> dict[str, float]:
        """Numbers for the current step: data wait, skipped samples by reason and, given the batch, packing."""
        out: dict[str, float] = {}
        loader = self._train_loader
        if loader is not None:
            out["data/wait_s"] = loader.data_wait_s
            for reason, count in sorted(loader.skipped.items()):
                out[f"data/skipped_{reason}"] = float(count)
        if batch is not None:
            out.update(batch_metrics(batch, self.cost_model))
        return out


def batch_metrics(batch: PackedBatch, cost_model: CostModel) -> dict[str, float]:
    """Real-token fraction, samples and tokens of one packed row, the sum of squared sample lengths (to fit
    the cost model, see `balancer.py`) and its estimated cost."""
    lengths = batch.sample_lengths().tolist()[: batch.num_samples]
    return {
        "data/real_token_fraction": batch.num_real_tokens / max(1, batch.num_tokens),
        "data/samples_per_pack": float(batch.num_samples),
        "data/tokens_per_pack": float(batch.num_real_tokens),
        "data/sum_sq_tokens": float(sum(n * n for n in lengths)),
        "data/pack_cost": cost_model.pack_cost(lengths),
    }


__all__ = ["WebDatasetDataModule", "batch_metrics", "expand_shards"]
