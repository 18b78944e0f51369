"""Generic towers of the zoo: vision encoders, projectors, language decoders, action heads.

Each tower is plain single-device PyTorch and keeps its repeated blocks in `.blocks` (an `nn.ModuleList`).
"""

from lightning_loneforge.model_zoo.attention import attention

__all__ = ["attention"]
