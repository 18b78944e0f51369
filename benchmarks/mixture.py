"""Reference sample-length mixture for packing, balancing and throughput benchmarks.

Copied unchanged (apart from this note) from the project's shared design folder, bench/mixture.py,
so that the benchmarks run from the repository alone (CI has no ../shared).

A LLaVA-OneVision-like mix of single images, text-only turns, high-resolution / multi-image
samples and short videos. Each sample is described by what a Qwen2-VL-style model sees:
the vision grids (t, h, w) in 14-px patches (4 patches merge into one LLM token) and the
number of text tokens. Deterministic for a given seed.

    python benchmarks/mixture.py --n 5 --seed 0                    # a few samples as JSON lines
    python benchmarks/mixture.py --n 5 --video-share 0.5           # the video-heavy variant
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SampleShape:
    grids: tuple[tuple[int, int, int], ...] = field(default_factory=tuple)  # (t, h, w) in patches
    text_tokens: int = 0

    @property
    def vision_tokens(self) -> int:
        """LLM tokens the images become (2x2 patch merge)."""
        return sum(t * h * w // 4 for t, h, w in self.grids)

    @property
    def tokens(self) -> int:
        return self.vision_tokens + self.text_tokens


def _lognormal(rng: random.Random, median: float, cap: int) -> int:
    return max(8, min(cap, int(rng.lognormvariate(math.log(median), 0.9))))


def sample_shapes(n: int, seed: int = 0, video_share: float = 0.1) -> list[SampleShape]:
    """`n` samples; `video_share` of them short videos, the other kinds keeping their proportions
    (single image 5 : text only 2 : high-res or multi-image 2)."""
    if not 0.0 <= video_share <= 1.0:
        raise ValueError(f"video_share must be in [0, 1], got {video_share}")
    scale = (1.0 - video_share) / 0.9
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5 * scale:  # one image, short answer
            g = ((1, 2 * rng.randint(8, 24), 2 * rng.randint(8, 24)),)
            out.append(SampleShape(g, _lognormal(rng, 150, 2048)))
        elif r < 0.7 * scale:  # text only
            out.append(SampleShape((), _lognormal(rng, 400, 4096)))
        elif r < 0.9 * scale:  # high resolution or several images
            k = rng.choice([1, 1, 2, 3])
            g = tuple((1, 2 * rng.randint(16, 40), 2 * rng.randint(16, 40)) for _ in range(k))
            out.append(SampleShape(g, _lognormal(rng, 300, 2048)))
        else:  # short video: frames in temporal pairs
            g = ((rng.choice([2, 4, 8]), 24, 24),)
            out.append(SampleShape(g, _lognormal(rng, 100, 1024)))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video-share", type=float, default=0.1)
    a = p.parse_args()
    for s in sample_shapes(a.n, a.seed, a.video_share):
        print(json.dumps({"grids": s.grids, "text_tokens": s.text_tokens, "tokens": s.tokens}))
