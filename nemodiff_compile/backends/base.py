"""What every backend shares, so that a backend implements only its buffers and one pass.

`BackendDenoiser` owns the `Denoiser` contract's bookkeeping:
  cache lengths   per row, on the host ([batch] int64): `reset` / `lengths` / `trim` (rows only shrink)
  buckets         backends with static shapes pad a batch up to a bucket (`buckets`); `bucket` = rows allocated
  the guard       the batch is the one `reset` was called for; only causal passes write; the block fits
  num_valid       default: the whole block
  causal          a bool per pass, or per row ([B] bool) where the backend sets `row_causal` (its graph takes one
                  flag per row): a writing pass then stores and advances the causal rows only
  noise           Gumbel noise in float64 from the loop's `GumbelStream` (`decoding/noise.py`: counter-based, the
                  same values on any device), so every backend samples the same tokens; drawn on the host, or
                  on the backend's device where it sets `noise_on_device` (eager torch, fast)
  executed        forwards run since `reset` (device block refiners add the passes they run)
and the helpers: `kv_cache` (the static [layers, rows, kv_heads, max_len, head_dim] K/V buffers),
`scatter_block` (write a block's K/V at each row's length, FP8 caches included) and `TORCH_DTYPES` (the I/O
spec's dtype names -> torch).

A new backend implements
  __init__             its engine/session, then super().__init__(config, max_len, device, ...)
  _allocate(rows)      (re)allocate its cache and buffers for `rows` rows (reset calls it when rows or max_len change)
  _pass(tokens, ...)   one pass over tokens [B, L] at the rows' lengths -> StepOut (token, confidence on the host);
                       a causal `write` pass stores the block's K/V (the base then advances the lengths)
and, where it keeps a copy of the lengths on its device, `_set_lengths`; where it can refine a diffusion block
on its device, `block_refiner` (decoding/refine.py); `_kv` (its K/V buffers) lets `regroup` carry rows over when a
scheduler changes the batch (decoding/scheduler.py).
"""

from __future__ import annotations

import torch

from ..artifact.buckets import BatchBuckets
from ..config import ModelConfig
from ..decoding import remask
from ..decoding.denoiser import Denoiser, StepOut
from ..decoding.noise import GumbelStream
from ..errors import InvalidArgument
from ..model.cache import check_room, check_trim

# I/O spec dtype name -> torch dtype. float8_e4m3fn: the KV cache of fp8-cache builds (quant/kv_cache.py)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn}


