"""The `loneforge` command: LightningCLI for fit/validate/test/predict, plus data, plan and models tools."""

from __future__ import annotations

import os
import sys

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

_TOOLS = {
    "data": "lightning_loneforge.datamodules.tools:main",
    "plan": "lightning_loneforge.strategies.planner:main",
    "models": "lightning_loneforge.model_zoo.listing:main",
}


class LoneforgeCLI(LightningCLI):
    """LightningCLI whose defaults are the suite's: tower-parallel strategy, offline W&B, rich progress bar and
    telemetry (tokens/s, MFU, memory, data health, data pictures, run summary)."""

    def __init__(self, *args, **kwargs) -> None:
        from lightning_loneforge.datamodules.metrics import PackingMetricsCallback
        from lightning_loneforge.strategies import TowerParallelStrategy
        from lightning_loneforge.telemetry import (
            DataPictures,
            DeviceMemoryMonitor,
            PackedThroughputMonitor,
            RunSummary,
        )

        defaults = {
            "strategy": lazy_instance(TowerParallelStrategy),
            "logger": lazy_instance(WandbLogger, project="loneforge", offline=True),
            "callbacks": [
                lazy_instance(RichProgressBar),
                lazy_instance(PackedThroughputMonitor),
                lazy_instance(DeviceMemoryMonitor),
                lazy_instance(PackingMetricsCallback),
                lazy_instance(DataPictures),
                lazy_instance(RunSummary),
            ],
        }
        defaults.update(kwargs.pop("trainer_defaults", None) or {})
        super().__init__(*args, trainer_defaults=defaults, **kwargs)


def _run_tool(target: str, argv: list[str]) -> int:
    module_name, func_name = target.split(":")
    module = __import__(module_name, fromlist=[func_name])
    return int(getattr(module, func_name)(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loneforge` console script."""
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in _TOOLS:
        return _run_tool(_TOOLS[words[0]], words[1:])
    os.environ.setdefault("WANDB_MODE", "offline")
    import lightning_loneforge  # noqa: F401  (registers the suite's accelerator and strategy names)
    from lightning_loneforge.reliability import translate_resume_args

    if argv is None:
        sys.argv[1:] = translate_resume_args(words)  # `--resume auto|PATH` -> `--ckpt_path last|PATH`
    else:
        argv = translate_resume_args(argv)
    LoneforgeCLI(args=argv, subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
