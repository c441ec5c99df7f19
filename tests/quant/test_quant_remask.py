"""Quantized graphs with the remask stage (fp8 with the standard-ops stage, int8 with the plugin node under
ONNX Runtime): the device refinement loop gives exactly the engine's host-pass tokens and NFE, and
`validate` holds it to the recipe's gates against the fp32 reference."""

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("modelopt")


@pytest.mark.parametrize("fixture", ["fp8_remask_dir", "int8_remask_dir"])
def test_quantized_remask_engine_passes_its_recipe_gates(fixture, request):
    from nemodiff_compile.artifact.manifest import read_manifest
    from nemodiff_compile.validate.engine import validate_engine

    d = request.getfixturevalue(fixture)
    m = read_manifest(d)
    assert m.quantization and m.io_spec["extra"]["remask"]["variant"] == ("plugin" if "int8" in fixture else "onnx")
    report = validate_engine(d, modes=("dlm",), quick=True, write=False)
    dlm = report.modes["dlm"]
    assert dlm.device is not None and dlm.device["same_as_host_passes"], report.to_table()
    assert dlm.device["device_passes"] >= dlm.nfe["engine"] - 2 > 0        # the loop ran in the graph
    assert report.passed, report.to_table()
