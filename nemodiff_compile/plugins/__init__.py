"""Custom ops shared by the exporter, the builder and the runtimes: one folder per op, each with its
id table (`spec.py`), a torch reference (`reference.py`) and kernels."""
