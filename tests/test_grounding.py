"""Box/span text: writing, reading what models really emit, scoring, drawing."""
from __future__ import annotations

import math

import pytest
from PIL import Image

from fastground.grounding import (
    box_iou, box_to_pixels, box_to_relative, format_box, format_span, mean_iou,
    parse_box, parse_boxes, parse_span, parse_spans, rec_accuracy, recall_at_1, span_iou,
    square_offsets,
)
from fastground.visualize import draw_boxes, draw_timeline


def approx_seq(seq, **kw):
    return [pytest.approx(tuple(x), **kw) for x in seq]


# ------------------------------------------------------------------------ writing


def test_format_box_three_decimals():
    assert format_box((0.125, 0.3, 0.875, 0.96)) == "[0.125,0.300,0.875,0.960]"
    assert format_box((0.12345, 0, 1, 0.9996)) == "[0.123,0.000,1.000,1.000]"
    assert format_box((0.1, 0.2, 0.3, 0.4), decimals=2) == "[0.10,0.20,0.30,0.40]"


def test_format_box_clips_and_rejects():
    assert format_box((-0.0001, -0.2, 1.3, 1.0)) == "[0.000,0.000,1.000,1.000]"
    with pytest.raises(ValueError):
        format_box((0.5, 0.1, 0.2, 0.4))  # x1 > x2
    with pytest.raises(ValueError):
        format_box((0.1, 0.2, 0.3))
    with pytest.raises(ValueError):
        format_box((0.1, 0.2, math.nan, 0.4))


def test_format_span_styles_and_duration():
    assert format_span(0.12, 0.48) == "{0.12,0.48}"
    assert format_span(0.12, 0.48, style="[]") == "[0.12,0.48]"
    assert format_span(3.0, 12.0, duration=25.0) == "{0.12,0.48}"
    assert format_span(0.0, 31.0, duration=30.0) == "{0.00,1.00}"  # past the end: clipped
    assert format_span(0.123, 0.456, decimals=3) == "{0.123,0.456}"
    with pytest.raises(ValueError):
        format_span(0.1, 0.2, style="()")
    with pytest.raises(ValueError):
        format_span(0.5, 0.2)
    with pytest.raises(ValueError):
        format_span(1.0, 2.0, duration=0)


# ------------------------------------------------------------- pixel <-> relative


def test_square_offsets_match_centred_padding():
    assert square_offsets(640, 480) == (640, 0, 80)
    assert square_offsets(480, 640) == (640, 80, 0)
    assert square_offsets(641, 480) == (641, 0, 80)  # odd difference: extra row at bottom
    assert square_offsets(300, 300) == (300, 0, 0)
    with pytest.raises(ValueError):
        square_offsets(0, 10)


def test_box_to_relative_hand_values():
    # Landscape 640x480: 80 rows of padding above and below.
    assert box_to_relative((0, 0, 640, 480), 640, 480) == pytest.approx((0, 0.125, 1, 0.875))
    assert box_to_relative((160, 120, 480, 360), 640, 480) == pytest.approx(
        (0.25, 0.3125, 0.75, 0.6875))
    # Portrait 300x500: 100 columns of padding left and right.
    assert box_to_relative((0, 0, 300, 500), 300, 500) == pytest.approx((0.2, 0, 0.8, 1))
    assert box_to_relative((150, 250, 300, 500), 300, 500) == pytest.approx(
        (0.5, 0.5, 0.8, 1.0))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (641, 300), (333, 1000), (256, 256)])
def test_pixel_relative_round_trip(size):
    w, h = size
    boxes = [(0, 0, w, h), (10.5, 20.25, w / 2, h - 3), (w * 0.3, h * 0.1, w * 0.31, h * 0.9)]
    for box in boxes:
        rel = box_to_relative(box, w, h)
        assert all(0 <= v <= 1 for v in rel)
        assert box_to_pixels(rel, w, h) == pytest.approx(box, abs=1e-9)


def test_box_to_pixels_clips_padding():
    # Box reaching into the top padding of a 640x480 image is cut at row 0.
    assert box_to_pixels((0.0, 0.0, 0.5, 0.5), 640, 480) == pytest.approx((0, 0, 320, 240))
    assert box_to_pixels((0.0, 0.0, 0.5, 0.5), 640, 480, clip=False) == pytest.approx(
        (0, -80, 320, 240))


