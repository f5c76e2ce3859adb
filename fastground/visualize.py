"""Pictures of grounding answers: boxes on the image, spans on a timeline.

A box list or a pair of numbers says little until it is seen against the image or the
clip, so these are for eyeballing predictions against ground truth. Pillow only.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from PIL import Image, ImageColor, ImageDraw, ImageFont

from fastground.grounding import box_to_pixels

__all__ = ["PALETTE", "PRED_COLOR", "TRUE_COLOR", "draw_boxes", "draw_timeline", "box_picture",
           "span_picture", "video_frames", "contact_sheet", "html_page"]

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
            # Above the box when there is room, else below it, so the label hides none of
            # the box; inside only when the image has no room either side.
            if top - th - 2 * pad - lw >= 0:
                ly = top - th - 2 * pad - lw // 2
            elif bottom + lw + th + 2 * pad < h:
                ly = bottom + lw // 2 + 1
            else:
                ly = top
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


# ----------------------------------------------------------------- prediction vs truth
# Truth green, prediction magenta: apart in hue and in lightness, so they read the same
# for the common colour-vision deficiencies and in greyscale print.
TRUE_COLOR = (0, 158, 115)
PRED_COLOR = (204, 51, 153)


def _legend(width: int, items: Sequence[tuple[str, tuple[int, int, int]]], caption: str = "",
            size: int = 14) -> Image.Image:
    """A white strip with colour swatches and a caption (wrapped to the width)."""
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 4
    lines = _wrap(caption, font, width - 12, probe) if caption else []
    img = Image.new("RGB", (width, line_h * (1 + len(lines)) + 6), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x = 6
    for text, col in items:
        d.rectangle((x, 5, x + size, 5 + size - 2), fill=col)
        d.text((x + size + 4, 3), text, fill=_TEXT, font=font)
        x += size + 12 + int(d.textlength(text, font=font))
    for k, line in enumerate(lines):
        d.text((6, 3 + line_h * (k + 1)), line, fill=_TEXT, font=font)
    return img


def _wrap(text: str, font, width: int, draw) -> list[str]:
    out: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            cand = (line + " " + word).strip()
            if line and draw.textlength(cand, font=font) > width:
                out.append(line)
                line = word
            else:
                line = cand
        out.append(line)
    return out[:6]


def _stack(*parts: Image.Image, bg=(255, 255, 255)) -> Image.Image:
    w = max(p.width for p in parts)
    out = Image.new("RGB", (w, sum(p.height for p in parts)), bg)
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


def box_picture(image: Image.Image, pred, true: Optional[Sequence[float]] = None,
                caption: str = "", min_side: int = 360, max_side: int = 640) -> Image.Image:
    """The image with the true and predicted boxes (relative to the padded square) in two
    colours and a legend (`pred`: one box, a list of boxes, or None). Small images are enlarged (nearest neighbour, so pixels stay
    honest) until lines and labels are legible; a margin keeps every label outside its box."""
    img = image.convert("RGB")
    scale = max(1.0, min_side / min(img.size))
    scale = min(scale, max_side / max(img.size)) if max(img.size) * scale > max_side else scale
    if scale != 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.NEAREST if scale > 1 else Image.BILINEAR)
    font_px = max(12, round(min(img.size) / 22))
    margin = font_px + 10
    canvas = Image.new("RGB", (img.width + 2 * margin, img.height + 2 * margin), (255, 255, 255))
    canvas.paste(img, (margin, margin))
    # Boxes are drawn on the canvas: map image-relative pixels by the margin offset.
    draw = ImageDraw.Draw(canvas)
    font = _font(font_px)
    lw = max(3, round(min(img.size) / 120))
    placed: list[tuple[int, int, int, int]] = []
    preds = [pred] if pred is None or isinstance(pred[0], (int, float)) else list(pred)
    named = [(true, TRUE_COLOR, "true")] + [
        (p, PRED_COLOR, "predicted" if len(preds) == 1 else f"predicted {k + 1}") for k, p in enumerate(preds)]
    for box, col, name in named:
        if box is None:
            continue
        x1, y1, x2, y2 = box_to_pixels(box, img.width, img.height, clip=True)
        if x2 <= x1 or y2 <= y1:
            continue
        rect = (margin + round(x1), margin + round(y1), margin + max(round(x1), round(x2) - 1),
                margin + max(round(y1), round(y2) - 1))
        draw.rectangle(rect, outline=col, width=lw)
        tb = draw.textbbox((0, 0), name, font=font)
        tw, th = tb[2] - tb[0] + 6, tb[3] - tb[1] + 6
        lx = min(max(0, rect[0]), canvas.width - tw)
        above = (lx, rect[1] - th - 1, lx + tw, rect[1] - 1)
        below = (lx, rect[3] + 1, lx + tw, rect[3] + th + 1)
        # Above the box unless that collides with the other label or leaves the canvas.
        spot = above if above[1] >= 0 and not any(_overlap(above, p) for p in placed) else below
        if spot[3] > canvas.height:
            spot = above
        placed.append(spot)
        draw.rectangle(spot, fill=col)
        draw.text((spot[0] + 3 - tb[0], spot[1] + 3 - tb[1]), name, fill=_ink_on(col), font=font)
    items = ([("true", TRUE_COLOR)] if true is not None else []) + ([
        ("predicted" if any(p is not None for p in preds) else "predicted: none", PRED_COLOR)]
        if true is not None or any(p is not None for p in preds) else [])
    return _stack(canvas, _legend(canvas.width, items, caption))


def _overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def video_frames(path: str, n: int = 8, height: int = 72) -> list[tuple[float, Image.Image]]:
    """n frames spread evenly over a video, as (time in seconds, thumbnail). Only the chosen
    frames are converted and kept, so an hour-long film costs one decode pass, not its pixels."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        rate = float(s.average_rate or 25)
        total = s.frames or (int(c.duration / 1e6 * rate) if c.duration else 0)
        if total <= 0:  # no count in the header: one pass to count
            total = sum(1 for _ in c.decode(s))
            c.seek(0)
        want = sorted({round(i * (total - 1) / max(1, n - 1)) for i in range(min(n, total))})
        out, k = [], 0
        for idx, f in enumerate(c.decode(s)):
            if idx == want[k]:
                im = f.to_image()
                w = max(1, round(im.width * height / im.height))
                t = float(f.time) if f.time is not None else idx / rate
                out.append((t, im.resize((w, height), Image.BILINEAR)))
                k += 1
                if k == len(want):
                    break
    return out


