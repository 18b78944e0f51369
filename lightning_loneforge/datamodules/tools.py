"""`loneforge data demo|shard|inspect`: write the demo shards, shard a JSONL manifest, inspect a shard set."""

from __future__ import annotations

import argparse
import bisect
import glob
import importlib
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from webdataset.autodecode import DecodingError
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_DEFAULT_TOKENIZER = "lightning_loneforge.datamodules.tokenizer.DemoTokenizer"
_SHOWN_PROBLEMS = 20


class ToolError(ValueError):
    """A user-facing error of a data tool; the message names the file and line or shard and key."""


def _console() -> Console:
    return Console(file=sys.stdout, highlight=False, markup=False, soft_wrap=True)


def _err_console() -> Console:
    return Console(file=sys.stderr, highlight=False, markup=False, soft_wrap=True)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


# ---------------------------------------------------------------------------------------------- demo


def run_demo(args: argparse.Namespace) -> int:
    """Write the demo shards (or find them complete) and print where, with the text-only ceiling."""
    from lightning_loneforge.datamodules.demo_data import (
        DemoSpec,
        default_demo_dir,
        find_demo_shards,
        text_only_ceiling,
        write_demo_shards,
    )

    console = _console()
    spec = DemoSpec(n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    out = Path(args.out) if args.out else default_demo_dir(spec)
    found = find_demo_shards(out, spec)
    start = time.perf_counter()
    with console.status(f"writing demo shards into {out} ..."):
        shards = found or write_demo_shards(out, n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    how = "found complete" if found else f"written in {time.perf_counter() - start:.1f} s"
    ceiling = text_only_ceiling(shards.train, shards.val)
    console.print(f"demo shards in {shards.root} ({how})")
    console.print(
        f"  train: {len(shards.train)} shard(s), {shards.spec.n_train} samples: {_brace(shards.train)}"
    )
    console.print(f"  val:   {len(shards.val)} shard(s), {shards.spec.n_val} samples: {_brace(shards.val)}")
    console.print(f"  text-only ceiling (best val accuracy without the image): {ceiling:.3f}")
    return 0


def _brace(paths: Sequence[Path]) -> str:
    """`dir/train-{000000..000007}.tar` for a complete run of numbered shards, else the paths joined by spaces."""
    numbered = [re.fullmatch(r"(.*-)(\d+)(\..*)", p.name) for p in paths]
    if len(paths) > 1 and all(numbered) and all(p.parent == paths[0].parent for p in paths):
        stem, first, suffix = numbered[0].groups()
        expected = [f"{stem}{i:0{len(first)}d}{suffix}" for i in range(int(first), int(first) + len(paths))]
        if [p.name for p in paths] == expected:
            return str(paths[0].parent / f"{stem}{{{first}..{numbered[-1].group(2)}}}{suffix}")
    return " ".join(str(p) for p in paths)


# ---------------------------------------------------------------------------------------------- shard


@dataclass
class _ShardStats:
    written: int = 0
    skipped: list[str] = field(default_factory=list)


def _image_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes and WebDataset extension; formats other than JPEG/PNG/WebP are re-encoded as PNG."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            image_format = image.format
        if image_format in _KEEP_FORMATS:
            return data, _KEEP_FORMATS[image_format]
        with Image.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
            return out.getvalue(), "png"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ToolError(f"not a readable image: {path} ({exc})") from exc


def manifest_sample(record: Any, image_root: Path) -> dict[str, bytes]:
    """WebDataset fields of one manifest record: images as `png`/`jpg` (or `0.png`, `1.jpg`, ...) and `json`.

    Raises:
        ToolError: If the record is not an object, lacks text and conversations, names a missing or
            unreadable image, or has more `<image>` placeholders than images.
    """
    if not isinstance(record, dict):
        raise ToolError(f"expected a JSON object, got {type(record).__name__}")
    if "image" in record and "images" in record:
        raise ToolError("has both 'image' and 'images'")
    images = record.get("images", [record["image"]] if "image" in record else [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ToolError("'image' must be a path string and 'images' a list of path strings")
    conversations = record.get("conversations")
    if conversations is None and not isinstance(record.get("text"), str):
        raise ToolError("needs 'conversations' (a list of turns) or 'text' (a string)")
    if conversations is not None:
        if not isinstance(conversations, list) or not conversations:
            raise ToolError("'conversations' must be a non-empty list of turns")
        for n, turn in enumerate(conversations):
            if not isinstance(turn, dict) or not isinstance(turn.get("value", turn.get("content")), str):
                raise ToolError(f"conversations[{n}] needs 'from' and a string 'value', got {turn!r}")
        placeholders = sum(turn.get("value", turn.get("content")).count("<image>") for turn in conversations)
        if placeholders > len(images):
            raise ToolError(f"{placeholders} <image> placeholder(s) but {len(images)} image(s)")
    elif images:
        raise ToolError("images need 'conversations'; plain 'text' samples cannot carry images")
    sample: dict[str, bytes] = {}
    for n, name in enumerate(images):
        path = Path(name) if os.path.isabs(name) else image_root / name
        if not path.is_file():
            raise ToolError(f"image file not found: {path}")
        data, ext = _image_bytes(path)
        sample[ext if len(images) == 1 else f"{n}.{ext}"] = data
    meta = {k: v for k, v in record.items() if k not in ("image", "images")}
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return sample


def _manifest_records(manifest: Path) -> Iterator[tuple[int, Any | ToolError]]:
    with manifest.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, ToolError(f"invalid JSON ({exc.msg} at column {exc.colno})")


def run_shard(args: argparse.Namespace) -> int:
    """Turn a JSONL manifest plus image files into WebDataset shards `<out>/<prefix>-%06d.tar`."""
    manifest = Path(args.manifest)
    if not manifest.is_file():
        raise ToolError(f"manifest not found: {manifest}")
    out = Path(args.out)
    image_root = Path(args.image_root) if args.image_root else manifest.parent
    existing = sorted(out.glob(f"{args.prefix}-*.tar"))
    if existing:
        raise ToolError(
            f"{out} already holds {args.prefix}-*.tar shards ({existing[0].name}, ...); use another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{args.prefix}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    stats = _ShardStats()
    console, errors = _console(), _err_console()
    with manifest.open("rb") as lines:
        total_lines = sum(1 for _ in lines)
    try:
        with (
            _progress(errors) as progress,
            wds.ShardWriter(
                str(tmp / f"{args.prefix}-%06d.tar"),
                maxcount=args.max_count,
                maxsize=args.max_size,
                verbose=0,
            ) as writer,
        ):
            task = progress.add_task(f"sharding {manifest.name}", total=total_lines)
            for number, record in _manifest_records(manifest):
                progress.update(task, completed=number)
                try:
                    if isinstance(record, ToolError):
                        raise record
                    sample = manifest_sample(record, image_root)
                except ToolError as exc:
                    problem = f"{manifest}:{number}: {exc}"
                    if not args.skip_bad:
                        raise ToolError(problem) from exc
                    stats.skipped.append(problem)
                    continue
                writer.write({"__key__": f"{stats.written:09d}", **sample})
                stats.written += 1
        shards = sorted(tmp.glob(f"{args.prefix}-*.tar"))
        if stats.written == 0:
            raise ToolError(f"{manifest}: no usable samples ({len(stats.skipped)} bad line(s))")
        for shard in shards:
            os.replace(shard, out / shard.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for problem in stats.skipped[:_SHOWN_PROBLEMS]:
        errors.print(f"skipped {problem}")
    if len(stats.skipped) > _SHOWN_PROBLEMS:
        errors.print(f"... and {len(stats.skipped) - _SHOWN_PROBLEMS} more skipped line(s)")
    written = [out / s.name for s in shards]
    console.print(f"wrote {stats.written} samples into {len(written)} shard(s): {_brace(written)}")
    if stats.skipped:
        console.print(f"skipped {len(stats.skipped)} bad line(s) of {manifest}")
    return 0


# ---------------------------------------------------------------------------------------------- inspect


@dataclass
class InspectReport:
    """What `inspect` found in a shard set."""

    shards: list[Path] = field(default_factory=list)
    samples: int = 0
    fields: Counter[str] = field(default_factory=Counter)
    bad: list[tuple[str, str, str]] = field(default_factory=list)
    """(shard, key, reason) of every bad sample or unreadable shard part."""
    lengths: list[int] = field(default_factory=list)
    """Tokens (text + image placeholders) of each good sample as the encoder gives them."""
    image_sizes: Counter[tuple[int, int]] = field(default_factory=Counter)


def expand_shards(specs: Sequence[str]) -> list[Path]:
    """Shard paths from paths, folders (their `*.tar`), globs and brace patterns (`train-{000..007}.tar`, `a::b`).

    Raises:
        ToolError: If a spec matches nothing.
    """
    paths: list[Path] = []
    for spec in specs:
        for expanded in expand_urls(spec):
            path = Path(expanded)
            if path.is_dir():
                matches = sorted(path.glob("*.tar"))
            elif any(c in expanded for c in "*?["):
                matches = [Path(p) for p in sorted(glob.glob(expanded))]
            else:
                matches = [path] if path.exists() else []
            if not matches:
                raise ToolError(f"no shards match {expanded!r}")
            paths.extend(matches)
    return paths


def _samples_of(shard: Path, report: InspectReport) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard as the WebDataset loader groups them; a broken tar is recorded, not raised."""
    last_key = "(start)"
    try:
        with shard.open("rb") as stream:
            files = ({**file, "__url__": str(shard)} for file in tar_file_iterator(stream))
            for sample in group_by_keys(files, handler=wds.reraise_exception):
                last_key = sample["__key__"]
                yield sample
    except Exception as exc:  # tarfile.ReadError, EOFError, zlib errors, duplicate names ...
        report.bad.append((str(shard), f"after {last_key}", f"unreadable tar: {type(exc).__name__}: {exc}"))
        return
    problem = tar_tail_problem(shard)
    if problem:
        report.bad.append((str(shard), f"after {last_key}", problem))


def tar_tail_problem(shard: Path) -> str | None:
    """Why an uncompressed tar's end is broken, or None.

    Python's `tarfile` (and so WebDataset) silently stops at a damaged header after the first one, and
    reads a tar cut at a member boundary as complete; this finds both: after the last member there must
    be only zero bytes, at least the two 512-byte blocks of the end-of-archive marker.
    """
    if shard.suffix != ".tar":
        return None
    try:
        with tarfile.open(shard, "r:") as tar:
            for _ in tar:
                pass
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"unreadable tar: {type(exc).__name__}: {exc}"
    with shard.open("rb") as stream:
        stream.seek(end)
        tail = stream.read()
    if tail.strip(b"\0"):
        return f"damaged or truncated tar: unreadable bytes from offset {end} on (members after it are lost)"
    if len(tail) < 2 * tarfile.BLOCKSIZE:
        return f"truncated tar: no end-of-archive marker after byte {end}"
    return None


def _build_tokenizer(path: str) -> Any:
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)()
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        raise ToolError(f"cannot build tokenizer {path!r}: {exc}") from exc


def build_encoder(args: argparse.Namespace) -> tuple[Any, str]:
    """The `SampleEncoder` that counts tokens, and a line saying which one it is.

    With `--model ROW` it is the zoo model's own encoder (`MultimodalModule(ROW).sample_encoder()`),
    otherwise a Qwen2-VL-style encoder with `--tokenizer`, `--patch-size` and `--merge-size`.
    """
    from lightning_loneforge.datamodules.encoder import SampleEncoder

    tokenizer = _build_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.model:
        from lightning_loneforge.model_zoo.module import MultimodalModule

        try:
            encoder = MultimodalModule(model=args.model, tokenizer=tokenizer).sample_encoder()
        except (KeyError, ValueError) as exc:
            raise ToolError(f"--model {args.model}: {exc}") from exc
        return encoder, f"encoder of zoo model {args.model}"
    tokenizer = tokenizer or _build_tokenizer(_DEFAULT_TOKENIZER)
    encoder = SampleEncoder(tokenizer, patch_size=args.patch_size, merge_size=args.merge_size)
    name = type(tokenizer).__name__
    return encoder, f"encoder: {name}, patch {args.patch_size}, merge {args.merge_size} (or use --model ROW)"


def inspect_shards(shards: Sequence[Path], encoder: Any | None, limit: int | None = None) -> InspectReport:
    """Read, decode and encode every sample of `shards`, collecting counts, lengths and bad samples."""
    decoder = wds.autodecode.Decoder([wds.autodecode.imagehandler("pil")])
    report = InspectReport(shards=list(shards))
    with _progress(_err_console()) as progress:
        task = progress.add_task("inspecting", total=len(shards))
        for shard in shards:
            if limit is not None and report.samples >= limit:
                break
            for raw in _samples_of(shard, report):
                if limit is not None and report.samples >= limit:
                    break
                report.samples += 1
                key = raw["__key__"]
                report.fields.update(k for k in raw if not k.startswith("__"))
                problem = _check_sample(raw, decoder, encoder, report)
                if problem:
                    report.bad.append((str(shard), key, problem))
            progress.advance(task)
    return report


def _check_sample(
    raw: dict[str, Any], decoder: Any, encoder: Any | None, report: InspectReport
) -> str | None:
    try:
        sample = decoder(raw)
    except DecodingError as exc:
        return f"field {exc.k!r} does not decode: {exc.__cause__!r}"
    images = [v for v in sample.values() if isinstance(v, Image.Image)]
    report.image_sizes.update(image.size for image in images)
    if encoder is None:
        return None
    try:
        encoded = encoder(sample)
    except ValueError as exc:  # SampleError and friends: the message already says what is wrong
        return str(exc).replace(f"sample {raw['__url__']}:{raw['__key__']}: ", "")
    except Exception as exc:  # an encoder bug on this sample is still a finding, not a crash of the report
        return f"encoder failed: {type(exc).__name__}: {exc}"
    report.lengths.append(encoded.num_tokens)
    return None


def length_histogram(lengths: Sequence[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) bins covering `lengths`, low inclusive, high exclusive.

    Up to `bins` equal-width bins when the longest sample is at most 8x the shortest, else power-of-two edges.
    """
    if not lengths:
        return []
    low, top = min(lengths), max(lengths)
    if top <= 8 * max(low, 1):
        width = max(1, math.ceil((top - low + 1) / bins))
        edges = [low + width * i for i in range(math.ceil((top - low + 1) / width) + 1)]
    else:
        edges = [0] + [2**k for k in range(math.ceil(math.log2(top + 1)) + 1)]
    counts = Counter(bisect.bisect_right(edges, n) for n in lengths)
    first, last = min(counts), max(counts)
    return [(edges[i - 1], edges[i], counts.get(i, 0)) for i in range(first, last + 1)]


def _print_report(report: InspectReport, max_tokens: int | None, console: Console) -> None:
    console.print(f"shards: {len(report.shards)}   samples: {report.samples}   bad: {len(report.bad)}")
    console.print("fields: " + ", ".join(f"{k}={v}" for k, v in sorted(report.fields.items())))
    if report.image_sizes:
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in report.image_sizes.most_common(3))
        console.print(f"images: {sum(report.image_sizes.values())}, most common sizes {common}")
    if report.lengths:
        ordered = sorted(report.lengths)
        mean = sum(ordered) / len(ordered)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        console.print(
            f"tokens per sample (text + image): min {ordered[0]}  mean {mean:.1f}  "
            f"p50 {ordered[len(ordered) // 2]}  p95 {p95}  max {ordered[-1]}  total {sum(ordered)}"
        )
        if max_tokens is not None:
            over = sum(n > max_tokens for n in ordered)
            console.print(
                f"longer than --max-tokens {max_tokens}: {over} sample(s) (the packer cannot place them)"
            )
        table = Table(title="token length histogram")
        for column in ("tokens", "samples", "share", ""):
            table.add_column(column, justify="right" if column else "left")
        peak = max(count for _, _, count in length_histogram(ordered))
        for low, high, count in length_histogram(ordered):
            bar = "█" * round(30 * count / peak)
            table.add_row(
                f"{low}" if high == low + 1 else f"{low}-{high - 1}",
                str(count),
                f"{100 * count / len(ordered):.1f}%",
                bar,
            )
        console.print(table)
    if report.bad:
        console.print(f"bad samples ({len(report.bad)}):")
        for shard, key, reason in report.bad[:_SHOWN_PROBLEMS]:
            console.print(f"  {shard} {key}: {reason}")
        if len(report.bad) > _SHOWN_PROBLEMS:
            console.print(f"... and {len(report.bad) - _SHOWN_PROBLEMS} more bad sample(s)")


def _plot(lengths: Sequence[int], path: Path, console: Console) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        console.print(
            f"--plot skipped: matplotlib is not installed (pip install matplotlib); {path} not written"
        )
        return
    if not lengths:
        console.print(f"--plot skipped: no encoded samples; {path} not written")
        return
    figure, axes = plt.subplots(figsize=(6, 3.5))
    bins = length_histogram(lengths)
    unit = all(high == low + 1 for low, high, _ in bins)
    edges = [low for low, _, _ in bins] + [bins[-1][1]]
    axes.hist(lengths, bins=[e - 0.5 for e in edges] if unit else edges)
    if bins[-1][1] > 16 * max(1, bins[0][0]):
        axes.set_xscale("symlog")
    axes.set_xlabel("tokens per sample (text + image)")
    axes.set_ylabel("samples")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    console.print(f"histogram plot written to {path}")


def run_inspect(args: argparse.Namespace) -> int:
    """Print sample count, field counts, token-length histogram and bad samples; exit 1 if any are bad."""
    console = _console()
    shards = expand_shards(args.shards)
    encoder, which = build_encoder(args)
    console.print(which)
    report = inspect_shards(shards, encoder, args.limit)
    _print_report(report, args.max_tokens, console)
    if args.plot:
        _plot(report.lengths, Path(args.plot), console)
    return 1 if report.bad else 0


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loneforge data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="write the embedded demo shards and print the text-only ceiling")
    demo.add_argument(
        "--out", default=None, help="folder (default: $LONEFORGE_CACHE or ~/.cache/lightning_loneforge)"
    )
    demo.add_argument("--n-train", type=int, default=20_000)
    demo.add_argument("--n-val", type=int, default=1_000)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=run_demo)

    shard = commands.add_parser("shard", help="turn a JSONL manifest plus image files into WebDataset shards")
    shard.add_argument(
        "--manifest", required=True, help='JSONL: {"image": path, "conversations": [...]} per line'
    )
    shard.add_argument("--out", required=True, help="output folder")
    shard.add_argument(
        "--image-root", default=None, help="folder relative image paths start from (default: the manifest's)"
    )
    shard.add_argument("--prefix", default="shard", help="shard file prefix (default: shard)")
    shard.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most")
    shard.add_argument("--max-size", type=int, default=1_000_000_000, help="bytes per shard at most")
    shard.add_argument(
        "--skip-bad", action="store_true", help="skip (count and report) bad lines instead of failing"
    )
    shard.set_defaults(run=run_shard)

    inspect = commands.add_parser(
        "inspect", help="count samples and fields, histogram token lengths, list bad samples"
    )
    inspect.add_argument("shards", nargs="+", help="shard paths, folders, globs or brace patterns")
    inspect.add_argument(
        "--max-tokens", type=int, default=None, help="report samples longer than this budget"
    )
    inspect.add_argument("--limit", type=int, default=None, help="inspect at most this many samples")
    inspect.add_argument(
        "--model", default=None, help="count tokens with this zoo row's encoder (e.g. tiny-demo)"
    )
    inspect.add_argument(
        "--tokenizer", default=None, help=f"import path of a tokenizer class (default {_DEFAULT_TOKENIZER})"
    )
    inspect.add_argument(
        "--patch-size", type=int, default=14, help="vision patch size without --model (default 14)"
    )
    inspect.add_argument(
        "--merge-size", type=int, default=2, help="patch merge size without --model (default 2)"
    )
    inspect.add_argument("--plot", default=None, help="write a length histogram PNG (needs matplotlib)")
    inspect.set_defaults(run=run_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `loneforge data ...`; returns the exit status (2 on a usage or input error)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except (ToolError, FileExistsError) as exc:
        _err_console().print(f"loneforge data {args.command}: error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
