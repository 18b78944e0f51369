"""The auto-planner: a `TowerPlan` per tower from its size, the world size and device memory; `loneforge plan`.

Memory model (per rank, states only; activations come on top and are what `budget_fraction` leaves room for):
weights in their dtype, plus for trainable parameters a gradient in the same dtype and fp32 AdamW moments
(8 bytes). `replicate` and `none` hold the whole tower, `full` 1/W of it, `hybrid` 1/g, and sharded plans add
the gathered weights of two blocks (the current one and the prefetched next).

Rule: start with every trainable tower replicated (cheapest communication: ~2x its bytes per step against ~3x
for sharding, see benchmarks/comm_volume.py) and frozen towers as plain copies; while the estimate exceeds the
budget, shard the largest remaining tower (`hybrid` over a node when there are several nodes, else `full`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_loneforge.strategies.apply import model_towers, tower_blocks
from lightning_loneforge.strategies.plan import TowerPlan

GIB = 1024**3
ADAM_STATE_BYTES = 8
DEFAULT_BUDGET_FRACTION = 0.4
DEFAULT_MEMORY_GIB = 80.0


@dataclass(frozen=True)
class TowerSize:
    """What the planner needs to know about a tower."""

    params: int
    """All parameters."""
    trainable: int
    """Parameters with `requires_grad`."""
    weight_bytes: int
    """Bytes of all parameters in their dtype."""
    largest_block_bytes: int
    """Bytes of the largest entry of `tower.blocks` (the whole tower when it has none)."""


def tower_sizes(towers: Mapping[str, nn.Module]) -> dict[str, TowerSize]:
    """Sizes of each tower (works on the meta device: no memory is touched)."""
    sizes = {}
    for name, tower in towers.items():
        params = list(tower.parameters())
        units = tower_blocks(tower) or [tower]
        sizes[name] = TowerSize(
            params=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in params if p.requires_grad),
            weight_bytes=sum(p.numel() * p.element_size() for p in params),
            largest_block_bytes=max(sum(p.numel() * p.element_size() for p in u.parameters()) for u in units),
        )
    return sizes


def shard_group(plan: TowerPlan, world_size: int, num_nodes: int) -> int:
    """How many ranks share one copy of the tower's states under `plan`."""
    if plan.shard == "full":
        return world_size
    if plan.shard == "hybrid":
        return plan.shard_group_size or max(world_size // max(num_nodes, 1), 1)
    return 1


def estimate_bytes_per_rank(size: TowerSize, plan: TowerPlan, *, world_size: int, num_nodes: int = 1) -> float:
    """Bytes one rank holds for this tower under `plan` (weights, gradients, AdamW states, gathered blocks)."""
    element = size.weight_bytes / max(size.params, 1)
    trainable = 0 if plan.frozen else size.trainable
    states = size.weight_bytes + trainable * (element + ADAM_STATE_BYTES)
    group = shard_group(plan, world_size, num_nodes)
    if group == 1:
        return float(states)
    return states / group + 2 * size.largest_block_bytes


def auto_plans(
    sizes: Mapping[str, TowerSize],
    *,
    world_size: int,
    num_nodes: int = 1,
    memory_gib: float = DEFAULT_MEMORY_GIB,
    budget_fraction: float = DEFAULT_BUDGET_FRACTION,
) -> dict[str, TowerPlan]:
    """Small towers replicate, large ones shard (hybrid across nodes) until the states fit the budget."""
    plans = {
        name: TowerPlan(shard="replicate") if size.trainable else TowerPlan(shard="none") for name, size in sizes.items()
    }
    if world_size <= 1:
        return plans
    budget = memory_gib * GIB * budget_fraction

    def total() -> float:
        return sum(estimate_bytes_per_rank(sizes[n], p, world_size=world_size, num_nodes=num_nodes) for n, p in plans.items())

    by_size = sorted(sizes, key=lambda n: sizes[n].weight_bytes, reverse=True)
    multi_node = num_nodes > 1 and world_size // num_nodes > 1
    for kind in ("hybrid", "full") if multi_node else ("full",):
        for name in by_size:
            if total() <= budget:
                return plans
            if plans[name].shard in ("replicate", "none") or (kind == "full" and plans[name].shard == "hybrid"):
                plans[name] = TowerPlan(shard=kind, trainable=sizes[name].trainable > 0)
    return plans


def device_memory_gib(device: torch.device) -> float:
    """Total memory of `device` in GiB, asked through `torch.get_device_module` (host memory for CPU)."""
    module = torch.get_device_module(device.type)
    if hasattr(module, "get_device_properties") and device.type != "cpu":
        return module.get_device_properties(device).total_memory / GIB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def plan_summary(
    sizes: Mapping[str, TowerSize], plans: Mapping[str, TowerPlan], *, world_size: int, num_nodes: int = 1
) -> dict[str, Any]:
    """`{"towers": {name: {"shard", "params", "gib_per_rank"}}, "gib_per_rank"}` for printing and logging."""
    towers = {}
    for name, size in sizes.items():
        gib = estimate_bytes_per_rank(size, plans[name], world_size=world_size, num_nodes=num_nodes) / GIB
        towers[name] = {"shard": plans[name].shard, "params": size.params, "gib_per_rank": round(gib, 4)}
    return {"towers": towers, "gib_per_rank": round(sum(t["gib_per_rank"] for t in towers.values()), 4)}


def format_plan_table(
    sizes: Mapping[str, TowerSize], plans: Mapping[str, TowerPlan], *, world_size: int, num_nodes: int = 1
) -> str:
    """A fixed-width table: tower, plan, parameters, trainable, estimated GiB per rank."""
    summary = plan_summary(sizes, plans, world_size=world_size, num_nodes=num_nodes)
    lines = [
        f"Tower plans at world size {world_size} ({num_nodes} node(s)); GiB/rank = weights + grads + AdamW, no activations",
        f"{'tower':<16} {'shard':<10} {'frozen':<7} {'params':>14} {'GiB/rank':>10}",
    ]
    for name, row in summary["towers"].items():
        frozen = "yes" if plans[name].frozen else "no"
        lines.append(f"{name:<16} {row['shard']:<10} {frozen:<7} {row['params']:>14,} {row['gib_per_rank']:>10.3f}")
    lines.append(f"{'total':<16} {'':<10} {'':<7} {sum(s.params for s in sizes.values()):>14,} {summary['gib_per_rank']:>10.3f}")
    return "\n".join(lines)


def build_meta_model(model_config: Mapping[str, Any], *, where: str) -> nn.Module:
    """Instantiates the YAML `model` section (`class_path` + `init_args`) on the meta device, then `configure_model()`."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=nn.Module)
    try:
        cfg = parser.parse_object({"model": dict(model_config)})
        with torch.device("meta"):
            model = parser.instantiate_classes(cfg).model
            if callable(getattr(model, "configure_model", None)):
                model.configure_model()
    except Exception as err:
        raise ValueError(f"{where}: cannot build the model: {err}") from err
    return model


def _strategy_args(config: Mapping[str, Any]) -> dict[str, Any]:
    strategy = (config.get("trainer") or {}).get("strategy")
    return dict(strategy.get("init_args") or {}) if isinstance(strategy, Mapping) else {}


def plan_for_config(
    config: Mapping[str, Any], *, devices: int, num_nodes: int = 1, memory_gib: float = DEFAULT_MEMORY_GIB, where: str = "config"
) -> tuple[dict[str, TowerSize], dict[str, TowerPlan]]:
    """Tower sizes and plans for a LightningCLI config: plans named in `trainer.strategy` win, `auto` for the rest."""
    if "model" not in config:
        raise ValueError(f"{where}: no `model` section.")
    model = build_meta_model(config["model"], where=f"{where}: model")
    sizes = tower_sizes(model_towers(model))
    args = _strategy_args(config)
    key = f"{where}: trainer.strategy.init_args"
    given = args.get("plans", "auto")
    named = {}
    if isinstance(given, Mapping):
        named = {n: TowerPlan.from_value(p, where=f"{key}.plans.{n}") for n, p in given.items()}
    default = TowerPlan.from_value(args.get("default_plan") or {}, where=f"{key}.default_plan")
    plans = {name: named.get(name, default) for name in sizes}
    if given == "auto":
        rest = {name: size for name, size in sizes.items() if name not in named}
        world_size = devices * num_nodes
        plans.update(auto_plans(rest, world_size=world_size, num_nodes=num_nodes, memory_gib=memory_gib))
    return sizes, plans


def main(argv: list[str] | None = None) -> int:
    """`loneforge plan --config X.yaml --devices N [--num-nodes K] [--memory-gib M]`: table, then one JSON line."""
    import yaml

    parser = argparse.ArgumentParser(prog="loneforge plan", description=main.__doc__)
    parser.add_argument("--config", required=True, help="LightningCLI YAML with a `model` section")
    parser.add_argument("--devices", type=int, required=True, help="devices per node")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--memory-gib", type=float, default=DEFAULT_MEMORY_GIB, help="memory of one device")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.num_nodes < 1:
        parser.error("--devices and --num-nodes must be >= 1")
    try:
        with open(args.config) as file:
            config = yaml.safe_load(file) or {}
        sizes, plans = plan_for_config(
            config, devices=args.devices, num_nodes=args.num_nodes, memory_gib=args.memory_gib, where=args.config
        )
    except (OSError, ValueError, TypeError) as err:
        print(f"loneforge plan: {err}", file=sys.stderr)
        return 2
    world_size = args.devices * args.num_nodes
    print(f"device memory {args.memory_gib:g} GiB, budget {DEFAULT_BUDGET_FRACTION:.0%} for weights and optimizer states")
    print(format_plan_table(sizes, plans, world_size=world_size, num_nodes=args.num_nodes))
    summary = plan_summary(sizes, plans, world_size=world_size, num_nodes=args.num_nodes)
    budget = args.memory_gib * DEFAULT_BUDGET_FRACTION
    if summary["gib_per_rank"] > budget:
        print(f"warning: {summary['gib_per_rank']:.1f} GiB/rank exceeds the {budget:.1f} GiB budget even with these "
              "plans: use more devices, cpu_offload, or bf16 weights")  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
