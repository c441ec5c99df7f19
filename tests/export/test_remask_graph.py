"""The remask stage in standard ops: the same commit sets as decoding.remask (ties, none above threshold,
all committed, inactive rows, the per-row choice between the threshold and the top-k rule), the same stop
rule as the host loop, and the exported graph's commits, counters and done flag agree with the rules
applied to its own token/confidence outputs under ONNX Runtime."""

import numpy as np
import pytest
import torch

from nemodiff_compile.export.remask_graph import commit_by_rank, remask_stage, still_refining
from nemodiff_compile.decoding import remask
from nemodiff_compile.kernels.remask.reference import stage_commit


def _cases():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(6, 16, generator=g)
    conf[1] = 0.5                                   # all tied
    conf[2, 3] = conf[2, 9] = 0.99                  # tie at the top
    masked = torch.rand(6, 16, generator=g) < 0.6
    masked[3] = False                               # nothing masked (all committed already)
    masked[4] = True
    return conf, masked


@pytest.mark.parametrize("threshold", [0.9, 0.0, 1.0, 0.3, 0.5])
def test_threshold_rule_matches_sampling(threshold):
    conf, masked = _cases()
    want = remask.commit_threshold(conf, masked, threshold)
    assert torch.equal(commit_by_rank(conf, masked, threshold, torch.full((6,), -1)), want)   # -1: threshold rule


def test_confidence_equal_to_the_threshold_commits():
    """Row 1 of _cases is all 0.5: at threshold 0.5 every masked position commits (>=, not >)."""
    conf, masked = _cases()
    got = commit_by_rank(conf, masked, 0.5, torch.full((6,), -1))                 # -1: the threshold rule
    assert torch.equal(got[1], masked[1]) and int(masked[1].sum()) > 1
    ones = torch.ones(2, 5)
    assert commit_by_rank(ones, torch.ones(2, 5, dtype=torch.bool), 1.0, torch.full((2,), -1)).all()


@pytest.mark.parametrize("k", [0, 1, 3, 16])
def test_topk_rule_matches_sampling(k):
    conf, masked = _cases()
    quota = torch.tensor([k, 2, 1, 5, k, 0])
    assert torch.equal(commit_by_rank(conf, masked, None, quota), remask.commit_topk(conf, masked, quota))
    assert torch.equal(commit_by_rank(conf, masked, 0.9, quota), remask.commit_topk(conf, masked, quota))


def test_rows_choose_their_rule_by_quota():
    """One graph serves both policies: quota >= 0 rows take the top-k rule, quota < 0 rows the threshold
    rule; the plugin's reference (stage_commit) says the same, and a top-k node ignores the threshold."""
    conf, masked = _cases()
    quota = torch.tensor([-1, 3, -1, 2, 0, -1])
    want = torch.where(quota[:, None] >= 0, remask.commit_topk(conf, masked, quota.clamp(min=0)),
                       remask.commit_threshold(conf, masked, 0.5))
    assert torch.equal(commit_by_rank(conf, masked, 0.5, quota), want)
    assert torch.equal(stage_commit(conf, masked, quota, policy="threshold", threshold=0.5), want)
    assert torch.equal(stage_commit(conf, masked, quota, policy="topk", threshold=0.5),
                       remask.commit_topk(conf, masked, quota.clamp(min=0)))


def test_stop_rule_and_counters_match_the_host_loop():
    """still_refining (first mask before first EOS, no cumsum) equals the loop's `masked.any & ~eos_complete`;
    remask_stage's counters and done flag follow refine.py on random canvases with EOS and masks."""
    g = torch.Generator().manual_seed(3)
    mask_id, eos = 100, (11, 12)
    canvas = torch.randint(0, 20, (64, 8), generator=g)
    canvas[torch.rand(64, 8, generator=g) < 0.4] = mask_id
    canvas[:4] = torch.tensor([[5, 11, 100, 100, 3, 3, 3, 3], [5, 100, 11, 3, 3, 3, 3, 3],
                               [5, 6, 7, 8, 9, 10, 3, 3], [12, 100, 100, 100, 100, 100, 100, 100]])
    masked = canvas == mask_id
    want = masked.any(1) & ~remask.eos_complete(canvas, masked, eos)
    assert torch.equal(still_refining(canvas, mask_id, eos), want)
    assert want[:4].tolist() == [False, True, False, False]
    active = torch.rand(64, generator=g) < 0.8
    logits = torch.randn(64, 8, 50, generator=g)
    row_nfe = torch.randint(0, 3, (64,), generator=g)
    quota = torch.full((64, 8), -1)
    opts = {"variant": "onnx", "mask_id": mask_id, "eos_ids": list(eos), "threshold": 0.05}
    token, conf, out, commit, nfe_out, done = remask_stage(logits, torch.zeros_like(logits), canvas, active, quota,
                                                           row_nfe, opts)
    refining = active & want
    assert torch.equal(commit, remask.commit_threshold(conf, masked & refining[:, None], 0.05))
    assert torch.equal(out, torch.where(commit, token, canvas)) and torch.equal(nfe_out, row_nfe + refining.long())
    m2 = out == mask_id
    assert bool(done) == (not bool((active & m2.any(1) & ~remask.eos_complete(out, m2, eos)).any()))


@pytest.mark.parametrize("graph", ["trt_fp32_dir", "fp8_remask_dir"])
def test_exported_remask_stage_under_onnxruntime(graph, request, tiny_cfg, quantized_linears):
    """fp32, and fp8 Q/DQ (the quantized export keeps the remask stage)."""
    ort = pytest.importorskip("onnxruntime")
    from nemodiff_compile.artifact.manifest import read_manifest

    folder = request.getfixturevalue(graph)
    m = read_manifest(folder)
    if m.quantization:
        assert m.quantization["graph"]["qdq_nodes"]["QuantizeLinear"] == quantized_linears("fp8")
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    c, B, L, S = tiny_cfg, 3, 16, 8
    rng = np.random.default_rng(0)
    mask_id = m.io_spec["extra"]["remask"]["mask_id"]
    canvas = np.where(rng.random((B, L)) < 0.7, mask_id, rng.integers(200, 300, (B, L))).astype(np.int64)
    kv = np.zeros((c.num_hidden_layers, B, c.num_key_value_heads, S, c.head_dim), np.float32)
    feeds = {"input_ids": canvas, "cache_lengths": np.zeros(B, np.int64), "num_valid": np.full(B, L, np.int64),
             "causal": np.zeros(B, bool), "temperature": np.array(0.0, np.float32),
             "gumbel_noise": np.zeros((B, L, c.vocab_size), np.float32), "past_keys": kv, "past_values": kv,
             "canvas": canvas, "active": np.array([True, True, False]), "quota": np.full((B, L), -1, np.int64),
             "row_nfe": np.array([0, 2, 1], np.int64)}
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    token, conf = torch.from_numpy(out["token"]), torch.from_numpy(out["confidence"])
    masked = (torch.from_numpy(canvas) == mask_id) & torch.tensor([True, True, False])[:, None]
    want = remask.commit_threshold(conf, masked, m.io_spec["extra"]["remask"]["threshold"])
    assert torch.equal(torch.from_numpy(out["commit"]), want)
    assert torch.equal(torch.from_numpy(out["canvas_out"]), torch.where(want, token, torch.from_numpy(canvas)))
    assert not out["commit"][2].any() and out["commit"][:2].any(axis=1).all()
    assert out["row_nfe_out"].tolist() == [1, 3, 1] and out["done"].shape == () and not out["done"]
