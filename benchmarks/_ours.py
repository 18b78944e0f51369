"""The "ours" arm: the zoo's Qwen2-VL-2B through `TowerParallelStrategy` on packed rows from `TokenBudgetPacker`.

Samples are synthesized directly as encoded samples (token ids, M-RoPE positions, random patches of the
right shapes) instead of decoding images: the benchmark measures the training step, and JPEG decoding of
~38,000 patches per row would need a worker pool the lent machine's start-up cannot amortize.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from _bench_common import (
    MERGE,
    PATCH_DIM,
    ArmResult,
    MatmulParams,
    patches_of,
    peak_gib,
    reset_memory,
    sample_mrope_positions,
    sample_token_ids,
    synchronize,
)


@dataclass
class OursConfig:
    """Levers of the ours arm (the strategy's `TowerPlan` fields, the token budget, the attention kernel)."""

    max_tokens: int = 16384
    vision_ac: str | int = "full"
    """Activation checkpointing of the ViT: "none", "full", or n (every n-th block)."""
    llm_ac: str | int = "none"
    compile: bool = True
    reshard_after_forward: bool = False
    """On one GPU there is nothing to save by re-gathering in backward."""
    fused_adamw: bool = True
    attention: str = "auto"
    """"fa4" routes the zoo's varlen attention to FlashAttention-4, "auto" keeps the zoo's choice."""
    lookahead: int = 256
    workers: int = 2
    extra: dict = field(default_factory=dict)

    def label(self) -> str:
        return (f"tok{self.max_tokens}-vitAC{self.vision_ac}-llmAC{self.llm_ac}-"
                f"{'compile' if self.compile else 'eager'}-{self.attention}")


# ----------------------------------------------------------------------------- data
def encode_synthetic(shapes, *, seed: int, pool: torch.Tensor, start_index: int = 0, learnable: bool = False):
    """EncodedSamples for `shapes` (ids, labels, M-RoPE positions, patches cut from `pool`)."""
    from lightning_loneforge.datamodules.encoder import EncodedSample

    gen = torch.Generator().manual_seed(seed)
    out = []
    for offset, shape in enumerate(shapes):
        ids, labels = sample_token_ids(shape, gen, learnable)
        grids = torch.tensor(shape.grids, dtype=torch.long) if shape.grids else None
        sample = EncodedSample(
            input_ids=ids, labels=labels, key=str(start_index + offset),
            position_ids=sample_mrope_positions(shape),
            pixel_values=pool[: patches_of(shape)] if grids is not None else None,
            image_grid_thw=grids,
        )
        sample.index = start_index + offset
        out.append(sample)
    return out


class PackedRows(torch.utils.data.IterableDataset):
    """The packer over pre-encoded samples: one `PackedBatch` per step (a webdataset-style stage).

    Row `i` of the packed stream (from `start` on) goes to data-parallel rank `i % world`, and within a rank
    DataLoader workers take turns, so every rank sees its rows in stream order. `cost_budget` closes packs by
    estimated cost (the balancer, `datamodules/balancer.py`) instead of by tokens alone. `skip_text_only`
    drops rows without any image (counted in `text_only_rows`; needed across ranks, see `__iter__`).
    """

    def __init__(self, samples, max_tokens: int, lookahead: int, *, rank: int = 0, world: int = 1,
                 start: int = 0, cost_budget: float | None = None, skip_text_only: bool = False) -> None:
        self.samples, self.max_tokens, self.lookahead = samples, max_tokens, lookahead
        self.rank, self.world, self.start, self.cost_budget = rank, world, start, cost_budget
        self.skip_text_only = skip_text_only

    def packer(self):
        from lightning_loneforge.datamodules.packer import TokenBudgetPacker

        return TokenBudgetPacker(self.max_tokens, lookahead=self.lookahead, oversize="skip",
                                 cost_budget=self.cost_budget)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        packer = self.packer()
        mine = index = 0
        self.text_only_rows = 0
        for pack in packer.iter_packs(iter(self.samples)):
            if self.skip_text_only and not any(s.pixel_values is not None for s in pack):
                # a row without images skips the vision tower, and with it that tower's collectives on this
                # rank only: the other ranks would wait forever (see benchmarks/NOTES.md). Counted, skipped.
                self.text_only_rows += 1
                continue
            index += 1
            if index - 1 < self.start or (index - 1 - self.start) % self.world != self.rank:
                continue
            if mine % workers == worker:  # workers take turns, so rows arrive in stream order
                yield packer.collate(pack)
            mine += 1


def row_stats(samples, max_tokens: int, lookahead: int) -> list[tuple[int, int, int]]:
    """(tokens, patches, labelled next-token targets) of each row the packer will build, in order."""
    from lightning_loneforge.datamodules.packer import TokenBudgetPacker

    packer = TokenBudgetPacker(max_tokens, lookahead=lookahead, oversize="skip")
    stats = []
    for pack in packer.iter_packs(iter(samples)):
        tokens = sum(s.num_tokens for s in pack)
        patches = sum(s.num_patches for s in pack)
        logits = sum(int((s.labels[1:] != -100).sum()) for s in pack)
        stats.append((tokens, patches, logits))
    return stats


# ----------------------------------------------------------------------------- model + strategy
def build_module(row: str, tiny: bool, lr: float = 1e-5):
    """The zoo's LightningModule for `row` (tiny variant for CPU smoke runs); no warm-up."""
    from lightning_loneforge.model_zoo.module import MultimodalModule

    return MultimodalModule(model=row, overrides=TINY_OVERRIDES if tiny else None, lr=lr, warmup_steps=0)


TINY_OVERRIDES = {
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "mrope_section": [2, 3, 3]},
    "vision": {"hidden_size": 32, "intermediate_size": 128, "num_layers": 2, "num_heads": 2},
    "projector": {"in_dim": 32, "out_dim": 64},
}


