"""Image prompts for validating a vision-language engine: its vision graph against the reference's vision
tower + projector, and prompts with images for the per-pass comparison (both sides prefill the reference's
features, so the decode comparison is teacher-forced from the same inputs; the vision graph is judged on
its own).

Two synthetic images (seeded noise with a gradient) of sizes that are not multiples of the 28-pixel grid
(50x70 and 30x100 before preprocessing), each with one built-in prompt.
"""

from __future__ import annotations

from typing import Any

import torch

VISION_COSINE_MIN = 0.999          # features' cosine similarity, engine vs reference, per image token
IMAGE_SIZES = ((50, 70), (30, 100))
IMAGE_TEXTS = ("Describe the picture.", "What is in this image?")


def synthetic_images() -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for h, w in IMAGE_SIZES:
        grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        px = np.clip(rng.normal(0, 40, (h, w, 3)) + grad, 0, 255).astype(np.uint8)
        out.append(Image.fromarray(px))
    return out


def image_prompts(reference, engine, tokenizer: Any) -> tuple[list[list[int]], list, dict]:
    """(prompt ids, PromptImages per prompt, vision report) for a VLM engine: the engine's vision graph vs the
    reference model's `image_features` on the synthetic images."""
    from ..model.image_prompt import ImagePrompter, image_prompt_text
    from ..model.tokenizer import encode_prompt
    from ..model.vision_config import ImageTokenIds, VisionConfig

    cfg = reference.config
    prompter = ImagePrompter(VisionConfig.of(cfg), ImageTokenIds.of(cfg, tokenizer), reference.encode_image)
    ids, imgs, cos_min, max_abs = [], [], 1.0, 0.0
    for text, image in zip(IMAGE_TEXTS, synthetic_images()):
        pixels = prompter.pixels(image, name="synthetic image")
        ref = reference.encode_image(pixels).float().cpu()                                 # [tokens, hidden]
        eng = torch.as_tensor(engine.encode_image(pixels)).float().cpu()
        cos_min = min(cos_min, float(torch.nn.functional.cosine_similarity(ref, eng, dim=-1).min()))
        max_abs = max(max_abs, float((ref - eng).abs().max()))
        if tokenizer is not None:
            start_ids = encode_prompt(tokenizer, image_prompt_text(text, 1))
        else:
            start_ids = [cfg.bos_token_id or 1, prompter.tokens.start, 5, 6, 7]
        i, pi = prompter.prepare(start_ids, [pixels])
        ids.append(i)
        imgs.append(pi)
    report = {"images": len(ids), "sizes": [list(s) for s in IMAGE_SIZES], "features_cosine_min": cos_min,
              "features_max_abs_diff": max_abs, "passed": cos_min >= VISION_COSINE_MIN}
    return ids, imgs, report
