"""A test helper shared by tests/decoding and tests/serve: a `Denoiser` with only the contract.

`ContractOnly(inner, delay)` forwards reset / lengths / trim / step to a real denoiser but declares neither
`regroup` nor subset passes, so a scheduler drives it as fixed slots of one batch; `delay` seconds added to
every pass make a slow engine (rows stay busy long enough to fill a queue or cancel mid-stream).
"""

import time

from nemodiff_compile.decoding.denoiser import Denoiser


class ContractOnly(Denoiser):
    def __init__(self, inner, delay: float = 0.0):
        self.inner, self.delay = inner, delay
        self.config, self.max_len = inner.config, inner.max_len

    def reset(self, batch):
        self.inner.reset(batch)

    def lengths(self):
        return self.inner.lengths()

    def trim(self, lengths):
        self.inner.trim(lengths)

    def step(self, tokens, **kw):
        time.sleep(self.delay)
        return self.inner.step(tokens, **kw)
