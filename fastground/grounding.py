"""Spatial-temporal text: writing, reading and scoring boxes and time spans.

GroundingGPT answers in plain text. A box is `[x1,y1,x2,y2]` with 3 decimals, relative
to the image after it was padded to a square (the release pads, centred, before CLIP
preprocessing, so that is the frame the model sees). A time span is two values relative to
the duration with 2 decimals; the bracket style of the released data is not stated, so
readers accept both `[s,e]` and `{s,e}` and writers take the style as a setting.

Pure Python, so evaluation scripts can use it without torch or numpy.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Sequence

Box = tuple[float, float, float, float]
Span = tuple[float, float]

__all__ = [
    "Box", "Span", "PARSE_TOLERANCE",
    "format_box", "format_span",
    "square_offsets", "box_to_relative", "box_to_pixels",
    "parse_boxes", "parse_box", "parse_spans", "parse_span",
    "box_iou", "span_iou", "mean_iou", "rec_accuracy", "recall_at_1",
]

# How far outside [0, 1] a parsed value may lie and still be read as a relative
# coordinate that overshot. Beyond it the model is not speaking relative coordinates
# (pixels, a 0-1000 grid, seconds) and clipping would invent a box, so the group is
# dropped instead.
PARSE_TOLERANCE = 0.5

# Plain decimals only: models trained on `%.3f` text never emit exponents, and a
# `nan`/`inf` spelled out must not slip through float().
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# An innermost bracket group: an opener, then anything but brackets, then a closer.
_GROUP = re.compile(r"([\[{])([^\[\]{}]*)([\]}])")
_PAIRS = {"[": "]", "{": "}"}

# Scores come from numbers printed with 2-3 decimals; an IoU that is exactly the
# threshold on paper may land a hair below it in floating point.
_IOU_EPS = 1e-9


# ----------------------------------------------------------------------- writing


def _clip01(v: float) -> float:
    return min(1.0, max(0.0, v))


def _finite(values: Iterable[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} has a non-finite value: {out}")
    return out


def format_box(box: Sequence[float], decimals: int = 3) -> str:
    """`[x1,y1,x2,y2]` for a box already relative to the padded square image.

    Values are clipped to [0, 1]. Corners out of order raise rather than being fixed,
    because a writer is producing training data and a swapped box there is a bug upstream.
    """
    if len(box) != 4:
        raise ValueError(f"a box has 4 values, got {len(box)}")
    x1, y1, x2, y2 = (_clip01(v) for v in _finite(box, "box"))
    if x1 > x2 or y1 > y2:
        raise ValueError(f"box corners out of order: {tuple(box)}")
    return "[" + ",".join(f"{v:.{decimals}f}" for v in (x1, y1, x2, y2)) + "]"


def format_span(start: float, end: float, duration: Optional[float] = None,
                decimals: int = 2, style: str = "{}") -> str:
    """Time span relative to the duration, e.g. `{0.12,0.48}`.

    With `duration`, `start`/`end` are seconds; without, they are already relative.
    `style` is the pair of brackets to write: "{}" or "[]".
    """
    if style not in ("{}", "[]"):
        raise ValueError(f"style must be '{{}}' or '[]', got {style!r}")
    s, e = _finite((start, end), "span")
    if duration is not None:
        (d,) = _finite((duration,), "duration")
        if d <= 0:
            raise ValueError(f"duration must be positive, got {duration}")
        s, e = s / d, e / d
    if s > e:
        raise ValueError(f"span start after end: ({start}, {end})")
    s, e = _clip01(s), _clip01(e)
    return f"{style[0]}{s:.{decimals}f},{e:.{decimals}f}{style[1]}"


# ------------------------------------------------------------- pixel <-> relative


def square_offsets(width: int, height: int) -> tuple[int, int, int]:
    """(side, x offset, y offset) of the image inside the release's padded square.

    The release pastes the image at ((side - w) // 2, (side - h) // 2) on a side x side
    canvas, so an odd difference leaves the extra pixel of padding at the right/bottom.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def box_to_relative(box_px: Sequence[float], width: int, height: int) -> Box:
    """Pixel box on the original image -> box relative to the padded square."""
    side, ox, oy = square_offsets(width, height)
    x1, y1, x2, y2 = _finite(box_px, "box")
    return ((x1 + ox) / side, (y1 + oy) / side, (x2 + ox) / side, (y2 + oy) / side)


def box_to_pixels(rel_box: Sequence[float], width: int, height: int,
                  clip: bool = True) -> Box:
    """Box relative to the padded square -> pixel box on the original image.

    With `clip`, parts lying on the padding are cut off at the image border, since the
    padding has no pixels to point at.
    """
    side, ox, oy = square_offsets(width, height)
    x1, y1, x2, y2 = _finite(rel_box, "box")
    px = (x1 * side - ox, y1 * side - oy, x2 * side - ox, y2 * side - oy)
    if clip:
        px = (min(max(px[0], 0.0), width), min(max(px[1], 0.0), height),
              min(max(px[2], 0.0), width), min(max(px[3], 0.0), height))
    return px


# ----------------------------------------------------------------------- reading


def _groups(text: str, arity: int, tolerance: float) -> list[list[float]]:
    """Numbers of every well-formed innermost bracket group holding `arity` values."""
    out = []
    for opener, body, closer in _GROUP.findall(text):
        if _PAIRS[opener] != closer:
            continue
        parts = [p.strip() for p in body.split(",")]
        if len(parts) != arity or not all(_NUMBER.fullmatch(p) for p in parts):
            continue
        values = [float(p) for p in parts]
        # float() turns a 400-digit integer into inf rather than failing, so the
        # finiteness test is what keeps it out, not the regex.
        if not all(math.isfinite(v) and -tolerance <= v <= 1.0 + tolerance
                   for v in values):
            continue
        out.append([_clip01(v) for v in values])
    return out


def parse_boxes(text: str, tolerance: float = PARSE_TOLERANCE) -> list[Box]:
    """Every box `[x1,y1,x2,y2]` (or `{x1,y1,x2,y2}`) in a model answer, in order.

    Rules, chosen so that a returned box is never an invented one:
    - a box is an innermost bracket group of exactly 4 comma-separated plain decimals
      (`.5`, `0.50`, `1`, `-0.01`; spaces around commas allowed); groups with another
      count, non-numbers, exponents, `nan`/`inf`, or mismatched brackets (`[..}`) are
      skipped, and a bracket never closed yields nothing;
    - every value must lie in [-tolerance, 1 + tolerance]; otherwise the whole group is
      skipped (pixel or 0-1000 coordinates are not relative ones);
    - values are then clipped to [0, 1] and corners given out of order are swapped;
    - a box with zero width or height after clipping is skipped.
    Nested lists such as `[[..],[..]]` give their inner boxes.
    """
    boxes = []
    for x1, y1, x2, y2 in _groups(text, 4, tolerance):
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
        if x2 > x1 and y2 > y1:
            boxes.append((x1, y1, x2, y2))
    return boxes


def parse_box(text: str, tolerance: float = PARSE_TOLERANCE) -> Optional[Box]:
    """The first box of `parse_boxes`, or None."""
    boxes = parse_boxes(text, tolerance)
    return boxes[0] if boxes else None


def parse_spans(text: str, tolerance: float = PARSE_TOLERANCE) -> list[Span]:
    """Every time span `{s,e}` (or `[s,e]`) in a model answer, in order.

    Same rules as `parse_boxes` with 2 values instead of 4: a 4-value group is a box and
    never a span. Start after end is swapped; a zero-length span after clipping is
    skipped.
    """
    spans = []
    for s, e in _groups(text, 2, tolerance):
        s, e = min(s, e), max(s, e)
        if e > s:
            spans.append((s, e))
    return spans


def parse_span(text: str, tolerance: float = PARSE_TOLERANCE) -> Optional[Span]:
    """The first span of `parse_spans`, or None."""
    spans = parse_spans(text, tolerance)
    return spans[0] if spans else None


# ----------------------------------------------------------------------- scoring


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes (0 when both are empty)."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
             + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter)
    return inter / union if union > 0 else 0.0


