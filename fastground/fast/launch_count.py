"""What one fast-branch call costs in launches, counted without a GPU.

`branch_launches("video", batch=8)` builds the trainable part of the branch at the
groundinggpt-7b shapes on the "meta" device, runs the fast path forward (and backward) inside
`record_launches`, and returns the Triton launches it would make on an H100 (132 SMs) and the
other device kernels (aten ops that are not views or allocations) around them. Used by the
launch-count test and reported by the benchmarks next to their timings.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastground.kernels.runtime import record_launches

# aten ops that launch no device kernel
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
         "lift_fresh", "_to_copy_noop", "set_", "resize_", "is_same_size", "_local_scalar_dense"}


@dataclass
class LaunchCount:
    triton: list = field(default_factory=list)  # aot.Launch records
    other: list = field(default_factory=list)  # names of other device ops

    @property
    def triton_names(self) -> list[str]:
        return [l.kernel.fn.__name__ if hasattr(l.kernel, "fn") else str(l.kernel) for l in self.triton]

    def summary(self) -> str:
        from collections import Counter
        t = Counter(self.triton_names)
        o = Counter(self.other)
        return (f"{len(self.triton)} Triton launches ({dict(t)}), {len(self.other)} other device ops ({dict(o)})")


class _OpLog(TorchDispatchMode):
    def __init__(self, out: list):
        super().__init__()
        self.out = out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        on_device = any(isinstance(t, torch.Tensor) and t.device.type == "meta"
                        for t in (out if isinstance(out, (tuple, list)) else (out,)))
        if on_device and not func.is_view and name not in _FREE and not name.startswith("empty"):
            self.out.append(name)
        return out


class _Branch(nn.Module):
    """The trainable part of the video or audio branch, with GroundingGPTModel's names."""

    def __init__(self, cfg, which: str):
        super().__init__()
        from fastground.model.groundinggpt import qformer_spec
        from fastground.model.qformer import QFormer
        qh = cfg.qformer_hidden_size
        if which == "video":
            self.video_Qformer = QFormer(qformer_spec(cfg, cfg.video_qformer_layers, qh, 1))
            self.video_query_tokens = nn.Parameter(torch.zeros(1, cfg.video_token_len, qh))
            self.video_frame_position_embedding = nn.Embedding(cfg.max_frame, qh)
            self.llama_proj = nn.Linear(qh, cfg.hidden_size)
        else:
            self.audio_Qformer = QFormer(qformer_spec(cfg, cfg.audio_qformer_layers, cfg.audio_out_dim, 1))
            self.audio_query_tokens = nn.Parameter(torch.zeros(1, cfg.sound_token_len, qh))
            self.audio_position_embedding = nn.Embedding(cfg.audio_position_embeddings, cfg.audio_out_dim)
            self.audio_llama_proj = nn.Linear(qh, cfg.hidden_size)


def branch_launches(which: str = "video", batch: int = 8, backward: bool = True, training: bool = True,
                    dtype: torch.dtype = torch.bfloat16, preset: str = "groundinggpt-7b", num_sms: int = 132,
                    masked: bool = False, repeat: int = 1, frozen: bool = False) -> LaunchCount:
    """Launches of the last of `repeat` calls (earlier ones warm the per-shape caches);
    `frozen`: no parameter of the branch requires grad (as the frame Q-Former's)."""
    from fastground.config import GroundingGPTConfig
    from fastground.fast.branches import fast_audio_branch, fast_video_branch
    from fastground.fast.patching import patch

    cfg = GroundingGPTConfig.from_preset(preset)
    with torch.device("meta"):
        part = _Branch(cfg, which).to(dtype)
    patch(part, llama=False)
    part.train(training)
    part.requires_grad_(not frozen)
    if which == "video":
        feats = torch.empty(batch, cfg.num_frames, cfg.num_query_token, cfg.qformer_hidden_size,
                            device="meta", dtype=dtype)
        mask = torch.ones(batch, cfg.num_frames, device="meta", dtype=torch.long) if masked else None
        call = lambda: fast_video_branch(part, feats, mask)
    else:
        feats = torch.empty(batch, cfg.num_audio_clips, cfg.audio_out_dim, device="meta", dtype=dtype)
        mask = torch.ones(batch, cfg.num_audio_clips, device="meta", dtype=torch.long) if masked else None
        call = lambda: fast_audio_branch(part, feats, mask)
    def step():
        with torch.set_grad_enabled(backward):
            out = call()
            if backward:
                out.backward(torch.empty_like(out))

    for _ in range(repeat - 1):
        with record_launches(num_sms=num_sms):
            step()
        part.zero_grad(set_to_none=True)
    count = LaunchCount()
    with record_launches(num_sms=num_sms) as rec, _OpLog(count.other):
        step()
    count.triton = list(rec)
    return count
