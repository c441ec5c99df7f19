"""The joint AR + block-diffusion objective: mask layout, noising rules, and that it trains."""

import torch

from nemodiff_compile.config import PRESETS
from nemodiff_compile.model import NemotronLabsDiffusion
from tinylm.objective import (
    add_noise,
    block_diff_mask,
    doc_layout,
    joint_loss,
    joint_positions,
)


def test_block_diff_mask_l8_block4():
    m = block_diff_mask(8, 4).int()
    # rows/cols 0..7 = noisy x_t (blocks {0..3}, {4..7}), 8..15 = clean x_0 (same blocks)
    N = [[1] * 4 + [0] * 4] * 4 + [[0] * 4 + [1] * 4] * 4        # noisy -> noisy: own block only
    NC = [[0] * 8] * 4 + [[1] * 4 + [0] * 4] * 4                 # noisy -> clean: earlier blocks only
    C = [[int(k <= q) for k in range(8)] for q in range(8)]        # clean -> clean: causal
    want = torch.tensor([n + nc for n, nc in zip(N, NC)] + [[0] * 8 + c for c in C])
    assert torch.equal(m, want)
    assert torch.equal(joint_positions(8), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7] * 2))


def test_noise_keeps_block_seeds_and_follows_p():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(200, 300, (64, 32), generator=g)
    nz = add_noise(x0, block_size=8, mask_id=100, generator=g)
    assert not nz.masked[:, ::8].any()                             # first token of each block given
    assert torch.equal(nz.x_t[nz.masked], torch.full_like(nz.x_t[nz.masked], 100))
    assert torch.equal(nz.x_t[~nz.masked], x0[~nz.masked])
    # one mask rate per block
    assert torch.equal(nz.p.view(64, 4, 8), nz.p.view(64, 4, 8)[:, :, :1].expand(64, 4, 8))
    assert ((nz.p >= 1e-3) & (nz.p <= 1)).all()
    # realised rate ~ p over the maskable positions
    rate = nz.masked[nz.maskable].float().mean()
    assert abs(rate - nz.p[nz.maskable].mean()) < 0.03


def test_doc_layout_packed_rows():
    # blocks of 4; documents: 0 = positions 0..5, 1 = 6..9
    doc = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    lay = doc_layout(doc, 4)
    assert lay.pos_clean.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    # block [4..7] starts in document 0: its positions 6, 7 are EOS padding of document 0
    assert lay.noisy_doc.tolist() == [[0, 0, 0, 0, 0, 0, 0, 0, 1, 1]]
    assert lay.pos_noisy.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 2, 3]]
    assert lay.pad.tolist() == [[False] * 6 + [True, True] + [False] * 2]


def test_doc_mask_never_crosses_documents():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].replace(num_hidden_layers=1, vocab_size=256)
    model = NemotronLabsDiffusion(cfg)
    seen = {}
    orig = model.forward

    def spy(ids, **kw):
        seen.update(kw)
        return orig(ids, **kw)

    model.forward = spy
    x0 = torch.randint(120, 200, (1, 8))
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    joint_loss(model, x0, block_size=4, mask_id=100, alpha=1.0, doc_ids=doc, eos_id=11)
    m = seen["attn_mask"][0]                                             # [16, 16]
    clean = slice(8, 16)
    assert not m[clean, clean][3:, :3].any()
    assert torch.equal(m[clean, clean][3:, 3:], torch.ones(5, 5, dtype=torch.bool).tril())
    # noisy block 1 (positions 4..7, document 1) reads clean document-1 keys of block 0 only (pos 3)
    assert m[4:8, clean].int().tolist() == [[0, 0, 0, 1, 0, 0, 0, 0]] * 4
    assert seen["positions"][0].tolist() == [0, 1, 2, 3, 1, 2, 3, 4] + [0, 1, 2, 0, 1, 2, 3, 4]


def test_loss_finite_and_decreases():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].replace(num_hidden_layers=2, vocab_size=256)
    model = NemotronLabsDiffusion(cfg)
    g = torch.Generator().manual_seed(0)
    # a learnable toy batch: repeating ramps
    x0 = (torch.arange(32)[None, :] * 3 + torch.arange(4)[:, None] * 7) % 50 + 120   # [4, 32]
    doc = (torch.arange(32) // 13).expand(4, 32)                                     # 3 documents a row
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = joint_loss(model, x0, block_size=8, mask_id=cfg.mask_token_id, alpha=0.5, doc_ids=doc, eos_id=11,
                         generator=g)
        assert torch.isfinite(out.loss) and out.n_masked > 0
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
