"""The engine directory as a format, the bottom layer the runtime, the builder and the validator all read:
the manifest (`manifest.py`), the step graph's I/O spec (`spec.py`), batch buckets and TensorRT
optimization profiles (`buckets.py`, `profiles.py`) and GPU targets (`targets.py`). No torch import."""
