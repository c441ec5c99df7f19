"""ONNX Runtime backend vs the eager reference on the tiny geometry, fp32: per-pass parity (input tokens,
candidates, confidence, logits) over whole trajectories in every mode, batch 1 and 4, ragged prompts."""

import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from nemodiff_compile import TINY_ASSET                                  # noqa: E402
from nemodiff_compile.errors import NemodiffError                        # noqa: E402
from nemodiff_compile.export.onnx import ONNX_NAME, export_step          # noqa: E402
from nemodiff_compile.artifact.spec import IOSpec, TensorSpec              # noqa: E402
from nemodiff_compile.backends.ort import OrtDenoiser              # noqa: E402
from nemodiff_compile.backends.eager import TorchDenoiser          # noqa: E402
from nemodiff_compile.decoding import loops  # noqa: E402

MAX_LEN = 64
PROMPTS = {                                       # batch 1 at two prompt lengths, batch 4 ragged and even
    "b1-short": [[1, 50, 51]],
    "b1-long": [[1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69]],
    "b4-ragged": [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69],
                  [1, 7, 8, 9, 10]],
    "b4-even": [[1, 20 + i, 30 + i, 40 + i, 50 + i, 60 + i] for i in range(4)],
}
# random_tiny is flat (confidences ~0.004-0.01 over 1024 tokens): 0.9 and 0.3 commit one position per
# pass, 0.007 (about the median) commits several, so the threshold rule is exercised at its boundary.
MODES = {
    "ar": ("ar", {}),
    "dlm-t0.9": ("dlm", dict(threshold=0.9)),
    "dlm-t0.3": ("dlm", dict(threshold=0.3)),
    "dlm-t0.007": ("dlm", dict(threshold=0.007)),
    "dlm-steps4": ("dlm", dict(threshold=None, steps=4)),
    "linear-spec": ("linear-spec", {}),
}


class Recording:
    """A Denoiser proxy that keeps every pass's logits (the loops' trace keeps tokens and confidence)."""

    def __init__(self, den):
        self.den, self.logits = den, []

    def __getattr__(self, name):
        return getattr(self.den, name)

    def step(self, tokens, **kw):
        out = self.den.step(tokens, **kw)
        self.logits.append(out.logits.detach().cpu().clone())
        return out


