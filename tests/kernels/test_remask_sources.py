"""The C++/CUDA sources of nemodiff::Remask (nemodiff_compile/kernels/csrc/, shipped with the package): the kernel compiles with nvcc;
the IPluginV3 source compiles where TensorRT headers are found."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "nemodiff_compile" / "kernels" / "csrc"
SRC = CSRC / "remask"


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (install the CUDA toolkit to compile kernels/csrc/remask/remaskKernel.cu)")
    return nvcc


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
def test_cuda_kernel_compiles(tmp_path, arch):
    r = subprocess.run([_nvcc(), "-c", "-std=c++17", f"-arch={arch}", "-O3", "-Werror", "all-warnings",
                        str(SRC / "remaskKernel.cu"), "-o", str(tmp_path / "remask.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "remask.o").stat().st_size > 0


def _tensorrt_include():
    for d in filter(None, [os.environ.get("TensorRT_ROOT"), "/usr", "/usr/local", "/opt/tensorrt"]):
        for sub in ("include", "include/x86_64-linux-gnu"):
            if (Path(d) / sub / "NvInfer.h").is_file():
                return Path(d) / sub
    return None


def test_plugin_source_compiles_against_tensorrt_headers(tmp_path):
    inc = _tensorrt_include()
    if inc is None:
        pytest.skip("TensorRT headers (NvInfer.h) not found: set TensorRT_ROOT; the tensorrt-rtx wheel ships none")
    r = subprocess.run([_nvcc(), "-c", "-std=c++17", "-x", "cu", f"-I{inc}", f"-I{SRC}",
                        str(SRC / "RemaskPlugin.cpp"), "-o", str(tmp_path / "plugin.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_one_id_table_for_the_cpp_source():
    from nemodiff_compile.kernels.remask.spec import REMASK

    text = (SRC / "RemaskPlugin.cpp").read_text()
    for field, value in (("kName", REMASK.name), ("kVersion", REMASK.version), ("kNamespace", REMASK.namespace)):
        assert f'{field} = "{value}"' in text


def test_cuda_kernel_library_builds_and_exports_its_entry_point(tmp_path, monkeypatch):
    """The ctypes path the GPU check uses: compiled here, loaded (dlopen needs no GPU), not called."""
    _nvcc()
    import ctypes

    from nemodiff_compile.kernels.remask import cuda_kernel

    monkeypatch.setenv("NEMODIFF_CUDA_CACHE", str(tmp_path))
    path = cuda_kernel.library_path("sm_90")
    assert path.parent == tmp_path and cuda_kernel.library_path("sm_90") == path      # cached
    assert hasattr(ctypes.CDLL(str(path)), "nemodiffRemaskLaunch")


def test_cmake_builds_the_kernels(tmp_path):
    """kernels/csrc/CMakeLists.txt configures and builds the kernel library (the plugin library too where
    TensorRT headers are found)."""
    _nvcc()
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    build = tmp_path / "build"
    for cmd in ([cmake, "-S", str(CSRC), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=90"],
                [cmake, "--build", str(build), "-j2"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert (build / "libnemodiff_remask_kernels.a").is_file()
    if _tensorrt_include() is not None:
        assert (build / "libnemodiff_plugins.so").is_file()
