"""Pictures of grounding answers: boxes on the image, spans on a timeline.

A box list or a pair of numbers says little until it is seen against the image or the
clip, so these are for eyeballing predictions against ground truth. Pillow only.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from PIL import Image, ImageColor, ImageDraw, ImageFont

from fastground.grounding import box_to_pixels

__all__ = ["PALETTE", "draw_boxes", "draw_timeline"]

Color = Union[str, tuple[int, int, int]]

# Saturated and far apart, so neighbouring boxes stay distinguishable on photos.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
)

_TEXT = (40, 40, 40)
_TRACK = (225, 225, 225)
_AXIS = (90, 90, 90)


def _rgb(color: Color) -> tuple[int, int, int]:
    rgb = ImageColor.getrgb(color) if isinstance(color, str) else tuple(color)
    return tuple(int(c) for c in rgb[:3])


def _colors(colors: Optional[Sequence[Color]], n: int) -> list[tuple[int, int, int]]:
    pool = [_rgb(c) for c in colors] if colors else list(PALETTE)
    return [pool[i % len(pool)] for i in range(n)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _ink_on(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    # Rec. 601 luma: enough to pick black or white text on a label background.
    luma = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luma > 150 else (255, 255, 255)


def draw_boxes(image: Image.Image,
               boxes_rel: Sequence[Optional[Sequence[float]]],
               labels: Optional[Sequence[Optional[str]]] = None,
               colors: Optional[Sequence[Color]] = None,
               line_width: Optional[int] = None) -> Image.Image:
    """A copy of `image` (RGB) with boxes drawn on it.

    Boxes are relative to the padded square image, as the model writes them; they are
    mapped back to the original image's pixels, and parts that fall on the padding are
    cut at the border. None entries (unparseable answers) are skipped but still use up
    their colour and label, so colours stay paired with the caller's lists.
    """
    out = image.convert("RGB")  # a new image even when already RGB
    w, h = out.size
    draw = ImageDraw.Draw(out)
    lw = line_width or max(2, round(min(w, h) / 150))
    font = _font(max(10, round(min(w, h) / 30)))
    cols = _colors(colors, len(boxes_rel))
    for i, box in enumerate(boxes_rel):
        if box is None:
            continue
        x1, y1, x2, y2 = box_to_pixels(box, w, h, clip=True)
        if x2 <= x1 or y2 <= y1:
            continue  # wholly on the padding: nothing of the image to outline
        # Pillow's rectangle includes both end pixels, so the far edge is one pixel in.
        left, top = min(int(round(x1)), w - 1), min(int(round(y1)), h - 1)
        right = max(left, min(int(round(x2)) - 1, w - 1))
        bottom = max(top, min(int(round(y2)) - 1, h - 1))
        draw.rectangle((left, top, right, bottom), outline=cols[i], width=lw)
        label = labels[i] if labels is not None and i < len(labels) else None
        if label:
            tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), label, font=font)
            tw, th, pad = tx1 - tx0, ty1 - ty0, 2
            # Above the box when there is room, so the label hides none of it.
            ly = top - th - 2 * pad if top - th - 2 * pad >= 0 else top
            lx = min(left, max(0, w - tw - 2 * pad))
            draw.rectangle((lx, ly, lx + tw + 2 * pad, ly + th + 2 * pad), fill=cols[i])
            draw.text((lx + pad - tx0, ly + pad - ty0), label, fill=_ink_on(cols[i]),
                      font=font)
    return out


_NICE_STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600,
               7200)


def _tick_steps(duration: float, px_per_s: float) -> tuple[float, float]:
    """(minor, labelled) tick steps in seconds, spaced for legibility."""
    minor = next((s for s in _NICE_STEPS if s >= 1 and s * px_per_s >= 5), _NICE_STEPS[-1])
    if duration < 2:  # a clip this short has at most one whole second to mark
        minor = next((s for s in _NICE_STEPS if s * px_per_s >= 5), minor)
    major = next((s for s in _NICE_STEPS
                  if s >= minor and s * px_per_s >= 60
                  and abs(s / minor - round(s / minor)) < 1e-9), _NICE_STEPS[-1])
    return minor, major


def _fmt_seconds(t: float, long: bool) -> str:
    if long:
        return f"{int(t) // 60}:{int(t) % 60:02d}"
    return f"{t:g}s"


def draw_timeline(duration: float,
                  spans: Sequence[Optional[Sequence[float]]],
                  labels: Optional[Sequence[Optional[str]]] = None,
                  width: int = 800, height: Optional[int] = None,
                  colors: Optional[Sequence[Color]] = None,
                  relative: bool = True) -> Image.Image:
    """Time spans as bars, one row each, over an axis with ticks in seconds.

    `spans` are relative to `duration` (what the model writes and `parse_spans`
    returns) unless `relative=False`, in which case they are seconds. Typical use is
    `draw_timeline(30.0, [pred, gt], labels=["pred", "gt"])`. A None span (no answer)
    leaves its row empty with a note. `height` defaults to what the rows need.
    """
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be positive, got {duration}")
    n = max(1, len(spans))
    font = _font(12)
    margin_top, margin_right, axis_h, default_row = 8, 16, 34, 26
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0
    if labels:
        label_w = max((probe.textbbox((0, 0), l, font=font)[2] for l in labels if l),
                      default=0)
    margin_left = max(label_w + 12, 16)
    if height is None:
        height = margin_top + n * default_row + axis_h
    row_h = (height - margin_top - axis_h) / n
    if row_h < 4 or width - margin_left - margin_right < 20:
        raise ValueError(f"{width}x{height} is too small for {n} rows")

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x0, x1 = margin_left, width - margin_right
    scale = (x1 - x0) / duration

    def x_of(t: float) -> int:
        return int(round(x0 + min(max(t, 0.0), duration) * scale))

    cols = _colors(colors, len(spans))
    for i, span in enumerate(spans):
        top = margin_top + i * row_h
        bar_top, bar_bottom = int(round(top + 0.2 * row_h)), int(round(top + 0.8 * row_h)) - 1
        mid = int(round(top + row_h / 2))
        draw.rectangle((x0, bar_top, x1, bar_bottom), fill=_TRACK)
        label = labels[i] if labels is not None and i < len(labels) else None
        if label:
            tb = draw.textbbox((0, 0), label, font=font)
            draw.text((margin_left - 8 - (tb[2] - tb[0]) - tb[0], mid - (tb[3] + tb[1]) / 2),
                      label, fill=_TEXT, font=font)
        if span is None:
            tb = draw.textbbox((0, 0), "no span", font=font)
            draw.text((x0 + 4 - tb[0], mid - (tb[3] + tb[1]) / 2), "no span", fill=_AXIS,
                      font=font)
            continue
        s, e = (float(v) * duration for v in span) if relative else map(float, span)
        s, e = min(s, e), max(s, e)
        left, right = x_of(s), x_of(e)
        draw.rectangle((left, bar_top, max(left, right - 1), bar_bottom), fill=cols[i])

    axis_y = int(round(margin_top + n * row_h)) + 4
    draw.line((x0, axis_y, x1, axis_y), fill=_AXIS, width=1)
    minor, major = _tick_steps(duration, scale)
    long = duration >= 120
    for k in range(int(duration / minor + 1e-9) + 1):
        t = k * minor
        x = x_of(t)
        is_major = abs(t / major - round(t / major)) < 1e-9
        draw.line((x, axis_y, x, axis_y + (7 if is_major else 3)), fill=_AXIS, width=1)
        if is_major:
            text = _fmt_seconds(t, long)
            tb = draw.textbbox((0, 0), text, font=font)
            # Centred on the tick, but kept inside the picture at both ends.
            tx = min(max(x - (tb[2] - tb[0]) / 2, 0), width - (tb[2] - tb[0]))
            draw.text((tx - tb[0], axis_y + 9 - tb[1]), text, fill=_TEXT, font=font)
    return img
