"""`validate --fast`: the fast engine against the reference through the same shadow comparison."""

import json

from click.testing import CliRunner

from nemodiff_compile.cli import cli


def test_validate_fast_passes_on_cpu():
    res = CliRunner().invoke(cli, ["validate", "--fast", "--size", "tiny", "--max-new-tokens", "12",
                                   "--mode", "dlm", "--mode", "ar", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["passed"] and report["token_agreement"] == 1.0
    assert report["tolerances"]["precision"] == "fp32"


def test_validate_usage_errors():
    runner = CliRunner()
    res = runner.invoke(cli, ["validate"])
    assert res.exit_code == 2 and "ENGINE_DIR, or --fast" in res.output
    res = runner.invoke(cli, ["validate", "somewhere", "--fast"])
    assert res.exit_code == 2 and "not ENGINE_DIR" in res.output
    res = runner.invoke(cli, ["validate", "somewhere", "--size", "tiny"])
    assert res.exit_code == 2 and "go with --fast" in res.output
