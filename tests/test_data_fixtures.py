"""Shared data for the data-pipeline tests: a word tokenizer, small encoders and WebDataset shards.

No tests here; the `test_data_*` modules import these helpers.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from lightning_loneforge.datamodules.encoder import SampleEncoder
from lightning_loneforge.datamodules.tokenizer import WordTokenizer

WORDS = (
    "what is in the image describe a red blue green square circle cat dog sky tree and of on it this".split()
)


def tokenizer() -> WordTokenizer:
    return WordTokenizer(WORDS)


def encoder(**kwargs) -> SampleEncoder:
    """Small images: a 56x56 picture becomes a 4x4 patch grid, 4 LLM tokens."""
    kwargs.setdefault("min_pixels", 28 * 28)
    kwargs.setdefault("max_pixels", 112 * 112)
    return SampleEncoder(tokenizer(), **kwargs)


def png_bytes(rng: random.Random, size: tuple[int, int] = (56, 56)) -> bytes:
    array = np.random.default_rng(rng.randrange(1 << 30)).integers(
        0, 255, (size[1], size[0], 3), dtype=np.uint8
    )
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def conversation(rng: random.Random, image: bool) -> dict:
    question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
    answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    prompt = ("<image>\n" if image else "") + question
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


def write_shards(
    directory: Path, n_shards: int = 4, per_shard: int = 25, seed: int = 0, image_every: int = 2
) -> list[str]:
    """LLaVA-style shards: every `image_every`-th sample has a 56x56 PNG; keys are unique across shards."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard in range(n_shards):
        path = directory / f"train-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(per_shard):
                has_image = i % image_every == 0
                sample = {
                    "__key__": f"s{shard:03d}_{i:04d}",
                    "json": json.dumps(conversation(rng, has_image)),
                }
                if has_image:
                    sample["png"] = png_bytes(rng)
                writer.write(sample)
        urls.append(str(path))
    return urls


def all_keys(n_shards: int = 4, per_shard: int = 25) -> set[str]:
    return {f"s{shard:03d}_{i:04d}" for shard in range(n_shards) for i in range(per_shard)}
