"""The embedded demo task: coloured shapes on a plain background, with questions only the image can answer.

Each sample is one 64x64 RGB PNG with 2-3 non-overlapping shapes (each a different shape and colour) and one
LLaVA-style question, e.g. "what colour is the triangle?" -> "red", "what shape is blue?" -> "circle",
"how many shapes are there?" -> "three". Shards are WebDataset tars written with `webdataset.ShardWriter`.
`DemoDataModule` generates them once into a cache folder and streams them like any WebDataset shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, ImageDraw
from typing_extensions import override
from webdataset.shardlists import expand_urls

from lightning_loneforge.datamodules.webdataset_dm import WebDatasetDataModule

DEMO_VERSION = "demo-v2"
VAL_SHARDS = 8
"""Validation is cut into this many shards so every rank of a multi-process run gets some."""
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 190),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
QUESTION_WEIGHTS: dict[str, float] = {"colour": 0.4, "shape": 0.4, "count": 0.2}
_MANIFEST = "demo.json"
_COLOUR_JITTER = 12
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class DemoSpec:
    """What a demo shard set contains; two sets with equal specs are byte-identical."""

    n_train: int = 20_000
    n_val: int = 1_000
    seed: int = 0
    image_size: int = 64
    min_shapes: int = 2
    max_shapes: int = 3
    samples_per_shard: int = 2_500
    version: str = DEMO_VERSION

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_val < 1:
            raise ValueError(
                f"n_train and n_val must be >= 1, got n_train={self.n_train}, n_val={self.n_val}"
            )
        if not 1 <= self.min_shapes <= self.max_shapes <= min(len(SHAPES), len(COLOURS), 4):
            raise ValueError(
                f"need 1 <= min_shapes <= max_shapes <= 4, got {self.min_shapes}..{self.max_shapes}"
            )
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: kind, colour name, centre (x, y) in pixels and half-size `r` (its box is 2r wide)."""

    shape: str
    colour: str
    x: int
    y: int
    r: int


@dataclass
class DemoShards:
    """Where a complete demo shard set lives."""

    root: Path
    train: list[Path] = field(default_factory=list)
    val: list[Path] = field(default_factory=list)
    spec: DemoSpec = field(default_factory=DemoSpec)


def default_cache_dir() -> Path:
    """`$LONEFORGE_CACHE` or `~/.cache/lightning_loneforge`."""
    root = os.environ.get("LONEFORGE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lightning_loneforge"


def default_demo_dir(spec: DemoSpec | None = None) -> Path:
    """Cache folder of a demo set: `<cache>/demo-v2` for the default spec, a spec-named sibling otherwise."""
    spec = spec or DemoSpec()
    if spec == DemoSpec():
        return default_cache_dir() / DEMO_VERSION
    digest = hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]
    return default_cache_dir() / f"{DEMO_VERSION}-{digest}"


# ---------------------------------------------------------------------------------------------- rendering


