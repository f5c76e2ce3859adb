"""CUDA graphs of the trainable branches: one replay instead of ~80 launches per step.

    step = fastground.fast.graphed(model.model.video_branch, (frame_feats,))
    out = step(frame_feats)          # same shapes every call; forward and backward replay
    out.backward(grad)

A thin layer over torch.cuda.make_graphed_callables. What makes the fast path capturable:
dropout keys come from a device counter while a graph is captured (kernels/runtime.py,
`dropout_seed`), so every replay draws fresh masks, and the fused weights are rebuilt inside
the graph (no host-side cache), so an optimizer step between replays is seen. Static shapes
only: batch size, frame count and masks' shapes are fixed by the sample arguments. GPU only.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fastground.kernels.runtime import prepare_device_seeds


class _Bound(nn.Module):
    """A module's method as a module, so the graph's backward reaches the owner's trainable
    parameters (make_graphed_callables differentiates a module's parameters())."""

    def __init__(self, method):
        super().__init__()
        self.owner = method.__self__
        self.method = method
        self.train(self.owner.training)

    def parameters(self, recurse: bool = True):
        return (p for p in self.owner.parameters() if p.requires_grad)

    def forward(self, *args):
        return self.method(*args)


def graphed(fn: Callable[..., torch.Tensor] | nn.Module, sample_args: tuple, num_warmup_iters: int = 3):
    """fn (a module, or a module's bound method such as model.model.video_branch) captured
    forward and backward for inputs shaped like `sample_args` (CUDA tensors). Capture in the
    mode (train/eval) it will run in."""
    tensors = [a for a in sample_args if isinstance(a, torch.Tensor)]
    if not tensors or not all(t.is_cuda for t in tensors):
        raise ValueError("fastground.fast.graphed: CUDA graphs need CUDA sample tensors")
    prepare_device_seeds(tensors[0].device)
    if not isinstance(fn, nn.Module) and isinstance(getattr(fn, "__self__", None), nn.Module):
        fn = _Bound(fn)
    return torch.cuda.make_graphed_callables(fn, sample_args, num_warmup_iters=num_warmup_iters)
