"""ImageBind-huge's audio encoder, the frozen encoder of the sound branch (reference path).

The release keeps the whole ImageBindModel under `model.audio_encoder` (vision, text,
depth, thermal and IMU towers included) but only runs the audio modality. This module holds
the audio part alone, under the same names relative to the encoder:

    modality_preprocessors.audio.{cls_token, rgbt_stem.proj.0, rgbt_stem.norm_layer,
                                  pos_embedding_helper.pos_embed}
    modality_trunks.audio.blocks.N.{attn, norm_1, mlp.fc1, mlp.fc2, norm_2}
    modality_heads.audio.{0 (LayerNorm), 2 (Linear)}
    modality_postprocessors.audio.1.log_logit_scale

Keys of the other modalities, in `imagebind_huge.pth` or in a release checkpoint, are not
used by GroundingGPT and are reported as ignored by the loader.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from fastground.model.layers import Mlp, init_linear_and_norm

from fastground.model.eva_vit import _check_shapes, _key_report, read_state_dict

MODALITY_CONTAINERS = ("modality_preprocessors", "modality_trunks", "modality_heads",
                       "modality_postprocessors")


def is_audio_key(key: str) -> bool:
    """True for an ImageBind state-dict key (relative to the ImageBindModel) of the audio modality."""
    parts = key.split(".", 2)
    return len(parts) >= 2 and parts[0] in MODALITY_CONTAINERS and parts[1] == "audio"


# --------------------------------------------------------------------------- preprocessor
class AudioStem(nn.Module):
    def __init__(self, embed_dim: int, kernel_size: int, stride: int):
        super().__init__()
        # A Sequential of one conv, because ImageBind's generic stem takes a list of layers:
        # that is where the ".proj.0." in the released key comes from.
        self.proj = nn.Sequential(
            nn.Conv2d(1, embed_dim, kernel_size=kernel_size, stride=stride, bias=False))
        self.norm_layer = nn.LayerNorm(embed_dim)  # eps 1e-5: ImageBind's stem uses the default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_layer(self.proj(x).flatten(2).transpose(1, 2))


class PosEmbedding(nn.Module):
    def __init__(self, num_tokens: int, embed_dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))


class AudioPreprocessor(nn.Module):
    """Fbank (N, 1, mel, frames) -> tokens (N, 1 + P, D): patches, CLS prepended, positions added."""

    def __init__(self, num_mel_bins: int, target_len: int, kernel_size: int, stride: int, embed_dim: int):
        super().__init__()
        self.input_shape = (1, num_mel_bins, target_len)
        self.grid = ((num_mel_bins - kernel_size) // stride + 1, (target_len - kernel_size) // stride + 1)
        self.num_patches = self.grid[0] * self.grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rgbt_stem = AudioStem(embed_dim, kernel_size, stride)
        self.pos_embedding_helper = PosEmbedding(1 + self.num_patches, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The release pads or crops every clip to the configured length, so ImageBind's
        # pos-embedding interpolation never runs for audio; a mismatch is a pipeline bug.
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"audio encoder expects (N, {', '.join(map(str, self.input_shape))}) "
                             f"fbank input, got {tuple(x.shape)}")
        tokens = self.rgbt_stem(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat((cls, tokens), dim=1) + self.pos_embedding_helper.pos_embed


# --------------------------------------------------------------------------- trunk
class SeqFirstDropPath(nn.Module):
    """Stochastic depth as ImageBind applies it inside its sequence-first trunk.

    ImageBind uses timm's DropPath, which draws one keep/drop decision per index of dim 0.
    Because the trunk runs on (L, B, D) tensors, dim 0 is the token position, so a dropped
    residual branch is dropped for that position in every sample of the batch. Kept as is
    so training-mode outputs have the release's distribution.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


AudioMlp = Mlp


class AudioBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop_path: float, mlp_ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        # add_bias_kv appends one learned key/value to every sequence (a "null" slot that
        # each query can attend to), so keys have length L + 1.
        self.attn = nn.MultiheadAttention(dim, num_heads, bias=True, add_bias_kv=True)
        self.drop_path = SeqFirstDropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm_1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = AudioMlp(dim, mlp_ratio * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (L, B, D), sequence first, as nn.MultiheadAttention's default layout."""
        h = self.norm_1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class AudioTrunk(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, drop_path: float):
        super().__init__()
        # ImageBind's "progressive" rule: linearly from 0 at the first block to the rate at the last.
        # Drawn from a float32 linspace, so the rates match the release to the bit; on the
        # CPU explicitly because the module may be built under a meta-device context.
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(AudioBlock(dim, num_heads, r) for r in rates)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.transpose(0, 1)
        for blk in self.blocks:
            x = blk(x)
        return x.transpose(0, 1)


# --------------------------------------------------------------------------- head, postprocessor
class SelectToken(nn.Module):
    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index]


class Normalize(nn.Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=self.dim, p=2)


