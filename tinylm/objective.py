"""Joint autoregressive + block-diffusion training objective (research note §3 "training mask", §8).

For a clean batch x0 [B, L] the model reads the 2L sequence [x_t | x_0]:

  x_t  noisy half: x0 with positions replaced by the mask token (id 100) with probability p
  x_0  clean half: the sequence itself
  positions 0..L-1 for each half (RoPE sees the same position for x_t[i] and x_0[i])

Attention (True = query may read key), blocks of `block_size` positions:
  noisy -> noisy   only inside the same block, bidirectional
  noisy -> clean   only clean blocks strictly before the query's block
  clean -> clean   causal
  clean -> noisy   never

This is the inference layout of block diffusion: a block being refined sees the committed prefix
through causal K/V and itself bidirectionally, and the clean half is plain causal LM training.

Losses:
  L_diff = sum over masked noisy positions of CE(logit_i, x0_i) / p_i, divided by the number of
           maskable positions (no shift: logit i predicts token i). E[masked/p] = 1, so this is an
           unbiased estimate of the mean per-token CE of denoising at a uniformly drawn mask rate.
  L_AR   = mean CE of the clean half shifted by one (logit i predicts token i+1)
  loss   = L_AR + alpha * L_diff

Masking rate: p = (1 - eps) * t + eps with t ~ U(0, 1) drawn per block (default) or per row.
The first position of every block is never masked: at inference the first token of each block is
the AR prediction ("seed") from the previous commit pass and is given to the denoiser.

Packed rows (optional `doc_ids` [B, L], a non-decreasing document index per token) are laid out as
inference sees one document: attention never crosses documents, positions restart at 0 with each
document, the AR loss skips the prediction of a document's first token from the previous one, and
(with `eos_id`) the noisy half of a block in which a document ends is EOS-padded after it — the
diffusion target of "the rest of the block" is EOS, as in NLD/LLaDA SFT where answers are padded
with EOS, instead of the start of the next packed document. Positions of that padding continue the
ending document's positions, and it attends within that document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def block_diff_mask(L: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean attention mask [2L, 2L] over [x_t | x_0] (rows = queries, columns = keys)."""
    i = torch.arange(2 * L, device=device)
    noisy = i < L                                        # [2L] first half is x_t
    pos = i % L                                          # [2L] position inside its half
    blk = pos // block_size                              # [2L] block index
    qn, kn = noisy[:, None], noisy[None, :]              # [2L, 1], [1, 2L]
    same_block = blk[:, None] == blk[None, :]
    earlier_block = blk[None, :] < blk[:, None]          # key's block strictly before the query's
    causal = pos[None, :] <= pos[:, None]
    return (qn & kn & same_block) | (qn & ~kn & earlier_block) | (~qn & ~kn & causal)


