"""Quality of generated text without reference answers: its likelihood under the model itself.

`causal_nll` scores each continuation teacher-forced in causal mode (one forward over prompt +
continuation; the logits at position i predict token i+1) and returns the mean negative
log-likelihood per generated token, in nats; lower is more likely. AR greedy decoding picks the most
likely token at every step, so its continuations are the natural reference point (a lower bound per
step, not over whole sequences: a decode that leaves the greedy path can reach a more predictable
tail, so another setting can score below it).

The judge is the PyTorch reference model, not the engine under test: the `Denoiser` contract returns
each position's argmax and its probability, not the probability of a given token (that needs the
logits, which only validation builds export); and a fixed judge scores every engine and precision
on the same scale, so a quantized engine's output is judged by the unquantized model.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def causal_nll(model, prompts: list[list[int]], continuations: list[list[int]], *,
               rows_per_pass: int = 8) -> list[float]:
    """Per row: mean -log p(continuation token | prompt + earlier continuation tokens), in nats."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts, {len(continuations)} continuations")
    if any(not c for c in continuations) or any(not p for p in prompts):
        raise ValueError("every prompt and continuation needs at least one token")
    cfg = model.config
    dev = model.diffusion_head.weight.device
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_ids[0]
    out: list[float] = []
    for i in range(0, len(prompts), rows_per_pass):
        rows = [p + c for p, c in zip(prompts[i:i + rows_per_pass], continuations[i:i + rows_per_pass])]
        ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)           # [b, L]
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
        n = torch.tensor([len(r) for r in rows])
        logits = model(ids.to(dev), num_valid=n.to(dev))                                   # [b, L, V] causal
        for b, (p, c) in enumerate(zip(prompts[i:i + rows_per_pass], continuations[i:i + rows_per_pass])):
            P, T = len(p), len(c)
            logp = logits[b, P - 1: P + T - 1].float().log_softmax(-1)                     # [T, V]
            target = torch.tensor(c, device=dev)[:, None]                                   # [T, 1]
            out.append(float(-logp.gather(-1, target).mean()))
    return out
