"""Counter-based Gumbel noise: the same float64 draw on the host and inside a device loop.

Sampling (remask.py) picks argmax(logits + T * g) with g = -log(-log(u)), u uniform in (0, 1), float64,
as the released sampler does. Here u is not taken from a stateful generator but computed: row b's draw
number c at position i, vocabulary entry v is a pure function of (key[b], c, i * V + v). So

  - a device loop (a captured CUDA graph) draws exactly the host loop's noise for a pass from two small
    tensors, the rows' keys and counters, without reading anything back;
  - every backend (CPU, CUDA, ONNX Runtime fed from the host) sees the same noise for the same seed;
  - a row's draws depend only on its own key and how many passes it took part in, not on its batch mates.

The integer hash works in 32-bit lanes held in int64 (multipliers < 2**31, so no product overflows and torch
computes it bit for bit alike on every device). Two independent 32-bit hashes give the 53 bits of u:
u = (hi26 * 2**27 + lo27 + 0.5) / 2**53, exact in float64. The log is the device's float64 log (CPU and CUDA
may differ in the last ulp, which could only flip an argmax between two scores equal to ~1e-16).
Not cryptographic; its job is the distribution and reproducibility.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x2C1B3C6D        # odd, < 2**31: x * C < 2**63 for x < 2**32
_SALT = 0x68E31DA4                       # separates the second hash of an element from the first


def hash32(x):
    """A 32-bit integer mixer on int64 tensors (or Python ints) holding values in [0, 2**32); same values out."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def row_keys(seed: int, rows: int) -> torch.Tensor:
    """[rows] int64: the stream key of each row of a run seeded with `seed` (any Python int). Hashed on Python
    ints (the same values as on tensors: no product exceeds 2**63): every request makes its keys, on a
    server's event loop, where a dozen one-element torch ops cost ~0.09 ms."""
    s = int(seed) % (1 << 64)
    base = hash32(hash32(s & _M32) ^ hash32((s >> 32) ^ 0x9E3779B9))
    return torch.tensor([hash32(base ^ r) for r in range(rows)], dtype=torch.long)


def gumbel(keys: torch.Tensor, counters: torch.Tensor, L: int, V: int) -> torch.Tensor:
    """keys [B], counters [B] int64 (on the device to draw on) -> Gumbel noise [B, L, V] float64.
    Graph-capturable: no host reads."""
    dev = keys.device
    base = hash32(keys ^ hash32(counters & _M32))[:, None, None]                       # [B, 1, 1]
    base2 = hash32(base ^ _SALT)
    e = (torch.arange(L * V, dtype=torch.long, device=dev) & _M32).view(1, L, V)       # element index
    hi = hash32(hash32(base ^ e)) >> 6                                                 # 26 bits
    lo = hash32(hash32(base2 ^ e)) >> 5                                                # 27 bits
    u = (hi.double() * 134217728.0 + lo.double() + 0.5) * (2.0 ** -53)                 # (0, 1), exact
    return -torch.log(-torch.log(u))


class GumbelStream:
    """The noise source of one run: a key per row and the number of draws each row has made.
    `draw` advances every row by one; device loops draw pass s at `counters + s` themselves and the
    caller then `advance`s the rows by the passes the host loop would have drawn for."""

    def __init__(self, seed: int, rows: int):
        self.seed = seed
        self.keys = row_keys(seed, rows)                                                # [B] int64
        self.counters = torch.zeros(rows, dtype=torch.long)                            # [B] int64

    @property
    def rows(self) -> int:
        return len(self.keys)

    def draw(self, shape, device: torch.device | str = "cpu") -> torch.Tensor:
        """Noise [B, L, V] float64 on `device` (B = rows) for the next draw of every row."""
        B, L, V = shape
        if B != self.rows:
            raise ValueError(f"a noise stream of {self.rows} rows cannot draw {tuple(shape)}")
        out = gumbel(self.keys.to(device), self.counters.to(device), L, V)
        self.counters += 1
        return out

    def advance(self, n: torch.Tensor | int) -> None:
        """Skip n draws (int, or [B] per row): the draws a device loop made for the host loop's passes."""
        self.counters += torch.as_tensor(n, dtype=torch.long)

    @classmethod
    def of_rows(cls, streams: "list[GumbelStream | None]") -> "GumbelStream":
        """One stream whose row b is the one-row stream streams[b] (None: an unused row, key 0): how a
        scheduler hands a device loop the rows' own streams. Advance each row's own stream afterwards."""
        out = cls.__new__(cls)
        out.seed = None
        out.keys = torch.tensor([0 if s is None else int(s.keys[0]) for s in streams], dtype=torch.long)
        out.counters = torch.tensor([0 if s is None else int(s.counters[0]) for s in streams], dtype=torch.long)
        return out

    def clone(self) -> "GumbelStream":
        other = GumbelStream.__new__(GumbelStream)
        other.seed, other.keys, other.counters = self.seed, self.keys.clone(), self.counters.clone()
        return other