def joint_positions(L: int, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE positions [2L]: 0..L-1 for the noisy half, again 0..L-1 for the clean half."""
    return torch.arange(L, device=device).repeat(2)


@dataclass
class DocLayout:
    """Per-token layout of packed rows (all [B, L])."""

    noisy_doc: torch.Tensor   # document a noisy position belongs to: that of its block's first token
    pos_clean: torch.Tensor   # position inside its document
    pos_noisy: torch.Tensor   # position inside noisy_doc (EOS padding continues the ending document)
    pad: torch.Tensor         # bool, noisy positions past the end of their block's first document


def doc_layout(doc_ids: torch.Tensor, block_size: int) -> DocLayout:
    B, L = doc_ids.shape
    idx = torch.arange(L).expand(B, L)                                            # [B, L]
    first = (torch.arange(L) // block_size * block_size).expand(B, L)             # block's first index
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [B, L] doc start
    noisy_doc = doc_ids.gather(1, first)
    return DocLayout(noisy_doc, idx - start, idx - start.gather(1, first), doc_ids != noisy_doc)


@dataclass
class Noised:
    x_t: torch.Tensor        # [B, L] x0 with masked positions set to mask_id
    masked: torch.Tensor     # [B, L] bool, positions replaced by the mask token
    p: torch.Tensor          # [B, L] masking probability each position was drawn with
    maskable: torch.Tensor   # [B, L] bool, positions that may be masked (not a block's first)


def add_noise(x0: torch.Tensor, *, block_size: int, mask_id: int, eps: float = 1e-3,
              per_block: bool = True, keep_first: bool = True,
              generator: torch.Generator | None = None) -> Noised:
    B, L = x0.shape
    n_blocks = -(-L // block_size)
    t = torch.rand(B, n_blocks if per_block else 1, generator=generator)           # [B, nb] or [B, 1]
    p_draw = (1 - eps) * t + eps
    p = p_draw.repeat_interleave(block_size, dim=1)[:, :L] if per_block else p_draw.expand(B, L)  # [B, L]
    maskable = torch.ones(B, L, dtype=torch.bool)
    if keep_first:
        maskable[:, ::block_size] = False                                           # seeds are given
    masked = (torch.rand(B, L, generator=generator) < p) & maskable
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return Noised(x_t, masked, p.contiguous(), maskable)


@dataclass
class JointLoss:
    loss: torch.Tensor       # scalar, L_AR + alpha * L_diff (differentiable)
    ar: float                # L_AR
    diff: float              # L_diff (1/p weighted, per maskable position)
    masked_ce: float         # plain mean CE over masked positions (easier to read)
    n_masked: int


def joint_loss(model, x0: torch.Tensor, *, block_size: int, mask_id: int, alpha: float,
               doc_ids: torch.Tensor | None = None, eos_id: int | None = None,
               eps: float = 1e-3, per_block: bool = True,
               generator: torch.Generator | None = None) -> JointLoss:
    """One forward of `model` (a NemotronLabsDiffusion) over [x_t | x_0]; x0 is [B, L] int64.

    doc_ids [B, L]: document index per token of packed rows (see the module doc); eos_id: with
    doc_ids, EOS-pad the noisy half after a document's end inside a block.
    """
    B, L = x0.shape
    mask = block_diff_mask(L, block_size)[None]                           # [1, 2L, 2L]
    positions = joint_positions(L).expand(B, 2 * L)                       # [B, 2L]
    target = x0                                                           # noisy half's target
    ar_valid = torch.ones(B, L - 1, dtype=torch.bool)                     # AR predictions to score
    if doc_ids is not None:
        lay = doc_layout(doc_ids, block_size)
        seg = torch.cat([lay.noisy_doc, doc_ids], dim=1)                  # [B, 2L]
        mask = mask & (seg[:, :, None] == seg[:, None, :])                # [B, 2L, 2L]
        positions = torch.cat([lay.pos_noisy, lay.pos_clean], dim=1)
        ar_valid = doc_ids[:, 1:] == doc_ids[:, :-1]
        if eos_id is not None:
            target = torch.where(lay.pad, torch.full_like(x0, eos_id), x0)
    nz = add_noise(target, block_size=block_size, mask_id=mask_id, eps=eps, per_block=per_block,
                   generator=generator)
    ids = torch.cat([nz.x_t, x0], dim=1)                                  # [B, 2L]
    logits = model(ids, positions=positions, attn_mask=mask).float()      # [B, 2L, V]
    V = logits.shape[-1]
    noisy_logits, clean_logits = logits[:, :L], logits[:, L:]             # [B, L, V] each

    ar_ce = F.cross_entropy(clean_logits[:, :-1].reshape(-1, V), x0[:, 1:].reshape(-1), reduction="none")
    ar = (ar_ce * ar_valid.reshape(-1)).sum() / ar_valid.sum().clamp(min=1)
    ce = F.cross_entropy(noisy_logits.reshape(-1, V), target.reshape(-1), reduction="none").view(B, L)
    m = nz.masked.float()
    diff = (ce * m / nz.p).sum() / nz.maskable.sum().clamp(min=1)
    n_masked = int(nz.masked.sum())
    masked_ce = (ce.detach() * m).sum().item() / max(n_masked, 1)
    return JointLoss(ar + alpha * diff, ar.detach().item(), diff.detach().item(), masked_ce, n_masked)
