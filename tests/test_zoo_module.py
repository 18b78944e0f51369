"""MultimodalModule: trains tiny-demo through Lightning on encoded demo samples; packed == unpacked; groups."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_loneforge.datamodules.batch import IGNORE_INDEX, PackedBatch
from lightning_loneforge.model_zoo.module import (
    MultimodalModule,
    answer_exact_match,
    param_groups,
    warmup_cosine,
)

os.environ.setdefault("WANDB_MODE", "offline")


def _samples(module: MultimodalModule, count: int, seed: int = 0):
    """Encoded demo samples (real encoder, real images)."""
    import random

    from lightning_loneforge.datamodules.demo_data import DemoSpec, make_sample

    encoder = module.sample_encoder()
    rng = random.Random(seed)
    spec = DemoSpec(n_train=count, n_val=1)
    return [encoder(_decoded(make_sample(i, "train", rng, spec))) for i in range(count)]


def _decoded(raw: dict) -> dict:
    import io
    import json

    from PIL import Image

    out = {}
    for key, value in raw.items():
        if key.endswith((".png", ".jpg")) or key in ("png", "jpg"):
            out[key] = Image.open(io.BytesIO(value)).convert("RGB") if isinstance(value, bytes) else value
        elif key == "json" and isinstance(value, bytes | str):
            out[key] = json.loads(value)
        else:
            out[key] = value
    return out


def _pack(samples) -> PackedBatch:
    lengths = [s.num_tokens for s in samples]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    grids = [s.image_grid_thw for s in samples if s.image_grid_thw is not None]
    return PackedBatch(
        input_ids=torch.cat([s.input_ids for s in samples]), labels=torch.cat([s.labels for s in samples]),
        position_ids=torch.cat([s.position_ids for s in samples], dim=-1), cu_seqlens=cu, max_seqlen=max(lengths),
        pixel_values=torch.cat(pixels) if pixels else None, image_grid_thw=torch.cat(grids) if grids else None,
        num_real_tokens=sum(lengths), sample_keys=[s.key for s in samples],
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo_module():
    torch.manual_seed(0)
    module = MultimodalModule("tiny-demo", max_pixels=64 * 64)
    module.configure_model()
    return module


def test_packed_row_equals_each_sample_alone(demo_module):
    samples = _samples(demo_module, 3)
    packed = _pack(samples)
    with torch.no_grad():
        out, targets = demo_module(packed, predict=True)
        alone = [demo_module(_pack([s]), predict=True)[0] for s in samples]
    torch.testing.assert_close(out.hidden, torch.cat([a.hidden for a in alone]), atol=1e-5, rtol=1e-5)
    total = sum(float(a.loss) * a.num_targets for a in alone)
    assert out.num_targets == sum(a.num_targets for a in alone) > 0
    torch.testing.assert_close(out.loss, torch.tensor(total / out.num_targets), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.predictions, torch.cat([a.predictions for a in alone]))


def test_answer_exact_match_per_sample():
    targets = torch.tensor([IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX])
    cu = torch.tensor([0, 3, 6, 8])
    predictions = torch.tensor([3, 4, 9])  # sample 0 right, sample 1 wrong, sample 2 has no labels
    assert answer_exact_match(predictions, targets, cu).tolist() == [1.0, 0.0]


def test_param_groups_split_vision_and_decay(demo_module):
    groups = {g["name"]: g for g in param_groups(demo_module.model, 1e-3, 1e-4, 0.1)}
    assert set(groups) == {"vision_decay", "vision_no_decay", "rest_decay", "rest_no_decay"}
    assert groups["vision_decay"]["lr"] == 1e-4 and groups["rest_decay"]["lr"] == 1e-3
    assert all(p.dim() == 1 for p in groups["rest_no_decay"]["params"]) and groups["rest_no_decay"]["weight_decay"] == 0
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in demo_module.model.parameters())


def test_freeze_and_schedule():
    module = MultimodalModule("tiny-demo", freeze=["vision", "llm"])
    module.configure_model()
    trainable = {n.split(".")[0] for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    with pytest.raises(ValueError, match="unknown tower"):
        MultimodalModule("tiny-demo", freeze=["eyes"]).configure_model()
    schedule = warmup_cosine(10, 110, 0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55) and schedule(500) == pytest.approx(0.1)


def test_flops_estimate(demo_module):
    batch = _pack(_samples(demo_module, 2))
    flops = demo_module.flops_per_batch(batch)
    llm_params = sum(p.numel() for p in demo_module.model.llm.parameters())
    assert flops["llm"] == pytest.approx(6 * llm_params * batch.num_tokens, rel=0.01)
    assert flops["vision"] > 0 and flops["attention"] > 0
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))


def test_trains_through_lightning(tmp_path):
    import lightning.pytorch as pl

    torch.manual_seed(0)
    module = MultimodalModule("tiny-demo", lr=3e-3, warmup_steps=2, max_steps=8, max_pixels=64 * 64)
    module.configure_model()
    batches = [_pack(chunk) for chunk in _chunks(_samples(module, 4, seed=1), 2)]
    val = [_pack(_samples(module, 2, seed=2))]
    trainer = pl.Trainer(
        max_steps=8, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )  # fmt: skip
    with torch.no_grad():
        first = float(module(batches[0])[0].loss)
    trainer.fit(module, train_dataloaders=_loader(batches * 4), val_dataloaders=_loader(val))
    with torch.no_grad():
        last = float(module(batches[0])[0].loss)
    assert last < first * 0.8, (first, last)
    assert "val/answer_acc" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics


def _chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def _loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def test_vla_row_trains_action_head_from_packed_row():
    from lightning_loneforge.model_zoo.module import MultimodalModule as Module

    torch.manual_seed(0)
    module = Module("tiny-pi0")
    module.configure_model()
    patch = torch.randn(2 * 16, 3 * 8 * 8)
    ids = torch.cat([torch.full((16,), 6), torch.arange(20, 30), torch.full((16,), 6), torch.arange(40, 45)])
    batch = PackedBatch(
        input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), position_ids=torch.cat([torch.arange(26), torch.arange(21)]),
        cu_seqlens=torch.tensor([0, 26, 47], dtype=torch.int32), max_seqlen=26, pixel_values=patch,
        image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]), actions=torch.randn(2, 5, 4), proprio=torch.randn(2, 3),
        action_sample_index=torch.tensor([1, 0]), sample_keys=["a", "b"],
    )  # fmt: skip
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    for tower in ("action", "vision", "llm"):
        grads = [p.grad for p in module.towers()[tower].parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), tower


def test_checkpoint_folder_loads_into_the_module(tmp_path):
    from lightning_loneforge.model_zoo.hf_io import save_hf
    from lightning_loneforge.model_zoo.model import MultimodalModel
    from lightning_loneforge.model_zoo.rows import name_to_config

    torch.manual_seed(0)
    source = MultimodalModel(name_to_config["tiny-qwen2-vl"])
    save_hf(source, tmp_path)
    module = MultimodalModule("from-disk", tokenizer=None, checkpoint=str(tmp_path))
    module.configure_model()
    assert not module.checkpoint_pending
    for (name, a), b in zip(source.state_dict().items(), module.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    full = module.pretrained_state_dict()
    assert set(full) == {f"model.{k}" for k in source.state_dict()}
    with torch.device("meta"):
        lazy = MultimodalModule("from-disk", checkpoint=str(tmp_path))
        lazy.configure_model()
    assert lazy.checkpoint_pending
    with pytest.raises(RuntimeError, match="was not loaded"):
        lazy.on_fit_start()


@pytest.mark.parametrize("name", ["internvl3-1b", "idefics3-8b", "llava-1.5-7b"])
def test_sample_encoder_matches_the_towers(name):
    from lightning_loneforge.datamodules.tokenizer import DemoTokenizer
    from lightning_loneforge.model_zoo.rows import name_to_config

    config = name_to_config[name]
    vocab = DemoTokenizer().vocab_size
    module = MultimodalModule(name, tokenizer=DemoTokenizer(), overrides={"text": {"vocab_size": max(vocab, 512)}})
    encoder = module.sample_encoder()
    assert encoder.patch_size == config.vision.patch_size
    assert encoder.merge_size == config.projector.merge_size
    assert encoder.temporal_patch_size == 1 and not encoder.mrope


def test_vit_family_trains_on_encoded_samples():
    """InternVL-style row (CLS token, pixel shuffle) on the real encoder's patches: packed == alone, loss drops."""
    torch.manual_seed(0)
    from lightning_loneforge.datamodules.tokenizer import DemoTokenizer

    module = MultimodalModule("tiny-internvl", tokenizer=DemoTokenizer(), lr=3e-3, max_pixels=64 * 64)
    module.configure_model()
    samples = _samples(module, 3)
    packed = _pack(samples)
    with torch.no_grad():
        out, _ = module(packed)
        alone = [module(_pack([s]))[0] for s in samples]
    torch.testing.assert_close(out.hidden, torch.cat([a.hidden for a in alone]), atol=1e-5, rtol=1e-5)
    optimizer = module.configure_optimizers()["optimizer"]
    first = float(out.loss)
    for _ in range(5):
        loss = module(packed)[0].loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss) < first
