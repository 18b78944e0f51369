"""A tiny two-tower LightningModule, its data and a plain single-process reference loop for the strategy tests.

The other test_strategy_* files import from here; the tests in this file check the reference itself.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

IN_DIM, DIM, VOCAB = 8, 16, 12
LR = 1e-2


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(torch.tanh(self.fc1(self.norm(x)))))


class Tower(nn.Module):
    """Input projection, `.blocks` (the strategy contract), final norm."""

    def __init__(self, in_dim: int, dim: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class TwoTowerModel(pl.LightningModule):
    """`vision` -> `llm` -> `head` (the head is outside every tower: it gets the default plan).

    Built in `configure_model()` from a fixed seed, like the zoo models; dropout is 0 when training
    (so distributed and single-process runs match) and only active in a frozen tower left in train mode.
    """

    def __init__(self, seed: int = 0, depth: int = 2, dropout_in_train: bool = False) -> None:
        super().__init__()
        self.seed = seed
        self.depth = depth
        self.dropout_in_train = dropout_in_train
        self.vision: Tower | None = None
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.vision is not None:
            return
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        self.vision = Tower(IN_DIM, DIM, self.depth)
        self.llm = Tower(DIM, DIM, self.depth)
        self.head = nn.Linear(DIM, VOCAB)
        torch.random.set_rng_state(generator_state)
        if not self.dropout_in_train:
            for module in self.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0

    def towers(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "llm": self.llm}

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pixels, targets = batch
        return nn.functional.cross_entropy(self.head(self.llm(self.vision(pixels))), targets)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        loss = self.loss(batch)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR)


def make_data(num_samples: int, seed: int = 1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_samples, IN_DIM, generator=generator)
    targets = torch.randint(0, VOCAB, (num_samples,), generator=generator)
    return TensorDataset(pixels, targets)


class TinyDataModule(pl.LightningDataModule):
    """Sequential batches of `per_rank_batch` (use with `Trainer(use_distributed_sampler=False)`), stateful."""

    def __init__(self, num_samples: int, per_rank_batch: int) -> None:
        super().__init__()
        self.data = make_data(num_samples)
        self.per_rank_batch = per_rank_batch
        self.epochs_started = 0
        self.loaded_state: dict | None = None

    def train_dataloader(self) -> DataLoader:
        """Rank r takes samples r, r+W, ...: each step's global batch is a contiguous slice (no shuffling)."""
        self.epochs_started += 1
        sampler = DistributedSampler(
            self.data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(self.data, batch_size=self.per_rank_batch, sampler=sampler)

    def state_dict(self) -> dict:
        return {"epochs_started": self.epochs_started}

    def load_state_dict(self, state_dict: dict) -> None:
        self.loaded_state = dict(state_dict)


def reference_run(
    *,
    steps: int,
    global_batch: int,
    accumulate: int = 1,
    clip: float | None = None,
    frozen: tuple[str, ...] = (),
    epochs: int = 1,
    seed: int = 0,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain PyTorch on one process over the same global batches: per-micro-batch losses and final parameters.

    Each epoch is `steps` optimizer steps over the same `steps * accumulate * global_batch` samples.
    """
    model = TwoTowerModel(seed=seed)
    model.configure_model()
    for name in frozen:
        getattr(model, name).requires_grad_(False)
        getattr(model, name).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    data = make_data(steps * accumulate * global_batch)
    losses = []
    for step in range(steps * epochs):
        optimizer.zero_grad()
        for micro in range(accumulate):
            start = ((step % steps) * accumulate + micro) * global_batch
            batch = data[start : start + global_batch]
            loss = model.loss(batch)
            (loss / accumulate).backward()
            losses.append(float(loss.detach()))
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return losses, copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})


def max_abs_diff(left: Mapping[str, torch.Tensor], right: Mapping[str, torch.Tensor]) -> float:
    assert sorted(left) == sorted(right), (sorted(left), sorted(right))
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def test_reference_trains_and_clipping_changes_it() -> None:
    losses, params = reference_run(steps=3, global_batch=4, accumulate=2)
    clipped_losses, clipped = reference_run(steps=3, global_batch=4, accumulate=2, clip=0.05)
    assert losses[:2] == clipped_losses[:2]  # same first step inputs
    assert max_abs_diff(params, clipped) > 1e-4  # the clip value used by the tests is active


def test_frozen_tower_in_reference_keeps_its_weights() -> None:
    model = TwoTowerModel()
    model.configure_model()
    before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    _, params = reference_run(steps=2, global_batch=4, frozen=("vision",))
    after = {k.removeprefix("vision."): v for k, v in params.items() if k.startswith("vision.")}
    assert max_abs_diff(before, after) == 0.0
