"""torch -> ONNX: the denoiser step's I/O spec as data, the dynamo export driver, graph checks."""
