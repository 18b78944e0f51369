"""The baseline arm: what a user does today with `transformers` (padded batches, SDPA, AdamW).

Qwen2VLForConditionalGeneration, random init in bf16, `attn_implementation="sdpa"`; each step takes the
next `batch_size` samples of the stream, pads them to the longest (right padding), and trains with the
model's own loss. Pixel values are random patches of the shapes the grids ask for.
"""

from __future__ import annotations

import torch
from _bench_common import (
    IMAGE_TOKEN_ID,
    PATCH_DIM,
    ArmResult,
    MatmulParams,
    Stopwatch,
    patches_of,
    peak_gib,
    reset_memory,
    sample_token_ids,
)


def build_hf_model(text: dict, vision: dict, device: torch.device):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(text)
    scaling = text.pop("rope_scaling")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                               "mrope_section": scaling["mrope_section"]}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                           image_token_id=IMAGE_TOKEN_ID)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU smoke runs: fp32 is faster there
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def padded_batch(shapes, gen: torch.Generator, device: torch.device) -> tuple[dict, int, int, int, int]:
    """HF inputs for `shapes`, right-padded; also (real tokens, slots, patches, labelled tokens)."""
    pairs = [sample_token_ids(s, gen) for s in shapes]
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for row, (i, lab) in enumerate(pairs):
        ids[row, : len(i)], labels[row, : len(i)], mask[row, : len(i)] = i, lab, 1
    grids = [g for s in shapes for g in s.grids]
    patches = sum(patches_of(s) for s in shapes)
    inputs = {
        "input_ids": ids.to(device, non_blocking=True),
        "attention_mask": mask.to(device, non_blocking=True),
        "labels": labels.to(device, non_blocking=True),
        "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).to(torch.int32).to(device, non_blocking=True),
    }
    if grids:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        inputs["pixel_values"] = torch.randn(patches, PATCH_DIM, device=device, dtype=dtype)
        inputs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long, device=device)
    real = int(mask.sum())
    return inputs, real, ids.numel(), patches, int((labels != -100).sum())


def run_baseline(shapes, *, text: dict, vision: dict, batch_size: int, warmup: int, steps: int,
                 device: torch.device, seed: int = 0) -> ArmResult:
    """The largest batch from `batch_size` down that fits: a batch that runs out of memory is retried one
    smaller (the OOM is printed, and the result's note names the batch that ran)."""
    for size in range(batch_size, 0, -1):
        try:
            return _run_baseline(shapes, text=text, vision=vision, batch_size=size, warmup=warmup, steps=steps,
                                 device=device, seed=seed)
        except torch.OutOfMemoryError as err:
            message = str(err)[:160]
        print(f"# baseline batch {size} ran out of memory: {message}", flush=True)
        reset_memory()  # after the except block, so the traceback no longer holds the activations
    raise RuntimeError("baseline: even batch 1 runs out of memory")


def _run_baseline(shapes, *, text: dict, vision: dict, batch_size: int, warmup: int, steps: int,
                  device: torch.device, seed: int = 0) -> ArmResult:
    """Train `warmup + steps` padded batches of `batch_size` samples; time the last `steps`."""
    reset_memory()
    model = build_hf_model(text, vision, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    params = MatmulParams.from_shape(text, vision)
    gen = torch.Generator().manual_seed(seed)
    need = (warmup + steps) * batch_size
    if len(shapes) < need:
        raise ValueError(f"baseline: {need} samples needed, stream has {len(shapes)}")
    watch = Stopwatch()
    tokens = slots = patches = 0
    flops = 0.0
    losses = []
    try:
        for step in range(warmup + steps):
            if step == warmup:
                watch.start()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
            batch = shapes[step * batch_size: (step + 1) * batch_size]
            inputs, real, n_slots, n_patches, n_logits = padded_batch(batch, gen, device)
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= warmup:
                tokens, slots, patches = tokens + real, slots + n_slots, patches + n_patches
                flops += params.train_flops(n_patches, real, n_logits)
                losses.append(loss.detach())
        seconds = watch.stop()
        peak = peak_gib()
    finally:
        del model, optimizer
        reset_memory()
    return ArmResult("baseline-hf-padded", steps, seconds, tokens, slots, patches, flops, peak,
                     note=f"batch {batch_size}", losses=tuple(float(x) for x in losses))
