"""Cache-free quality checks for a (tiny) model: greedy AR decoding and a block-diffusion decode.

Both rerun the whole sequence every pass (no KV cache), so they are independent of the cache and the
sampling package and only need `model(ids, attn_mask=...)`. The diffusion check follows the released
`generate` loop (research note §4.2) with a confidence threshold:

  seed  = AR prediction after the prompt (first token of the block, never masked)
  block = [seed, MASK x (B-1)]
  repeat: one bidirectional pass over the block (it also sees the whole prefix, computed causally);
          commit the most confident masked position plus every masked position with conf >= tau
  commit pass: causal over prefix + block; its last logit is the next block's seed
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def prefix_block_mask(P: int, B: int) -> torch.Tensor:
    """[1, P+B, P+B] bool: prefix rows causal, block rows see the whole prefix and the whole block."""
    n = P + B
    m = torch.ones(n, n, dtype=torch.bool).tril()
    m[P:, :] = True
    return m[None]


@torch.no_grad()
def greedy_ar(model, ids: list[int], max_new: int, eos: int) -> list[int]:
    """Greedy causal decoding, one full forward per token; returns the new tokens (EOS included)."""
    x = list(ids)
    out: list[int] = []
    for _ in range(max_new):
        logits = model(torch.tensor([x]))[0, -1]                      # [V]
        nxt = int(logits.argmax())
        out.append(nxt)
        x.append(nxt)
        if nxt == eos:
            break
    return out


@dataclass
class DiffusionStats:
    tokens: list[int] = field(default_factory=list)            # generated, through the first EOS
    denoise_passes: list[int] = field(default_factory=list)    # per block
    first_pass_confident: list[int] = field(default_factory=list)  # masked positions >= tau, pass 1
    first_pass_masked: list[int] = field(default_factory=list)
    committed_per_pass: list[int] = field(default_factory=list)    # every denoise pass

    @property
    def commit_passes(self) -> int:
        return len(self.denoise_passes)

    @property
    def nfe(self) -> int:
        """Denoise + commit passes (the prompt prefill, which predicts the first seed, not counted)."""
        return sum(self.denoise_passes) + self.commit_passes

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(1, self.nfe)

    @property
    def tokens_per_denoise_pass(self) -> float:
        return sum(self.committed_per_pass) / max(1, len(self.committed_per_pass))


@torch.no_grad()
def diffusion_decode(model, ids: list[int], *, max_blocks: int, block: int, mask_id: int, eos: int,
                     threshold: float = 0.9) -> DiffusionStats:
    st = DiffusionStats()
    prefix = list(ids)
    seed = int(model(torch.tensor([prefix]))[0, -1].argmax())          # prefill: not counted
    for _ in range(max_blocks):
        P = len(prefix)
        blk = torch.full((block,), mask_id, dtype=torch.long)
        blk[0] = seed
        mask = prefix_block_mask(P, block)
        passes = 0
        while (blk == mask_id).any():
            logits = model(torch.cat([torch.tensor(prefix), blk])[None], attn_mask=mask)[0, P:]   # [B, V]
            probs = logits.float().softmax(-1)
            conf, cand = probs.max(-1)                                      # [B], [B]
            masked = blk == mask_id
            conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
            commit = masked & (conf >= threshold)
            commit[int(conf.argmax())] = True                               # always at least one
            if passes == 0:
                st.first_pass_confident.append(int((masked & (conf >= threshold)).sum()))
                st.first_pass_masked.append(int(masked.sum()))
            blk[commit] = cand[commit]
            passes += 1
            st.committed_per_pass.append(int(commit.sum()))
            hit = (blk == eos).nonzero()
            if len(hit) and not (blk[: int(hit[0])] == mask_id).any():
                break                                                      # EOS with nothing masked before it
        st.denoise_passes.append(passes)
        prefix += blk.tolist()
        seed = int(model(torch.tensor([prefix]))[0, -1].argmax())          # commit pass (causal)
        new = prefix[len(ids):]
        if eos in new:
            st.tokens = new[: new.index(eos) + 1]
            return st
    st.tokens = prefix[len(ids):]
    return st