@pytest.fixture(scope="module")
def exported(random_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort_tiny")
    spec = export_step(random_tiny, out, with_logits=True)
    return out / ONNX_NAME, spec


@pytest.fixture(scope="module")
def pair(random_tiny, exported):
    path, spec = exported
    return (TorchDenoiser(random_tiny, MAX_LEN, return_logits=True),
            OrtDenoiser(path, spec, random_tiny.config, MAX_LEN, threads=1, return_logits=True))


def run_both(pair, prompts, mode, **kw):
    ref, ort = Recording(pair[0]), Recording(pair[1])
    a = loops.generate(ref, prompts, mode, max_new_tokens=16, block_length=8, trace=True, **kw)
    b = loops.generate(ort, prompts, mode, max_new_tokens=16, block_length=8, trace=True, **kw)
    assert len(a.trace) == len(b.trace) == len(ref.logits) == len(ort.logits)
    for i, (x, y, lx, ly) in enumerate(zip(a.trace, b.trace, ref.logits, ort.logits)):
        where = f"pass {i} ({x.phase}, block {x.block}, step {x.step})"
        assert torch.equal(x.tokens, y.tokens), where
        assert torch.equal(x.out_token, y.out_token), where
        torch.testing.assert_close(y.conf, x.conf, rtol=0, atol=1e-5, msg=where)
        torch.testing.assert_close(ly, lx, rtol=0, atol=1e-4, msg=where)
        assert (x.committed is None) == (y.committed is None)
        assert x.committed is None or torch.equal(x.committed, y.committed), where
    assert a.tokens == b.tokens and a.finish == b.finish
    assert a.nfe_by_phase == b.nfe_by_phase and a.row_nfe == b.row_nfe
    return a


@pytest.mark.parametrize("prompts", PROMPTS)
@pytest.mark.parametrize("mode", MODES)
def test_trajectory_parity(pair, mode, prompts):
    name, kw = MODES[mode]
    g = run_both(pair, PROMPTS[prompts], name, **kw)
    if mode == "dlm-t0.007":
        assert any(int(r.committed.sum(1).max()) > 1 for r in g.trace if r.phase == "denoise")


@pytest.mark.parametrize("mode", ["ar", "dlm", "linear-spec"])
def test_sampling_parity_same_seed(pair, mode):
    run_both(pair, PROMPTS["b4-ragged"], mode, temperature=0.8, seed=7)


def test_graph_dims_are_symbolic(exported):
    path, spec = exported
    model = onnx.load(str(path), load_external_data=False)
    want = {t.name: t.shape for t in (*spec.inputs, *spec.outputs)}
    for vi in (*model.graph.input, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        got = tuple(d.dim_param if d.dim_param else d.dim_value for d in dims)
        assert got == tuple(want[vi.name]), vi.name
    assert {"batch", "block", "cache_len"} <= {d for s in want.values() for d in s if isinstance(d, str)}


def test_graph_takes_the_forms_onnx_runtime_fuses(exported, random_tiny, tmp_path):
    """The step graph's attention is explicit (`model.explicit_attention`): per layer MatMul, Add of the pass's
    one bias, Softmax, MatMul, without scaled_dot_product_attention's per-layer mask conversion and all-masked
    guard (IsNaN, Where); its RMSNorms divide by the root, the form ONNX Runtime fuses into
    SimplifiedLayerNormalization. Together 16-22% off a two-thread CPU pass (README, "Serving")."""
    import collections

    import onnxruntime as ort

    n = random_tiny.config.num_hidden_layers
    ops = collections.Counter(node.op_type for node in onnx.load(str(exported[0]), load_external_data=False).graph.node)
    assert ops["IsNaN"] == 0 and ops["Where"] == 1 and ops["Softmax"] == n + 1     # the layers' and the confidence's
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(exported[0]), opts, providers=["CPUExecutionProvider"])
    fused = collections.Counter(node.op_type for node in onnx.load(opts.optimized_model_filepath,
                                                                   load_external_data=False).graph.node)
    assert fused["SimplifiedLayerNormalization"] == 2 * n + 1 and fused["Sqrt"] == 0


@pytest.mark.parametrize("batch, max_len", [(1, 24), (3, 48)])
def test_step_parity_at_two_batches_and_cache_lengths(random_tiny, exported, batch, max_len):
    """Drive both step() directly: ragged prefill, bidirectional read, causal write, trim, decode."""
    path, spec = exported
    ref = TorchDenoiser(random_tiny, max_len, return_logits=True)
    ort = OrtDenoiser(path, spec, random_tiny.config, max_len, threads=1, return_logits=True)
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([9, 4, 6][:batch])
    passes = [
        (torch.randint(0, 1024, (batch, 9), generator=g), dict(causal=True, write=True, num_valid=n)),
        (torch.randint(0, 1024, (batch, 5), generator=g), dict(causal=False, write=False)),
        (torch.randint(0, 1024, (batch, 5), generator=g), dict(causal=True, write=True)),
        None,                                                                       # trim 2 per row
        (torch.randint(0, 1024, (batch, 1), generator=g), dict(causal=True, write=True)),
    ]
    for den in (ref, ort):
        den.reset(batch)
    for p in passes:
        if p is None:
            for den in (ref, ort):
                den.trim(den.lengths() - 2)
            continue
        tokens, kw = p
        a, b = ref.step(tokens, **kw), ort.step(tokens, **kw)
        assert b.token.dtype == torch.int64 and b.conf.dtype == torch.float32 and b.token.device.type == "cpu"
        assert torch.equal(a.token, b.token)
        torch.testing.assert_close(b.conf, a.conf, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-4)
        assert torch.equal(ref.lengths(), ort.lengths())
    assert ort.lengths().tolist() == (n + 5 - 2 + 1).tolist()


def test_cache_discipline(random_tiny, exported):
    path, spec = exported
    den = OrtDenoiser(path, spec, random_tiny.config, 16, threads=1)
    den.reset(2)
    k = den.k
    den.reset(2)
    assert den.k is k                                     # same batch: no reallocation
    den.reset(1)
    assert den.k.shape == (6, 1, 2, 16, 32)
    out = den.step(torch.ones(1, 10, dtype=torch.long), causal=True, write=True)
    assert out.logits is None and den.lengths().tolist() == [10]
    with pytest.raises(ValueError, match="overflow"):
        den.step(torch.ones(1, 7, dtype=torch.long), causal=False, write=False)
    with pytest.raises(ValueError, match="shorten"):
        den.trim(torch.tensor([11]))
    with pytest.raises(ValueError, match="bidirectional"):
        den.step(torch.ones(1, 2, dtype=torch.long), causal=False, write=True)


def test_a_mixed_pass_equals_its_rows_passes_apart(random_tiny, exported, tmp_path):
    """The graph takes `causal` per row: one pass of commit rows (causal, written) beside a denoise row
    (bidirectional, nothing kept) gives each row what its own kind of pass gives. A graph exported before that
    (the same graph with its `causal` input declared 0-d, as older manifests say) runs one flag per pass."""
    path, spec = exported
    cfg = random_tiny.config
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63]]
    block = torch.randint(200, 1000, (3, 8), generator=torch.Generator().manual_seed(0))   # [3, 8]
    rows = torch.tensor([True, False, True])

    def prefilled(onnx_path, io_spec):
        den = OrtDenoiser(onnx_path, io_spec, cfg, MAX_LEN, threads=1, return_logits=True)
        den.reset(3)
        n = max(map(len, prompts))
        den.step(torch.tensor([p + [0] * (n - len(p)) for p in prompts]), causal=True, write=True,
                 num_valid=torch.tensor([len(p) for p in prompts]))
        return den

    mixed = prefilled(path, spec)
    assert mixed.row_causal and spec.input("causal").shape == ("batch",)
    out = mixed.step(block, causal=rows, write=True)
    apart = prefilled(path, spec)
    commit = apart.step(block[[0, 2]], rows=[0, 2], causal=True, write=True)
    denoise = apart.step(block[[1]], rows=[1], causal=False, write=False)
    for r, (ran, i) in enumerate([(commit, 0), (denoise, 0), (commit, 1)]):       # row r was row i of `ran`
        torch.testing.assert_close(out.logits[r], ran.logits[i], rtol=1e-5, atol=1e-5)
        assert out.token[r].tolist() == ran.token[i].tolist()
    assert mixed.lengths().tolist() == apart.lengths().tolist() == [15, 3, 13]
    for r, n in enumerate(mixed.lengths().tolist()):           # the cache up to each row's length
        torch.testing.assert_close(mixed.k[:, r, :, :n], apart.k[:, r, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed.v[:, r, :, :n], apart.v[:, r, :, :n], rtol=1e-5, atol=1e-5)

    old = onnx.load(str(path))
    next(i for i in old.graph.input if i.name == "causal").type.tensor_type.shape.ClearField("dim")
    onnx.save(old, str(tmp_path / ONNX_NAME))
    one_flag = IOSpec(tuple(TensorSpec("causal", "bool", ()) if t.name == "causal" else t for t in spec.inputs),
                      spec.outputs, spec.extra)
    den = prefilled(tmp_path / ONNX_NAME, one_flag)
    assert not den.row_causal
    torch.testing.assert_close(den.step(block, causal=False, write=False).logits[1], out.logits[1],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one causal flag per pass"):
        den.step(block, causal=rows, write=True)


def test_refuses_a_mismatched_spec(random_tiny, exported):
    path, spec = exported
    no_logits = IOSpec(spec.inputs, tuple(t for t in spec.outputs if t.name != "logits"))
    with pytest.raises(NemodiffError, match="differs from its I/O spec"):
        OrtDenoiser(path, no_logits, random_tiny.config, 16)


@pytest.mark.skipif(not (TINY_ASSET / "config.json").is_file(), reason="trained tiny checkpoint not built")
def test_trained_tiny_trajectory(tmp_path):
    from nemodiff_compile import load_reference

    model = load_reference("tiny", dtype="float32")
    spec = export_step(model, tmp_path, with_logits=True)
    pair = (TorchDenoiser(model, MAX_LEN, return_logits=True),
            OrtDenoiser(tmp_path / ONNX_NAME, spec, model.config, MAX_LEN, threads=1, return_logits=True))
    for name, kw in [("dlm", dict(threshold=0.9)), ("linear-spec", {})]:
        run_both(pair, PROMPTS["b4-ragged"], name, **kw)


def test_draft_lora_is_switched_inside_the_graph(random_tiny, tmp_path_factory):
    """A model with a draft LoRA exports one graph with a draft_lora flag: drafts use it, verifies not."""
    import copy

    m = copy.deepcopy(random_tiny)
    g = torch.Generator().manual_seed(11)
    cfg = m.config
    a = [torch.randn(4, cfg.q_width, generator=g) * 0.05 for _ in range(cfg.num_hidden_layers)]
    b = [torch.randn(cfg.hidden_size, 4, generator=g) * 0.05 for _ in range(cfg.num_hidden_layers)]
    m.set_draft_lora(a, b, scale=4.0)
    out = tmp_path_factory.mktemp("ort_lora")
    spec = export_step(m, out, with_logits=True)
    assert spec.has_input("draft_lora")
    pair = (TorchDenoiser(m, MAX_LEN, return_logits=True),
            OrtDenoiser(out / ONNX_NAME, spec, cfg, MAX_LEN, threads=1, return_logits=True))
    with_lora = run_both(pair, PROMPTS["b4-ragged"], "linear-spec")
    base = loops.generate(TorchDenoiser(random_tiny, MAX_LEN), PROMPTS["b4-ragged"], "linear-spec",
                          max_new_tokens=16, block_length=8, trace=True)
    assert with_lora.tokens == base.tokens                      # verify is LoRA-free: still lossless
    drafts = [r.out_token for r in with_lora.trace if r.phase == "draft"]
    base_drafts = [r.out_token for r in base.trace if r.phase == "draft"]
    assert not torch.equal(drafts[0], base_drafts[0])           # ...but the drafts changed


def test_a_graph_ort_cannot_load_is_one_line(tmp_path, tiny_cfg):
    """ONNX Runtime's CPU provider has no bf16 Mul: opening such a graph is a NemodiffError naming the
    file and what to do, not onnxruntime's traceback."""
    import onnx
    from onnx import TensorProto, helper

    from nemodiff_compile.artifact.spec import step_spec

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])
    g = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"])], "g", [x], [y])
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    spec = step_spec(tiny_cfg, "bfloat16", False, with_lora=False, remask=None)
    with pytest.raises(NemodiffError, match=r"bf16.onnx: ONNX Runtime \(CPUExecutionProvider\) cannot load "
                                            r"this graph: .*NOT_IMPLEMENTED.*no bfloat16 kernels") as e:
        OrtDenoiser(path, spec, tiny_cfg, 16)
    assert "\n" not in str(e.value)