class LogitScale(nn.Module):
    """Fixed multiplier exp(log_logit_scale), capped at max_scale.

    Frozen in ImageBind's audio postprocessor, but stored as a persistent buffer so it is in
    the released state dict and must be loadable under its name.
    """

    def __init__(self, init: float = 20.0, max_scale: float = 100.0):
        super().__init__()
        self.max_scale = max_scale
        self.register_buffer("log_logit_scale", torch.ones([]) * math.log(init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.log_logit_scale.exp(), max=self.max_scale) * x


# --------------------------------------------------------------------------- encoder
class ImageBindAudioEncoder(nn.Module):
    """Clips of fbank -> per-clip embeddings. See get_audio_feature for the outputs."""

    def __init__(self, num_mel_bins: int = 128, target_len: int = 204, kernel_size: int = 16,
                 stride: int = 10, embed_dim: int = 768, num_blocks: int = 12, num_heads: int = 12,
                 drop_path: float = 0.1, out_dim: int = 1024, logit_scale: float = 20.0):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.out_dim = out_dim
        self.modality_preprocessors = nn.ModuleDict(
            {"audio": AudioPreprocessor(num_mel_bins, target_len, kernel_size, stride, embed_dim)})
        self.modality_trunks = nn.ModuleDict(
            {"audio": AudioTrunk(embed_dim, num_blocks, num_heads, drop_path)})
        self.modality_heads = nn.ModuleDict({"audio": nn.Sequential(
            nn.LayerNorm(embed_dim, eps=1e-6),
            SelectToken(0),
            nn.Linear(embed_dim, out_dim, bias=False),
        )})
        self.modality_postprocessors = nn.ModuleDict({"audio": nn.Sequential(
            Normalize(dim=-1),
            LogitScale(logit_scale),
        )})
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg) -> "ImageBindAudioEncoder":
        return cls(num_mel_bins=cfg.audio_num_mel_bins, target_len=cfg.audio_target_len,
                   kernel_size=cfg.audio_kernel_size, stride=cfg.audio_stride,
                   embed_dim=cfg.audio_embed_dim, num_blocks=cfg.audio_num_blocks,
                   num_heads=cfg.audio_num_heads, drop_path=cfg.audio_drop_path,
                   out_dim=cfg.audio_out_dim, logit_scale=cfg.audio_logit_scale)

    @property
    def preprocessor(self) -> AudioPreprocessor:
        return self.modality_preprocessors["audio"]

    @property
    def trunk(self) -> AudioTrunk:
        return self.modality_trunks["audio"]

    @property
    def head(self) -> nn.Sequential:
        return self.modality_heads["audio"]

    @property
    def postprocessor(self) -> nn.Sequential:
        return self.modality_postprocessors["audio"]

    def reset_parameters(self, std: float = 0.02) -> None:
        """A sane start for tests and small presets; checkpoints overwrite every value.
        The attention's packed in-projection and bias_k/v keep nn.MultiheadAttention's init."""
        pre = self.preprocessor
        nn.init.trunc_normal_(pre.cls_token, std=std)
        nn.init.trunc_normal_(pre.pos_embedding_helper.pos_embed, std=std)
        init_linear_and_norm(self, std)

    def get_audio_feature(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, S, 1, mel, frames), S clips per audio (or (N, 1, mel, frames)).

        Returns (feature, final): feature is the head's LayerNorm'd CLS token before the
        projection, (B, S, D); final is the normalised projection times the logit scale,
        (B, S, out_dim), the one GroundingGPT feeds to its audio Q-Former. Clips are not
        averaged (ImageBind's own forward would average them; the release's method does not).
        """
        clips = x.ndim >= 5
        if clips:
            b, s = x.shape[:2]
            x = x.reshape(b * s, *x.shape[2:])
        tokens = self.trunk(self.preprocessor(x))
        head = self.head
        feature = head[1](head[0](tokens))
        final = self.postprocessor(head[2](feature))
        if clips:
            feature = feature.reshape(b, s, -1)
            final = final.reshape(b, s, -1)
        return feature, final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_audio_feature(x)[1]


# --------------------------------------------------------------------------- weights
def load_imagebind_audio_weights(module: ImageBindAudioEncoder, path: str | os.PathLike,
                                 prefix: str = "") -> dict:
    """Load the audio modality of a full ImageBind state dict (`imagebind_huge.pth`).

    `prefix` selects keys under a parent module (e.g. "model.audio_encoder." for a file that
    holds the release's whole model). Keys outside the prefix or of another modality are
    ignored and reported. Returns {"loaded": n, "ignored": m, "ignored_keys": [...]};
    a missing audio key, an audio key this module lacks, or a shape mismatch raises, naming
    the file.
    """
    path = os.fspath(path)
    sd = read_state_dict(path)
    audio: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in sd.items():
        rel = k[len(prefix):] if k.startswith(prefix) else None
        if rel is not None and is_audio_key(rel):
            audio[rel] = v
        else:
            ignored.append(k)
    own = module.state_dict()
    if not audio:
        raise KeyError(f"{path}: no ImageBind audio keys found under prefix {prefix!r} "
                       f"(expected e.g. {prefix}modality_trunks.audio.blocks.0.attn.in_proj_weight)")
    missing = sorted(prefix + k for k in own if k not in audio)
    unexpected = sorted(prefix + k for k in audio if k not in own)
    if missing or unexpected:
        raise KeyError(_key_report(path, "ImageBind audio encoder", missing, unexpected))
    _check_shapes(path, own, audio, prefix)
    module.load_state_dict({k: audio[k] for k in own}, strict=True)
    return {"loaded": len(own), "ignored": len(ignored), "ignored_keys": ignored}
