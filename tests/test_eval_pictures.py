"""Pictures a person can read: enlarged small images, labels outside boxes, two colours,
frames or waveform under the spans."""
import numpy as np
from PIL import Image

from fastground.grounding import box_to_relative
from fastground.visualize import PRED_COLOR, TRUE_COLOR, box_picture, contact_sheet, draw_boxes, span_picture

GREY = (128, 128, 128)


def _where(img, colour):
    a = np.asarray(img)
    ys, xs = np.nonzero((a == np.array(colour, dtype=a.dtype)).all(-1))
    return xs, ys


def test_small_image_is_enlarged_and_labels_sit_outside_their_boxes():
    w, h = 60, 40
    img = Image.new("RGB", (w, h), GREY)
    true_px = (0, 0, 30, 20)  # touches the top-left corner: no room above inside the image
    pred_px = (30, 10, 58, 38)
    pic = box_picture(img, box_to_relative(pred_px, w, h), box_to_relative(true_px, w, h), "caption")
    assert min(pic.size) >= 360  # 40 px tall images are not drawn at 40 px
    tx, ty = _where(pic, TRUE_COLOR)
    px, py = _where(pic, PRED_COLOR)
    assert tx.size and px.size
    # The image is pasted at a margin; find the scale from the enlarged grey area.
    gx, gy = _where(pic, GREY)
    x0, y0, scale = gx.min(), gy.min(), (gx.max() - gx.min() + 1) / w
    assert scale >= 9
    # The true box starts at the image's top edge, so its label (filled with the box colour)
    # lies above the image, in the margin, outside the box.
    assert ty.min() < y0
    # Nothing of either colour inside the boxes' interiors: labels never cover a box.
    for (a, b, c, d) in (true_px, pred_px):
        ix0, iy0 = x0 + (a + 1) * scale + 4, y0 + (b + 1) * scale + 4
        ix1, iy1 = x0 + (c - 1) * scale - 4, y0 + (d - 1) * scale - 4
        inner = np.asarray(pic)[int(iy0):int(iy1), int(ix0):int(ix1)]
        assert (inner == np.array(GREY, dtype=inner.dtype)).all(-1).all()


def test_draw_boxes_label_goes_below_a_box_at_the_top():
    img = Image.new("RGB", (200, 200), GREY)
    red = (255, 0, 0)
    out = draw_boxes(img, [box_to_relative((50, 0, 150, 80), 200, 200)], labels=["dog"], colors=[red],
                     line_width=2)
    inside = np.asarray(out)[4:76, 54:146]
    assert (inside == np.array(GREY, dtype=inside.dtype)).all(-1).all()  # the label hides none of it
    xs, ys = _where(out, red)
    assert ys.max() > 80  # the label sits below the box


def test_span_picture_with_frames_and_waveform():
    frames = [(t, Image.new("RGB", (64, 48), (200, 30, 30))) for t in (0.0, 2.0, 4.0, 6.0)]
    bare = span_picture(8.0, (0.25, 0.5), (0.3, 0.6), "q")
    with_frames = span_picture(8.0, (0.25, 0.5), (0.3, 0.6), "q", frames=frames)
    t = np.linspace(0, 8, 8000)
    wave = np.where((t > 2.4) & (t < 4.8), np.sin(2 * np.pi * 440 * t), 0.01 * np.sin(t))
    with_wave = span_picture(8.0, None, (0.3, 0.6), "q", wave=wave, sample_rate=1000)
    assert with_frames.height > bare.height and with_wave.height > bare.height
    for pic in (bare, with_frames):
        assert _where(pic, TRUE_COLOR)[0].size and _where(pic, PRED_COLOR)[0].size
    assert _where(with_frames, (200, 30, 30))[0].size  # the frames are there
    # the loud part of the waveform is drawn where the true span is
    xs, ys = _where(with_wave, (70, 90, 140))
    tx, _ = _where(with_wave, TRUE_COLOR)
    loud = xs[ys < np.median(ys) - 10]
    assert loud.size and abs(np.median(loud) - np.median(tx)) < 0.1 * with_wave.width
    sheet = contact_sheet([("a", bare), ("b", with_frames), ("c", with_wave)], "title", columns=2)
    assert sheet.width == 2 * 420 + 3 * 12