def tower_plans(cfg: OursConfig) -> dict:
    from lightning_loneforge.strategies import TowerPlan

    common = {"compile": cfg.compile, "reshard_after_forward": cfg.reshard_after_forward}
    return {
        "vision": TowerPlan(activation_checkpointing=cfg.vision_ac, **common),
        "projector": TowerPlan(**common),
        "llm": TowerPlan(activation_checkpointing=cfg.llm_ac, **common),
    }


class _Timer:
    """Lightning callback: wall time of steps `[warmup, warmup + steps)`, the device synchronized at both ends;
    then, optionally, a torch.profiler trace of the next `profile_steps` steps (written as a table)."""

    def __init__(self, warmup: int, steps: int, profile_steps: int = 0, profile_path=None) -> None:
        import lightning.pytorch as pl

        outer = self

        class Callback(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == outer.warmup:
                    synchronize()
                    if torch.cuda.is_available():
                        torch.cuda.reset_peak_memory_stats()
                    outer.t0 = time.perf_counter()
                if batch_idx == outer.warmup + outer.steps:
                    outer.stop()
                    outer.start_profile()
                if outer.warmup <= batch_idx < outer.warmup + outer.steps:
                    outer.keys.append(list(batch.sample_keys))

            def on_train_end(self, trainer, module):
                outer.stop()
                outer.end_profile()

        self.warmup, self.steps = warmup, steps
        self.profile_steps, self.profile_path = profile_steps, profile_path
        self.keys: list[list[str]] = []
        self.t0 = 0.0
        self.t1: float | None = None
        self.peak = float("nan")
        self._prof = None
        self.callback = Callback()

    def stop(self) -> None:
        if self.t1 is None:
            synchronize()
            self.t1 = time.perf_counter()
            self.peak = peak_gib()

    def start_profile(self) -> None:
        if not self.profile_steps or self.profile_path is None:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()

    def end_profile(self) -> None:
        if self._prof is None:
            return
        synchronize()
        self._prof.__exit__(None, None, None)
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        table = self._prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70)
        self.profile_path.write_text(table)
        self._prof = None


def run_ours(shapes, *, cfg: OursConfig, warmup: int, steps: int, device: torch.device, row: str = "qwen2-vl-2b",
             tiny: bool = False, seed: int = 0, text: dict, vision: dict, profile_steps: int = 0,
             profile_path=None) -> ArmResult:
    """Train `warmup + steps` packed rows through Lightning + TowerParallelStrategy; time the last `steps`."""
    import lightning.pytorch as pl

    from lightning_loneforge.strategies import TowerParallelStrategy

    reset_memory()
    from _fa4 import install_fa4, uninstall_fa4

    backend = "zoo default"
    if cfg.attention == "fa4":
        backend = install_fa4()
    else:
        uninstall_fa4()
    max_patches = max(patches_of(s) for s in shapes)
    pool = torch.randn(max(max_patches, 1), PATCH_DIM, dtype=torch.bfloat16)
    samples = encode_synthetic(shapes, seed=seed, pool=pool)
    stats = row_stats(samples, cfg.max_tokens, cfg.lookahead)
    if len(stats) < warmup + steps + profile_steps:
        raise ValueError(f"ours: {warmup + steps + profile_steps} rows needed, {len(shapes)} samples give {len(stats)}")
    loader = torch.utils.data.DataLoader(
        PackedRows(samples, cfg.max_tokens, cfg.lookahead), batch_size=None, num_workers=cfg.workers,
        prefetch_factor=4 if cfg.workers else None, persistent_workers=False,
    )
    module = build_module(row, tiny)
    timer = _Timer(warmup, steps, profile_steps if profile_path else 0, profile_path)
    trainer = pl.Trainer(
        accelerator="cuda" if device.type == "cuda" else "cpu", devices=1,
        strategy=TowerParallelStrategy(plans=tower_plans(cfg)),
        precision="bf16-true" if device.type == "cuda" else "32-true",  # CPU smoke runs: fp32 is faster
        max_steps=warmup + steps + (profile_steps if profile_path else 0), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer.callback],
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        del trainer, module, loader
        reset_memory()
    params = MatmulParams.from_shape(text, vision)
    measured = timer.keys
    by_key = {s.key: s for s in samples}
    tokens = patches = logits = 0
    for keys in measured:
        rows = [by_key[k] for k in keys]
        tokens += sum(s.num_tokens for s in rows)
        patches += sum(s.num_patches for s in rows)
        logits += sum(int((s.labels[1:] != -100).sum()) for s in rows)
    flops = params.train_flops(patches, tokens, logits)
    slots = len(measured) * cfg.max_tokens
    return ArmResult(f"ours-{cfg.label()}", len(measured), timer.t1 - timer.t0, tokens, slots, patches, flops,
                     timer.peak, note=f"attention {backend}")


__all__ = ["OursConfig", "run_ours", "MERGE"]
