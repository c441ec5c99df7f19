"""The thinking budget in the three decode loops, on the trained tiny model: the closing tag lands at
generated index max_tokens (unless the row closed or finished first), tokens before it are the
unforced generation's, and decoding carries on from it."""

import pytest

from nemodiff_compile import TINY_ASSET
from nemodiff_compile.decoding import loops
from nemodiff_compile.decoding.thinking import ThinkingBudget

pytestmark = pytest.mark.skipif(not (TINY_ASSET / "config.json").is_file(), reason="tiny assets not built")
END = 13            # </think> in the tiny vocabulary
BLOCK = 16          # the tiny model's block_size


def test_cut_and_block_position():
    b = ThinkingBudget(5, END)
    assert b.cut(0, [1, 2, 3]) == [1, 2, 3]                       # under budget
    assert b.cut(3, [1, 2, 3, 4]) == [1, 2, END]                  # index 5 becomes the tag, the rest is cut
    assert b.cut(5, [7]) == [END]                                 # ar: the token at the budget index
    assert b.cut(3, [1, END, 3, 4]) == [1, END, 3, 4]             # closed by the model itself
    assert b.block_position(0, 4) is None and b.block_position(0, 16) == 5 and b.block_position(4, 4) == 1
    assert ThinkingBudget(16, END).block_position(16, 16) == 0    # the block's seed position (as upstream)
    with pytest.raises(ValueError):
        ThinkingBudget(-1, END)


@pytest.fixture(scope="module")
def den():
    from nemodiff_compile import load_reference
    from nemodiff_compile.backends.eager import TorchDenoiser

    return TorchDenoiser(load_reference("tiny"), max_len=256)


@pytest.fixture(scope="module")
def prompts():
    from nemodiff_compile.model.tokenizer import encode_prompt, load_tokenizer

    tok = load_tokenizer(TINY_ASSET)
    # row 0 tells a long story; row 1 ends (EOS) after 15 tokens, before any budget below is spent
    return [encode_prompt(tok, t, chat=False) for t in ("Once upon a time, Tom", "The days of the week are")]


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear-spec"])
def test_budget_forces_the_closing_tag(den, prompts, mode):
    free = loops.generate(den, prompts, mode, max_new_tokens=40).tokens
    assert END not in free[0] and len(free[0]) == 40 and len(free[1]) == 15
    budget = 20                                                   # inside the second dlm block
    g = loops.generate(den, prompts, mode, max_new_tokens=40, thinking=ThinkingBudget(budget, END), trace=True)
    row = g.tokens[0]
    assert row[budget] == END and END not in row[:budget] and len(row) == 40
    same = budget if mode != "dlm" else BLOCK     # dlm: the blocks before the tag's block are untouched
    assert row[:same] == free[0][:same]
    assert g.tokens[1] == free[1]                 # finished before its budget: nothing forced
    if mode == "dlm":                             # the tag was in place before the block was refined
        first = next(p for p in g.trace if p.phase == "denoise" and p.block == 1)
        assert int(first.tokens[0, budget - BLOCK]) == END
    if mode == "linear-spec":                     # greedy linear-spec is AR, also across a forced tag
        ar = loops.generate(den, prompts, "ar", max_new_tokens=40, thinking=ThinkingBudget(budget, END)).tokens
        assert g.tokens == ar


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear-spec"])
def test_zero_budget_closes_at_once(den, prompts, mode):
    g = loops.generate(den, prompts[:1], mode, max_new_tokens=8, thinking=ThinkingBudget(0, END))
    assert g.tokens[0][0] == END and g.tokens[0].count(END) == 1
