"""Distribution-level gates (per pass kind cosine percentile and mean KL, prompt spread), chunked
validation, and the failure explanation down to the decoder layer, on the random tiny model."""

import copy
import json

import pytest
import torch

from nemodiff_compile.backends.eager import TorchDenoiser
from nemodiff_compile.validate import tolerances_for, validate
from nemodiff_compile.validate import layers, spread
from nemodiff_compile.validate.explain import explain

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63], [1, 70, 71, 72, 73, 74, 75, 76]]
KW = dict(max_new_tokens=16, block_length=8, threshold=0.3)
# judged by distributions only: no per-pass bound, no trajectory bound
GATES = tolerances_for("fp8", dict(cosine_p05=0.99, kl_mean_max=0.005, forced_token_agreement=None,
                                   commit_agreement=None))


def den(model):
    return TorchDenoiser(model, max_len=96, return_logits=True)


def perturb(model, layer: int, scale: float):
    m = copy.deepcopy(model)
    w = m.encoder.layers[layer].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * scale)
    return m


def test_quantile_and_prompt_spread():
    x = torch.arange(1, 101, dtype=torch.float32) / 100                    # 0.01 .. 1.00
    assert spread.quantile(x, 0.01) == pytest.approx(0.01) and spread.quantile(x, 0.5) == pytest.approx(0.5)
    assert spread.quantile(torch.zeros(0), 0.5) is None
    s = spread.prompt_spread([1.0, 1.0, 1.0, 0.5, 0.0])
    assert s["prompts"] == 5 and s["mean"] == pytest.approx(0.7) and s["median"] == 1.0
    assert s["min"] == 0.0 and s["exact"] == pytest.approx(0.6)


def test_identical_engine_has_zero_kl_and_unit_cosine(random_tiny):
    rep = validate(den(random_tiny), den(random_tiny), PROMPTS, tolerances=GATES, **KW)
    assert rep.passed, rep.to_table()
    js = json.loads(json.dumps(rep.to_json()))
    for mode in js["per_mode"].values():
        assert mode["kl_mean"] == pytest.approx(0.0, abs=1e-9)
        assert mode["prompt_spread"]["exact"] == 1.0
        for d in mode["phases"].values():
            assert d["cosine"]["p01"] == pytest.approx(1.0) and d["kl"]["max"] == pytest.approx(0.0, abs=1e-9)
    assert set(js["per_mode"]["linear-spec"]["phases"]) == {"prefill", "draft", "verify"}
    assert "pass kind" in rep.to_table() and "draft" in rep.to_table()


def test_chunked_validation_pools_its_chunks(random_tiny):
    """batch=2 runs the 4 prompts as two decode batches, pooled into one report: the same figures as
    the two halves validated on their own, combined; trajectories as in one batch of 4."""
    eng = perturb(random_tiny, 2, 0.02)
    modes = ("dlm", "linear-spec")
    parts = validate(den(random_tiny), den(eng), PROMPTS, tolerances=GATES, batch=2, modes=modes, **KW)
    halves = [validate(den(random_tiny), den(eng), PROMPTS[i:i + 2], tolerances=GATES, modes=modes, **KW)
              for i in (0, 2)]
    whole = validate(den(random_tiny), den(eng), PROMPTS, tolerances=GATES, modes=("dlm",), **KW)
    for name, m in parts.modes.items():
        hs = [h.modes[name] for h in halves]
        assert m.prompt_agreement == hs[0].prompt_agreement + hs[1].prompt_agreement
        assert len(m.passes) == sum(len(h.passes) for h in hs)
        assert [p.index for p in m.passes] == list(range(len(m.passes)))
        assert sum(p.token_matches for p in m.passes) == sum(p.token_matches for h in hs for p in h.passes)
        assert m.nfe["engine"] == sum(h.nfe["engine"] for h in hs)
        assert m.tokens_per_forward["engine"] == pytest.approx(sum(h.tokens_per_forward["engine"] for h in hs) / 2)
        assert {p.first_prompt for p in m.passes} == {0, 2}
    assert parts.modes["dlm"].prompt_agreement == pytest.approx(whole.modes["dlm"].prompt_agreement)


@pytest.mark.parametrize("layer", [1, 4])
def test_explanation_names_the_mode_pass_kind_and_layer(random_tiny, layer):
    """An error put into one decoder layer's weights: the distribution gates fail, and the
    explanation replays the worst pass and finds the error rising at that layer."""
    eng = perturb(random_tiny, layer, 0.05)
    rep = validate(den(random_tiny), den(eng), PROMPTS, tolerances=GATES, batch=2, modes=("dlm",), **KW)
    assert not rep.passed
    assert any("passes: mean KL" in f or "5th-percentile logit cosine" in f for f in rep.failures), rep.failures
    why = explain(rep, den(random_tiny), den(eng), PROMPTS)
    assert why["mode"] in rep.modes and not rep.modes[why["mode"]].passed
    assert why["phase"] in ("prefill", "decode", "denoise", "commit", "draft", "verify")
    rel = why["layers"]["relative"]
    assert len(rel) == random_tiny.config.num_hidden_layers
    assert why["layers"]["jump"] == layer
    assert all(r < 1e-5 for r in rel[:layer]) and rel[layer] > 1e-3        # exact before it, off from it on
    assert f"largest rise at layer {layer}" in why["text"] and why["mode"] in why["text"]
    assert explain(validate(den(random_tiny), den(random_tiny), PROMPTS[:1], tolerances=GATES, modes=("dlm",), **KW),
                   den(random_tiny), den(random_tiny), PROMPTS[:1]) is None


def test_onnx_runtime_tap_reads_the_layer_outputs(tiny_engine):
    """The graph values picked as layer outputs are the decoder layers' outputs: an fp32 ONNX Runtime
    engine tapped on one pass equals the torch reference's hooks layer by layer."""
    from nemodiff_compile.validate.engine import open_pair

    _, eng, ref, _ = open_pair(tiny_engine, max_len=64)
    x = torch.tensor([[1, 60, 61, 62, 63, 64]])
    with layers.tap(ref) as tr, layers.tap(eng) as te:
        for d in (ref, eng):
            d.reset(1)
            d.step(x[:, :4], causal=True, write=True)
        tr.arm()
        te.arm()
        for d in (ref, eng):
            d.step(x[:, 4:], causal=False, write=False)
    assert len(te.states) == len(tr.states) == ref.config.num_hidden_layers
    errors = layers.layer_errors(tr.states, te.states, torch.ones(1, 2, dtype=torch.bool))
    assert max(errors["relative"]) < 1e-5
    out = eng.step(x[:, 4:], causal=False, write=False)          # untapped again: the engine's own session
    assert out.logits.shape == (1, 2, ref.config.vocab_size)


def test_advice_never_asks_for_what_the_recipe_already_keeps():
    from nemodiff_compile.validate.explain import advice

    assert "--keep-first-layers 1" in advice(0, 6)                       # nothing kept: keep the first layer
    assert "--keep-last-layers 1" in advice(5, 6)
    assert "--keep-first-layers 2" in advice(1, 6, kept=(1, 0))           # fp8 keeps layer 0: the next one
    assert "--keep-last-layers 2" in advice(4, 6, kept=(0, 1))
    for layer, kept in ((0, (1, 0)), (5, (0, 1)), (1, (2, 0))):
        text = advice(layer, 6, kept=kept)
        assert "already kept in float" in text and "--keep-" not in text, (layer, kept, text)
    assert "mid-model" in advice(3, 6, kept=(1, 0))
