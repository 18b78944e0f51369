"""Model zoo: one config table, a few generic towers, one LightningModule."""

from lightning_loneforge.model_zoo.attention import attention
from lightning_loneforge.model_zoo.config import ModelConfig
from lightning_loneforge.model_zoo.module import MultimodalModule
from lightning_loneforge.model_zoo.rows import name_to_config

__all__ = ["ModelConfig", "MultimodalModule", "attention", "name_to_config"]
