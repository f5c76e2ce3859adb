"""Triton kernels of the fast path, installed as `fastground.kernels`."""
