"""Per-tower parallel plans: `TowerPlan`, the `apply_*` functions, the auto-planner and `TowerParallelStrategy`."""

from lightning_loneforge.strategies.apply import (
    apply_activation_checkpointing,
    apply_compile,
    apply_freeze,
    apply_fsdp,
    apply_plans,
    apply_tower_plan,
    model_towers,
)
from lightning_loneforge.strategies.clip import (
    clip_grad_norm_by_mesh_,
    clip_grad_value_by_mesh_,
    global_grad_norm,
)
from lightning_loneforge.strategies.export import consolidated_state_dict, export_hf
from lightning_loneforge.strategies.plan import TowerPlan
from lightning_loneforge.strategies.planner import auto_plans, format_plan_table, tower_sizes
from lightning_loneforge.strategies.strategy import DEFAULT_TIMEOUT_S, TowerParallelStrategy

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TowerParallelStrategy",
    "TowerPlan",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_freeze",
    "apply_fsdp",
    "apply_plans",
    "apply_tower_plan",
    "auto_plans",
    "clip_grad_norm_by_mesh_",
    "clip_grad_value_by_mesh_",
    "consolidated_state_dict",
    "export_hf",
    "format_plan_table",
    "global_grad_norm",
    "model_towers",
    "tower_sizes",
]
