"""The thinking budget of the instruct models: once a row has generated `max_tokens` tokens without
closing its thinking, the closing tag (`</think>`) is forced as its next token.

Where the tag lands, in every mode: at generated index `max_tokens` (0-based), i.e. after exactly
`max_tokens` thinking tokens, unless the row closed its thinking earlier by itself.
  ar           the token chosen at that index is replaced by the tag (upstream `ar_generate`).
  dlm          a block that reaches the index starts with the tag already in place at it, committed
               like the seed, so the refinement passes denoise around it (upstream `generate`; the
               tag may overwrite the seed when the index is the block's first position).
  linear-spec  a verified round that reaches the index is cut there and the tag becomes the bonus
               token (the next seed), so the rejected tail is trimmed from the cache as usual.
               Upstream `linear_spec_generate` swaps the tag in for the next seed once a round has
               gone past the budget: its tag lands up to a block late, and the bonus token it
               replaced stays in the output though the model never read it. Here the output is
               exactly what the model read.
The loops call `cut` on tokens they are about to emit and `block_position` before refining a block
(`loops._Run` keeps which rows have closed their thinking).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument


@dataclass(frozen=True)
class ThinkingBudget:
    max_tokens: int              # generated tokens of thinking before the tag is forced
    end_id: int                  # the closing tag's token id

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            raise InvalidArgument(f"max_thinking_tokens must be a non-negative integer, got {self.max_tokens!r}")

    def cut(self, written: int, tokens: list[int]) -> list[int]:
        """`tokens` about to be appended to a row that has `written` tokens and has not closed its
        thinking: unchanged when they close it (or stay under the budget), else cut at the budget
        index with the tag there."""
        for i, t in enumerate(tokens):
            if t == self.end_id:
                return tokens
            if written + i >= self.max_tokens:
                return tokens[:i] + [self.end_id]
        return tokens

    def block_position(self, written: int, block_length: int) -> int | None:
        """Where in a block starting at generated index `written` the tag goes (None: not this block)."""
        if written + block_length <= self.max_tokens:
            return None
        return max(0, self.max_tokens - written)
