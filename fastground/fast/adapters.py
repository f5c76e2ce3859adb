"""Drop-in adapter modules on the Triton kernels, with the release's parameter names.

``FastMLPAdapter`` is an ``nn.Sequential`` of (Linear, GELU, Linear), so its state-dict keys
are ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias`` exactly like ``mm_vision_projector``;
``FastLinear`` is an ``nn.Linear`` (``llama_proj`` / ``audio_llama_proj``). Only forward
differs. Where Triton cannot run (CPU tensors without TRITON_INTERPRET=1) they compute the
reference math and warn once.
"""
from __future__ import annotations

import torch
from torch import nn

from fastground.fast.runtime import cast, compute_dtype, triton_or_warn
from fastground.kernels.adapters import mlp_adapter, projection

def _autocast(x, *params):
    # Outside autocast a dtype mismatch stays an error, as in nn.Linear.
    if x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type):
        return (x, *params)
    return cast(compute_dtype(x), x, *params)


class FastMLPAdapter(nn.Sequential):
    """Linear(in, hidden) -> GELU (exact) -> Linear(hidden, out) on the fused kernels."""

    _fastground_original = nn.Sequential

    def __init__(self, in_features: int = 1024, hidden_features: int = 4096, out_features: int = 4096,
                 bias: bool = True, device=None, dtype=None):
        kw = dict(bias=bias, device=device, dtype=dtype)
        super().__init__(nn.Linear(in_features, hidden_features, **kw), nn.GELU(),
                         nn.Linear(hidden_features, out_features, **kw))

    @classmethod
    def from_module(cls, ref: nn.Sequential) -> "FastMLPAdapter":
        """A FastMLPAdapter holding a copy of a reference Sequential(Linear, GELU, Linear)."""
        l1, l2 = ref[0], ref[2]
        w = l1.weight
        m = cls(l1.in_features, l1.out_features, l2.out_features, bias=l1.bias is not None,
                device=w.device, dtype=w.dtype)
        m.load_state_dict(ref.state_dict())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l1, act, l2 = self[0], self[1], self[2]
        exact = isinstance(act, nn.GELU) and act.approximate == "none"
        if not exact or not triton_or_warn(x, l1.weight, l2.weight):
            return super().forward(x)
        return mlp_adapter(*_autocast(x, l1.weight, l1.bias, l2.weight, l2.bias))


class FastLinear(nn.Linear):
    """nn.Linear whose forward is the Triton GEMM with a bias epilogue."""

    _fastground_original = nn.Linear

    @classmethod
    def from_module(cls, ref: nn.Linear) -> "FastLinear":
        m = cls(ref.in_features, ref.out_features, bias=ref.bias is not None,
                device=ref.weight.device, dtype=ref.weight.dtype)
        m.load_state_dict(ref.state_dict())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not triton_or_warn(x, self.weight):
            return super().forward(x)
        return projection(*_autocast(x, self.weight, self.bias))
