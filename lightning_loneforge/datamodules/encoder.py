"""`SampleEncoder`: one decoded WebDataset sample -> one token sequence, exactly as a Qwen2-VL-style model sees it.

Images are resized with Qwen2-VL's `smart_resize`, normalized and cut into patches flattened
`[P, C * temporal_patch * patch * patch]` in 2x2-merge-window order (the layout of transformers'
`Qwen2VLImageProcessor`); each image becomes `t * h * w / merge**2` placeholder tokens. Only assistant answers
(with their `<|im_end|>`) carry labels.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lightning_loneforge.datamodules.batch import IGNORE_INDEX

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant"}
_SYSTEM_ROLES = {"system"}
_PLACEHOLDER = re.compile(r"(<image>|<video>)")


class Tokenizer(Protocol):
    """What the encoder needs from a tokenizer; special-token strings must encode to one id each."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SampleError(ValueError):
    """A sample that cannot be encoded; `reason` is a short counter name (`missing_field`, `bad_image`, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ChatTemplate:
    """Strings of a chat template (Qwen2-VL defaults). Videos use `video_pad` tokens."""

    user_start: str = "<|im_start|>user\n"
    assistant_start: str = "<|im_start|>assistant\n"
    system_start: str = "<|im_start|>system\n"
    turn_end: str = "<|im_end|>\n"
    answer_end: str = "<|im_end|>"
    """The part of `turn_end` that belongs to the labelled answer (the trailing newline is not labelled)."""
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"
    video_pad: str = "<|video_pad|>"


@dataclass
class EncodedSample:
    """One sample as token ids plus its vision patches; the unit the packer moves around."""

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    """`[T]`, or `[3, T]` M-RoPE positions (temporal, height, width) when the encoder has `mrope=True`."""
    key: str
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    actions: Tensor | None = None
    proprio: Tensor | None = None
    source: str = ""
    """Shard the sample came from (for error messages)."""
    index: int = -1
    """Position in its worker's sample stream (what exact resume re-reads buffered samples by)."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])

    @property
    def num_patches(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of `factor`, area within `[min_pixels, max_pixels]`."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def mrope_positions(
    input_ids: Tensor, vision_token_ids: Sequence[int], grids: Tensor | None, merge_size: int
) -> Tensor:
    """`[3, T]` M-RoPE positions of one sample, as transformers' Qwen2-VL `get_rope_index`.

    Text tokens advance all three axes together; the tokens of an image/video (a run of a vision token id,
    `t * h * w / merge**2` long) take `start + (t, h, w)` over the merged grid; text after it resumes at
    `start + max(h, w)` (transformers >= 5; older releases used `max(t, h, w)`, equal for images).
    """
    ids = input_ids.tolist()
    out = torch.empty(3, len(ids), dtype=torch.int64)
    vision = set(vision_token_ids)
    next_pos, i, image = 0, 0, 0
    while i < len(ids):
        if ids[i] not in vision:
            out[:, i] = next_pos
            next_pos += 1
            i += 1
            continue
        if grids is None or image >= grids.shape[0]:
            raise ValueError(
                f"more vision placeholder runs than grids ({0 if grids is None else grids.shape[0]})"
            )
        t, h, w = (int(v) for v in grids[image])
        h, w = h // merge_size, w // merge_size
        n = t * h * w
        tt = torch.arange(t).view(-1, 1, 1).expand(t, h, w).reshape(-1)
        hh = torch.arange(h).view(1, -1, 1).expand(t, h, w).reshape(-1)
        ww = torch.arange(w).view(1, 1, -1).expand(t, h, w).reshape(-1)
        out[:, i : i + n] = torch.stack([tt, hh, ww]) + next_pos
        next_pos += max(h, w)
        i += n
        image += 1
    return out


