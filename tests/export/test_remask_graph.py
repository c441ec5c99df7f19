"""The remask stage in standard ops: the same commit sets as decoding.remask (ties, none above threshold,
all committed, inactive rows), and the exported graph's commits agree with the rule applied to its own
token/confidence outputs under ONNX Runtime."""

import numpy as np
import pytest
import torch

from nemodiff_compile.export.remask_graph import commit_by_rank
from nemodiff_compile.decoding import remask


def _cases():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(6, 16, generator=g)
    conf[1] = 0.5                                   # all tied
    conf[2, 3] = conf[2, 9] = 0.99                  # tie at the top
    masked = torch.rand(6, 16, generator=g) < 0.6
    masked[3] = False                               # nothing masked (all committed already)
    masked[4] = True
    return conf, masked


@pytest.mark.parametrize("threshold", [0.9, 0.0, 1.0, 0.3])
def test_threshold_rule_matches_sampling(threshold):
    conf, masked = _cases()
    want = remask.commit_threshold(conf, masked, threshold)
    assert torch.equal(commit_by_rank(conf, masked, threshold, torch.zeros(6, dtype=torch.long)), want)


@pytest.mark.parametrize("k", [0, 1, 3, 16])
def test_topk_rule_matches_sampling(k):
    conf, masked = _cases()
    quota = torch.tensor([k, 2, 1, 5, k, 0])
    assert torch.equal(commit_by_rank(conf, masked, None, quota), remask.commit_topk(conf, masked, quota))


@pytest.mark.parametrize("graph", ["trt_fp32_dir", "fp8_remask_dir"])
def test_exported_remask_stage_under_onnxruntime(graph, request, tiny_cfg):
    """fp32, and fp8 Q/DQ (the quantized export keeps the remask stage)."""
    ort = pytest.importorskip("onnxruntime")
    from nemodiff_compile.artifact.manifest import read_manifest

    folder = request.getfixturevalue(graph)
    m = read_manifest(folder)
    if m.quantization:
        assert m.quantization["graph"]["qdq_nodes"]["QuantizeLinear"] == 6 * 7
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    c, B, L, S = tiny_cfg, 3, 16, 8
    rng = np.random.default_rng(0)
    mask_id = m.io_spec["extra"]["remask"]["mask_id"]
    canvas = np.where(rng.random((B, L)) < 0.7, mask_id, rng.integers(200, 300, (B, L))).astype(np.int64)
    kv = np.zeros((c.num_hidden_layers, B, c.num_key_value_heads, S, c.head_dim), np.float32)
    feeds = {"input_ids": canvas, "cache_lengths": np.zeros(B, np.int64), "num_valid": np.full(B, L, np.int64),
             "causal": np.array(False), "temperature": np.array(0.0, np.float32),
             "gumbel_noise": np.zeros((B, L, c.vocab_size), np.float32), "past_keys": kv, "past_values": kv,
             "canvas": canvas, "active": np.array([True, True, False]), "quota": np.ones(B, np.int64)}
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    token, conf = torch.from_numpy(out["token"]), torch.from_numpy(out["confidence"])
    masked = (torch.from_numpy(canvas) == mask_id) & torch.tensor([True, True, False])[:, None]
    want = remask.commit_threshold(conf, masked, m.io_spec["extra"]["remask"]["threshold"])
    assert torch.equal(torch.from_numpy(out["commit"]), want)
    assert torch.equal(torch.from_numpy(out["canvas_out"]), torch.where(want, token, torch.from_numpy(canvas)))
    assert not out["commit"][2].any() and out["commit"][:2].any(axis=1).all()
