"""The decode loops on the tiny geometry: cache discipline, commit rules, batching, losslessness."""

import pytest
import torch

from contract_denoiser import ContractOnly  # tests/contract_denoiser.py
from nemodiff_compile.backends.eager import TorchDenoiser
from nemodiff_compile.decoding import loops, remask
from nemodiff_compile.decoding.denoiser import Denoiser, StepOut

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69]]


class NoCacheDenoiser(Denoiser):
    """The same contract without a KV cache: every pass re-runs the whole history of each row with
    an explicit block-causal mask (history causal, block causal or bidirectional over everything)."""

    def __init__(self, model, max_len):
        self.model, self.config, self.max_len = model, model.config, max_len

    def reset(self, batch):
        self.hist = [torch.zeros(0, dtype=torch.long) for _ in range(batch)]

    def lengths(self):
        return torch.tensor([len(h) for h in self.hist])

    def trim(self, lengths):
        self.hist = [h[: int(n)] for h, n in zip(self.hist, lengths)]

    @torch.no_grad()
    def step(self, tokens, *, causal, write, num_valid=None, draft_lora=False, temperature=0.0, generator=None):
        B, L = tokens.shape
        num_valid = num_valid if num_valid is not None else torch.full((B,), L)
        logits = []
        for b in range(B):
            h, blk = self.hist[b], tokens[b, : int(num_valid[b])]       # padding is simply left out
            P, n = len(h), len(blk)
            mask = torch.ones(P + n, P + n, dtype=torch.bool).tril()
            if not causal:
                mask[P:, P:] = True
            out = self.model(torch.cat([h, blk])[None], attn_mask=mask[None], draft_lora=draft_lora)[0, P:]
            logits.append(torch.cat([out, out.new_zeros(L - n, out.shape[-1])]))
            if write:
                self.hist[b] = torch.cat([h, blk])
        logits = torch.stack(logits)
        noise = remask.gumbel_noise(logits.shape, generator) if temperature > 0 else None
        tok, conf = remask.pick(logits, temperature, noise)
        return StepOut(tok, conf)


@pytest.fixture(scope="module")
def den(random_tiny):
    return TorchDenoiser(random_tiny, max_len=160)


@pytest.mark.parametrize("mode", loops.MODES)
def test_cached_loop_equals_uncached_loop(random_tiny, den, mode):
    kw = dict(max_new_tokens=16, block_length=8, threshold=0.3 if mode == "dlm" else None)
    a = loops.generate(den, PROMPTS[:2], mode, **kw)
    b = loops.generate(NoCacheDenoiser(random_tiny, 160), PROMPTS[:2], mode, **kw)
    assert a.tokens == b.tokens and a.nfe_by_phase == b.nfe_by_phase


def test_threshold_one_commits_one_per_pass(den, random_tiny):
    g = loops.diffusion_generate(den, PROMPTS[:1], max_new_tokens=16, block_length=8, threshold=1.0, trace=True)
    denoise = [r for r in g.trace if r.phase == "denoise"]
    confs = torch.cat([r.conf for r in denoise])
    assert confs.max() < 1.0          # random weights: no position is certain, so exactly one per pass
    assert all(int(r.committed.sum()) == 1 for r in denoise)
    assert g.nfe_by_phase == {"prefill": 1, "denoise": 2 * 7, "commit": 2}


def test_threshold_zero_commits_the_whole_block_in_one_pass(den):
    g = loops.diffusion_generate(den, PROMPTS[:1], max_new_tokens=32, block_length=16, threshold=0.0, trace=True)
    assert g.nfe_by_phase == {"prefill": 1, "denoise": 2, "commit": 2}
    assert all(int(r.committed.sum()) == 15 for r in g.trace if r.phase == "denoise")
    assert len(g.tokens[0]) == 32 and 100 not in g.tokens[0]


def test_fixed_steps_schedule_is_a_hard_budget(den):
    g = loops.diffusion_generate(den, PROMPTS[:2], max_new_tokens=32, block_length=16, threshold=None,
                                 steps=4, trace=True)
    assert g.nfe_by_phase == {"prefill": 1, "denoise": 8, "commit": 2}
    per_pass = [r.committed.sum(1).tolist() for r in g.trace if r.phase == "denoise"]
    assert per_pass[:4] == [[4, 4], [4, 4], [4, 4], [3, 3]]          # 15 masks split over 4 passes


def test_seed_is_the_causal_prediction_and_never_changes(den, random_tiny):
    g = loops.diffusion_generate(den, PROMPTS[:1], max_new_tokens=16, block_length=8, threshold=0.5, trace=True)
    prefill, commits = g.trace[0], [r for r in g.trace if r.phase == "commit"]
    assert g.tokens[0][0] == int(prefill.out_token[0, len(PROMPTS[0]) - 1])
    assert g.tokens[0][8] == int(commits[0].out_token[0, -1])
    for r in g.trace:
        if r.phase == "denoise":
            assert not r.committed[:, 0].any()
    with torch.no_grad():   # the seed of block 2 is the AR prediction after prompt + block 1
        logits = random_tiny(torch.tensor([PROMPTS[0] + g.tokens[0][:8]]))
    assert g.tokens[0][8] == int(logits[0, -1].argmax())