def test_format_parse_round_trip_through_pixels():
    w, h = 500, 375
    px = (37, 58, 412, 301)
    text = format_box(box_to_relative(px, w, h))
    back = box_to_pixels(parse_box(text), w, h)
    # 3 decimals of a 500-pixel side: at most 0.25 px off.
    assert back == pytest.approx(px, abs=0.26)


# ----------------------------------------------------------------------- reading


def test_round_trip_boxes_and_spans():
    boxes = [(0.125, 0.3, 0.875, 0.96), (0.0, 0.0, 1.0, 1.0), (0.001, 0.5, 0.002, 0.501)]
    for b in boxes:
        assert parse_box(format_box(b)) == pytest.approx(b)
    for style in ("{}", "[]"):
        for s in [(0.12, 0.48), (0.0, 1.0), (0.99, 1.0)]:
            assert parse_span(format_span(*s, style=style)) == pytest.approx(s)
    many = " and ".join(format_box(b) for b in boxes)
    assert parse_boxes(many) == approx_seq(boxes)


BOX_CASES = [
    # (model answer, expected boxes)
    ("[0.125,0.300,0.875,0.960]", [(0.125, 0.3, 0.875, 0.96)]),
    ("[0.1, 0.2, 0.3, 0.4]", [(0.1, 0.2, 0.3, 0.4)]),
    ("[ 0.1 ,0.2 ,  0.3,0.4 ]", [(0.1, 0.2, 0.3, 0.4)]),
    ("{0.1,0.2,0.3,0.4}", [(0.1, 0.2, 0.3, 0.4)]),
    ("[.5,0.50,1,1.]", [(0.5, 0.5, 1.0, 1.0)]),
    ("[0,0,1,1]", [(0.0, 0.0, 1.0, 1.0)]),
    ("The dog is at [0.1,0.2,0.3,0.4] and the cat at [0.5,0.6,0.7,0.8].",
     [(0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)]),
    ("[[0.1,0.2,0.3,0.4],[0.5,0.6,0.7,0.8]]", [(0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)]),
    ("[0.3,0.2,0.1,0.4]", [(0.1, 0.2, 0.3, 0.4)]),            # x swapped
    ("[0.1,0.4,0.3,0.2]", [(0.1, 0.2, 0.3, 0.4)]),            # y swapped
    ("[0.7,0.9,0.2,0.1]", [(0.2, 0.1, 0.7, 0.9)]),            # both swapped
    ("[-0.02,0.1,1.05,0.9]", [(0.0, 0.1, 1.0, 0.9)]),         # slight overshoot: clipped
    ("[+0.1,0.2,0.3,0.4]", [(0.1, 0.2, 0.3, 0.4)]),
    ("[0.1,0.2,0.3,0.4]</s>", [(0.1, 0.2, 0.3, 0.4)]),
    ("[0.1,0.2,0.3,0.4] [0.1,0.2]", [(0.1, 0.2, 0.3, 0.4)]),  # the span is not a box
    ("[0.1,0.2,0.3,0.4] then [0.1,0.2,0.3", [(0.1, 0.2, 0.3, 0.4)]),  # truncated second
    # garbage: nothing, never a made-up box
    ("", []),
    ("no box here", []),
    ("[0.1,0.2]", []),                      # two numbers: a span
    ("[0.1,0.2,0.3]", []),
    ("[0.1,0.2,0.3,0.4,0.5]", []),
    ("[a,b,c,d]", []),
    ("[x1,y1,x2,y2]", []),
    ("[0.1,0.2,0.3,]", []),
    ("[0.1,,0.3,0.4]", []),
    ("[0.1 0.2 0.3 0.4]", []),              # no commas
    ("[0.1;0.2;0.3;0.4]", []),
    ("[0.1,0.2,0.3,0.4", []),               # never closed
    ("0.1,0.2,0.3,0.4]", []),               # never opened
    ("0.1,0.2,0.3,0.4", []),
    ("[0.1,0.2,0.3,0.4}", []),              # mismatched pair
    ("{0.1,0.2,0.3,0.4]", []),
    ("[nan,0.2,0.3,0.4]", []),
    ("[inf,0.2,0.3,0.4]", []),
    ("[0.1,0.2,-inf,0.4]", []),
    ("[1e-1,0.2,0.3,0.4]", []),             # exponents are not what the model writes
    ("[0.1.2,0.2,0.3,0.4]", []),
    ("[12,45,300,400]", []),                # pixels
    ("[125,300,875,960]", []),              # a 0-1000 grid
    ("[0,0,300,400]", []),                  # would clip to the full image: rejected
    ("[" + "9" * 400 + ",0.2,0.3,0.4]", []),  # float() gives inf
    ("[0.1,0.2,0.1,0.4]", []),              # zero width
    ("[0.1,0.2,0.3,0.2]", []),              # zero height
    ("[1.2,0.2,1.4,0.4]", []),              # zero width once clipped
    ("[-0.3,0.2,-0.1,0.4]", []),
]


