"""The TensorRT builder: ONNX -> one serialized plan per GPU target (`builder.py`), with the check that
every matrix multiply runs in the requested precision (`precision.py`)."""
