"""`--resume auto|PATH` on the command line -> Lightning's `--ckpt_path last|PATH`."""

from __future__ import annotations


def translate_resume_args(argv: list[str]) -> list[str]:
    """Rewrites `--resume auto` as `--ckpt_path last` (with `ReliableCheckpoint`: the newest *complete*
    checkpoint, or a fresh start when there is none) and `--resume PATH` as `--ckpt_path PATH`."""
    out: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--resume" or word.startswith("--resume="):
            value = word.split("=", 1)[1] if "=" in word else next(words, None)
            if not value:
                raise ValueError("--resume needs a value: `auto` or a checkpoint path.")
            out += ["--ckpt_path", "last" if value == "auto" else value]
        else:
            out.append(word)
    return out
