"""Backends implementing the `Denoiser` contract (`decoding/denoiser.py`) over one base (`base.py`: host cache
lengths, reset/trim, the argument guard, noise, K/V scatter, dtype table): the eager torch reference
(`eager.py`), ONNX Runtime (`ort.py`), TensorRT (`trt.py`, with `trt_shim.py` choosing the module) and the
fast CUDA-graph engine (`fast.py` over `fast_model.py`); `graphs.py` is the CUDA-graph pool fast and TensorRT
capture through; `open.py` opens an engine directory (`open_engine`)."""