class BackendDenoiser(Denoiser):
    noise_on_device = False          # draw a GumbelStream's noise on self.device (its _pass takes it there)

    def __init__(self, config: ModelConfig, max_len: int, device: torch.device | str, *,
                 buckets: BatchBuckets | None = None, return_logits: bool = False):
        self.config, self.max_len = config, max_len
        self.device = torch.device(device)
        self.buckets = buckets
        self.return_logits = return_logits
        self.batch = 0                                   # rows the caller asked for
        self.bucket = 0                                  # rows allocated (>= batch)
        self.executed = 0
        self._allocated: tuple[int, int] | None = None   # (rows, max_len) of the current buffers
        self._lengths = torch.zeros(0, dtype=torch.long)  # [batch] on the host

    # ---- the Denoiser contract -------------------------------------------------------------------------

    def reset(self, batch: int) -> None:
        """`batch` empty rows; (re)allocates when the rows (the bucket) or `max_len` (which callers may
        change between generations to fit the request) differ from the buffers'."""
        rows = self.buckets.pick(batch) if self.buckets is not None else batch
        self.batch, self.bucket, self.executed = batch, rows, 0
        if (rows, self.max_len) != self._allocated:
            self._allocate(rows)
            self._allocated = (rows, self.max_len)
        self._set_lengths(torch.zeros(batch, dtype=torch.long))

    def lengths(self) -> torch.Tensor:
        return self._lengths.clone()

    def trim(self, lengths: torch.Tensor) -> None:
        lengths = lengths.to("cpu", torch.long)
        check_trim(self._lengths, lengths)
        self._set_lengths(lengths.clone())

    # backends whose `_pass` takes `embeds` (decoding/embeds.py: a vision-language prefill) set this; and
    # `accepts_spans` where it also prefills an image span bidirectionally (image_prefill="bidirectional")
    accepts_embeds = False
    accepts_spans = False
    # backends whose graph takes `causal` per row set this: one pass may then mix causal rows (a commit, a prefill)
    # with bidirectional ones (a denoise), and a writing pass stores the causal rows' K/V only
    row_causal = False

    def step(self, tokens, *, causal, write, num_valid=None, draft_lora=False, temperature=0.0,
             generator=None, noise=None, embeds=None) -> StepOut:
        """causal: a bool, or a [B] bool tensor (backends with `row_causal`): then `write` stores and advances
        the causal rows only. noise: a [B, L, V] float64 Gumbel draw to use instead of drawing one from
        `generator` (a scheduler draws each row's from the row's own generator). embeds: a causal writing pass's
        input embeddings (PrefillEmbeds: image features in place of the image pad tokens)."""
        B, L = tokens.shape
        causal = self._causal_rows(causal, B)
        self.check_pass(B, L, causal=causal, write=write)
        extra = {}
        if embeds is not None:
            if not self.accepts_embeds:
                raise InvalidArgument(f"{type(self).__name__}: this engine takes no image input "
                                      "(build it from a vision-language checkpoint)")
            if causal is not True or not write:
                raise ValueError("input embeddings enter through a causal writing pass (the prefill)")
            if embeds.spans is not None and not self.accepts_spans:
                raise InvalidArgument(f"image_prefill 'bidirectional': the reference only ({type(self).__name__} "
                                      "prefills image spans causally)")
            extra["embeds"] = embeds
        num_valid = torch.full((B,), L) if num_valid is None else num_valid.to("cpu", torch.long)
        if temperature <= 0:
            noise = None
        elif noise is None:
            on_device = self.noise_on_device and isinstance(generator, GumbelStream)
            noise = remask.gumbel_noise((B, L, self.config.vocab_size), generator,       # [B, L, V] float64
                                        self.device if on_device else "cpu")
        out = self._pass(tokens, causal=causal, write=write, num_valid=num_valid, draft_lora=draft_lora,
                         temperature=temperature, noise=noise, **extra)
        self.executed += 1
        if write:        # a mixed pass's bidirectional rows keep their lengths (what it wrote past them is scratch)
            self._set_lengths(self._lengths + num_valid * causal)          # causal: a bool, or [B] bool
        return out

    def _causal_rows(self, causal, batch: int) -> "bool | torch.Tensor":
        """A pass's causal flag: a bool, or a [batch] bool tensor (CPU) where the rows differ."""
        if not isinstance(causal, torch.Tensor):
            return bool(causal)
        rows = causal.to("cpu", torch.bool).reshape(-1)
        if rows.numel() == 1:
            return bool(rows)
        if rows.shape != (batch,):
            raise ValueError(f"causal: one flag per row ({batch}), got shape {tuple(causal.shape)}")
        if bool(rows.all()) or not bool(rows.any()):
            return bool(rows[0])
        if not self.row_causal:
            raise ValueError(f"{type(self).__name__} takes one causal flag per pass (its graph predates per-row "
                             "causal: re-export it to mix causal and bidirectional rows)")
        return rows

    @property
    def can_regroup(self) -> bool:
        """The backend declares its K/V buffers (`_kv`), so `regroup` can carry rows over."""
        return type(self)._kv is not BackendDenoiser._kv

    def regroup(self, keep: list[int], batch: int) -> None:
        """A new batch of `batch` rows whose first len(keep) are the current rows `keep` (their K/V and lengths
        carried over, in that order) and the rest empty: how a scheduler adds and drops rows between passes."""
        if len(keep) > batch or len(set(keep)) != len(keep) or any(not 0 <= r < self.batch for r in keep):
            raise ValueError(f"regroup: rows {keep} of {self.batch} into a batch of {batch}")
        rows = self.buckets.pick(batch) if self.buckets is not None else batch
        lengths = torch.zeros(batch, dtype=torch.long)
        lengths[: len(keep)] = self._lengths[keep]
        old, idx = self._kv() if self._allocated is not None else (), torch.tensor(keep, dtype=torch.long)
        moved = [t.index_select(1, idx.to(t.device)) for t in old]          # [layers, len(keep), H, S, D] each
        if (rows, self.max_len) != self._allocated:
            self._allocate(rows)
            self._allocated = (rows, self.max_len)
        for dst, src in zip(self._kv(), moved):
            s = min(dst.shape[3], src.shape[3])                              # windowed caches keep their prefix
            dst[:, : len(keep), :, :s].copy_(src[:, :, :, :s])
        self.batch, self.bucket = batch, rows
        self._set_lengths(lengths)

    def check_pass(self, batch: int, block: int, *, causal: bool = False, write: bool = False) -> None:
        """The guard of every pass (refiners call it too): the reset batch, causal writes, room for the block."""
        if batch != self.batch:
            raise ValueError(f"reset() was called for batch {self.batch}, the pass got {batch} rows")
        if write and not (bool(causal.any()) if isinstance(causal, torch.Tensor) else causal):
            raise ValueError("the KV cache only holds causal K/V: bidirectional passes cannot write it")
        check_room(self._lengths, block, self.max_len)

    # ---- what a backend implements -----------------------------------------------------------------------

    def _allocate(self, rows: int) -> None:
        raise NotImplementedError

    def _pass(self, tokens: torch.Tensor, *, causal: bool, write: bool, num_valid: torch.Tensor,
              draft_lora: bool, temperature: float, noise: torch.Tensor | None) -> StepOut:
        """tokens [B, L] at positions lengths[b] + 0..L-1; num_valid [B] (host); noise [B, L, V] float64
        (host) when temperature > 0."""
        raise NotImplementedError

    def _set_lengths(self, lengths: torch.Tensor) -> None:
        """The rows' new lengths [batch] (host); backends that mirror them on their device extend this."""
        self._lengths = lengths

    def _kv(self) -> tuple[torch.Tensor, ...]:
        """The cache buffers, each [layers, rows, kv_heads, S, head_dim] (for `regroup`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot regroup its rows")

    # ---- helpers -------------------------------------------------------------------------------------------

    def kv_cache(self, rows: int, dtype: torch.dtype, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed K and V, each [layers, rows, kv_heads, length (default max_len), head_dim]."""
        c = self.config
        shape = (c.num_hidden_layers, rows, c.num_key_value_heads, length or self.max_len, c.head_dim)
        return (torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device))


def scatter_block(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, new_k: torch.Tensor,
                  new_v: torch.Tensor) -> None:
    """Write a block's new_k / new_v [layers, R, H, L, D] into the caches k / v [layers, R, H, S, D] at positions
    lengths[r] + 0..L-1 (lengths [R] on the caches' device): the writes of `StaticKVCache.write`."""
    L = new_k.shape[3]
    idx = lengths[:, None] + torch.arange(L, device=lengths.device)                  # [R, L]
    idx = idx[None, :, None, :, None].expand_as(new_k)                               # [layers, R, H, L, D]
    for cache, block in ((k, new_k), (v, new_v)):
        if cache.element_size() == 1 and cache.is_floating_point():   # no float8 scatter kernel on the CPU:
            cache, block = cache.view(torch.uint8), block.view(torch.uint8)   # 1-byte dtypes as their bytes
        cache.scatter_(3, idx, block)
