"""Triton kernels of eeengine, one op per module, installed as ``eeengine.kernels``.

Importing a module here imports ``triton``; the engine does so only when it picks the
``triton`` backend (a CUDA device), so CPU-only installs never need triton.
"""
