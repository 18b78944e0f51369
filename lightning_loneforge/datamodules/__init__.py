"""Data side of lightning-loneforge: WebDataset streaming, sample encoding, token-budget packing, balancing."""

from lightning_loneforge.datamodules.balancer import CostModel, balance_ratio
from lightning_loneforge.datamodules.batch import IGNORE_INDEX, PackedBatch
from lightning_loneforge.datamodules.encoder import ChatTemplate, EncodedSample, SampleEncoder, SampleError
from lightning_loneforge.datamodules.metrics import PackingMetricsCallback
from lightning_loneforge.datamodules.packer import TokenBudgetPacker, collate_packed
from lightning_loneforge.datamodules.stream import PackedLoader, PackedStream
from lightning_loneforge.datamodules.webdataset_dm import WebDatasetDataModule

__all__ = [
    "IGNORE_INDEX",
    "ChatTemplate",
    "CostModel",
    "EncodedSample",
    "PackedBatch",
    "PackedLoader",
    "PackedStream",
    "PackingMetricsCallback",
    "SampleEncoder",
    "SampleError",
    "TokenBudgetPacker",
    "WebDatasetDataModule",
    "balance_ratio",
    "collate_packed",
]
