"""Telemetry building blocks: what a batch is worth, the numbers behind the pictures, the summary table."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from rich.console import Console

from lightning_loneforge.telemetry import (
    BatchFlops,
    DataPictures,
    batch_flops,
    histogram_image,
    picture_numbers,
    real_tokens_in,
    samples_in,
    save_histogram,
    summary_table,
)
from tests.test_telemetry_run import ROW, packed_row


class StatesPerBatch:
    def __init__(self) -> None:
        self.calls = 0

    def flops_per_batch(self, batch: object) -> dict[str, float]:
        self.calls += 1
        return {"llm": 60.0, "vision": 30.0, "projector": 10.0, "attention": 25.0, "total": 125.0}


class StatesPerToken:
    def flops_per_token(self) -> float:
        return 6.0


def test_packed_batch_counts_samples_and_real_tokens() -> None:
    row = packed_row(3)
    assert samples_in(row) == row.num_samples > 0
    assert real_tokens_in(row) == row.num_real_tokens < ROW  # padding excluded


def test_plain_batches_count_their_leading_dimension() -> None:
    batch = [torch.zeros(4, 10, dtype=torch.long), torch.zeros(4)]
    assert samples_in(batch) == 4 and real_tokens_in(batch) == 40
    assert samples_in({"x": torch.zeros(3, 2)}) == 3
    assert samples_in("no tensors") == 1


def test_flops_split_attention_from_the_6n_part() -> None:
    row = packed_row(1)
    assert batch_flops(StatesPerBatch(), row) == BatchFlops(dense=100.0, attention=25.0)
    per_token = batch_flops(StatesPerToken(), packed_row(2))
    assert per_token == BatchFlops(dense=6.0 * packed_row(2).num_real_tokens, attention=0.0)
    assert batch_flops(object(), packed_row(4)) is None


def test_flops_are_computed_once_per_batch() -> None:
    model, row = StatesPerBatch(), packed_row(5)
    batch_flops(model, row)
    batch_flops(model, row)
    assert model.calls == 1
    batch_flops(model, packed_row(6))
    assert model.calls == 2


def test_picture_numbers() -> None:
    numbers = picture_numbers(list(range(1, 11)), [0.5, 1.0], [1.0, 3.0])
    assert numbers["data/sample_length_p50"] == pytest.approx(5.5)
    assert numbers["data/sample_length_p90"] == pytest.approx(9.1)
    assert numbers["data/sample_length_max"] == 10
    assert numbers["data/pack_fill_mean"] == 0.75 and numbers["data/pack_fill_min"] == 0.5
    assert numbers["data/rank_cost_max_over_mean"] == pytest.approx(1.5)
    assert picture_numbers([], [], []) == {}


def test_data_pictures_rejects_zero_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        DataPictures(steps=0)


def test_summary_table_says_na_for_unknown_numbers() -> None:
    console = Console(record=True, width=100)
    console.print(summary_table({"tokens_seen": 12345.0, "mfu": 0.4321, "skipped_too_long": 2.0}))
    text = console.export_text()
    assert "12,345" in text and "43.2%" in text and "too_long" in text
    assert text.count("n/a") == 8  # every other row of the table


def test_histogram_bars_are_as_tall_as_their_counts(tmp_path) -> None:
    bins = [(0, 1, 0), (1, 2, 4), (2, 4, 2)]
    path = save_histogram(bins, tmp_path / "plots" / "lengths.png", "lengths")
    image = Image.open(path).convert("RGB")
    assert image.size == histogram_image(bins, "lengths").size
    width, height = image.size
    bottom = height - 48 - 1

    def bar_height(index: int) -> int:
        x = int(48 + (index + 0.5) * (width - 24 - 48) / len(bins))
        return sum(1 for y in range(bottom, 0, -1) if image.getpixel((x, y)) == (70, 110, 180))

    assert bar_height(0) == 0
    assert bar_height(1) > 100
    assert abs(bar_height(2) - bar_height(1) / 2) <= 2
    with pytest.raises(ValueError, match="no bins"):
        histogram_image([], "empty")
