"""CPU smoke test of benchmarks/throughput.py: both arms at tiny size for 2 timed steps, so the script cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytest.importorskip("transformers")

import _bench_common as common  # noqa: E402
import throughput  # noqa: E402

REQUIRED = ("device", "baseline_tokens_per_s", "ours_tokens_per_s", "ratio", "ours_mfu", "ours_peak_gib",
            "baseline_peak_gib", "commit")


def test_tiny_run_writes_table_and_json(tmp_path, capsys):
    argv = ["--tiny", "--log-dir", str(tmp_path), "--no-compile", "--video-shares", "0.1", "--samples", "300",
            "--max-tokens", "192", "--baseline-batch", "2", "--baseline-warmup", "1", "--baseline-steps", "2",
            "--ours-warmup", "1", "--ours-steps", "2"]
    summary = throughput.main(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))
    for key in REQUIRED:
        assert key in summary, key
    assert summary["baseline_tokens_per_s"] > 0 and summary["ours_tokens_per_s"] > 0
    assert summary["ratio"] == pytest.approx(summary["ours_tokens_per_s"] / summary["baseline_tokens_per_s"], rel=0.01)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["arm"].split("-")[0] for r in rows] == ["baseline", "ours"]
    assert all("error" not in r for r in rows)
    assert rows[1]["real_slot_share"] <= 1.0 and rows[0]["real_slot_share"] < 1.0  # padding is counted out
    assert "| arm |" in (tmp_path / "table.md").read_text() or "| video_share |" in (tmp_path / "table.md").read_text()


def test_matmul_params_match_the_zoo_row():
    from torch import nn

    from lightning_loneforge.model_zoo.config import ModelConfig
    from lightning_loneforge.model_zoo.model import build_on_meta

    model = build_on_meta(ModelConfig.from_name("qwen2-vl-2b"))
    ours = common.MatmulParams.from_shape(common.QWEN2_VL_2B_TEXT, common.QWEN2_VL_2B_VISION)

    def linear(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

    assert ours.vision_per_patch == linear(model.vision)
    assert ours.merger_per_vision_token == linear(model.projector)
    assert ours.llm_per_token == linear(model.llm.blocks)
    assert ours.head_per_logit == model.llm.output_weight.numel()


def test_synthetic_positions_follow_the_encoder_rule():
    from lightning_loneforge.datamodules.encoder import mrope_positions

    gen = torch.Generator().manual_seed(0)
    for shape in common.sample_stream(40, seed=1, video_share=0.5):
        ids, labels = common.sample_token_ids(shape, gen)
        assert ids.numel() == labels.numel() == shape.tokens
        assert int((ids == common.IMAGE_TOKEN_ID).sum()) == shape.vision_tokens
        grids = torch.tensor(shape.grids) if shape.grids else None
        expected = mrope_positions(ids, [common.IMAGE_TOKEN_ID], grids, 2)
        assert torch.equal(common.sample_mrope_positions(shape), expected)
