"""Single-process checks of TowerPlan, the auto-planner, `loneforge plan`, YAML selection and the strategy on 1 CPU."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn

from lightning_loneforge.strategies import TowerParallelStrategy, TowerPlan, consolidated_state_dict
from lightning_loneforge.strategies.apply import mesh_shape, model_towers
from lightning_loneforge.strategies.planner import GIB, TowerSize, auto_plans, main, tower_sizes
from tests.test_strategy_tiny import TinyDataModule, TwoTowerModel, max_abs_diff, reference_run


# ----------------------------------------------------------------------------------------------- TowerPlan
def test_tower_plan_defaults_and_validation() -> None:
    plan = TowerPlan()
    assert (plan.shard, plan.checkpoint_every, plan.frozen) == ("full", 0, False)
    assert TowerPlan(activation_checkpointing="full").checkpoint_every == 1
    assert TowerPlan(activation_checkpointing="3").checkpoint_every == 3
    assert TowerPlan(shard="none").frozen and TowerPlan(trainable=False).frozen
    with pytest.raises(ValueError, match="TowerPlan.shard='fsdp'"):
        TowerPlan(shard="fsdp")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        TowerPlan(activation_checkpointing=0)
    with pytest.raises(ValueError, match="param_dtype='bf17'"):
        TowerPlan(param_dtype="bf17")
    with pytest.raises(ValueError, match="only used with shard='hybrid'"):
        TowerPlan(shard="full", shard_group_size=2)


def test_tower_plan_from_dict_names_the_place() -> None:
    assert TowerPlan.from_value({"shard": "replicate"}, where="plans.vision").shard == "replicate"
    with pytest.raises(ValueError, match=r"plans.vision: unknown TowerPlan field\(s\) \['shards'\]"):
        TowerPlan.from_value({"shards": "full"}, where="plans.vision")
    with pytest.raises(ValueError, match="plans.llm: TowerPlan.shard"):
        TowerPlan.from_value({"shard": "zero3"}, where="plans.llm")


def test_mesh_shapes_per_plan_kind() -> None:
    assert mesh_shape(TowerPlan(shard="full"), 8, 4) == (8,)
    assert mesh_shape(TowerPlan(shard="replicate"), 8, 4) == (8, 1)
    assert mesh_shape(TowerPlan(shard="hybrid"), 8, 4) == (2, 4)
    assert mesh_shape(TowerPlan(shard="hybrid", shard_group_size=1), 2, 2) == (2, 1)
    assert mesh_shape(TowerPlan(shard="none"), 8, 4) is None
    with pytest.raises(ValueError, match="plans.llm.shard_group_size=3 does not divide the world size 8"):
        mesh_shape(TowerPlan(shard="hybrid", shard_group_size=3), 8, 4, where="plans.llm")


def test_towers_include_modules_outside_every_tower() -> None:
    model = TwoTowerModel()
    model.configure_model()
    assert list(model_towers(model)) == ["vision", "llm", "head"]

    class Loose(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.vision = nn.Linear(2, 2)

        def towers(self) -> dict[str, nn.Module]:
            return {"vision": self.vision}

    with pytest.raises(ValueError, match=r"owns parameters \['scale'\] directly"):
        model_towers(Loose())


# --------------------------------------------------------------------------------------------- auto-planner
def _size(params: int, trainable: bool = True, block_fraction: float = 0.05) -> TowerSize:
    return TowerSize(params, params if trainable else 0, 2 * params, int(2 * params * block_fraction))


def test_auto_planner_replicates_small_and_shards_large() -> None:
    sizes = {"vision": _size(600_000_000), "projector": _size(30_000_000), "llm": _size(7_000_000_000)}
    plans = auto_plans(sizes, world_size=8, memory_gib=80)
    assert {n: p.shard for n, p in plans.items()} == {"vision": "replicate", "projector": "replicate", "llm": "full"}
    across_nodes = auto_plans(sizes, world_size=16, num_nodes=2, memory_gib=80)
    assert across_nodes["llm"].shard == "hybrid" and across_nodes["vision"].shard == "replicate"
    small_memory = auto_plans(sizes, world_size=8, memory_gib=24)
    assert small_memory["vision"].shard == "full"
    assert all(p.shard == "replicate" for p in auto_plans(sizes, world_size=1, memory_gib=24).values())


def test_auto_planner_keeps_frozen_towers_as_plain_copies_unless_too_big() -> None:
    sizes = {"vision": _size(400_000_000, trainable=False), "llm": _size(1_000_000_000)}
    plans = auto_plans(sizes, world_size=4, memory_gib=80)
    assert plans["vision"].shard == "none" and plans["vision"].frozen
    huge = {"vision": _size(30_000_000_000, trainable=False), "llm": _size(1_000_000)}
    plans = auto_plans(huge, world_size=8, memory_gib=80)
    assert plans["vision"].shard == "full" and plans["vision"].frozen


def test_tower_sizes_on_meta_device() -> None:
    with torch.device("meta"):
        model = TwoTowerModel()
        model.configure_model()
    sizes = tower_sizes(model_towers(model))
    assert sizes["vision"].params == sum(p.numel() for p in model.vision.parameters())
    assert sizes["head"].largest_block_bytes == sizes["head"].weight_bytes == 4 * (16 * 12 + 12)


def test_loneforge_plan_prints_table_then_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = {
        "model": {"class_path": "tests.test_strategy_tiny.TwoTowerModel", "init_args": {"depth": 3}},
        "trainer": {"strategy": {"class_path": "lightning_loneforge.strategies.TowerParallelStrategy",
                                 "init_args": {"plans": {"vision": {"shard": "none"}}}}},
    }  # fmt: skip
    path = tmp_path / "two_tower.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["--config", str(path), "--devices", "4", "--memory-gib", "1e-6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("vision") and "none" in line for line in lines)
    summary = json.loads(lines[-1])
    assert summary["towers"]["vision"]["shard"] == "none"  # named in the YAML
    assert summary["towers"]["llm"]["shard"] == "full"  # too big for 1e-6 GiB: sharded
    assert summary["towers"]["llm"]["params"] == sum(p.numel() for p in _built(depth=3).llm.parameters())
    assert summary["gib_per_rank"] == pytest.approx(sum(t["gib_per_rank"] for t in summary["towers"].values()), abs=1e-3)


def test_loneforge_plan_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"trainer": {}}))
    assert main(["--config", str(path), "--devices", "2"]) == 2
    assert f"{path}: no `model` section" in capsys.readouterr().err


def _built(depth: int = 2) -> TwoTowerModel:
    model = TwoTowerModel(depth=depth)
    model.configure_model()
    return model


# ------------------------------------------------------------------------------------- strategy, 1 process
def test_registered_and_selectable_from_yaml() -> None:
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import StrategyRegistry

    assert "tower_parallel" in StrategyRegistry
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=pl.strategies.Strategy)
    config = {"class_path": "lightning_loneforge.strategies.TowerParallelStrategy",
              "init_args": {"plans": {"vision": {"shard": "replicate"}, "llm": {"shard": "hybrid"}}, "timeout": 90}}  # fmt: skip
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config})).strategy
    assert isinstance(strategy, TowerParallelStrategy)
    assert strategy.plans["vision"].shard == "replicate" and strategy.plans["llm"].shard == "hybrid"
    assert strategy._timeout.total_seconds() == 90
    assert TowerParallelStrategy()._timeout.total_seconds() == 1800


@pytest.fixture
def single_process_group():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.timeout(120)
def test_single_process_fit_matches_plain_pytorch_and_clips(single_process_group) -> None:
    plans = {"vision": {"shard": "none"}, "llm": {"shard": "replicate", "activation_checkpointing": "full"}}
    model = TwoTowerModel()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=TowerParallelStrategy(plans=plans, timeout=60), max_steps=3,
        accumulate_grad_batches=2, gradient_clip_val=0.05, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, TinyDataModule(24, 4))
    losses, params = reference_run(steps=3, global_batch=4, accumulate=2, clip=0.05, frozen=("vision",))
    assert max(abs(a - b) for a, b in zip(model.losses, losses, strict=True)) < 1e-6
    assert max_abs_diff(consolidated_state_dict(model), params) < 1e-6
    applied = trainer.strategy.applied_plans
    assert applied["head"] == TowerPlan() and applied["vision"].frozen
    assert type(trainer.precision_plugin).__name__.startswith("MeshAwareClipping")


def test_memory_estimate_is_in_gib() -> None:
    size = _size(GIB // 2)  # bf16 weights: 1 GiB
    from lightning_loneforge.strategies.planner import estimate_bytes_per_rank

    assert estimate_bytes_per_rank(size, TowerPlan(shard="none"), world_size=8) == GIB
    assert estimate_bytes_per_rank(size, TowerPlan(shard="replicate"), world_size=8) == 6 * GIB  # 2+2+8 bytes/param


@pytest.mark.timeout(120)
def test_pending_pretrained_weights_load_into_sharded_meta_model(single_process_group, tmp_path: Path) -> None:
    from lightning.fabric.utilities.init import _materialize_distributed_module
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_loneforge.datamodules.tokenizer import DemoTokenizer
    from lightning_loneforge.model_zoo import MultimodalModule
    from lightning_loneforge.model_zoo.hf_io import save_hf
    from lightning_loneforge.strategies import apply_plans
    from lightning_loneforge.strategies.export import load_pending_pretrained

    torch.manual_seed(0)
    pretrained = MultimodalModule("tiny-demo", tokenizer=DemoTokenizer())
    pretrained.configure_model()
    folder = save_hf(pretrained.model, tmp_path / "hf")
    module = MultimodalModule("tiny-demo", tokenizer=DemoTokenizer(), checkpoint=str(folder))
    with torch.device("meta"):
        module.configure_model()
    assert module.checkpoint_pending
    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    apply_plans(model_towers(module), {name: TowerPlan() for name in model_towers(module)}, lambda name, plan: mesh)
    _materialize_distributed_module(module, torch.device("cpu"))  # random init, as the strategy's setup does
    assert max_abs_diff(consolidated_state_dict(module.model), pretrained.model.state_dict()) > 0
    assert load_pending_pretrained(module) and not module.checkpoint_pending
    assert max_abs_diff(consolidated_state_dict(module.model), pretrained.model.state_dict()) == 0.0
    assert not load_pending_pretrained(module)  # nothing pending any more
