"""Training pieces for the embedded tiny model: packing the corpus, weight init, the CPU train loop.

`scripts/train_tiny.py` strings these together; everything is seeded, so a given seed, step count
and thread count reproduce the same weights.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tinylm.objective import joint_loss
from tinylm.tokenizer import BOS, IM_END_ID


def pack_stream(tok, docs: Iterator[str], n_tokens: int, *, seed: int = 0, drop_bos: float = 0.1,
                batch_docs: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode documents one after another: (tokens [n_tokens], document index [n_tokens]) int64.

    Each document is `<s> text <|im_end|>` (chat documents already end with <|im_end|>, the EOS).
    A fraction `drop_bos` of documents goes without the BOS, so prompts encoded either way work.
    """
    r = random.Random(seed)
    out: list[int] = []
    doc: list[int] = []
    n_doc = 0
    while len(out) < n_tokens:
        texts = [next(docs) for _ in range(batch_docs)]
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids = list(enc.ids)
            if r.random() >= drop_bos:
                ids.insert(0, BOS)
            if not ids or ids[-1] != IM_END_ID:
                ids.append(IM_END_ID)
            out.extend(ids)
            doc.extend([n_doc] * len(ids))
            n_doc += 1
    return torch.tensor(out[:n_tokens]), torch.tensor(doc[:n_tokens])


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) everywhere, output projections scaled by 1/sqrt(2 * layers), norms 1."""
    g = torch.Generator().manual_seed(seed)
    n_layers = len(model.encoder.layers)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            p.copy_(torch.randn(p.shape, generator=g) * std / math.sqrt(2 * n_layers))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)


@dataclass
class TrainArgs:
    steps: int = 1600
    batch: int = 12
    seq_len: int = 128
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    alpha: float = 1.0
    doc_mask: bool = True        # attention inside documents only, positions restart per document
    eos_fill: bool = True        # with doc_mask: EOS-pad the noisy half after a document's end
    eps: float = 1e-3
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 20


@dataclass
class TrainLog:
    rows: list[dict] = field(default_factory=list)   # one per log_every steps
    seconds: float = 0.0


def lr_at(step: int, a: TrainArgs) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    frac = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model, stream: torch.Tensor, doc_ids: torch.Tensor, a: TrainArgs, print_fn=print) -> TrainLog:
    """Train on consecutive [batch, seq_len] rows of `stream` / `doc_ids` (from `pack_stream`)."""
    cfg = model.config
    need = a.steps * a.batch * a.seq_len
    if stream.numel() < need:
        raise ValueError(f"stream has {stream.numel()} tokens, training needs {need}")
    rows = stream[:need].view(a.steps, a.batch, a.seq_len)                 # [steps, B, L]
    docs = doc_ids[:need].view(a.steps, a.batch, a.seq_len)                # [steps, B, L]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(a.seed + 1)
    log, acc = TrainLog(), {"loss": 0.0, "ar": 0.0, "diff": 0.0, "masked_ce": 0.0, "n": 0}
    model.train()
    t0 = time.time()
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a)
        out = joint_loss(model, rows[step], block_size=cfg.block_size, mask_id=cfg.mask_token_id,
                         alpha=a.alpha, eps=a.eps, generator=g,
                         doc_ids=docs[step] if a.doc_mask else None,
                         eos_id=cfg.eos_ids[0] if a.eos_fill else None)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        acc["loss"] += out.loss.item(); acc["ar"] += out.ar; acc["diff"] += out.diff
        acc["masked_ce"] += out.masked_ce; acc["n"] += 1
        if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
            n = acc.pop("n")
            row = {"step": step + 1, "lr": lr_at(step, a), **{k: v / n for k, v in acc.items()},
                   "elapsed_s": time.time() - t0}
            log.rows.append(row)
            print_fn(f"step {row['step']:5d}  lr {row['lr']:.2e}  loss {row['loss']:.3f}  "
                     f"ar {row['ar']:.3f}  diff {row['diff']:.3f}  masked_ce {row['masked_ce']:.3f}  "
                     f"{row['elapsed_s']:6.0f}s")
            acc = {"loss": 0.0, "ar": 0.0, "diff": 0.0, "masked_ce": 0.0, "n": 0}
    log.seconds = time.time() - t0
    model.eval()
    return log