def _place_shapes(rng: random.Random, spec: DemoSpec) -> list[ShapeObject]:
    """2-3 shapes of distinct kinds and colours at random positions, boxes 2 px apart (rejection sampling)."""
    count = rng.randint(spec.min_shapes, spec.max_shapes)
    size = spec.image_size
    largest = max(6, size // 5)
    smallest = max(5, size // 8)
    for _ in range(_PLACEMENT_TRIES):
        kinds = rng.sample(SHAPES, count)
        colours = rng.sample(list(COLOURS), count)
        objects: list[ShapeObject] = []
        for kind, colour in zip(kinds, colours, strict=True):
            r = rng.randint(smallest, largest)
            for _ in range(_PLACEMENT_TRIES):
                x, y = rng.randint(r + 1, size - r - 2), rng.randint(r + 1, size - r - 2)
                if all(abs(x - o.x) > r + o.r + 2 or abs(y - o.y) > r + o.r + 2 for o in objects):
                    objects.append(ShapeObject(kind, colour, x, y, r))
                    break
        if len(objects) == count:
            return objects
    raise RuntimeError(f"could not place {count} shapes in a {size}x{size} image")


def _polygon(obj: ShapeObject) -> list[tuple[float, float]]:
    x, y, r = obj.x, obj.y, obj.r
    if obj.shape == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if obj.shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        return points
    if obj.shape == "cross":
        a = max(2, round(r * 0.4))
        return [
            (x - a, y - r), (x + a, y - r), (x + a, y - a), (x + r, y - a), (x + r, y + a), (x + a, y + a),
            (x + a, y + r), (x - a, y + r), (x - a, y + a), (x - r, y + a), (x - r, y - a), (x - a, y - a),
        ]  # fmt: skip
    raise ValueError(f"no polygon for shape {obj.shape!r}")


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
    return r, g, b


def render(objects: Sequence[ShapeObject], size: int, rng: random.Random) -> Image.Image:
    """Draw the shapes, each in its (slightly jittered) colour, on a random plain grey background."""
    grey = rng.randint(70, 190)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = _jitter(rng, COLOURS[obj.colour], _COLOUR_JITTER)
        box = (obj.x - obj.r, obj.y - obj.r, obj.x + obj.r, obj.y + obj.r)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(_polygon(obj), fill=fill)
    return image


def ask(objects: Sequence[ShapeObject], rng: random.Random) -> tuple[str, str, str]:
    """One (question type, question, answer) about the shapes."""
    kind = rng.choices(list(QUESTION_WEIGHTS), weights=list(QUESTION_WEIGHTS.values()))[0]
    target = rng.choice(objects)
    if kind == "colour":
        return kind, f"what colour is the {target.shape}?", target.colour
    if kind == "shape":
        return kind, f"what shape is {target.colour}?", target.shape
    return kind, "how many shapes are there?", NUMBER_WORDS[len(objects)]


def make_sample(index: int, split: str, rng: random.Random, spec: DemoSpec) -> dict:
    """One WebDataset sample: `__key__`, `png` bytes and `json` (conversations, objects, question type)."""
    objects = _place_shapes(rng, spec)
    image = render(objects, spec.image_size, rng)
    kind, question, answer = ask(objects, rng)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    meta = {
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "question_type": kind,
        "objects": [{"shape": o.shape, "colour": o.colour, "x": o.x, "y": o.y, "r": o.r} for o in objects],
    }
    return {"__key__": f"{split}-{index:07d}", "png": buffer.getvalue(), "json": json.dumps(meta).encode()}


def iter_samples(split: str, count: int, spec: DemoSpec) -> Iterator[dict]:
    """The `count` samples of one split, deterministic in (`spec.seed`, `split`)."""
    rng = random.Random(f"loneforge-{spec.version}-{split}-{spec.seed}")
    for index in range(count):
        yield make_sample(index, split, rng, spec)


# ---------------------------------------------------------------------------------------------- shards


def _write_split(directory: Path, split: str, count: int, spec: DemoSpec) -> list[Path]:
    pattern = str(directory / f"{split}-%06d.tar")
    per_shard = spec.samples_per_shard if split == "train" else min(spec.samples_per_shard, -(-count // VAL_SHARDS))
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=0) as writer:
        for sample in iter_samples(split, count, spec):
            writer.write(sample)
    return sorted(directory.glob(f"{split}-*.tar"))


def _manifest_spec(directory: Path) -> dict | None:
    try:
        return json.loads((directory / _MANIFEST).read_text()).get("spec")
    except (OSError, ValueError, AttributeError):
        return None


def find_demo_shards(directory: str | Path, spec: DemoSpec) -> DemoShards | None:
    """The complete demo set of `spec` in `directory` (all shards present with their recorded sizes), or None."""
    directory = Path(directory)
    if _manifest_spec(directory) != asdict(spec):
        return None
    manifest = json.loads((directory / _MANIFEST).read_text())
    shards = DemoShards(root=directory, spec=spec)
    for split in ("train", "val"):
        for name, size in manifest["files"][split].items():
            path = directory / name
            if not path.is_file() or path.stat().st_size != size:
                return None
            getattr(shards, split).append(path)
    return shards


def write_demo_shards(
    out_dir: str | Path | None = None,
    n_train: int = 20_000,
    n_val: int = 1_000,
    seed: int = 0,
    **spec_fields,
) -> DemoShards:
    """Write the demo set into `out_dir` (default: the cache folder) unless a complete equal set is there.

    Generation happens in a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a folder that looks complete. A set of the same spec with missing or
    resized shards is regenerated.

    Args:
        out_dir: Target folder; `None` means `default_demo_dir(spec)`.
        n_train: Training samples.
        n_val: Validation samples.
        seed: Seed of the generator (train and val draw from different streams).
        **spec_fields: Other `DemoSpec` fields (`image_size`, `min_shapes`, `max_shapes`, `samples_per_shard`).

    Returns:
        The shard paths.

    Raises:
        FileExistsError: If `out_dir` holds something else (another spec or foreign files).
    """
    spec = DemoSpec(n_train=n_train, n_val=n_val, seed=seed, **spec_fields)
    out_dir = Path(out_dir) if out_dir is not None else default_demo_dir(spec)
    existing = find_demo_shards(out_dir, spec)
    if existing is not None:
        return existing
    damaged = _manifest_spec(out_dir) == asdict(spec)
    if out_dir.exists() and any(out_dir.iterdir()) and not damaged:
        raise FileExistsError(
            f"{out_dir} is not empty and holds no complete demo set with spec {asdict(spec)}; "
            "delete it or choose another folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {
            split: _write_split(tmp, split, count, spec)
            for split, count in (("train", n_train), ("val", n_val))
        }
        manifest = {
            "spec": asdict(spec),
            "files": {split: {p.name: p.stat().st_size for p in paths} for split, paths in files.items()},
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if damaged:
            shutil.rmtree(out_dir)
        elif out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except OSError:
        complete = find_demo_shards(out_dir, spec)  # another process may have finished the same set first
        if complete is None:
            raise
        return complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = find_demo_shards(out_dir, spec)
    assert result is not None, f"{out_dir} incomplete right after writing"
    return result


# ---------------------------------------------------------------------------------------------- text-only ceiling


def _shard_paths(source: str | Path | Sequence[str | Path], split: str) -> list[Path]:
    if isinstance(source, (str, Path)):
        source = Path(source)
        if source.is_dir():
            paths = sorted(source.glob(f"{split}-*.tar"))
            if not paths:
                raise FileNotFoundError(f"no {split}-*.tar shards in {source}")
            return paths
        return [Path(p) for p in expand_urls(str(source))]
    return [Path(p) for p in source]


def question_answer_pairs(shards: Iterable[str | Path]) -> Iterator[tuple[str, str]]:
    """(question, answer) of every human/gpt turn pair in the `json` field of the shards' samples.

    The question is the human turn without `<image>` placeholders, lowercased, whitespace collapsed.

    Raises:
        ValueError: If a `json` member cannot be parsed or has no `conversations` list (names shard and member).
    """
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                raw = tar.extractfile(member)
                try:
                    turns = json.loads(raw.read() if raw else b"")["conversations"]
                    pairs = [
                        (" ".join(human["value"].replace("<image>", " ").lower().split()),
                         " ".join(gpt["value"].lower().split()))
                        for human, gpt in zip(turns[::2], turns[1::2], strict=False)
                    ]  # fmt: skip
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise ValueError(f"{shard}:{member.name}: no readable 'conversations' ({exc!r})") from exc
                yield from pairs


def text_only_ceiling(
    train: str | Path | Sequence[str | Path], val: str | Path | Sequence[str | Path]
) -> float:
    """Best answer accuracy on `val` of any model that sees only the question text.

    For each question, predict its most frequent answer in `train` (the Bayes-optimal text-only rule
    under the training distribution); questions unseen in `train` get the overall most frequent answer.

    Args:
        train: A folder of `train-*.tar` shards, a shard path or brace pattern, or a list of shards.
        val: A folder of `val-*.tar` shards, a shard path or brace pattern, or a list of shards.
    """
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    overall: Counter[str] = Counter()
    for question, answer in question_answer_pairs(_shard_paths(train, "train")):
        answers[question][answer] += 1
        overall[answer] += 1
    if not overall:
        raise ValueError(f"no question/answer pairs in the training shards {train}")
    best = {question: counts.most_common(1)[0][0] for question, counts in answers.items()}
    fallback = overall.most_common(1)[0][0]
    hits = total = 0
    for question, answer in question_answer_pairs(_shard_paths(val, "val")):
        hits += best.get(question, fallback) == answer
        total += 1
    if total == 0:
        raise ValueError(f"no question/answer pairs in the validation shards {val}")
    return hits / total


# ---------------------------------------------------------------------------------------------- datamodule


class DemoDataModule(WebDatasetDataModule):
    """`WebDatasetDataModule` over the embedded demo set, generated once into the cache folder.

    `prepare_data()` writes the shards (a no-op when a complete set is there); `setup()` points
    `train_shards`/`val_shards` at them unless given. So a config needs only the class path plus the
    packing knobs.

    Args:
        data_dir: Folder of the demo set; None means `default_demo_dir(spec)` under `$LONEFORGE_CACHE`
            or `~/.cache/lightning_loneforge`.
        n_train, n_val, demo_seed, image_size, min_shapes, max_shapes: What to generate (see `DemoSpec`).
        train_shards, val_shards: Other shards to use instead of the generated ones.
        max_tokens, num_workers, shuffle_buffer, lookahead, seed, bad_sample: As in `WebDatasetDataModule`.
        **kwargs: Further `WebDatasetDataModule` arguments (`balance`, `encoder`, ...).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        n_train: int = 20_000,
        n_val: int = 1_000,
        demo_seed: int = 0,
        image_size: int = 64,
        min_shapes: int = 2,
        max_shapes: int = 3,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        max_tokens: int = 1024,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        lookahead: int = 128,
        seed: int = 0,
        bad_sample: str = "raise",
        **kwargs: Any,
    ) -> None:
        self.spec = DemoSpec(
            n_train=n_train,
            n_val=n_val,
            seed=demo_seed,
            image_size=image_size,
            min_shapes=min_shapes,
            max_shapes=max_shapes,
        )
        self.data_dir = Path(data_dir).expanduser() if data_dir else default_demo_dir(self.spec)
        super().__init__(
            train_shards=train_shards if train_shards is not None else [],
            val_shards=val_shards,
            max_tokens=max_tokens,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            lookahead=lookahead,
            seed=seed,
            bad_sample=bad_sample,
            **kwargs,
        )
        self._use_demo_train = train_shards is None
        self._use_demo_val = val_shards is None
        self._ceiling: float | None = None

    def demo_shards(self) -> DemoShards:
        """The demo set, written now if it is not complete yet (safe to call from several processes)."""
        spec = asdict(self.spec)
        return write_demo_shards(self.data_dir, **{k: v for k, v in spec.items() if k != "version"})

    @override
    def prepare_data(self) -> None:
        self.demo_shards()

    @override
    def setup(self, stage: str) -> None:
        shards = self.demo_shards()
        if self._use_demo_train:
            self.train_shards = [str(p) for p in shards.train]
        if self._use_demo_val:
            self.val_shards = [str(p) for p in shards.val]
        super().setup(stage)

    def text_only_ceiling(self) -> float:
        """Best validation answer accuracy reachable without the image (see `text_only_ceiling`)."""
        if self._ceiling is None:
            shards = self.demo_shards()
            train = shards.train if self._use_demo_train else self.train_shards
            val = shards.val if self._use_demo_val else self.val_shards
            self._ceiling = text_only_ceiling(train, val)
        return self._ceiling
