"""`WordTokenizer`: a small, real word-level tokenizer with Qwen2-VL chat-template special tokens.

Text is lowercased and split into words (runs of letters), single digits, single punctuation characters and
newlines; other whitespace only separates tokens. The special strings (`<|im_start|>`, `<|image_pad|>`, ...)
are recognised anywhere in the text and map to one id each. Unknown words map to `<unk>`.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    UNK_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Special tokens in id order: the pad token is id 0, `<unk>` id 1."""

NEWLINE = "\n"
DIGITS: tuple[str, ...] = tuple(string.digits)
PUNCTUATION: tuple[str, ...] = tuple(string.punctuation)
_OPENING = set("([{<")
_NO_SPACE_AFTER = _OPENING | set("\"'#$@/-")
_VOCAB_FILE = "vocab.json"

DEMO_WORDS: tuple[str, ...] = (
    # chat template roles and the default Qwen2-VL system prompt
    "system", "user", "assistant", "you", "are", "a", "helpful",
    # demo questions and answers
    "what", "colour", "color", "is", "the", "shape", "shapes", "how", "many", "there", "in", "image",
    "which", "of", "this", "picture", "one", "two", "three", "four", "five", "six",
    "circle", "square", "triangle", "star", "cross",
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "gray",
    "yes", "no", "and", "or", "it", "on", "left", "right", "top", "bottom", "big", "small",
)  # fmt: skip
"""Vocabulary of the embedded demo task (see `demo_data.py`), plus the chat template's words."""


def _token_pattern(special_tokens: Sequence[str]) -> re.Pattern[str]:
    specials = "|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
    return re.compile(rf"({specials})|([^\W\d_]+)|(\d)|(\n)|([^\w\s]|_)")


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary: special tokens, newline, digits, punctuation, words.

    Args:
        words: The word list (lowercase letters only; duplicates and words already in the vocabulary are dropped).
        special_tokens: Strings that map to one id each wherever they appear in the text.
            The first is the padding token, the second the unknown token.

    Raises:
        ValueError: If a word is not lowercase letters or the special tokens are fewer than two.
    """

    def __init__(self, words: Iterable[str], special_tokens: Sequence[str] = SPECIAL_TOKENS) -> None:
        if len(special_tokens) < 2:
            raise ValueError("special_tokens needs at least the padding and the unknown token")
        self.special_tokens: tuple[str, ...] = tuple(special_tokens)
        vocab: list[str] = [*self.special_tokens, NEWLINE, *DIGITS, *PUNCTUATION]
        seen = set(vocab)
        self.words: list[str] = []
        for word in words:
            if not re.fullmatch(r"[a-z]+", word):
                raise ValueError(f"word {word!r} is not lowercase letters a-z only")
            if word not in seen:
                seen.add(word)
                vocab.append(word)
                self.words.append(word)
        self._id_to_token = vocab
        self._token_to_id = {token: index for index, token in enumerate(vocab)}
        self._pattern = _token_pattern(self.special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry (a special string, a word, a digit, a punctuation character or "\\n").

        Raises:
            KeyError: If the token is not in the vocabulary.
        """
        try:
            return self._token_to_id[token]
        except KeyError:
            raise KeyError(f"{token!r} is not in the vocabulary of {type(self).__name__}") from None

    def id_to_token(self, index: int) -> str:
        return self._id_to_token[index]

    def tokenize(self, text: str) -> list[str]:
        """Split text into vocabulary strings (unknown words stay as they are)."""
        tokens = []
        for match in self._pattern.finditer(text):
            special, word, digit, newline, other = match.groups()
            tokens.append(special or (word or digit or newline or other).lower())
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; unknown words and characters become `<unk>`."""
        unk = self.unk_id
        return [self._token_to_id.get(token, unk) for token in self.tokenize(text)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: words are separated by one space, punctuation sticks to the word before it.

        Raises:
            ValueError: If an id is outside the vocabulary.
        """
        pieces: list[str] = []
        previous = ""
        specials = set(self.special_tokens)
        for index in ids:
            index = int(index)
            if not 0 <= index < self.vocab_size:
                raise ValueError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
            token = self._id_to_token[index]
            if token in specials and (skip_special_tokens and token != UNK_TOKEN):
                continue
            if pieces and self._space_between(previous, token, specials):
                pieces.append(" ")
            pieces.append(token)
            previous = token
        return "".join(pieces)

    @staticmethod
    def _space_between(previous: str, token: str, specials: set[str]) -> bool:
        word_like = token[0].isalnum() or token == UNK_TOKEN
        if not (word_like or token in _OPENING) or previous == NEWLINE or previous in _NO_SPACE_AFTER:
            return False
        if previous in specials and previous != UNK_TOKEN:
            return False
        return not (previous.isdigit() and token.isdigit())

    def save(self, directory: str | Path) -> Path:
        """Write the vocabulary to `directory/vocab.json` and return its path."""
        path = Path(directory) / _VOCAB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"special_tokens": list(self.special_tokens), "words": self.words}
        path.write_text(json.dumps(payload, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> WordTokenizer:
        """Read a tokenizer written by `save`.

        Raises:
            ValueError: If the file lacks the `words` or `special_tokens` field.
        """
        path = Path(directory) / _VOCAB_FILE
        payload = json.loads(path.read_text())
        missing = [key for key in ("words", "special_tokens") if key not in payload]
        if missing:
            raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
        return WordTokenizer(payload["words"], payload["special_tokens"])

    @classmethod
    def from_texts(
        cls, texts: Iterable[str], special_tokens: Sequence[str] = SPECIAL_TOKENS
    ) -> WordTokenizer:
        """A tokenizer whose words are every word found in `texts`, in order of first appearance."""
        words = re.compile(r"[a-z]+")
        return cls((w for text in texts for w in words.findall(text.lower())), special_tokens)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class DemoTokenizer(WordTokenizer):
    """`WordTokenizer` over the embedded demo task's vocabulary (`DEMO_WORDS`); no arguments needed."""

    def __init__(self) -> None:
        super().__init__(DEMO_WORDS)
