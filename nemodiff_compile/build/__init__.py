"""Engine building: the engine directory and its manifest (and, later, the TensorRT builder)."""
