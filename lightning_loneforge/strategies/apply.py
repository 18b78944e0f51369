"""Free functions that apply a `TowerPlan` to a tower: freeze, activation checkpointing, compile, FSDP2.

Order per torchtitan: activation checkpointing, then compile, then FSDP. Every function works on a plain
`nn.Module` and a `DeviceMesh`, so multi-rank tests can call them directly on tiny models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from lightning_loneforge.strategies.plan import TowerPlan, parse_dtype


def tower_blocks(tower: nn.Module) -> list[nn.Module]:
    """The tower's repeated blocks (`tower.blocks`, the model<->strategy contract), or [] when it has none."""
    blocks = getattr(tower, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def mesh_shape(plan: TowerPlan, world_size: int, devices_per_node: int, *, where: str = "plan") -> tuple[int, ...] | None:
    """Shape of the `DeviceMesh` a plan shards over: `(W,)` full, `(W/g, g)` hybrid, `(W, 1)` replicate, None."""
    if plan.shard == "none":
        return None
    if plan.shard == "full":
        return (world_size,)
    if plan.shard == "replicate":
        return (world_size, 1)
    group = plan.shard_group_size or min(devices_per_node, world_size)
    if group < 1 or world_size % group:
        raise ValueError(f"{where}.shard_group_size={group} does not divide the world size {world_size}.")
    return (world_size // group, group)


class MeshCache:
    """One `DeviceMesh` per shape, created on first use (the same order on every rank)."""

    def __init__(self, device_type: str, root: DeviceMesh | None = None) -> None:
        self.device_type = device_type
        self._meshes: dict[tuple[int, ...], DeviceMesh] = {}
        if root is not None:
            self._meshes[tuple(root.shape)] = root

    def get(self, shape: tuple[int, ...]) -> DeviceMesh:
        if shape not in self._meshes:
            names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
            self._meshes[shape] = init_device_mesh(self.device_type, shape, mesh_dim_names=names)
        return self._meshes[shape]


def _keep_eval(module: nn.Module, args: tuple) -> None:
    if module.training:
        module.eval()


def apply_freeze(tower: nn.Module) -> None:
    """No gradients and eval mode, also after a later `model.train()` (checked before each forward)."""
    tower.requires_grad_(False)
    tower.eval()
    tower.register_forward_pre_hook(_keep_eval)


def _checkpoint_targets(tower: nn.Module, every: int) -> list[nn.Module]:
    blocks = tower_blocks(tower)
    if not blocks:
        return [tower] if every == 1 else []
    return [block for index, block in enumerate(blocks) if index % every == every - 1]


def apply_activation_checkpointing(tower: nn.Module, plan: TowerPlan) -> int:
    """Recomputes the activations of every n-th block in backward; returns how many modules it wrapped.

    Uses PyTorch's composable `checkpoint`, which keeps parameter names (and so checkpoints) unchanged.
    """
    from torch.distributed._composable import checkpoint

    targets = _checkpoint_targets(tower, plan.checkpoint_every) if plan.checkpoint_every else []
    for module in targets:
        checkpoint(module)
    return len(targets)


def apply_compile(tower: nn.Module, plan: TowerPlan) -> None:
    """`torch.compile` each block in place (names unchanged), or the whole tower when it has no blocks."""
    if not plan.compile:
        return
    for module in tower_blocks(tower) or [tower]:
        module.compile()


def _mixed_precision(plan: TowerPlan) -> MixedPrecisionPolicy:
    param = parse_dtype(plan.param_dtype, field="param_dtype") if plan.param_dtype else None
    reduce = parse_dtype(plan.reduce_dtype, field="reduce_dtype") if plan.reduce_dtype else None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def _offload(plan: TowerPlan, mesh: DeviceMesh) -> OffloadPolicy:
    if not plan.cpu_offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")


def apply_fsdp(tower: nn.Module, plan: TowerPlan, mesh: DeviceMesh) -> None:
    """`fully_shard` each block as its own unit, then the tower for its remaining parameters.

    A 1-D mesh shards (`full`); a 2-D `(replicate, shard)` mesh gives HSDP, which is DDP semantics when the
    shard dimension has size 1 (`replicate`). Per-block units let each block's gradient reduction start as
    soon as its backward is done, overlapping the rest of backward.
    """
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": plan.reshard_after_forward,
        "mp_policy": _mixed_precision(plan),
        "offload_policy": _offload(plan, mesh),
    }
    for block in tower_blocks(tower):
        fully_shard(block, **kwargs)
    fully_shard(tower, **kwargs)


def apply_tower_plan(tower: nn.Module, plan: TowerPlan, mesh: DeviceMesh | None) -> None:
    """Applies one plan: freeze, activation checkpointing, compile, then FSDP2 on `mesh` (None for `none`)."""
    if plan.frozen:
        apply_freeze(tower)
    apply_activation_checkpointing(tower, plan)
    apply_compile(tower, plan)
    if plan.shard != "none":
        if mesh is None:
            raise ValueError(f"shard={plan.shard!r} needs a DeviceMesh.")
        apply_fsdp(tower, plan, mesh)


def untowered_modules(root: nn.Module, towers: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Submodules holding parameters outside every tower, by dotted path (each gets the default plan).

    Raises:
        ValueError: a module that contains a tower also owns parameters directly (they cannot be sharded
            as a unit whose forward runs; move them into a tower or a child module).
    """
    tower_ids = {id(tower) for tower in towers.values()}
    found: dict[str, nn.Module] = {}

    def visit(path: str, module: nn.Module) -> None:
        if id(module) in tower_ids:
            return
        if not any(id(sub) in tower_ids for sub in module.modules()):
            if any(True for _ in module.parameters()):
                found[path] = module
            return
        direct = [name for name, _ in module.named_parameters(recurse=False)]
        if direct:
            where = path or type(module).__name__
            raise ValueError(
                f"{where} owns parameters {direct} directly and also contains towers; move them into a tower "
                "or a child module so the strategy can parallelize them."
            )
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", root)
    return found


def model_towers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's towers (`model.towers()`, the contract), plus every module with parameters outside them."""
    towers = dict(model.towers()) if callable(getattr(model, "towers", None)) else {}
    for name, tower in towers.items():
        if not isinstance(tower, nn.Module):
            raise TypeError(f"{type(model).__name__}.towers()[{name!r}] is a {type(tower).__name__}, not an nn.Module.")
    for path, module in untowered_modules(model, towers).items():
        towers.setdefault(path, module)
    return towers


def apply_plans(
    towers: Mapping[str, nn.Module], plans: Mapping[str, TowerPlan], mesh_for: Callable[[str, TowerPlan], DeviceMesh | None]
) -> None:
    """Applies `plans[name]` to every tower; `mesh_for(name, plan)` gives the mesh of that plan."""
    for name, tower in towers.items():
        if isinstance(tower, FSDPModule):
            continue  # already parallelized (a second fit/validate on the same model)
        plan = plans[name]
        apply_tower_plan(tower, plan, mesh_for(name, plan))


def move_plain_states(model: nn.Module, device: torch.device) -> None:
    """Moves parameters and buffers that FSDP2 does not manage to `device` (FSDP2 placed its own, offload kept)."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not isinstance(param, DTensor) and param.device != device:
                param.data = param.data.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def fsdp_modules(model: nn.Module) -> Iterator[FSDPModule]:
    """Every FSDP2 unit inside `model`."""
    return (module for module in model.modules() if isinstance(module, FSDPModule))
