import pytest
import torch

from nemodiff_compile.config import PRESETS


@pytest.fixture(scope="session")
def tiny_cfg():
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def random_tiny(tiny_cfg):
    """The tiny geometry with seeded random weights (std 0.05: peaked enough to exercise the rules)."""
    from nemodiff_compile.model import NemotronLabsDiffusion

    torch.manual_seed(0)
    m = NemotronLabsDiffusion(tiny_cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """The embedded tiny model built into an engine directory (with logits, not validated)."""
    pytest.importorskip("onnxruntime")
    from nemodiff_compile.build.pipeline import build_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-fp32"
    return build_engine("tiny", output=out, with_logits=True, validate=False)
