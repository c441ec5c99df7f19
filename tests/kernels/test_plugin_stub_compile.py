"""The IPluginV3 source of nemodiff::Remask compiles (g++ -fsyntax-only) against stand-in TensorRT headers
(stub_headers/: TensorRT 10's declarations of just the interfaces it uses), so a broken override, a
missing method or a typo fails CI on machines with no TensorRT headers. The real-header compile is
test_remask_sources.py's (skipped where none are found). A negative control shows the stubs bite."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "nemodiff_compile" / "kernels" / "csrc" / "remask"
STUBS = Path(__file__).resolve().parent / "stub_headers"


def _cuda_include() -> Path:
    """The CUDA toolkit's headers where installed, else the stand-in cuda_runtime.h."""
    for d in ("/usr/local/cuda/include", "/usr/include"):
        if (Path(d) / "cuda_runtime.h").is_file():
            return Path(d)
    return STUBS / "cuda"


def _compile(source: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or clang++) on PATH")
    return subprocess.run([cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{STUBS}",
                           f"-I{_cuda_include()}", f"-I{SRC}", str(source)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_plugin_source_compiles_against_stub_headers(tmp_path):
    r = _compile(SRC / "RemaskPlugin.cpp", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_broken_override_fails_against_the_stubs(tmp_path):
    text = (SRC / "RemaskPlugin.cpp").read_text()
    broken = tmp_path / "RemaskPlugin.cpp"
    bad = text.replace("RemaskPlugin::getNbOutputs() const noexcept", "RemaskPlugin::getNbOutputs() noexcept")
    assert bad != text
    broken.write_text(bad)
    r = _compile(broken, tmp_path)
    assert r.returncode != 0 and "getNbOutputs" in r.stderr
    # a plugin that does not implement a pure virtual of IPluginV3OneRuntime cannot be instantiated
    header = (SRC / "RemaskPlugin.h").read_text()
    (tmp_path / "RemaskPlugin.h").write_text(header.replace(
        "nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;", ""))
    (tmp_path / "remaskKernel.h").write_text((SRC / "remaskKernel.h").read_text())
    cut = text.split("PluginFieldCollection const* RemaskPlugin::getFieldsToSerialize()")[0] + \
        "RemaskPluginCreator::RemaskPluginCreator()" + text.split("RemaskPluginCreator::RemaskPluginCreator()")[1]
    broken.write_text(cut)
    r = subprocess.run([shutil.which("g++") or "clang++", "-fsyntax-only", "-std=c++17", f"-I{tmp_path}",
                        f"-I{STUBS}", f"-I{_cuda_include()}", str(broken)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "abstract" in r.stderr