def _under_strip(width: int, x0: int, x1: int, duration: float, frames=None, wave=None,
                 sample_rate: int | None = None, height: int = 72) -> Image.Image:
    """Frames at their times, or the waveform (min/max per pixel column), on the timeline's x."""
    img = Image.new("RGB", (width, height + 8), (255, 255, 255))
    d = ImageDraw.Draw(img)
    scale = (x1 - x0) / duration
    if frames:
        n = len(frames)
        slot = (x1 - x0) / n
        for k, (t, im) in enumerate(frames):
            # Each thumbnail fills its slot; a tick joins it to its time on the axis.
            th = im.resize((max(1, int(slot) - 2), height), Image.BILINEAR) if im.width > slot - 2 else im
            left = int(x0 + k * slot + (slot - th.width) / 2)
            img.paste(th, (left, 8))
            tx = int(x0 + min(max(t, 0.0), duration) * scale)
            d.line((tx, 0, left + th.width // 2, 7), fill=_AXIS)
    elif wave is not None:
        import numpy as np

        w = np.asarray(wave, dtype=np.float32)
        w = w.mean(0) if w.ndim == 2 else w
        cols = x1 - x0
        peak = float(np.abs(w).max()) or 1.0
        mid = 8 + height // 2
        edges = np.linspace(0, len(w), cols + 1).astype(int)
        for c in range(cols):
            seg = w[edges[c]:max(edges[c] + 1, edges[c + 1])]
            if seg.size == 0:
                continue
            lo, hi = float(seg.min()) / peak, float(seg.max()) / peak
            d.line((x0 + c, mid - hi * height / 2, x0 + c, mid - lo * height / 2), fill=(70, 90, 140))
        d.line((x0, mid, x1, mid), fill=_TRACK)
    return img


def span_picture(duration: float, pred: Optional[Sequence[float]], true: Optional[Sequence[float]],
                 caption: str = "", frames=None, wave=None, sample_rate: int | None = None,
                 width: int = 720) -> Image.Image:
    """True and predicted spans (relative) as two rows over a seconds axis, with the video's
    frames or the sound's waveform underneath on the same time scale."""
    tl = draw_timeline(duration, [true, pred], labels=["true", "predicted"], width=width,
                       colors=[TRUE_COLOR, PRED_COLOR])
    # draw_timeline's left margin: the widest label + 12 px (see there); right margin 16 px.
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x0 = max(probe.textbbox((0, 0), "predicted", font=_font(12))[2] + 12, 16)
    parts = [tl]
    if frames or wave is not None:
        parts.append(_under_strip(width, x0, width - 16, duration, frames, wave, sample_rate))
    items = [("true", TRUE_COLOR), ("predicted" if pred is not None else "predicted: none", PRED_COLOR)]
    parts.append(_legend(width, items, caption))
    return _stack(*parts)


def contact_sheet(tiles: Sequence[tuple[str, Image.Image]], title: str = "", columns: int = 3,
                  tile_width: int = 420) -> Image.Image:
    """Tiles (heading, picture) in a grid under a title, each scaled to tile_width."""
    font, big = _font(14), _font(20)
    scaled = []
    for head, im in tiles:
        # Fit a tile_width x 1.2 tile_width cell, so a tall picture does not dwarf the rest.
        r = min(tile_width / im.width, 1.2 * tile_width / im.height)
        scaled.append((head, im.resize((max(1, round(im.width * r)), max(1, round(im.height * r))),
                                       Image.BILINEAR) if r != 1 else im))
    rows = [scaled[i:i + columns] for i in range(0, len(scaled), columns)]
    gap, head_h, title_h = 12, 22, 36 if title else 0
    heights = [max(im.height for _, im in row) + head_h for row in rows]
    w = columns * tile_width + (columns + 1) * gap
    h = title_h + sum(heights) + (len(rows) + 1) * gap
    out = Image.new("RGB", (w, max(h, title_h + gap)), (246, 246, 246))
    d = ImageDraw.Draw(out)
    if title:
        d.text((gap, 8), title, fill=_TEXT, font=big)
    y = title_h + gap
    for row, rh in zip(rows, heights):
        for k, (head, im) in enumerate(row):
            x = gap + k * (tile_width + gap)
            d.text((x, y + 2), head, fill=_TEXT, font=font)
            out.paste(im, (x, y + head_h))
        y += rh + gap
    return out


def html_page(title: str, sections: Sequence[tuple[str, Sequence[tuple[str, Image.Image]]]],
              intro_html: str = "") -> str:
    """One self-contained HTML page (pictures inlined as PNG data URIs)."""
    import base64
    import html
    import io

    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:24px;background:#f6f6f6}"
             "figure{display:inline-block;vertical-align:top;margin:8px;background:#fff;padding:8px}"
             "figcaption{max-width:460px;font-size:13px;white-space:pre-wrap}</style>",
             f"<h1>{html.escape(title)}</h1>", intro_html]
    for head, tiles in sections:
        parts.append(f"<h2>{html.escape(head)}</h2>")
        for cap, im in tiles:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}' width='{min(im.width, 460)}'>"
                         f"<figcaption>{html.escape(cap)}</figcaption></figure>")
    return "\n".join(parts) + "\n"
