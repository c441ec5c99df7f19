"""Vision-language prompts: images in, token ids + the features that replace the image pad tokens out.

The chat template emits one <|image_start|> per image (research nld_vlm.md); `expand` turns each into the
image's span:
    <|image_start|>  (<|image_pad|> x cols  <|image_break|>) x (rows - 1)  <|image_pad|> x cols  <|image_end|>
rows x cols = (H // 28) x (W // 28) of the preprocessed image: one pad per merged 2x2 patch, rows separated
by breaks (the research note's reading of the released chat_utils.py, not verified against the file). Only
the pads take image features; start / break / end keep their token embeddings. Ids come from
config.json / the tokenizer (vision_config.ImageTokenIds), never constants.

A prompt text without an <|image_start|> gets one per image in front of the text; a text with them must
have exactly one per image (in the order given).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..decoding.embeds import IMAGE_PREFILL, PromptImages
from ..errors import InvalidArgument
from .images import image_pixels
from .vision_config import IMAGE_TOKENS, ImageTokenIds, VisionConfig


def image_prompt_text(text: str, n_images: int) -> str:
    """The user text with its image markers: as written, or n markers in front of it."""
    start = IMAGE_TOKENS["start"]
    have = text.count(start)
    if have == 0:
        return start * n_images + text
    if have != n_images:
        raise InvalidArgument(f"prompt: {have} {start} marker(s) for {n_images} image(s); expected one per image")
    return text


def expand(ids: Sequence[int], grids: Sequence[tuple[int, int]], tok: ImageTokenIds,
           bidirectional: bool = False) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
    """ids with one start token per image, grids [(rows, cols)] -> (expanded ids, pad positions [n] int64,
    span ids [len] int64 or None). A span id (image index + 1) covers start..end of each image."""
    starts = [i for i, t in enumerate(ids) if t == tok.start]
    if len(starts) != len(grids):
        raise InvalidArgument(f"prompt: {len(starts)} image start token(s) for {len(grids)} image(s)")
    if any(t in (tok.pad, tok.brk, tok.end) for t in ids):
        raise InvalidArgument("prompt: contains image pad/break/end tokens; pass images, not their tokens")
    out: list[int] = []
    span: list[int] = []
    pads: list[int] = []
    k = 0
    for i, t in enumerate(ids):
        if t != tok.start:
            out.append(t)
            span.append(0)
            continue
        rows, cols = grids[k]
        k += 1
        body = [tok.start]
        for r in range(rows):
            for _ in range(cols):
                pads.append(len(out) + len(body))
                body.append(tok.pad)
            body.append(tok.brk if r < rows - 1 else tok.end)
        out.extend(body)
        span.extend([k] * len(body))
    spans = torch.tensor(span, dtype=torch.long) if bidirectional else None
    return out, torch.tensor(pads, dtype=torch.long), spans


class ImagePrompter:
    """Turns (prompt ids with start markers, images) into (ids, PromptImages) for one model.

    encode_image: pixels [3, H, W] -> features [(H//28)*(W//28), hidden] (the reference's
    `image_features`, or an engine's vision graph)."""

    def __init__(self, vision: VisionConfig, tokens: ImageTokenIds, encode_image: Callable[[torch.Tensor], Any],
                 *, image_prefill: str = "causal", max_image_size: int | None = None):
        if image_prefill not in IMAGE_PREFILL:
            raise InvalidArgument(f"image_prefill {image_prefill!r}: expected one of {', '.join(IMAGE_PREFILL)}")
        self.vision, self.tokens, self.encode_image = vision, tokens, encode_image
        self.image_prefill = image_prefill
        self.max_image_size = max_image_size or vision.image_size

    def pixels(self, image: Any, name: str | None = None) -> torch.Tensor:
        return image_pixels(image, self.max_image_size, self.vision.merge_patch, name=name)

    def prepare(self, ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], PromptImages]:
        pixels = [im if isinstance(im, torch.Tensor) else self.pixels(im) for im in images]
        m = self.vision.merge_patch
        grids = [(p.shape[1] // m, p.shape[2] // m) for p in pixels]
        for p, (r, c) in zip(pixels, grids):
            if r == 0 or c == 0:
                raise InvalidArgument(f"image of {p.shape[1]}x{p.shape[2]} pixels is smaller than one "
                                      f"{m}x{m} image token")
        out, positions, spans = expand(ids, grids, self.tokens, self.image_prefill == "bidirectional")
        feats = [torch.as_tensor(self.encode_image(p)) for p in pixels]
        for f, (r, c) in zip(feats, grids):
            if f.shape[0] != r * c:
                raise ValueError(f"vision encoder gave {f.shape[0]} features for a {r}x{c} token grid")
        features = torch.cat([f.float().cpu() for f in feats])                                   # [n, hidden]
        return out, PromptImages(positions, features, spans)
