"""Shared pieces of the benchmarks: sample stream, model FLOPs, timing, device facts.

Imported by `throughput.py` and `multigpu.py` (run as scripts, so this folder is on `sys.path`).
Everything here is plain PyTorch: no Lightning, no wandb, nothing the device image lacks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
H100_DENSE_BF16_TFLOPS = 989.0
IMAGE_TOKEN_ID = 151655
VISION_START_ID, VISION_END_ID = 151652, 151653
TEXT_VOCAB_LIMIT = 151000  # random text ids stay clear of the special tokens
PATCH_DIM = 3 * 2 * 14 * 14  # C * temporal_patch * patch * patch
MERGE = 4  # 2x2 patches -> one LLM token

# Qwen2-VL-2B-Instruct's shape (config.json on the hub), random init.
QWEN2_VL_2B_TEXT = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)
QWEN2_VL_2B_VISION = dict(
    depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_channels=3,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)
TINY_TEXT = dict(QWEN2_VL_2B_TEXT, vocab_size=151936, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TINY_VISION = dict(QWEN2_VL_2B_VISION, depth=2, embed_dim=32, hidden_size=64, num_heads=2)


# ----------------------------------------------------------------------------- samples
def load_mixture():
    """The shared mixture module: `benchmarks/mixture.py` if the data helpers placed it, else `../shared`."""
    for path in (HERE / "mixture.py", REPO.parent / "shared" / "bench" / "mixture.py",
                 REPO / "shared" / "bench" / "mixture.py"):
        if path.exists():
            spec = importlib.util.spec_from_file_location("loneforge_bench_mixture", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError("mixture.py: neither benchmarks/mixture.py nor ../shared/bench/mixture.py exists")


def shrink_shapes(shapes, factor: int):
    """Scale grids and text down for CPU smoke runs (grids stay even, text >= 8)."""
    mixture = load_mixture()
    out = []
    for s in shapes:
        grids = tuple((t, max(2, h // factor // 2 * 2), max(2, w // factor // 2 * 2)) for t, h, w in s.grids)
        out.append(mixture.SampleShape(grids, max(8, s.text_tokens // factor)))
    return out


def sample_stream(n: int, seed: int, video_share: float, shrink: int = 1):
    shapes = load_mixture().sample_shapes(n, seed=seed, video_share=video_share)
    return shrink_shapes(shapes, shrink) if shrink > 1 else shapes


def patches_of(shape) -> int:
    return sum(t * h * w for t, h, w in shape.grids)


def sample_token_ids(shape, gen: torch.Generator, learnable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, labels)` of one sample, `shape.tokens` long: each image as `<start> placeholders <end>`
    (the two markers taken from the text budget), then text; loss on the text only. `learnable` text counts
    up from a random start (next token predictable, so a loss curve moves); otherwise it is uniform noise."""
    parts, labels = [], []
    for t, h, w in shape.grids:
        block = torch.full((t * h * w // MERGE + 2,), IMAGE_TOKEN_ID, dtype=torch.long)
        block[0], block[-1] = VISION_START_ID, VISION_END_ID
        parts.append(block)
        labels.append(torch.full_like(block, -100))
    n_text = shape.text_tokens - 2 * len(shape.grids)
    if n_text < 1:
        raise ValueError(f"sample with {len(shape.grids)} images has only {shape.text_tokens} text tokens")
    if learnable:
        start = torch.randint(0, 1000, (1,), generator=gen)
        text = (start + torch.arange(n_text)) % 1000 + 10
    else:
        text = torch.randint(0, TEXT_VOCAB_LIMIT, (n_text,), generator=gen, dtype=torch.long)
    parts.append(text)
    labels.append(text)
    return torch.cat(parts), torch.cat(labels)


def sample_mrope_positions(shape) -> torch.Tensor:
    """`[3, shape.tokens]` M-RoPE positions of `sample_token_ids`' layout, vectorized (same rule as the zoo's
    `encoder.mrope_positions`: text advances all axes; an image's tokens take start + (t, h, w) of the merged
    grid, and the next token resumes at start + max(t, h, w))."""
    pieces, pos = [], 0
    for t, h, w in shape.grids:
        pieces.append(torch.full((3, 1), pos, dtype=torch.long))  # <vision_start>
        pos += 1
        gh, gw = h // 2, w // 2
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij"))
        pieces.append(grid.reshape(3, -1) + pos)
        pos += max(t, gh, gw)
        pieces.append(torch.full((3, 1), pos, dtype=torch.long))  # <vision_end>
        pos += 1
    n_text = shape.text_tokens - 2 * len(shape.grids)
    pieces.append((torch.arange(n_text) + pos).expand(3, n_text))
    return torch.cat(pieces, dim=1)


# ----------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class MatmulParams:
    """Matmul parameters of a Qwen2-VL-shaped model, by what each one multiplies."""

    vision_per_patch: int  # patch embedding + ViT blocks
    merger_per_vision_token: int
    llm_per_token: int  # decoder blocks
    head_per_logit: int  # LM head

    @classmethod
    def from_shape(cls, text: dict, vision: dict) -> MatmulParams:
        d, e = text["hidden_size"], vision["embed_dim"]
        kv = text["num_key_value_heads"] * (d // text["num_attention_heads"])
        llm_block = d * d * 2 + d * kv * 2 + 3 * d * text["intermediate_size"]
        vit_block = e * 3 * e + e * e + 2 * e * e * vision["mlp_ratio"]
        merged = e * vision["spatial_merge_size"] ** 2
        return cls(
            vision_per_patch=PATCH_DIM * e + vision["depth"] * vit_block,
            merger_per_vision_token=merged * merged + merged * vision["hidden_size"],
            llm_per_token=text["num_hidden_layers"] * llm_block,
            head_per_logit=d * text["vocab_size"],
        )

    def train_flops(self, patches: int, tokens: int, logit_tokens: int) -> float:
        """6 x matmul parameters touched per item (forward + backward), attention scores excluded."""
        return 6.0 * (self.vision_per_patch * patches + self.merger_per_vision_token * (patches // MERGE)
                      + self.llm_per_token * tokens + self.head_per_logit * logit_tokens)


# ----------------------------------------------------------------------------- device facts
def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LONEFORGE_COMMIT", "unknown")


def device_facts() -> dict:
    facts = {"torch": torch.__version__, "commit": commit(), "device": "cpu", "driver": "n/a"}
    for package in ("transformers", "lightning"):
        try:
            facts[package] = importlib.import_module(package).__version__
        except ImportError:
            facts[package] = "absent"
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name()
        try:
            facts["driver"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], text=True).split()[0]
        except (OSError, subprocess.CalledProcessError):
            pass
        facts["cuda"] = torch.version.cuda
    return facts


def matmul_peak_tflops(n: int = 8192, reps: int = 30) -> float:
    """Measured dense bf16 matmul rate (median of `reps` products on random data)."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def reset_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class ArmResult:
    """Throughput of one benchmark arm over its measured steps."""

    name: str
    steps: int
    seconds: float
    tokens: int  # real (non-pad) LLM tokens
    slots: int  # token slots computed, padding included
    patches: int
    flops: float
    peak_gib: float
    note: str = ""
    losses: tuple[float, ...] = ()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12

    def mfu(self, peak_tflops: float = H100_DENSE_BF16_TFLOPS) -> float:
        return self.tflops / peak_tflops

    def row(self, matmul_peak: float) -> dict:
        return {
            "arm": self.name, "steps": self.steps, "tokens_per_s": round(self.tokens_per_s, 1),
            "real_slot_share": round(self.tokens / max(1, self.slots), 3),
            "tflops": round(self.tflops, 1), "mfu_989": round(self.mfu(), 4),
            "mfu_measured_peak": round(self.mfu(matmul_peak), 4) if math.isfinite(matmul_peak) else None,
            "peak_gib": round(self.peak_gib, 2), "note": self.note,
        }


class Stopwatch:
    """Wall time between `start()` and `stop()`, the device synchronized at both ends."""

    def start(self) -> None:
        synchronize()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        synchronize()
        return time.perf_counter() - self._t0


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
