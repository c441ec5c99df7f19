"""Static, preallocated KV cache with per-row lengths.

Shapes never change after allocation: K and V are [layers, batch, kv_heads, max_len, head_dim] and
`lengths` [batch] says how many leading positions of each row are valid. Writes scatter a block at
each row's own length, trims just lower `lengths` (stale K/V beyond a row's length are never read:
the attention mask hides them). This is the layout every backend and CUDA graph relies on.

Only causally computed K/V are ever written (prefill, AR steps, the diffusion commit pass, the
linear-spec verify pass); bidirectional refinement passes read the cache and leave it untouched.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class StaticKVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)   # [B]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.lengths.zero_()

    def trim(self, lengths: torch.Tensor) -> None:
        """Drop positions past `lengths` [B] (linear-spec rejects); lengths may only shrink."""
        check_trim(self.lengths, lengths)
        self.lengths.copy_(lengths)

    def check_room(self, new_tokens: int) -> None:
        check_room(self.lengths, new_tokens, self.max_len)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter k, v [B, kv_heads, L, D] at positions lengths[b] + 0..L-1 of each row."""
        B, H, L, D = k.shape
        idx = (self.lengths[:, None] + torch.arange(L, device=k.device))          # [B, L]
        idx = idx[:, None, :, None].expand(B, H, L, D)
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))

    def advance(self, num_tokens: torch.Tensor) -> None:
        """After all layers wrote: lengths += num_tokens [B]."""
        self.lengths += num_tokens


# The two rules every backend's per-row lengths obey (the engines keep theirs on the host).

def check_room(lengths: torch.Tensor, new_tokens: int, max_len: int) -> None:
    """Rows at `lengths` [B] can take `new_tokens` more positions within `max_len`, or ValueError."""
    need = int(lengths.max()) + new_tokens
    if need > max_len:
        raise ValueError(f"KV cache overflow: {need} positions needed, max_len is {max_len}")


def check_trim(lengths: torch.Tensor, new: torch.Tensor) -> None:
    """`new` [B] may only shorten rows at `lengths` [B]."""
    if bool((new > lengths).any()):
        raise ValueError("trim() can only shorten rows")

