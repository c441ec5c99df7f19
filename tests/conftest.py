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
