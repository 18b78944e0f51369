"""The demo tokenizer and the demo shape-question generator."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from lightning_loneforge.datamodules.demo_data import (
    COLOURS,
    NUMBER_WORDS,
    DemoSpec,
    iter_samples,
    text_only_ceiling,
    write_demo_shards,
)
from lightning_loneforge.datamodules.tokenizer import SPECIAL_TOKENS, DemoTokenizer, WordTokenizer

CHAT = (
    "<|im_start|>system\nyou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>\n"
    "what colour is the triangle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_special_strings_are_single_ids_anywhere_in_text() -> None:
    tok = DemoTokenizer()
    ids = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert tok.pad_id == tok.token_to_id("<|endoftext|>") == 0
    assert tok.unk_id == tok.token_to_id("<unk>")
    for special in SPECIAL_TOKENS:
        assert tok.encode(f"red{special}blue") == [
            tok.token_to_id("red"),
            tok.token_to_id(special),
            tok.token_to_id("blue"),
        ]
    assert tok.encode("<|image_pad|>" * 3) == [tok.token_to_id("<|image_pad|>")] * 3
    assert tok.encode("\n") == [tok.token_to_id("\n")]


def test_chat_round_trip_and_word_level_split() -> None:
    tok = DemoTokenizer()
    ids = tok.encode(CHAT)
    assert tok.decode(ids) == CHAT
    assert tok.tokenize("What COLOUR is it? 42") == ["what", "colour", "is", "it", "?", "4", "2"]
    assert tok.decode(tok.encode("shapes, (left) 12 and 3.")) == "shapes, (left) 12 and 3."
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_unknown_words_and_bad_ids() -> None:
    tok = DemoTokenizer()
    assert tok.encode("zebra wörld red") == [tok.unk_id, tok.unk_id, tok.token_to_id("red")]
    assert tok.decode(tok.encode("zebra!")) == "<unk>!"
    assert tok.decode(tok.encode(CHAT), skip_special_tokens=True).startswith("system\nyou are")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(KeyError, match="zebra"):
        tok.token_to_id("zebra")
    with pytest.raises(ValueError, match="lowercase"):
        WordTokenizer(["Red"])


def test_save_load_and_from_texts(tmp_path: Path) -> None:
    tok = WordTokenizer.from_texts(["The quick brown fox.", "the lazy dog"])
    assert tok.words == ["the", "quick", "brown", "fox", "lazy", "dog"]
    tok.save(tmp_path)
    loaded = WordTokenizer.load(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode("the lazy fox\n<|im_end|>") == tok.encode("the lazy fox\n<|im_end|>")
    (tmp_path / "vocab.json").write_text(json.dumps({"words": []}))
    with pytest.raises(ValueError, match="special_tokens"):
        WordTokenizer.load(tmp_path)


def test_demo_vocabulary_covers_every_question_and_answer() -> None:
    tok = DemoTokenizer()
    for sample in iter_samples("train", 300, DemoSpec()):
        for turn in json.loads(sample["json"])["conversations"]:
            text = turn["value"].replace("<image>", "")
            assert tok.unk_id not in tok.encode(text), text


# ---------------------------------------------------------------------------------------------- generator


def _nearest_colour(rgb: tuple[int, int, int]) -> str:
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, COLOURS[name], strict=True)))


def test_answers_match_the_rendered_image() -> None:
    kinds = set()
    for sample in iter_samples("val", 200, DemoSpec(seed=3)):
        image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        assert image.size == (64, 64)
        meta = json.loads(sample["json"])
        objects = meta["objects"]
        assert 2 <= len(objects) <= 3
        assert len({o["shape"] for o in objects}) == len({o["colour"] for o in objects}) == len(objects)
        for obj in objects:
            centre = image.getpixel((obj["x"], obj["y"]))
            assert _nearest_colour(centre) == obj["colour"], (sample["__key__"], obj, centre)
        background = image.getpixel((0, 0))
        assert max(background) - min(background) == 0  # plain grey
        human, gpt = meta["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        question, answer = human["value"].split("\n", 1)[1], gpt["value"]
        kinds.add(meta["question_type"])
        if meta["question_type"] == "colour":
            shape = question.removeprefix("what colour is the ").removesuffix("?")
            assert answer == next(o["colour"] for o in objects if o["shape"] == shape)
        elif meta["question_type"] == "shape":
            colour = question.removeprefix("what shape is ").removesuffix("?")
            assert answer == next(o["shape"] for o in objects if o["colour"] == colour)
        else:
            assert answer == NUMBER_WORDS[len(objects)]
    assert kinds == {"colour", "shape", "count"}


def test_generation_is_deterministic_and_splits_differ() -> None:
    first = list(iter_samples("train", 20, DemoSpec(seed=1)))
    assert first == list(iter_samples("train", 20, DemoSpec(seed=1)))
    assert [s["png"] for s in first] != [s["png"] for s in iter_samples("train", 20, DemoSpec(seed=2))]
    assert [s["png"] for s in first] != [s["png"] for s in iter_samples("val", 20, DemoSpec(seed=1))]


def test_write_demo_shards_is_complete_atomic_and_cached(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    shards = write_demo_shards(out, n_train=50, n_val=12, seed=0, samples_per_shard=20)
    assert [p.name for p in shards.train] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    # validation is cut into up to VAL_SHARDS shards (12 samples -> 2 per shard) so every rank gets some
    assert [p.name for p in shards.val] == [f"val-{i:06d}.tar" for i in range(6)]
    with tarfile.open(shards.train[2]) as tar:
        assert sorted(tar.getnames()) == sorted(
            f"train-{i:07d}.{ext}" for i in range(40, 50) for ext in ("json", "png")
        )
    assert not list(tmp_path.glob(".*tmp*"))
    digest = [p.read_bytes() for p in shards.train]

    stamp = shards.train[0].stat().st_mtime_ns
    again = write_demo_shards(out, n_train=50, n_val=12, seed=0, samples_per_shard=20)
    assert (
        again.train == shards.train and shards.train[0].stat().st_mtime_ns == stamp
    )  # reused, not rewritten

    other = write_demo_shards(tmp_path / "other", n_train=50, n_val=12, seed=0, samples_per_shard=20)
    assert [p.read_bytes() for p in other.train] == digest  # byte-identical
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_shards(out, n_train=51, n_val=12, seed=0, samples_per_shard=20)

    shards.train[1].write_bytes(b"truncated")  # a damaged set is regenerated, not trusted
    repaired = write_demo_shards(out, n_train=50, n_val=12, seed=0, samples_per_shard=20)
    assert [p.read_bytes() for p in repaired.train] == digest

    (out / "demo.json").unlink()  # foreign files are never overwritten
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_shards(out, n_train=50, n_val=12, seed=0, samples_per_shard=20)


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    from lightning_loneforge.datamodules import demo_data

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "_write_split", fail)
    with pytest.raises(KeyboardInterrupt):
        write_demo_shards(tmp_path / "demo", n_train=5, n_val=5)
    assert list(tmp_path.iterdir()) == []


def test_text_only_ceiling_counts_the_best_answer_per_question(tmp_path: Path) -> None:
    shards = write_demo_shards(tmp_path, n_train=600, n_val=300, seed=0)
    ceiling = text_only_ceiling(shards.root, shards.root)
    assert 0.15 < ceiling < 0.4

    rng = random.Random(0)

    def write(path: Path, pairs: list[tuple[str, str]]) -> None:
        with tarfile.open(path, "w") as tar:
            for i, (q, a) in enumerate(pairs):
                data = json.dumps(
                    {
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{q}"},
                            {"from": "gpt", "value": a},
                        ]
                    }
                )
                info = tarfile.TarInfo(f"{i:04d}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data.encode()))

    train = [("q1", "a")] * 3 + [("q1", "b")] + [("q2", "c")] * 2
    val = [("q1", "a"), ("q1", "b"), ("q2", "c"), ("q3", "a")]
    rng.shuffle(train)
    write(tmp_path / "t.tar", train)
    write(tmp_path / "v.tar", val)
    assert text_only_ceiling(tmp_path / "t.tar", [tmp_path / "v.tar"]) == pytest.approx(3 / 4)


# ---------------------------------------------------------------------------------------------- datamodule


def test_demo_datamodule_generates_once_and_streams_packed_batches(tmp_path: Path, monkeypatch) -> None:
    from lightning_loneforge.datamodules.batch import IGNORE_INDEX
    from lightning_loneforge.datamodules.demo_data import DemoDataModule, default_demo_dir
    from lightning_loneforge.datamodules.encoder import SampleEncoder

    monkeypatch.setenv("LONEFORGE_CACHE", str(tmp_path / "cache"))
    tok = DemoTokenizer()
    dm = DemoDataModule(n_train=64, n_val=16, max_tokens=128, num_workers=0, encoder=SampleEncoder(tok))
    assert (
        dm.data_dir == default_demo_dir(DemoSpec(n_train=64, n_val=16))
        and dm.data_dir.parent == tmp_path / "cache"
    )
    dm.prepare_data()
    stamp = (dm.data_dir / "demo.json").stat().st_mtime_ns
    dm.setup("fit")
    assert (dm.data_dir / "demo.json").stat().st_mtime_ns == stamp  # setup reuses what prepare_data wrote
    assert dm.train_shards == [str(dm.data_dir / "train-000000.tar")]

    image_pad = tok.token_to_id("<|image_pad|>")
    answers = set(COLOURS) | {"circle", "square", "triangle", "star", "cross"} | set(NUMBER_WORDS.values())
    samples = 0
    for batch in dm.train_dataloader():
        assert batch.num_tokens <= 128
        assert (
            int((batch.input_ids == image_pad).sum()) == 4 * batch.num_samples
        )  # 64x64 -> 56x56 -> 2x2 tokens
        assert batch.pixel_values.shape[0] == 16 * batch.num_samples
        for start, end in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(), strict=True):
            labels = batch.labels[start:end]
            assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) in {f"{a}<|im_end|>" for a in answers}
        samples += batch.num_samples
    assert samples == 64
    assert sum(b.num_samples for b in dm.val_dataloader()) == 16
    assert 0.0 < dm.text_only_ceiling() < 0.6


def test_demo_datamodule_is_selectable_by_class_path(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    init = {
        "data_dir": str(tmp_path),
        "max_tokens": 256,
        "balance": True,
        "min_shapes": 3,
        "n_train": 8,
        "n_val": 4,
    }
    config = parser.parse_object(
        {
            "data": {
                "class_path": "lightning_loneforge.datamodules.demo_data.DemoDataModule",
                "init_args": init,
            }
        }
    )
    dm = parser.instantiate_classes(config).data
    assert (dm.max_tokens, dm.balance, dm.data_dir) == (256, True, tmp_path)
    with tarfile.open(dm.demo_shards().train[0]) as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    assert len(metas) == 8 and all(len(meta["objects"]) == 3 for meta in metas)
