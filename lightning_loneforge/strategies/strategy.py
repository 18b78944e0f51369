"""`TowerParallelStrategy`: Lightning's `ModelParallelStrategy` with one parallel plan per model tower."""

from __future__ import annotations

import logging
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.optim import Optimizer
from typing_extensions import override

from lightning_loneforge.strategies.apply import (
    MeshCache,
    apply_plans,
    fsdp_modules,
    mesh_shape,
    model_towers,
    move_plain_states,
)
from lightning_loneforge.strategies.clip import clip_grad_norm_by_mesh_, clip_grad_value_by_mesh_
from lightning_loneforge.strategies.export import load_pending_pretrained
from lightning_loneforge.strategies.plan import TowerPlan
from lightning_loneforge.strategies.planner import (
    auto_plans,
    device_memory_gib,
    format_plan_table,
    tower_sizes,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0
"""Default process-group timeout: 30 minutes, as in PyTorch and Lightning."""


class TowerParallelStrategy(ModelParallelStrategy):
    """FSDP2 with a `TowerPlan` per tower of `model.towers()`, one `DeviceMesh` per plan kind, DCP checkpoints.

    Args:
        plans: `{tower_name: TowerPlan or dict of its fields}`, or `"auto"` to choose per tower from parameter
            count, world size and device memory (the choice is logged with a per-rank memory estimate).
        default_plan: plan of towers not named in `plans` (and of parameter-holding modules outside every
            tower); defaults to `TowerPlan()` (full sharding).
        save_distributed_checkpoint: sharded DCP folder (True) or one consolidated file written by rank 0.
        process_group_backend: `nccl`, `gloo`, ...; None asks Lightning for the device's default.
        timeout: process-group timeout in seconds (or a `timedelta`); default 1800 s.

    Registered as `"tower_parallel"` in Lightning's `StrategyRegistry`.
    """

    strategy_name = "tower_parallel"

    def __init__(
        self,
        plans: Mapping[str, TowerPlan | Mapping[str, Any]] | Literal["auto"] | None = "auto",
        default_plan: TowerPlan | Mapping[str, Any] | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: float | timedelta = DEFAULT_TIMEOUT_S,
    ) -> None:
        timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        if plans is not None and plans != "auto" and not isinstance(plans, Mapping):
            raise TypeError(f"TowerParallelStrategy(plans=...): expected a dict of TowerPlan or 'auto', got {plans!r}.")
        self.auto = plans == "auto"
        self.plans: dict[str, TowerPlan] = {
            name: TowerPlan.from_value(plan, where=f"plans.{name}")
            for name, plan in (plans.items() if isinstance(plans, Mapping) else ())
        }
        self.default_plan = TowerPlan.from_value(default_plan or {}, where="default_plan")
        self.applied_plans: dict[str, TowerPlan] = {}
        self._meshes: MeshCache | None = None
        self._planned_model_id: int | None = None

    @override
    def setup_environment(self) -> None:
        self._setup_distributed()
        assert self.root_device is not None
        mesh = init_device_mesh(self.root_device.type, (self.world_size,), mesh_dim_names=("data_parallel",))
        self._device_mesh = mesh
        self._meshes = MeshCache(self.root_device.type, root=mesh)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = mesh

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def mesh_for(self, name: str, plan: TowerPlan) -> DeviceMesh | None:
        """The mesh a tower's plan shards over (one per plan kind and shape, shared by towers)."""
        shape = mesh_shape(plan, self.world_size, max(self.num_processes, 1), where=f"plans.{name}")
        if shape is None:
            return None
        assert self._meshes is not None, "setup_environment() builds the meshes"
        return self._meshes.get(shape)

    def resolve_plans(self, model: nn.Module) -> dict[str, TowerPlan]:
        """Plan of every tower of `model`: named plans, then `auto` or the default for the rest."""
        towers = model_towers(model)
        unknown = sorted(set(self.plans) - set(towers))
        if unknown:
            raise ValueError(
                f"TowerParallelStrategy.plans names towers {unknown} that {type(model).__name__} does not have; "
                f"its towers are {sorted(towers)}."
            )
        chosen = {name: self.plans.get(name, self.default_plan) for name in towers}
        if self.auto:
            sizes = {name: size for name, size in tower_sizes(towers).items() if name not in self.plans}
            memory = device_memory_gib(self.root_device)
            chosen.update(auto_plans(sizes, world_size=self.world_size, num_nodes=self.num_nodes, memory_gib=memory))
        return chosen

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.model is not None
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        if self._planned_model_id != id(module):
            towers = model_towers(module)
            plans = self.resolve_plans(module)
            rank_zero_info(format_plan_table(tower_sizes(towers), plans, world_size=self.world_size))
            apply_plans(towers, plans, self.mesh_for)
            self.applied_plans = plans
            self._planned_model_id = id(module)

        _materialize_distributed_module(self.model, self.root_device)
        if load_pending_pretrained(module):  # a zoo model built on meta: its checkpoint= weights, into the shards
            rank_zero_info(f"loaded pretrained weights of {type(module).__name__} into the sharded towers")
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()

        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        enable_mesh_aware_clipping(self.precision_plugin)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        move_plain_states(self.model, self.root_device)

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """No gradient reduction while Lightning accumulates micro-batches; the last one reduces the sum."""
        units = list(fsdp_modules(self.model)) if self.model is not None else []
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name, cls, description="FSDP2 with a parallel plan per model tower (lightning-loneforge)"
            )


class _MeshAwareClipping:
    """Mixin for a precision plugin: clip by global norm (or value) across towers on different meshes."""

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        clip_grad_norm_by_mesh_(list(self.main_params(optimizer)), clip_val)

    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: int | float) -> None:
        clip_grad_value_by_mesh_(list(self.main_params(optimizer)), clip_val)


_CLIPPING_CLASSES: dict[type, type] = {}


def enable_mesh_aware_clipping(plugin: Precision) -> None:
    """Makes `plugin` clip with `clip_grad_norm_by_mesh_`, so `Trainer(gradient_clip_val=...)` keeps working.

    The plugin keeps its type (a subclass with the mixin first), so every other behaviour is unchanged.
    """
    cls = type(plugin)
    if issubclass(cls, _MeshAwareClipping):
        return
    if cls not in _CLIPPING_CLASSES:
        _CLIPPING_CLASSES[cls] = type(f"MeshAwareClipping{cls.__name__}", (_MeshAwareClipping, cls), {})
    plugin.__class__ = _CLIPPING_CLASSES[cls]


TowerParallelStrategy.register_strategies(StrategyRegistry)
