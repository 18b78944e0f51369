"""Histogram pictures drawn with Pillow alone (no matplotlib), for W&B images and `--plot` files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

Bins = Sequence[tuple[int, int, int]]
"""(low, high, count) per bin, low inclusive, high exclusive (as `datamodules.tools.length_histogram` gives)."""

_WIDTH, _HEIGHT, _MARGIN = 640, 360, 48


def histogram_image(bins: Bins, title: str, x_label: str = "tokens per sample") -> Image.Image:
    """A bar chart of `bins`: one bar per bin, its range under it and its count above it.

    Raises:
        ValueError: when `bins` is empty.
    """
    if not bins:
        raise ValueError(f"histogram_image({title!r}): no bins to draw")
    image = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((_MARGIN, 12), title, fill="black")
    left, right, top, bottom = _MARGIN, _WIDTH - _MARGIN // 2, 2 * _MARGIN // 2 + 12, _HEIGHT - _MARGIN
    draw.line([(left, bottom), (right, bottom)], fill="black")
    peak = max(count for _, _, count in bins) or 1
    slot = (right - left) / len(bins)
    for index, (low, high, count) in enumerate(bins):
        x0 = left + index * slot + 2
        x1 = left + (index + 1) * slot - 2
        y0 = bottom - (bottom - top) * count / peak
        draw.rectangle([(x0, y0), (x1, bottom)], fill=(70, 110, 180))
        draw.text((x0, y0 - 12), str(count), fill="black")
        label = str(low) if high == low + 1 else f"{low}-{high - 1}"
        if len(bins) <= 12 or index % 2 == 0:
            draw.text((x0, bottom + 4), label, fill="black")
    draw.text((left, _HEIGHT - 18), x_label, fill="black")
    return image


def save_histogram(bins: Bins, path: str | Path, title: str, x_label: str = "tokens per sample") -> Path:
    """Write `histogram_image(bins, ...)` to `path` (format from its suffix, e.g. `.png`) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    histogram_image(bins, title, x_label).save(path)
    return path