class SampleEncoder:
    """Encodes one decoded sample dict (LLaVA-style conversation, text, images, video frames, VLA arrays).

    Accepted keys: `json` with `{"conversations": [{"from": "human"|"user", "value": "<image>\\n..."},
    {"from": "gpt"|"assistant", "value": "..."}]}`; `txt`/`text` (or `json["text"]`) for plain text, every
    token labelled; one image under `jpg`/`jpeg`/`png`/`webp` or several under `0.jpg`, `1.jpg`, ...;
    video frames `frames.npy` `[T, H, W, 3]` uint8; `actions.npy`, `proprio.npy` for VLA samples.
    Images without an `<image>` placeholder in the first user turn are put in front of its text.

    Args:
        tokenizer: Any object with `encode`, `decode` and `vocab_size`; chat-template special strings must
            encode to single ids.
        patch_size, temporal_patch_size, merge_size: Vision patching (Qwen2-VL: 14, 2, 2).
        min_pixels, max_pixels: Area bounds for `smart_resize`.
        template: The chat template strings.
        image_mean, image_std: Per-channel normalization.
        max_frames: Videos longer than this are subsampled evenly.
        mrope: Give `[3, T]` M-RoPE positions instead of `[T]`.
        system_prompt: Optional system turn put before every conversation.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        template: ChatTemplate | None = None,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        max_frames: int = 16,
        mrope: bool = False,
        system_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.template = template or ChatTemplate()
        mean = np.asarray(image_mean, dtype=np.float32)
        std = np.asarray(image_std, dtype=np.float32)
        self._scale = (1 / (255 * std)).astype(np.float32)
        self._offset = (mean / std).astype(np.float32)
        self.max_frames = max_frames
        self.mrope = mrope
        self.system_prompt = system_prompt
        self.image_token_id = self._single_id(self.template.image_pad)
        self.video_token_id = self._single_id(self.template.video_pad)

    def _single_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(f"tokenizer must encode {text!r} to one id, got {ids}")
        return ids[0]

    # ---- vision ---------------------------------------------------------------------------------------

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)

    def image_tokens(self, height: int, width: int, frames: int = 1) -> int:
        """LLM tokens an image (or `frames` video frames) of this size becomes."""
        h, w = self.resized_size(height, width)
        t = max(1, math.ceil(frames / self.temporal_patch_size))
        return t * (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2

    def patchify(self, frames: list[Image.Image]) -> tuple[Tensor, Tensor]:
        """Resize, normalize and patch frames of one image/video: `([P, C*tp*p*p], grid [3])`.

        A single image is repeated to `temporal_patch_size` frames; a video is padded with its last frame
        to a multiple of it.
        """
        width, height = frames[0].size
        rh, rw = self.resized_size(height, width)
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        pixels = np.stack(
            [np.asarray(f.convert("RGB").resize((rw, rh), resample=Image.BICUBIC)) for f in frames]
        )
        normalized = pixels.astype(np.float32)
        normalized *= self._scale
        normalized -= self._offset
        order = list(range(len(frames)))
        order += [order[-1]] * (-len(order) % tp)
        if len(frames) == 1:
            x = np.broadcast_to(normalized, (tp, rh, rw, 3))
        else:
            x = normalized[order]
        gt, gh, gw = len(order) // tp, rh // p, rw // p
        x = x.reshape(gt, tp, gh // m, m, p, gw // m, m, p, 3).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
        flat = np.ascontiguousarray(x).reshape(gt * gh * gw, 3 * tp * p * p)
        return torch.from_numpy(flat), torch.tensor([gt, gh, gw], dtype=torch.int64)

    def _video_frames(self, array: np.ndarray, key: str) -> list[Image.Image]:
        if array.ndim != 4 or array.shape[-1] != 3:
            raise SampleError(
                f"sample {key}: frames.npy must be [T, H, W, 3], got {list(array.shape)}", "bad_video"
            )
        if array.shape[0] > self.max_frames:
            array = array[np.linspace(0, array.shape[0] - 1, self.max_frames).round().astype(int)]
        return [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in array]

    # ---- text -----------------------------------------------------------------------------------------

    def _vision_ids(self, kind: str, grid: Tensor) -> list[int]:
        tpl = self.template
        pad = self.image_token_id if kind == "image" else self.video_token_id
        n = int(grid.prod()) // self.merge_size**2
        return self.tokenizer.encode(tpl.vision_start) + [pad] * n + self.tokenizer.encode(tpl.vision_end)

    def _conversation(self, sample: dict[str, Any], key: str) -> list[tuple[str, str]]:
        meta = sample.get("json")
        if isinstance(meta, (bytes, str)):
            meta = json.loads(meta)
        if isinstance(meta, dict) and "conversations" in meta:
            turns = []
            for n, turn in enumerate(meta["conversations"]):
                role = str(turn.get("from", turn.get("role", ""))).lower()
                value = turn.get("value", turn.get("content"))
                if value is None or role not in _USER_ROLES | _ASSISTANT_ROLES | _SYSTEM_ROLES:
                    raise SampleError(
                        f"sample {key}: json.conversations[{n}] needs from/value, got {turn}", "bad_json"
                    )
                turns.append((role, str(value)))
            return turns
        text = sample.get("txt", sample.get("text"))
        if text is None and isinstance(meta, dict):
            text = meta.get("text")
        if text is None:
            raise SampleError(
                f"sample {key}: no 'json' with conversations and no 'txt'/'text' field", "missing_field"
            )
        return [("text", text.decode() if isinstance(text, bytes) else str(text))]

    # ---- the sample -----------------------------------------------------------------------------------

    def _images(self, sample: dict[str, Any], key: str) -> list[Image.Image]:
        found = [(k, sample[k]) for k in IMAGE_KEYS if k in sample]
        numbered = sorted(
            (int(k.split(".")[0]), k)
            for k in sample
            if "." in k and k.split(".")[0].isdigit() and k.split(".")[-1] in IMAGE_KEYS
        )
        found += [(k, sample[k]) for _, k in numbered]
        for field_name, image in found:
            if not isinstance(image, Image.Image):
                raise SampleError(f"sample {key}: field {field_name!r} is not a decoded image", "bad_image")
        return [image for _, image in found]

    def __call__(self, sample: dict[str, Any]) -> EncodedSample:
        """Encode one decoded sample.

        Raises:
            SampleError: If a field is missing or malformed (the message names the key and field).
        """
        key = str(sample.get("__key__", "?"))
        where = f"{sample.get('__url__', '?')}:{key}"
        turns = self._conversation(sample, where)
        visuals: list[tuple[str, list[Image.Image]]] = [("image", [im]) for im in self._images(sample, where)]
        if "frames.npy" in sample:
            visuals.append(("video", self._video_frames(np.asarray(sample["frames.npy"]), where)))
        pixel_values, grids = [], []
        for kind, frames in visuals:
            try:
                patches, grid = self.patchify(frames)
            except (OSError, ValueError) as err:
                raise SampleError(f"sample {where}: cannot process {kind}: {err}", "bad_image") from err
            pixel_values.append(patches)
            grids.append(grid)
        vision_ids = [self._vision_ids(kind, grid) for (kind, _), grid in zip(visuals, grids, strict=True)]
        ids, labels = self._tokens(turns, vision_ids, where)
        input_ids = torch.tensor(ids, dtype=torch.int64)
        grid_thw = torch.stack(grids) if grids else None
        if self.mrope:
            positions = mrope_positions(
                input_ids, (self.image_token_id, self.video_token_id), grid_thw, self.merge_size
            )
        else:
            positions = torch.arange(len(ids), dtype=torch.int64)
        out = EncodedSample(
            input_ids=input_ids,
            labels=torch.tensor(labels, dtype=torch.int64),
            position_ids=positions,
            key=key,
            source=str(sample.get("__url__", "")),
            pixel_values=torch.cat(pixel_values) if pixel_values else None,
            image_grid_thw=grid_thw,
        )
        for name in ("actions", "proprio"):
            if f"{name}.npy" in sample:
                setattr(out, name, torch.as_tensor(np.asarray(sample[f"{name}.npy"]), dtype=torch.float32))
        return out

    def _tokens(
        self, turns: list[tuple[str, str]], vision_ids: list[list[int]], where: str
    ) -> tuple[list[int], list[int]]:
        tpl, enc = self.template, self.tokenizer.encode
        if turns[0][0] == "text":
            if vision_ids:
                raise SampleError(
                    f"sample {where}: images need a 'json' conversation, got plain text", "bad_json"
                )
            ids = enc(turns[0][1])
            return ids, list(ids)
        pending = list(vision_ids)
        ids: list[int] = []
        labels: list[int] = []

        def add(part: list[int], labelled: bool) -> None:
            ids.extend(part)
            labels.extend(part if labelled else [IGNORE_INDEX] * len(part))

        if self.system_prompt and turns[0][0] not in _SYSTEM_ROLES:
            add(enc(tpl.system_start + self.system_prompt + tpl.turn_end), False)
        for role, value in turns:
            if role in _ASSISTANT_ROLES:
                add(enc(tpl.assistant_start), False)
                add(enc(value + tpl.answer_end), True)
                add(enc(tpl.turn_end[len(tpl.answer_end) :]), False)
                continue
            add(enc(tpl.system_start if role in _SYSTEM_ROLES else tpl.user_start), False)
            pieces = _PLACEHOLDER.split(value)
            if role in _USER_ROLES and pending and len(pieces) == 1:
                for vision in pending:
                    add(vision, False)
                pending = []
            for n, piece in enumerate(pieces):
                if n % 2 == 0:
                    if piece:
                        add(enc(piece), False)
                elif not pending:
                    raise SampleError(
                        f"sample {where}: more {piece} placeholders than images/videos", "bad_json"
                    )
                else:
                    add(pending.pop(0), False)
            add(enc(tpl.turn_end), False)
        if pending:
            raise SampleError(
                f"sample {where}: {len(pending)} image(s)/video(s) without a placeholder or user turn",
                "bad_json",
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError(f"sample {where}: no assistant answer to learn from", "no_answer")
        return ids, labels


__all__ = ["ChatTemplate", "EncodedSample", "SampleEncoder", "SampleError", "mrope_positions", "smart_resize"]