@pytest.mark.parametrize("text,expected", BOX_CASES)
def test_parse_boxes_table(text, expected):
    got = parse_boxes(text)
    assert got == approx_seq(expected)
    assert all(isinstance(v, float) for b in got for v in b)
    assert parse_box(text) == (pytest.approx(expected[0]) if expected else None)


SPAN_CASES = [
    ("{0.12,0.48}", [(0.12, 0.48)]),
    ("[0.12,0.48]", [(0.12, 0.48)]),
    ("{0.12, 0.48}", [(0.12, 0.48)]),
    ("{ .5 , 1 }", [(0.5, 1.0)]),
    ("The event happens during {0.12,0.48}.", [(0.12, 0.48)]),
    ("{0.1,0.2} and {0.5,0.9}", [(0.1, 0.2), (0.5, 0.9)]),
    ("{0.48,0.12}", [(0.12, 0.48)]),        # start after end: swapped
    ("{-0.01,1.02}", [(0.0, 1.0)]),
    ("[0.1,0.2,0.3,0.4] {0.3,0.6}", [(0.3, 0.6)]),  # the box is not a span
    # garbage
    ("{0.12}", []),
    ("{0.1,0.2,0.3}", []),
    ("{0.1,0.2,0.3,0.4}", []),              # four numbers: a box
    ("{a,b}", []),
    ("{start,end}", []),
    ("{0.12,0.48", []),
    ("0.12,0.48}", []),
    ("{0.12,0.48]", []),
    ("{nan,0.4}", []),
    ("{0.1,inf}", []),
    ("{12.5,30.1}", []),                    # seconds, not relative
    ("{3,12}", []),
    ("{0.3,0.3}", []),                      # zero length
    ("{1.1,1.3}", []),                      # zero length once clipped
    ("{0.1 0.2}", []),
]


@pytest.mark.parametrize("text,expected", SPAN_CASES)
def test_parse_spans_table(text, expected):
    assert parse_spans(text) == approx_seq(expected)
    assert parse_span(text) == (pytest.approx(expected[0]) if expected else None)


def test_tolerance_is_a_setting():
    assert parse_box("[0.1,0.2,0.3,1.4]") == pytest.approx((0.1, 0.2, 0.3, 1.0))
    assert parse_box("[0.1,0.2,0.3,1.6]") is None
    assert parse_box("[0.1,0.2,0.3,1.4]", tolerance=0.1) is None
    assert parse_span("{0.2,1.05}", tolerance=0.0) is None
    assert parse_span("{0.2,1.0}", tolerance=0.0) == pytest.approx((0.2, 1.0))


# ----------------------------------------------------------------------- scoring


