"""Tokenizers from local folders: HF `tokenizer.json` via `tokenizers`, our `vocab.json`; image ids reach the model."""

from __future__ import annotations

import pytest

from lightning_loneforge.model_zoo.module import MultimodalModule
from lightning_loneforge.model_zoo.tokenizers import HFTokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]  # fmt: skip


def _write_hf_tokenizer(folder):
    words = ["what", "colour", "is", "the", "circle", "red", "user", "assistant", "\n"]
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"pad_token": "<|endoftext|>"}')
    return len(vocab)


def test_hf_tokenizer_folder(tmp_path):
    size = _write_hf_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == size and tok.pad_id == 0
    ids = tok.encode("<|im_start|>what is the circle<|image_pad|>")
    assert ids[0] == 2 and ids[-1] == 6 and tok.decode(ids[1:-1]) == "what is the circle"
    module = MultimodalModule("tiny-qwen2-vl", tokenizer=str(tmp_path / "tok"))
    assert module.config.image_token_id == 6 and module.config.video_token_id == 7
    assert module.sample_encoder().image_token_id == 6


def test_word_tokenizer_folder_and_missing_folder(tmp_path):
    from lightning_loneforge.datamodules.tokenizer import DemoTokenizer

    DemoTokenizer().save(tmp_path / "demo")
    assert load_tokenizer(tmp_path / "demo").vocab_size == DemoTokenizer().vocab_size
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    _write_hf_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match="embeds only"):
        MultimodalModule("tiny-qwen2-vl", tokenizer=str(tmp_path / "tok"), overrides={"text": {"vocab_size": 8}})
