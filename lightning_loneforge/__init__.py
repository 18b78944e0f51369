"""lightning-loneforge: PyTorch Lightning plugins for fast multimodal training.

Importing the package registers the `kunlun` accelerator and the `tower_parallel` strategy with Lightning.
"""

from lightning_loneforge.accelerators import KunlunAccelerator, device_profile, register_kunlun
from lightning_loneforge.datamodules import (
    PackedBatch,
    SampleEncoder,
    TokenBudgetPacker,
    WebDatasetDataModule,
)
from lightning_loneforge.datamodules.demo_data import DemoDataModule
from lightning_loneforge.model_zoo import ModelConfig, MultimodalModule
from lightning_loneforge.strategies import TowerParallelStrategy, TowerPlan

register_kunlun()

__version__ = "0.1.0"
__all__ = [
    "DemoDataModule",
    "KunlunAccelerator",
    "ModelConfig",
    "MultimodalModule",
    "PackedBatch",
    "SampleEncoder",
    "TokenBudgetPacker",
    "TowerParallelStrategy",
    "TowerPlan",
    "WebDatasetDataModule",
    "device_profile",
]
