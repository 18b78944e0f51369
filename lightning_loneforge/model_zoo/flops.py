"""Training FLOPs of a packed row for MFU: 6 x matmul parameters x tokens per tower, plus attention."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_loneforge.datamodules.batch import PackedBatch


def matmul_params(module: nn.Module) -> int:
    """Weights used in matrix multiplies: every `nn.Linear` weight, plus a decoder's tied output matrix."""
    total = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    if getattr(module, "lm_head", "absent") is None:  # tied decoder: embeddings double as the output projection
        total += module.embed_tokens.weight.numel()
    return total


def _attention_flops(lengths: list[int], layers: int, width: int, causal: bool) -> float:
    """Forward + backward FLOPs of QK^T and AV (3 x forward), halved when causal."""
    pairs = sum(n * n for n in lengths) * (0.5 if causal else 1.0)
    return 3.0 * 4.0 * pairs * width * layers


def _vision_segments(model, grids: list[tuple[int, int, int]]) -> list[tuple[list[int], int]]:
    """(segment lengths, number of layers attending over them) for the vision tower."""
    vision = model.config.vision
    frames = [h * w for t, h, w in grids for _ in range(t)]
    if not vision.window_size:
        return [(frames, vision.num_layers)]
    from lightning_loneforge.model_zoo.towers.qwen_vision import _window_order

    _, windows = _window_order(grids, vision.spatial_merge_size, vision.window_size // vision.patch_size)
    full = len(vision.fullatt_block_indexes)
    return [(frames, full), (windows, vision.num_layers - full)]


def batch_flops(model, batch: PackedBatch) -> dict[str, float]:
    """`{"llm", "vision", "projector", "attention", "total"}` training FLOPs of one `PackedBatch`."""
    tokens = batch.num_tokens
    out = {"llm": 6.0 * matmul_params(model.llm) * tokens, "vision": 0.0, "projector": 0.0, "attention": 0.0}
    text = model.config.text
    lengths = batch.sample_lengths().tolist()
    out["attention"] += _attention_flops(lengths, text.num_layers, text.num_heads * text.resolved_head_dim, True)
    if batch.pixel_values is not None and model.vision is not None:
        patches = int(batch.pixel_values.shape[0])
        grid: Tensor = batch.image_grid_thw
        grids = [tuple(int(v) for v in row) for row in grid.tolist()]
        merge = max(1, model.config.projector.merge_size)
        out["vision"] = 6.0 * matmul_params(model.vision) * patches
        out["projector"] = 6.0 * matmul_params(model.projector) * patches / merge**2
        for segs, layers in _vision_segments(model, grids):
            out["attention"] += _attention_flops(segs, layers, model.config.vision.hidden_size, False)
    out["total"] = out["llm"] + out["vision"] + out["projector"] + out["attention"]
    return out
