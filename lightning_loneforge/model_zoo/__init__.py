"""Model zoo: one config table, a few generic towers, one LightningModule."""

from lightning_loneforge.model_zoo.attention import attention

__all__ = ["attention"]