@pytest.mark.parametrize("mode", loops.MODES)
def test_batch_rows_are_independent(den, mode):
    kw = dict(max_new_tokens=20, block_length=8, threshold=0.4 if mode == "dlm" else None)
    batch = loops.generate(den, PROMPTS, mode, **kw)
    for b, p in enumerate(PROMPTS):
        single = loops.generate(den, [p], mode, **kw)
        assert batch.tokens[b] == single.tokens[0]
        assert batch.row_nfe[b] == single.row_nfe[0]


def test_linear_spec_is_lossless(den):
    for block in (4, 8, 16):
        ar = loops.ar_generate(den, PROMPTS, max_new_tokens=30)
        ls = loops.linear_spec_generate(den, PROMPTS, max_new_tokens=30, block_length=block)
        assert ls.tokens == ar.tokens
        assert ls.nfe_by_phase["verify"] == ls.nfe_by_phase["draft"]


def test_rows_finish_at_different_times(random_tiny, tiny_cfg):
    """Make a different token the EOS for each run so one row stops early and the other runs on.
    Per mode: the EOS is a token of row 0's own output (dlm commits differ from AR), absent from
    row 1's; row 0 then stops there with the same tokens, and spends fewer passes."""
    den = TorchDenoiser(random_tiny, max_len=160)
    for mode in loops.MODES:
        kw = dict(max_new_tokens=20, block_length=8, threshold=0.3 if mode == "dlm" else None)
        den.config = tiny_cfg
        ref = loops.generate(den, PROMPTS[:2], mode, **kw)
        cut = next(i for i, t in enumerate(ref.tokens[0]) if 3 <= i < 12 and t not in ref.tokens[0][:i] + ref.tokens[1])
        den.config = tiny_cfg.replace(eos_token_id=ref.tokens[0][cut])
        g = loops.generate(den, PROMPTS[:2], mode, **kw)
        assert g.finish[1] == "length" and g.tokens[1] == ref.tokens[1], mode
        assert g.finish[0] == "eos" and g.tokens[0] == ref.tokens[0][: cut + 1], mode
        assert g.row_nfe[0] < g.row_nfe[1], mode


def test_temperature_sampling_is_seeded(den):
    for mode in loops.MODES:
        kw = dict(max_new_tokens=16, block_length=8, temperature=1.0)
        a = loops.generate(den, PROMPTS[:1], mode, seed=1, **kw)
        b = loops.generate(den, PROMPTS[:1], mode, seed=1, **kw)
        c = loops.generate(den, PROMPTS[:1], mode, seed=2, **kw)
        greedy = loops.generate(den, PROMPTS[:1], mode, max_new_tokens=16, block_length=8)
        assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != greedy.tokens


def test_tokens_per_forward_definition(den):
    g = loops.diffusion_generate(den, PROMPTS[:1], max_new_tokens=16, block_length=8, threshold=0.0)
    assert g.nfe == 1 + 2 + 2 and g.tokens_per_forward == pytest.approx(16 / 5)


def test_bad_arguments(den):
    with pytest.raises(ValueError, match="cache positions"):
        loops.ar_generate(den, PROMPTS[:1], max_new_tokens=1000)
    with pytest.raises(ValueError, match="threshold"):
        loops.diffusion_generate(den, PROMPTS[:1], max_new_tokens=8, threshold=1.5)
    with pytest.raises(ValueError, match="mode"):
        loops.generate(den, PROMPTS[:1], "beam", max_new_tokens=8)


@pytest.mark.parametrize("mode", loops.MODES)
def test_streamed_chunks_add_up_to_the_result(den, mode):
    chunks = {0: [], 1: []}
    g = loops.generate(den, PROMPTS[:2], mode, max_new_tokens=13, block_length=4,
                       on_tokens=lambda b, toks: chunks[b].append(toks))
    assert [sum(chunks[b], []) for b in (0, 1)] == g.tokens
    assert all(len(t) == 13 for t in g.tokens)
    if mode == "dlm":                      # whole blocks stream at once (the last one cut to 13)
        assert [len(c) for c in chunks[0]] == [4, 4, 4, 1]


class CertainDenoiser(ContractOnly):
    """`den` with every confidence exactly 1.0 (what bf16 reaches on a peaked output)."""

    def step(self, tokens, **kw):
        out = super().step(tokens, **kw)
        return StepOut(out.token, torch.ones_like(out.conf))


def test_confidence_equal_to_the_threshold_commits_in_the_loops(den):
    """Threshold 1.0 with confidences of exactly 1.0: one pass fills a block (>=, not >)."""
    sure = CertainDenoiser(den)
    g = loops.diffusion_generate(sure, PROMPTS[:2], max_new_tokens=16, block_length=8, threshold=1.0)
    assert g.nfe_by_phase == {"prefill": 1, "denoise": 2, "commit": 2}
    g = loops.linear_spec_generate(sure, PROMPTS[:1], max_new_tokens=8, block_length=8, threshold=1.0)
    assert g.nfe_by_phase["draft"] == g.nfe_by_phase["verify"]            # one draft pass per block
