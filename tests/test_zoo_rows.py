"""Every zoo row builds on the meta device with its published parameter count (within 1%); listing; YAMLs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_loneforge.model_zoo import ModelConfig, name_to_config
from lightning_loneforge.model_zoo.listing import main
from lightning_loneforge.model_zoo.model import build_on_meta, count_params, tower_support

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(name_to_config))
def test_row_builds_on_meta_with_published_size(name):
    config = ModelConfig.from_name(name)
    reason = tower_support(config)
    if reason is not None:
        pytest.skip(reason)
    model = build_on_meta(config)
    assert all(p.is_meta for p in model.parameters())
    for tower in model.towers().values():
        blocks = getattr(tower, "blocks", None)
        assert blocks is None or len(blocks) > 0
    if config.published_params is None:
        assert name.startswith("tiny-"), "only tiny rows may lack a published size"
        return
    params = count_params(model)
    tolerance = config.params_tolerance * config.published_params
    assert abs(params - config.published_params) <= tolerance, (params, config.published_params)


def test_table_has_the_issue_rows():
    published = [n for n, c in name_to_config.items() if c.published_params]
    assert len(published) >= 20
    for family in ("qwen2_vl", "qwen2_5_vl", "llava", "llava_onevision", "internvl", "idefics3", "paligemma"):
        assert any(c.family == family for c in name_to_config.values()), family


def test_overrides_and_unknown_names():
    config = ModelConfig.from_name("qwen2-vl-2b", text={"num_layers": 2}, vision={"num_layers": 1})
    assert config.text.num_layers == 2 and config.vision.num_layers == 1
    assert name_to_config["qwen2-vl-2b"].text.num_layers == 28
    with pytest.raises(ValueError, match="unknown model"):
        ModelConfig.from_name("qwen9")
    with pytest.raises(ValueError, match="no field 'layers'"):
        ModelConfig.from_name("tiny-demo", text={"layers": 2})


def test_listing_json(capsys):
    assert main(["--json", "qwen2-vl-2b", "tiny-demo"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["qwen2-vl-2b", "tiny-demo"]
    assert rows[0]["params"] == 2_208_985_600 and rows[0]["family"] == "qwen2_vl"
    assert set(rows[0]["towers"]) == {"vision", "projector", "llm"}


@pytest.mark.parametrize("name", sorted(name_to_config))
def test_every_row_has_a_yaml(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.is_file(), path
    model = yaml.safe_load(path.read_text())["model"]
    assert model["class_path"] == "lightning_loneforge.model_zoo.MultimodalModule"
    assert model["init_args"]["model"] == name
