"""EVA-CLIP ViT-g/14, the frozen per-frame encoder of the video branch (reference path).

Parameter names follow BLIP-2's `eva_vit_g.pth` (`cls_token`, `pos_embed`,
`patch_embed.proj.*`, `blocks.N.{norm1,attn,norm2,mlp}.*`) so the file and the release's
`model.visual_encoder.*` keys load without renaming. BLIP-2 dropped EVA's final norm and
classifier head; the LayerNorm after the encoder (`ln_vision`) is a sibling module of the
release and is not part of this one.

The release builds it with drop_path_rate=0 and no layer-scale, so the block has no
stochastic parts: dropout rates are 0 and are left out.
"""
from __future__ import annotations

import math
import os
import pickle

import torch
import torch.nn.functional as F
from torch import nn

from fastground.model.layers import Mlp, init_linear_and_norm

# Top-level names of EVA-CLIP modules that BLIP-2 removed from its ViT. The release loads
# eva_vit_g.pth with strict=False, so a file that still carries them must still load.
_EVA_DROPPED_MODULES = ("norm", "fc_norm", "head")


class EVAPatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # pos_embed has one row per patch of the configured grid; any other size would
        # silently misalign the position code.
        if h != self.img_size or w != self.img_size:
            raise ValueError(f"EVA ViT expects {self.img_size}x{self.img_size} images, got {h}x{w}")
        return self.proj(x).flatten(2).transpose(1, 2)


class EVAAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        # EVA keeps the qkv Linear bias-free and learns only q and v biases: a key bias adds
        # the same amount to every logit of a query row, which softmax cancels.
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def qkv_bias(self) -> torch.Tensor:
        return torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


EVAMlp = Mlp


class EVABlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EVAAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        # int() truncation as in the release: 1408 * 4.3637 = 6144.09 -> 6144.
        self.mlp = EVAMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EVAVisionTransformer(nn.Module):
    """Images (N, 3, S, S) -> tokens (N, 1 + (S/patch)^2, width), CLS first, no final norm."""

    def __init__(self, img_size: int = 224, patch_size: int = 14, embed_dim: int = 1408,
                 depth: int = 39, num_heads: int = 16, mlp_ratio: float = 4.3637,
                 in_chans: int = 3, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = EVAPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.ModuleList(
            EVABlock(embed_dim, num_heads, mlp_ratio, layer_norm_eps) for _ in range(depth))
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg) -> "EVAVisionTransformer":
        return cls(img_size=cfg.eva_image_size, patch_size=cfg.eva_patch_size,
                   embed_dim=cfg.eva_width, depth=cfg.eva_depth, num_heads=cfg.eva_num_heads,
                   mlp_ratio=cfg.eva_mlp_ratio)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def reset_parameters(self, std: float = 0.02) -> None:
        """EVA's own initialisation (checkpoints overwrite it): truncated normal weights,
        output projections shrunk by sqrt(2 * depth index) so the residual stream starts
        near the identity."""
        nn.init.trunc_normal_(self.cls_token, std=std)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        init_linear_and_norm(self, std)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks, start=1):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.pos_embed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for blk in self.blocks:
            x = blk(x)
        return x


# --------------------------------------------------------------------------- weights
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain tensor state dict from a torch.save file, without running pickled code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: weight file not found")
    try:
        try:
            # mmap keeps multi-GB files (imagebind_huge.pth) out of RAM until copied.
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files in the pre-zip format cannot be memory-mapped.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path}: cannot read as a torch state dict ({e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a plain state dict of tensors")
    return sd


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Bicubic resize of a square grid of position rows to another square grid, leaving the
    leading CLS row(s) as they are (what BLIP-2 does when loading at another resolution)."""
    old = pos_embed.shape[-2] - num_extra_tokens
    old_side, new_side = math.isqrt(old), math.isqrt(num_patches)
    if old_side * old_side != old or new_side * new_side != num_patches:
        raise ValueError(f"cannot resize pos_embed of {old} patches to {num_patches}: not square grids")
    if old_side == new_side:
        return pos_embed
    dim = pos_embed.shape[-1]
    extra = pos_embed[:, :num_extra_tokens].float()
    grid = pos_embed[:, num_extra_tokens:].float().reshape(-1, old_side, old_side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, grid), dim=1)


def load_eva_weights(module: EVAVisionTransformer, path: str | os.PathLike) -> dict:
    """Load BLIP-2's `eva_vit_g.pth` into `module`.

    Returns {"loaded": n, "ignored": [keys of EVA's dropped norm/head], "pos_embed_resized": bool}.
    Any other unexpected key, a missing key or a shape mismatch raises, naming the file.
    """
    path = os.fspath(path)
    sd = dict(read_state_dict(path))
    own = module.state_dict()
    resized = False
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        try:
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], module.num_patches)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        resized = True
    extra = sorted(k for k in sd if k not in own)
    ignored = [k for k in extra if k.split(".", 1)[0] in _EVA_DROPPED_MODULES]
    unexpected = [k for k in extra if k not in ignored]
    missing = sorted(k for k in own if k not in sd)
    if missing or unexpected:
        raise KeyError(_key_report(path, "EVA ViT", missing, unexpected))
    _check_shapes(path, own, sd)
    module.load_state_dict({k: sd[k] for k in own}, strict=True)
    return {"loaded": len(own), "ignored": ignored, "pos_embed_resized": resized}


def _key_report(path: str, what: str, missing: list[str], unexpected: list[str], limit: int = 8) -> str:
    def show(keys):
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    parts = [f"{path}: does not match the {what} layout"]
    if missing:
        parts.append(f"missing {len(missing)} key(s): {show(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {show(unexpected)}")
    return "; ".join(parts)


def _check_shapes(path: str, own: dict, sd: dict, prefix: str = "") -> None:
    bad = [f"{prefix}{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
           for k, v in own.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {len(bad)} key(s): " + "; ".join(bad[:8]))
