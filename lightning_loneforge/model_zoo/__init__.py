"""Model zoo: one config table, a few generic towers, one LightningModule.

- `ModelConfig` / `name_to_config` (`rows.py`): every named row; `loneforge models [--json]` lists them with
  parameter counts from the meta device.
- Towers (`towers/`): Qwen2-VL / Qwen2.5-VL ViT + patch merger, CLIP / SigLIP / InternViT + MLP / pixel-shuffle
  projectors (on the same packed patches), Llama-family decoder (GQA, RoPE / llama3 / M-RoPE, SwiGLU / GeGLU,
  RMSNorm / Gemma norm, QK-norm, tied or untied, prefix-LM), pi0-style flow-matching action expert.
- `attention`: varlen attention over packed rows (flash_attn, `varlen_attn`, flex document masks, SDPA).
- `hf_io.from_pretrained(folder)` / `save_hf(model, folder)`: strict local Hugging Face checkpoints.
- `MultimodalModule`: the LightningModule (packed training, chunked loss, answer accuracy, FLOPs for MFU).
"""

from lightning_loneforge.model_zoo.attention import attention
from lightning_loneforge.model_zoo.config import ModelConfig
from lightning_loneforge.model_zoo.module import MultimodalModule
from lightning_loneforge.model_zoo.rows import name_to_config

__all__ = ["ModelConfig", "MultimodalModule", "attention", "name_to_config"]
