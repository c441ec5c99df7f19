"""Input embeddings for a prefill: how a vision-language prompt's image features reach the decoder.

A prompt with images carries `PromptImages`: the prompt positions of its image pad tokens and the features
that replace their token embeddings there (model/image_prompt.py makes them). The loops' prefill gathers the
rows' into one `PrefillEmbeds` for the causal prefill pass (`Denoiser.step(..., embeds=...)`); every other
pass is plain tokens (the image span lives in the KV cache from then on).

How the image span is prefilled is an assumption the public sources do not settle (research nld_vlm.md):
"causal" (default: as the text prefill, each image token sees the tokens before it) or "bidirectional"
(the tokens of one image's span see each other; `spans` carries the span ids). Compiled engines run the
causal prefill only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_PREFILL = ("causal", "bidirectional")


@dataclass
class PromptImages:
    positions: torch.Tensor               # [n] int64: prompt positions of the image pad tokens
    features: torch.Tensor                # [n, H]: the features that replace them, in order
    spans: torch.Tensor | None = None     # [len(prompt)] int64 image-span ids (>0) for a bidirectional prefill


@dataclass
class PrefillEmbeds:
    mask: torch.Tensor                    # [B, L] bool: positions whose embedding is `values`
    values: torch.Tensor                  # [B, L, H]
    spans: torch.Tensor | None = None     # [B, L] int64 (bidirectional image prefill), None: causal

    @classmethod
    def of(cls, images: list[PromptImages | None], length: int) -> "PrefillEmbeds | None":
        """The batch's embeddings for a right-padded prefill of `length` positions; None without images."""
        present = [im for im in images if im is not None]
        if not present:
            return None
        B, H = len(images), present[0].features.shape[-1]
        mask = torch.zeros(B, length, dtype=torch.bool)
        values = torch.zeros(B, length, H, dtype=present[0].features.dtype)
        spans = torch.zeros(B, length, dtype=torch.long) if any(im.spans is not None for im in present) else None
        for b, im in enumerate(images):
            if im is None:
                continue
            mask[b, im.positions] = True
            values[b, im.positions] = im.features.to("cpu", values.dtype)
            if im.spans is not None:
                spans[b, : im.spans.shape[0]] = im.spans
        return cls(mask, values, spans)