@pytest.mark.parametrize("a,b,iou", [
    ((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75), 1 / 7),   # 0.0625 / 0.4375
    ((0, 0, 1, 1), (0, 0, 0.5, 1), 0.5),
    ((0.1, 0.1, 0.3, 0.3), (0.1, 0.1, 0.3, 0.3), 1.0),
    ((0, 0, 0.2, 0.2), (0.2, 0, 0.4, 0.2), 0.0),            # touching edges
    ((0, 0, 0.2, 0.2), (0.5, 0.5, 0.7, 0.7), 0.0),
    ((0, 0, 0.4, 0.2), (0.2, 0, 0.6, 0.4), 0.04 / 0.20),    # inter 0.2x0.2, union .08+.16-.04
    ((0.2, 0.2, 0.4, 0.4), (0, 0, 1, 1), 0.04),             # contained
    ((0.2, 0.2, 0.2, 0.4), (0.2, 0.2, 0.2, 0.4), 0.0),      # empty boxes
])
def test_box_iou_hand_values(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


@pytest.mark.parametrize("a,b,iou", [
    ((0.1, 0.5), (0.3, 0.7), 0.2 / 0.6),
    ((0.0, 0.5), (0.25, 0.5), 0.5),
    ((0.2, 0.4), (0.2, 0.4), 1.0),
    ((0.0, 0.3), (0.3, 0.6), 0.0),
    ((0.0, 0.2), (0.5, 0.9), 0.0),
    ((0.0, 1.0), (0.4, 0.6), 0.2),
    ((0.5, 0.5), (0.5, 0.5), 0.0),
])
def test_span_iou_hand_values(a, b, iou):
    assert span_iou(a, b) == pytest.approx(iou)
    assert span_iou(b, a) == pytest.approx(iou)


def test_rec_accuracy():
    gts = [(0, 0, 1, 1), (0, 0, 1, 1), (0.1, 0.1, 0.3, 0.3), (0, 0, 0.5, 0.5), (0, 0, 1, 1)]
    preds = [
        (0, 0, 1, 1),                 # IoU 1
        (0, 0, 0.5, 1),               # IoU exactly 0.5: a hit
        None,                         # unparseable answer: a miss
        (0.25, 0.25, 0.75, 0.75),     # IoU 1/7
        (0, 0, 0.7, 1),               # IoU 0.7
    ]
    assert rec_accuracy(preds, gts) == pytest.approx(3 / 5)
    assert rec_accuracy(preds, gts, thresh=0.75) == pytest.approx(1 / 5)
    assert mean_iou(preds, gts) == pytest.approx((1 + 0.5 + 0 + 1 / 7 + 0.7) / 5)
    with pytest.raises(ValueError):
        rec_accuracy(preds[:2], gts)
    with pytest.raises(ValueError):
        rec_accuracy([], [])


def test_recall_at_1():
    gts = [(0.1, 0.5), (0.1, 0.5), (0.2, 0.3), (0.5, 0.9)]
    preds = [(0.1, 0.5), (0.0, 0.4), None, (0.6, 0.9)]
    # IoUs: 1, 0.3/0.5 = 0.6, 0 (miss), 0.3/0.4 = 0.75
    r = recall_at_1(preds, gts)
    assert r == {"R@1,IoU=0.5": pytest.approx(0.75), "R@1,IoU=0.7": pytest.approx(0.5),
                 "mIoU": pytest.approx((1 + 0.6 + 0 + 0.75) / 4)}
    r = recall_at_1(preds, gts, thresholds=(0.3, 0.5, 0.7, 0.9))
    assert [r[f"R@1,IoU={t}"] for t in (0.3, 0.5, 0.7, 0.9)] == pytest.approx(
        [0.75, 0.75, 0.5, 0.25])
    assert mean_iou(preds, gts) == pytest.approx(r["mIoU"])


def test_threshold_is_not_lost_to_rounding():
    # 0.1 / 0.2 is 0.49999999999999994 in floating point; on paper it is 0.5.
    assert span_iou((0.0, 0.1), (0.0, 0.2)) < 0.5
    assert recall_at_1([(0.0, 0.1)], [(0.0, 0.2)])["R@1,IoU=0.5"] == 1.0


def test_metrics_from_parsed_answers():
    answers = ["{0.10,0.50}", "It starts at [0.00, 0.40].", "I don't know.", "{0.9,0.6}"]
    gts = [(0.1, 0.5), (0.1, 0.5), (0.2, 0.3), (0.5, 0.9)]
    r = recall_at_1([parse_span(a) for a in answers], gts)
    assert r["R@1,IoU=0.5"] == pytest.approx(0.75)
    assert r["R@1,IoU=0.7"] == pytest.approx(0.5)


def test_mixed_kinds_rejected():
    with pytest.raises(ValueError):
        mean_iou([(0.1, 0.2)], [(0.1, 0.2, 0.3, 0.4)])


# ----------------------------------------------------------------------- drawing

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.mark.parametrize("size", [(320, 200), (200, 320)])
def test_draw_boxes_edges_have_box_colour(size):
    w, h = size
    image = Image.new("RGB", size, (128, 128, 128))
    px = (40, 50, 160, 150)
    rel = box_to_relative(px, w, h)
    out = draw_boxes(image, [rel, None], labels=["dog", "missing"], colors=[RED, BLUE],
                     line_width=2)
    assert out.size == size and out.mode == "RGB"
    assert image.getpixel((40, 100)) == (128, 128, 128)   # the input is left alone
    x1, y1, x2, y2 = px
    assert out.getpixel((x1, (y1 + y2) // 2)) == RED      # left edge
    assert out.getpixel((x1 + 1, (y1 + y2) // 2)) == RED  # line width 2, drawn inward
    assert out.getpixel((x2 - 1, (y1 + y2) // 2)) == RED  # right edge
    assert out.getpixel(((x1 + x2) // 2, y2 - 1)) == RED  # bottom edge
    assert out.getpixel(((x1 + x2) // 2, y1)) == RED      # top edge
    assert out.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == (128, 128, 128)  # not filled
    assert out.getpixel((x1 - 1, (y1 + y2) // 2)) == (128, 128, 128)
    assert BLUE not in {c for _, c in out.getcolors(w * h)}  # the None box drew nothing


def test_draw_boxes_non_rgb_and_padding_box():
    image = Image.new("L", (300, 100), 0)
    # Wholly in the top padding of a 300x100 image (rows 0-100 of the square): skipped.
    out = draw_boxes(image, [(0.1, 0.0, 0.5, 0.2), (0.0, 0.0, 1.0, 1.0)], colors=[RED, BLUE])
    assert out.mode == "RGB" and out.size == (300, 100)
    colours = {c for _, c in out.getcolors(300 * 100)}
    assert RED not in colours
    # The full-square box clips to the image border.
    assert out.getpixel((0, 50)) == BLUE and out.getpixel((299, 50)) == BLUE
    assert out.getpixel((150, 0)) == BLUE and out.getpixel((150, 99)) == BLUE


def _columns_of(img, colour):
    w, h = img.size
    data = img.load()
    return sorted({x for x in range(w) for y in range(h) if data[x, y] == colour})


def test_draw_timeline_size_and_span_positions():
    img = draw_timeline(30.0, [(0.0, 1.0), (0.25, 0.75), None],
                        labels=["track", "pred", "gt"], colors=[RED, BLUE, (0, 200, 0)])
    assert img.width == 800 and img.height > 0
    full, half = _columns_of(img, RED), _columns_of(img, BLUE)
    assert full and half
    track = full[-1] - full[0] + 1
    centre = (full[0] + full[-1]) / 2
    # The half-length span sits in the middle of the track and is half as long.
    assert (half[-1] - half[0] + 1) == pytest.approx(track / 2, abs=1.5)
    assert (half[0] + half[-1]) / 2 == pytest.approx(centre, abs=1.5)
    assert (0, 200, 0) not in {c for _, c in img.getcolors(img.width * img.height)}


def test_draw_timeline_explicit_size_and_seconds():
    img = draw_timeline(12.0, [(3.0, 6.0), (6.0, 12.0)], width=400, height=120,
                        colors=[RED, BLUE], relative=False)
    assert img.size == (400, 120)
    a, b = _columns_of(img, RED), _columns_of(img, BLUE)
    # 3 s vs 6 s long, and the second starts where the first ends.
    assert (b[-1] - b[0] + 1) == pytest.approx(2 * (a[-1] - a[0] + 1), abs=2)
    assert b[0] == a[-1] + 1
    with pytest.raises(ValueError):
        draw_timeline(0.0, [(0.1, 0.2)])


@pytest.mark.parametrize("duration", [0.8, 30.0, 600.0, 5400.0])
def test_draw_timeline_any_duration(duration):
    img = draw_timeline(duration, [(0.1, 0.4)], labels=["pred"])
    assert img.size[0] == 800
