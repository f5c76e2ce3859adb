"""Image branch input: the release's pad-to-square, then CLIP preprocessing.

The release (LLaVA's `image_aspect_ratio="pad"`) pastes the image, centred, on a square
canvas filled with the CLIP mean colour and only then runs `CLIPImageProcessor`: resize
the shortest side to S with PIL bicubic, centre crop S x S, scale by 1/255, normalise.
Boxes in the text are relative to that padded square (see `fastground.grounding`).

This is the same arithmetic written with PIL and torch, so no processor has to be
downloaded; `tests/test_media.py` checks it against transformers' PIL `CLIPImageProcessor`
built offline. Kept as the release has it: no EXIF rotation, alpha dropped by
`convert("RGB")` (transparent pixels show their stored colour). One departure: 16-bit
grayscale images are scaled to 8 bits, where PIL's conversion would clip them to white.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fastground.data.errors import MediaError

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "PAD_COLOR",
    "open_rgb", "expand2square", "clip_preprocess", "load_image",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The release computes the fill as `tuple(int(x * 255) for x in image_mean)`: truncated,
# not rounded, so (122, 116, 104).
PAD_COLOR = tuple(int(x * 255) for x in CLIP_MEAN)


def open_rgb(path: Any, sample_id: Any = None) -> Image.Image:
    """Decode an image file fully into an RGB PIL image, or raise MediaError."""
    try:
        with Image.open(path) as img:
            # open() only reads the header; load() decodes, which is where a truncated
            # or damaged file shows itself.
            img.load()
            return _to_rgb(img)
    except FileNotFoundError:
        raise MediaError(path, "file not found", sample_id) from None
    except IsADirectoryError:
        raise MediaError(path, "is a directory, not an image file", sample_id) from None
    except UnidentifiedImageError:
        raise MediaError(path, "not an image (PIL cannot identify the format)",
                         sample_id) from None
    except Image.DecompressionBombError as e:
        raise MediaError(path, f"image too large to decode safely ({e})", sample_id) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncation as OSError("image file is truncated ...") for JPEG and
        # SyntaxError/EOFError for some PNG damage.
        raise MediaError(path, f"truncated or corrupt image ({type(e).__name__}: {e})",
                         sample_id) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any mode. 16-bit grayscale (PNG, TIFF: modes I;16*, I) is scaled to 8 bits;
    PIL's convert("RGB") clips it at 255, turning every pixel above 1/256 of full scale white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a8 = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if img.mode == "F":
        a8 = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    return img.convert("RGB")


def expand2square(img: Image.Image, background: tuple = PAD_COLOR) -> Image.Image:
    """Centre `img` on a square canvas of side max(w, h) filled with `background`.

    Integer halving puts an odd leftover pixel of padding at the right/bottom, as the
    release does; `fastground.grounding.square_offsets` uses the same offsets.
    """
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_preprocess(img: Image.Image, size: int,
                    mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD) -> torch.Tensor:
    """CLIPImageProcessor's eval transform: FloatTensor (3, size, size)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # transformers truncates the long side too
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    # Rescale in float64 then cast, normalise in float32: the processor's order, so the
    # result matches it to the last bit rather than to 1e-7.
    x = (np.asarray(img, dtype=np.float64) * (1.0 / 255.0)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def load_image(path: Any, cfg, sample_id: Any = None) -> torch.Tensor:
    """Image file -> FloatTensor (3, S, S), S = cfg.clip_image_size, as the release feeds CLIP."""
    img = open_rgb(os.fspath(path) if isinstance(path, os.PathLike) else path, sample_id)
    return clip_preprocess(expand2square(img, PAD_COLOR), int(cfg.clip_image_size))