def span_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Temporal IoU of two `(start, end)` spans (0 when both are empty)."""
    (as_, ae), (bs, be) = a, b
    inter = max(0.0, min(ae, be) - max(as_, bs))
    union = max(0.0, ae - as_) + max(0.0, be - bs) - inter
    return inter / union if union > 0 else 0.0


def _ious(preds: Sequence, gts: Sequence) -> list[float]:
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
    if not gts:
        raise ValueError("no samples to score")
    out = []
    for p, g in zip(preds, gts):
        if p is None:
            out.append(0.0)
        elif len(g) == 4 and len(p) == 4:
            out.append(box_iou(p, g))
        elif len(g) == 2 and len(p) == 2:
            out.append(span_iou(p, g))
        else:
            raise ValueError(f"prediction {p} and ground truth {g} are not the same kind")
    return out


def mean_iou(preds: Sequence[Optional[Sequence[float]]],
             gts: Sequence[Sequence[float]]) -> float:
    """Mean IoU over paired boxes or spans (told apart by length); None scores 0."""
    ious = _ious(preds, gts)
    return sum(ious) / len(ious)


def rec_accuracy(preds: Sequence[Optional[Sequence[float]]],
                 gts: Sequence[Sequence[float]], thresh: float = 0.5) -> float:
    """Referring-expression accuracy: fraction of boxes with IoU >= `thresh`.

    A None prediction (nothing parseable in the answer) is a miss.
    """
    ious = _ious(preds, gts)
    return sum(iou >= thresh - _IOU_EPS for iou in ious) / len(ious)


def recall_at_1(pred_spans: Sequence[Optional[Sequence[float]]],
                gt_spans: Sequence[Sequence[float]],
                thresholds: Sequence[float] = (0.5, 0.7)) -> dict[str, float]:
    """Charades-STA style R@1: `{"R@1,IoU=0.5": .., "R@1,IoU=0.7": .., "mIoU": ..}`.

    One prediction per query (the first span of the answer); None is a miss.
    """
    ious = _ious(pred_spans, gt_spans)
    n = len(ious)
    out = {f"R@1,IoU={t:g}": sum(iou >= t - _IOU_EPS for iou in ious) / n
           for t in thresholds}
    out["mIoU"] = sum(ious) / n
    return out
