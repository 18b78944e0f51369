"""SampleEncoder: Qwen2-VL image processing and M-RoPE against transformers, labels, sample formats, errors."""

from __future__ import annotations

import functools
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_loneforge.datamodules.batch import IGNORE_INDEX
from lightning_loneforge.datamodules.encoder import SampleEncoder, SampleError, mrope_positions, smart_resize
from tests.test_data_fixtures import encoder, tokenizer


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


@pytest.mark.parametrize("size", [(448, 448), (300, 200), (57, 91), (1000, 700)])
def test_pixel_values_and_grid_match_transformers_qwen2vl_processor(size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = _image(*size)
    min_pixels, max_pixels = 56 * 56, 28 * 28 * 256
    reference = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(
        images=[image], return_tensors="np"
    )
    enc = SampleEncoder(tokenizer(), min_pixels=min_pixels, max_pixels=max_pixels)
    patches, grid = enc.patchify([image])
    assert grid.tolist() == reference["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(patches.numpy(), reference["pixel_values"], atol=2e-5, rtol=0)
    h, w = smart_resize(size[1], size[0], 28, min_pixels, max_pixels)
    assert enc.image_tokens(size[1], size[0]) == (h // 14) * (w // 14) // 4 == int(grid.prod()) // 4


def test_mrope_positions_match_transformers_get_rope_index():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2)))
    fake.get_vision_position_ids = functools.partial(Qwen2VLModel.get_vision_position_ids, fake)
    image_id, video_id = 7, 8
    grids = torch.tensor([[1, 4, 6], [2, 4, 4], [1, 2, 2]])
    ids, types = [1, 2, 3], [0, 0, 0]
    for kind, (t, h, w) in zip((image_id, video_id, image_id), grids.tolist(), strict=True):
        n = t * h * w // 4
        ids += [kind] * n + [4, 5]
        types += [1 if kind == image_id else 2] * n + [0, 0]
    input_ids = torch.tensor(ids)
    reference, _ = Qwen2VLModel.get_rope_index(
        fake,
        input_ids[None],
        torch.tensor(types)[None],
        image_grid_thw=grids[[0, 2]],
        video_grid_thw=grids[[1]],
    )
    ours = mrope_positions(input_ids, (image_id, video_id), grids, merge_size=2)
    assert torch.equal(ours, reference[:, 0])


def _png(width: int = 56, height: int = 56) -> Image.Image:
    buffer = io.BytesIO()
    _image(width, height).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_llava_conversation_labels_only_assistant_answers():
    tok = tokenizer()
    enc = encoder(mrope=True)
    sample = {
        "__key__": "k0",
        "json": {
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is in the image"},
                {"from": "gpt", "value": "a red square"},
                {"from": "human", "value": "and the sky"},
                {"from": "gpt", "value": "blue"},
            ]
        },
        "png": _png(),
    }
    out = enc(sample)
    text = tok.decode(out.input_ids.tolist())
    assert text.count("<|image_pad|>") == 4 and out.num_images == 1 and out.num_patches == 16
    labelled = out.labels[out.labels != IGNORE_INDEX].tolist()
    assert tok.decode(labelled) == tok.decode(tok.encode("a red square<|im_end|>blue<|im_end|>"))
    assert out.position_ids.shape == (3, out.num_tokens)
    assert out.input_ids.tolist()[:3] == tok.encode("<|im_start|>user\n")


def test_text_only_is_fully_labelled_and_multi_image_numbered_keys():
    tok = tokenizer()
    out = encoder()({"__key__": "t", "txt": "the cat and the dog"})
    assert torch.equal(out.labels, out.input_ids) and out.pixel_values is None
    assert out.position_ids.tolist() == list(range(out.num_tokens))
    two = encoder()(
        {
            "__key__": "m",
            "json": {
                "conversations": [
                    {"from": "user", "value": "<image> <image> this"},
                    {"from": "assistant", "value": "it"},
                ]
            },
            "0.jpg": _png(56, 56),
            "1.jpg": _png(112, 56),
        }
    )
    assert two.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 8]]
    assert tok.decode(two.input_ids.tolist()).count("<|image_pad|>") == 4 + 8


def test_video_frames_and_vla_arrays():
    frames = np.random.default_rng(0).integers(0, 255, (5, 56, 56, 3), dtype=np.uint8)
    sample = {
        "__key__": "v",
        "json": {
            "conversations": [{"from": "human", "value": "<video>\nwhat"}, {"from": "gpt", "value": "a dog"}]
        },
        "frames.npy": frames,
        "actions.npy": np.zeros((4, 7), dtype=np.float32),
        "proprio.npy": np.ones(8, dtype=np.float32),
    }
    out = encoder(mrope=True)(sample)
    assert out.image_grid_thw.tolist() == [[3, 4, 4]]  # 5 frames padded to 6, temporal pairs
    assert out.pixel_values.shape == (3 * 16, 3 * 2 * 14 * 14)
    assert (out.input_ids == encoder().video_token_id).sum() == 3 * 4
    assert out.actions.shape == (4, 7) and out.proprio.shape == (8,)


def test_bad_samples_name_the_shard_key_and_field():
    enc = encoder()
    with pytest.raises(SampleError, match=r"shard-3.tar:k9: no 'json'") as err:
        enc({"__key__": "k9", "__url__": "shard-3.tar", "cls": 1})
    assert err.value.reason == "missing_field"
    with pytest.raises(SampleError, match="more <image> placeholders") as err:
        enc(
            {
                "__key__": "k",
                "json": {
                    "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]
                },
            }
        )
    with pytest.raises(SampleError, match="field 'png' is not a decoded image"):
        enc(
            {
                "__key__": "k",
                "json": json.dumps(
                    {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "a"}]}
                ),
                "png": b"xx",
            }
        )
    with pytest.raises(SampleError, match="no assistant answer"):
        enc({"__key__": "k", "json": {"conversations": [{"from": "human", "value": "a"}]}})


def test_encoder_needs_single_id_special_tokens():
    class Chars:
        vocab_size = 256

        def encode(self, text):
            return [ord(c) % 256 for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    with pytest.raises(ValueError, match="one id"):
        SampleEncoder(Chars())
