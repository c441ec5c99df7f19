"""Backends implementing the `Denoiser` contract (`decoding/denoiser.py`): the eager torch reference
(`eager.py`), ONNX Runtime (`ort.py`), TensorRT (`trt.py`, with `trt_shim.py` choosing the module) and the
fast CUDA-graph engine (`fast.py` over `fast_model.py`, captured through `graphs.py`)."""
