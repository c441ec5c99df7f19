"""CLI: TensorRT flags refused with one line where they do not apply; doctor without a graph."""

import pytest
from click.testing import CliRunner

from nemodiff_compile.cli import cli


@pytest.mark.parametrize("args,needle", [
    (["--gpus", "sm89"], "--gpus: only TensorRT engines are per GPU"),
    (["--backend", "tensorrt", "--gpus", "h100"], "--gpus 'h100'"),
    (["--backend", "tensorrt", "--remask-threshold", "x"], "--remask-threshold"),
])
def test_build_flag_errors(args, needle, tmp_path):
    r = CliRunner().invoke(cli, ["build", "--output", str(tmp_path / "e"), *args])
    assert r.exit_code == 2 and needle in r.output
    assert not (tmp_path / "e").exists()


def test_doctor_without_graph(rtx, monkeypatch, tmp_path):
    r = CliRunner().invoke(cli, ["doctor"])
    assert r.exit_code == 0 and "tensorrt_rtx" in r.output and "nemodiff::Remask/1" in r.output
    monkeypatch.setenv("NEMODIFF_PLUGIN_LIBS", str(tmp_path / "libmissing.so"))
    r = CliRunner().invoke(cli, ["doctor"])
    assert r.exit_code == 2 and "libmissing.so not found" in r.output


def test_rtx_build_without_target_or_with_sm90_is_refused_before_export(rtx, tmp_path):
    r = CliRunner().invoke(cli, ["build", "--backend", "tensorrt", "--output", str(tmp_path / "e")])
    assert r.exit_code == 2 and "no GPU here to build for" in r.output
    r = CliRunner().invoke(cli, ["build", "--backend", "tensorrt", "--gpus", "sm90", "--output", str(tmp_path / "e")])
    assert r.exit_code == 2 and "cannot target it" in r.output and "loading" not in r.output
