"""Consolidated (full, unsharded) state dicts for export, e.g. to Hugging Face format by the zoo's `save_hf`."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


def consolidated_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Full tensors of `module` on CPU on rank 0 (an empty dict on other ranks); every rank must call it.

    Names are the module's own parameter names: FSDP2, `torch.compile` (`_orig_mod`) and activation
    checkpointing leave no trace in them, so the zoo's name mapping applies directly.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
