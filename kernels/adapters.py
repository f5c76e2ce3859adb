"""Modality adapters on the fused-linear kernels, forward and backward.

* ``mlp_adapter(x, w1, b1, w2, b2)``: the image adapter ``mm_vision_projector``,
  Linear(1024, 4096) -> exact GELU -> Linear(4096, 4096). The first GEMM carries bias and
  GELU in its epilogue (``linear_gelu``, which keeps its pre-activation for backward); the
  second is the same Triton GEMM with a bias epilogue. Both are Triton rather than cuBLAS
  so the GELU never makes a separate pass over the 4608 x 4096 hidden tensor of a batch
  of 8 images, and so the second GEMM runs under the same block-size table.
* ``projection(x, w, b)``: ``llama_proj`` / ``audio_llama_proj``, Linear(768, 4096) as a
  Triton GEMM with a bias epilogue.

Both accept leading batch dimensions and are differentiable w.r.t. every argument; the
backward GEMMs (dx = dy @ w, dw = dy^T @ x) and the bias reduction are Triton kernels of
``fused_linear``.
"""
from __future__ import annotations

import torch

from .fused_linear import linear, linear_gelu, triton_usable

__all__ = ["mlp_adapter", "projection", "triton_usable"]


def mlp_adapter(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None) -> torch.Tensor:
    """gelu_erf(x @ w1^T + b1) @ w2^T + b2; x (..., K1), w1 (H, K1), w2 (N, H)."""
    return linear(linear_gelu(x, w1, b1), w2, b2)


def projection(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w^T + b; x (..., K), w (N, K)."""
    return linear(x, w, b)
