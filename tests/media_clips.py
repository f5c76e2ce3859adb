"""Small video clips made at test time (no media is downloaded)."""
from __future__ import annotations


def h264_clip(path, n: int = 90, faststart: bool = True, gop: int = 15, bframes: int | None = None,
              width: int = 96, height: int = 64) -> str:
    """An H.264 MP4 of a bar moving one pixel a frame (x264 defaults: B-frames, some of
    them non-reference)."""
    import av
    import numpy as np
    c = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    s = c.add_stream("libx264", rate=30)
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    s.options = {"g": str(gop), **({"bf": str(bframes)} if bframes is not None else {})}
    for i in range(n):
        img = np.zeros((height, width, 3), np.uint8)
        img[:, (i % width):(i % width) + 6] = 255
        img[(i * 2) % height, :, 1] = 200
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return str(path)
