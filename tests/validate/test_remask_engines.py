"""`validate` and the build accept engines with the remask stage: the teacher-forced and free-running
comparison through `step`, plus the device refinement loop (its tokens and NFE equal to the host passes,
its trajectories the reference's), fp32 on ONNX Runtime's CPU provider."""

import pytest
from click.testing import CliRunner

from nemodiff_compile.artifact.manifest import read_manifest
from nemodiff_compile.cli import cli


def test_the_build_validates_a_remask_engine(remask_engine):
    v = read_manifest(remask_engine("onnx")).validation
    assert v is not None and v["passed"] and v["token_agreement"] == 1.0
    assert v["dlm_policy"] == {"threshold": 0.9, "steps": None}
    assert v["device_loop"]["dlm"]["same_as_host_passes"] and v["device_loop"]["dlm"]["token_agreement"] == 1.0
    assert v["device_loop"]["dlm"]["device_passes"] > 0


@pytest.mark.parametrize("args, policy", [([], {"threshold": 0.9, "steps": None}),
                                          (["--steps", "4"], {"threshold": None, "steps": 4})])
def test_validate_cli_on_the_plugin_engine(remask_engine, args, policy):
    """The plugin variant (ONNX Runtime custom op), threshold and fixed-steps policies: validate (dlm, where
    the stage acts) runs the loop through the graph too and passes with agreement 1.0."""
    d = remask_engine("plugin")
    r = CliRunner().invoke(cli, ["validate", str(d), "--max-new-tokens", "16", "--mode", "dlm", *args])
    assert r.exit_code == 0, r.output
    assert "PASSED, token agreement 1.0000" in r.output
    assert "dlm device loop: tok agree 1.0000 with the reference, same tokens and NFE as the host passes" in r.output
    v = read_manifest(d).validation
    assert v["dlm_policy"] == policy and v["device_loop"]["dlm"]["same_as_host_passes"]


def test_a_stage_of_the_old_io_is_refused_with_the_rebuild_command(remask_engine, tmp_path):
    import shutil

    from nemodiff_compile.artifact.manifest import write_manifest
    from nemodiff_compile.backends.open import open_engine
    from nemodiff_compile.errors import NemodiffError

    d = tmp_path / "old"
    shutil.copytree(remask_engine("onnx"), d)
    m = read_manifest(d)
    del m.io_spec["extra"]["remask"]["io"]                      # what builds before the loop I/O recorded
    write_manifest(d, m)
    with pytest.raises(NemodiffError, match=r"older nemodiff-compile \(stage I/O 1, this runtime drives version 2\)"
                                            r".*build --remask onnx"):
        open_engine(d)
