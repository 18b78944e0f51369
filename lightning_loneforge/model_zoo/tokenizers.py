"""Loading a tokenizer from a local folder: HF `tokenizer.json` (via the `tokenizers` package) or our
`WordTokenizer`'s `vocab.json`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


class HFTokenizer:
    """`tokenizers.Tokenizer` behind the small interface `SampleEncoder` uses (`encode`, `decode`, `vocab_size`)."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError(f"{path}: reading tokenizer.json needs the `tokenizers` package (pip install tokenizers)") from err
        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self.pad_id = self._pad_id()

    def _pad_id(self) -> int:
        config = self.path.parent / "tokenizer_config.json"
        if config.is_file():
            pad = json.loads(config.read_text()).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad is not None and self._tok.token_to_id(pad) is not None:
                return int(self._tok.token_to_id(pad))
        return 0

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        index = self._tok.token_to_id(token)
        if index is None:
            raise KeyError(f"{token!r} is not in {self.path}")
        return index

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in `folder` (`tokenizer.json` first, then `vocab.json`), or a `tokenizer.json` path.

    Raises:
        FileNotFoundError: If the folder holds neither file.
    """
    path = Path(folder)
    if path.is_file() and path.name == "tokenizer.json":
        return HFTokenizer(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer(path / "tokenizer.json")
    if (path / "vocab.json").is_file():
        from lightning_loneforge.datamodules.tokenizer import WordTokenizer

        return WordTokenizer.load(path)
    raise FileNotFoundError(f"{path}: no tokenizer.json (HF tokenizers) or vocab.json (WordTokenizer) found")
