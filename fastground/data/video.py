"""Video branch input: T frames, resized, normalised, as FloatTensor (3, T, S, S).

What the release does (`video_llama.processors.video_processor.load_video` + the Alpro
train transform) and what is kept here:

* Frame choice: `np.arange(0, n, n / T).astype(int)` over the n frames of the file
  (`frame_indices`). The release silently returns fewer than T frames for a file shorter
  than T; here that is a MediaError unless `allow_repeat=True`, which pads with the last
  frame so the batch keeps its shape.
* Geometry: decord resizes every frame straight to S x S (aspect ratio not kept) and the
  training transform then takes a random-resized crop (scale 0.5-1, ratio 3/4-4/3) of that
  S x S frame and resizes it back to S. Default `resize_mode="squash"` keeps that view;
  `"center_crop"` (shorter side to S, centre crop) is offered for data where squashing
  hurts. The training crop is drawn on the S x S grid of the view, with torchvision's
  rules, then mapped back to source pixels, so one resize from the decoded frame does what
  the release's two resizes do, with one interpolation instead of two.
* The crop box is drawn once in Python from `seed`, so every backend gets the same box.
* Pixels: bicubic resize, /255, CLIP mean/std (the release's values).

Backends (`VideoDecoder.decode` / `load_video(backend=...)`):

* "pyav" (reference): sequential decode with FFmpeg through PyAV, YUV->RGB by swscale
  with bilinear full-chroma interpolation and accurate rounding, then PIL bicubic resize of
  the crop box. Those swscale flags are the ones DALI's CPU decoder uses, so the decoded
  RGB frames of the two backends are bit-identical; only the resize differs.
* "dali": `fn.decoders.video` with the same frame indices, `fn.resize` of the same ROI
  (cubic, antialiased) and `fn.crop_mirror_normalize` to CFHW. Device "mixed" (NVDEC) when
  torch sees a GPU, else "cpu". The CPU decoder reads VP8/VP9/MJPEG only; for any other
  codec, or when DALI fails on a file PyAV can read, it logs one warning line and decodes
  with PyAV.

Measured bound, DALI CPU vs PyAV, on the 60 demo videos (VP9 WebM, 64-96 px frames to
56 px; eval and four train crops each, both resize modes), 0-255 units before
normalisation: max |diff| 15, mean |diff| per clip <= 0.04 (0.013 on average), and at
most 0.15% of the values of a clip differ by more than 2. The decoded frames agree
exactly; the rest is PIL's and DALI's cubic resampling rounding differently, largest on
the hard, saturated edges of the synthetic shapes. The bound lives in
`tests/test_media.py`. With NVDEC the YUV->RGB conversion runs on the GPU and is
not covered by this bound.
"""
from __future__ import annotations

import abc

import logging
import math
import os
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional, Union

import numpy as np
import torch

from fastground.data.errors import MediaError, check_media_file
from fastground.data.image import CLIP_MEAN, CLIP_STD

__all__ = [
    "VideoInfo", "probe_video", "frame_indices", "crop_box",
    "VideoDecoder", "PyAVDecoder", "ScaledPyAVDecoder", "DALIDecoder", "BACKENDS", "get_decoder", "load_video",
    "normalize_frames", "worker_start_method",
]

log = logging.getLogger(__name__)

Seed = Union[int, np.random.Generator, None]


# ---------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class VideoInfo:
    n_frames: int
    width: int
    height: int
    fps: float
    codec: str
    duration: Optional[float]  # seconds, from the container header when it has one


def _fspath(path: Any) -> str:
    return os.fspath(path) if isinstance(path, os.PathLike) else str(path)


def _open_container(path: str, sample_id: Any):
    import av

    check_media_file(path, "a video", sample_id)
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise MediaError(path, f"not a readable video container ({e})", sample_id) from None
    if not container.streams.video:
        container.close()
        raise MediaError(path, "no video stream in the file", sample_id)
    return container


def probe_video(path: Any, sample_id: Any = None) -> VideoInfo:
    """Frame count, size, rate and codec of the first video stream, by demuxing only.

    The count is the container's when it stores one (MP4/MOV: read from the header, the
    file is not scanned); otherwise (WebM, MKV, AVI) the video packets are counted, which is how decord counts them too: one
    packet per shown frame (VP9 carries its hidden frames inside superframes). A file
    whose packets end well before the duration its header declares is reported as
    truncated, because decoders would otherwise return the surviving frames silently.
    """
    import av

    path = _fspath(path)
    container = _open_container(path, sample_id)
    try:
        stream = container.streams.video[0]
        cc = stream.codec_context
        width, height = int(cc.width), int(cc.height)
        if width <= 0 or height <= 0:
            raise MediaError(path, f"video stream has no frame size ({width}x{height})",
                             sample_id)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        declared = container.duration / 1e6 if container.duration else None
        if stream.frames and stream.frames > 0:
            # The container's own count (MP4/MOV): no pass over the file. A file cut short
            # fails where its frames are decoded ("truncated video: decoded n frames").
            return VideoInfo(int(stream.frames), width, height, fps, cc.name, declared)
        counted, end = 0, 0.0
        try:
            # Packets of every stream: a file whose audio outlasts its video is whole.
            for pkt in container.demux():
                if pkt.size == 0 or pkt.pts is None or pkt.time_base is None:
                    continue
                if pkt.stream.type == "video" and pkt.stream.index == stream.index:
                    counted += 1
                dur = pkt.duration or 0
                end = max(end, float((pkt.pts + dur) * pkt.time_base))
        except av.error.FFmpegError as e:
            raise MediaError(path, f"corrupt video container ({e})", sample_id) from None
        n = int(stream.frames) if stream.frames and stream.frames > 0 else counted
        if n <= 0:
            raise MediaError(path, "video has no frames", sample_id)
        if declared and fps > 0 and container.format.name not in ("image2",):
            start = float(container.start_time / 1e6) if container.start_time else 0.0
            if end - start < declared - 2.0 / fps - 1e-3:
                raise MediaError(
                    path, f"truncated video: packets end at {end - start:.3f} s, "
                          f"header declares {declared:.3f} s", sample_id)
        return VideoInfo(n, width, height, fps, cc.name, declared)
    finally:
        container.close()


# ------------------------------------------------------------------ frames and boxes


def frame_indices(n_total: int, n_frames: int, allow_repeat: bool = False,
                  path: Any = "", sample_id: Any = None) -> np.ndarray:
    """The release's uniform choice, `np.arange(0, n, n / n_frames).astype(int)`.

    With fewer frames than asked: MediaError, or with `allow_repeat` every frame once
    and then the last one again until there are `n_frames`.
    """
    n_total, n_frames = int(n_total), int(n_frames)
    if n_frames <= 0:
        raise ValueError(f"n_frames must be positive, got {n_frames}")
    if n_total <= 0:
        raise MediaError(_fspath(path), "video has no frames", sample_id)
    if n_total < n_frames:
        if not allow_repeat:
            raise MediaError(_fspath(path),
                             f"video has only {n_total} frames, {n_frames} asked", sample_id)
        idx = np.concatenate([np.arange(n_total), np.full(n_frames - n_total, n_total - 1)])
        return idx.astype(np.int64)
    idx = np.arange(0, n_total, n_total / n_frames).astype(int)
    # arange's length is ceil(n / step), exact for every n >= T tried (T <= 64,
    # n < 20000); the guard keeps a rounding surprise from changing T.
    return idx[:n_frames].astype(np.int64)


def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _random_resized_crop(rng: np.random.Generator, size: int,
                         scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params on a size x size frame: (top, left, h, w)."""
    area = size * size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            top = int(rng.integers(0, size - h + 1))
            left = int(rng.integers(0, size - w + 1))
            return top, left, h, w
    return 0, 0, size, size  # a square frame: torchvision's fallback is the whole frame


def crop_box(width: int, height: int, size: int, train: bool = False, seed: Seed = None,
             resize_mode: str = "squash") -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in source pixels of the region that becomes the S x S output."""
    if resize_mode == "squash":
        vx, vy, vw, vh = 0.0, 0.0, float(width), float(height)
    elif resize_mode == "center_crop":
        side = float(min(width, height))
        vx, vy, vw, vh = (width - side) / 2, (height - side) / 2, side, side
    else:
        raise ValueError(f"resize_mode must be 'squash' or 'center_crop', got {resize_mode!r}")
    if not train:
        return (vx, vy, vx + vw, vy + vh)
    top, left, h, w = _random_resized_crop(_rng(seed), size)
    sx, sy = vw / size, vh / size
    return (vx + left * sx, vy + top * sy, vx + (left + w) * sx, vy + (top + h) * sy)


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., T, S, S, 3) -> float (..., 3, T, S, S): /255 and CLIP mean/std. The same
    arithmetic wherever it runs, so frames shipped as uint8 and normalised on the device
    equal frames normalised here (the trainer ships uint8: a quarter of the bytes)."""
    x = frames.movedim(-1, -4).to(torch.float32) / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(3, 1, 1, 1)
    # contiguous: the moved-axis view would reach EVA's patch convolution in a channels-last
    # layout, whose kernels round differently from the batch a loader stacks
    return ((x - mean) / std).contiguous()


# ------------------------------------------------------------------------- decoders


class VideoDecoder(abc.ABC):
    """Shared front: probe, choose frames and box, then the backend decodes and resizes."""

    name = "base"

    def decode(self, path: Any, n_frames: int, size: int, train: bool = False,
               seed: Seed = None, *, allow_repeat: bool = False, resize_mode: str = "squash",
               normalize: bool = False, sample_id: Any = None) -> torch.Tensor:
        """uint8 (T, size, size, 3), or with `normalize` float (3, T, size, size)."""
        path = _fspath(path)
        info = probe_video(path, sample_id)
        idx = frame_indices(info.n_frames, n_frames, allow_repeat, path, sample_id)
        box = crop_box(info.width, info.height, size, train, seed, resize_mode)
        return self._decode(path, info, idx, box, int(size), normalize, sample_id)

    @abc.abstractmethod
    def _decode(self, path, info, idx, box, size, normalize, sample_id) -> torch.Tensor:
        """Decode frames `idx` of `path`, crop `box`, resize to `size` (the backend's part)."""


def _avcc_length_size(extradata: Optional[bytes]) -> Optional[int]:
    """NAL length-field size of an avcC (MP4/MKV) H.264 stream; None for Annex B (start codes)."""
    if extradata and len(extradata) >= 5 and extradata[0] == 1:
        return (extradata[4] & 3) + 1
    return None


def _h264_nal_headers(data: bytes, length_size: Optional[int]):
    if length_size is None:  # Annex B: a NAL starts after each 00 00 01
        i = data.find(b"\x00\x00\x01")
        while 0 <= i < len(data) - 3:
            yield data[i + 3]
            i = data.find(b"\x00\x00\x01", i + 3)
        return
    i = 0
    while i + length_size < len(data):
        n = int.from_bytes(data[i:i + length_size], "big")
        yield data[i + length_size]
        i += length_size + n


def _h264_nonref(data: bytes, length_size: Optional[int]) -> bool:
    """True for an access unit whose coded slices all have nal_ref_idc 0: no later picture
    predicts from it, so leaving it out of the decoder changes no other frame."""
    slices = [h for h in _h264_nal_headers(data, length_size) if 1 <= (h & 0x1F) <= 5]
    return bool(slices) and all((h >> 5) & 3 == 0 for h in slices)


@dataclass(frozen=True)
class _Plan:
    """Display index of each video packet (rank of its pts) and the packets the decoder can go
    without: non-reference H.264 pictures that are not wanted."""
    index: dict  # pts -> display index
    skip: frozenset  # pts of packets not sent to the decoder
    last_pts: int  # pts of the last wanted frame


def _decode_plan(container, stream, wanted: set) -> Optional[_Plan]:
    """From one demux pass (no decoding); None where pts cannot name the frames (missing or
    repeated pts, packets the demuxer marks to discard): those files decode in order."""
    nonref = stream.codec_context.name == "h264"
    length_size = _avcc_length_size(stream.codec_context.extradata) if nonref else None
    pts, droppable = [], set()
    for pkt in container.demux(stream):
        if pkt.size == 0:
            continue
        if pkt.pts is None or pkt.is_discard or pkt.is_corrupt:
            return None
        pts.append(pkt.pts)
        if nonref and _h264_nonref(bytes(pkt), length_size):
            droppable.add(pkt.pts)
    order = sorted(pts)
    if len(set(order)) != len(order) or not order:
        return None
    index = {p: i for i, p in enumerate(order)}
    wanted_pts = {order[i] for i in wanted if i < len(order)}
    if len(wanted_pts) != len(wanted):
        return None  # fewer packets than the probe's count: decode in order, fail as truncated there
    return _Plan(index, frozenset(droppable - wanted_pts), max(wanted_pts))


class PyAVDecoder(VideoDecoder):
    """Reference backend: FFmpeg via PyAV, swscale colour conversion, PIL resize.

    Frames are named by display index: the rank of their pts among the stream's packets (one
    demux pass, no decoding), which is the order the decoder returns them in. That lets the
    decoder skip unwanted H.264 pictures that nothing predicts from (nal_ref_idc 0; about half
    the frames of an x264 stream with B-frames): the frames it does return are bit for bit those
    of decoding everything. Files without usable pts decode every frame in order."""

    name = "pyav"

    def __init__(self, skip_nonref: bool = True) -> None:
        self.skip_nonref = skip_nonref

    def _decode(self, path, info, idx, box, size, normalize, sample_id):
        import av

        wanted = set(int(i) for i in idx)
        got: dict[int, np.ndarray] = {}

        convert = self._converter(info, box, size)

        def keep(n, frame):
            got[n] = convert(frame)

        plan = None
        if self.skip_nonref:
            container = _open_container(path, sample_id)
            try:
                plan = _decode_plan(container, container.streams.video[0], wanted)
            except av.error.FFmpegError:
                plan = None  # the ordered decode below names the damage
            finally:
                container.close()
        n = -1
        container = _open_container(path, sample_id)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame threads: faster, same frames
            if plan is None:
                last = max(wanted)
                for n, frame in enumerate(container.decode(stream)):
                    if n in wanted:
                        keep(n, frame)
                    if n >= last:
                        break
            else:
                n = self._decode_planned(container, stream, plan, wanted, keep, path, sample_id)
        except av.error.FFmpegError as e:
            raise MediaError(path, f"corrupt video: decoding failed after {n + 1} frames ({e})",
                             sample_id) from None
        finally:
            container.close()
        if len(got) != len(wanted):
            raise MediaError(path, f"truncated video: decoded {n + 1} frames, the container "
                                   f"lists {info.n_frames}", sample_id)
        frames = torch.from_numpy(np.stack([got[int(i)] for i in idx]))
        return normalize_frames(frames) if normalize else frames

    @staticmethod
    def _converter(info: VideoInfo, box, size: int):
        """frame -> uint8 (size, size, 3): full-frame RGB by swscale, then PIL bicubic of the box."""
        from av.video.reformatter import Interpolation
        from PIL import Image
        flags = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND

        def convert(frame):
            rgb = frame.reformat(format="rgb24", interpolation=flags).to_ndarray()
            fbox = box
            if (frame.width, frame.height) != (info.width, info.height):
                # The size changed mid-stream: the same region, in this frame's pixels.
                sx, sy = frame.width / info.width, frame.height / info.height
                fbox = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC, box=fbox))
        return convert

    @staticmethod
    def _decode_planned(container, stream, plan: _Plan, wanted, keep, path, sample_id) -> int:
        """Decode by plan; the display index of the last frame returned."""
        n = -1

        def take(frames) -> bool:
            nonlocal n
            for frame in frames:
                i = plan.index.get(frame.pts)
                if i is None:
                    raise MediaError(path, f"a decoded frame has pts {frame.pts}, which no packet carries",
                                     sample_id)
                n = i
                if i in wanted:
                    keep(i, frame)
            return n >= plan.index[plan.last_pts]  # frames come in display order: all wanted are in

        for pkt in container.demux(stream):
            if pkt.size and pkt.pts in plan.skip:
                continue
            if pkt.size and take(stream.decode(pkt)):
                return n
        take(stream.decode(None))  # flush the frames the decoder still holds
        return n


class ScaledPyAVDecoder(PyAVDecoder):
    """PyAV decoding as "pyav"; the crop, the resize and the YUV->RGB conversion in one FFmpeg
    filter pass (crop, then swscale bicubic straight to size x size RGB), so no full-resolution
    RGB frame is made. The crop box is rounded to whole source pixels and swscale's bicubic is
    not PIL's: the frames differ slightly from "pyav" (bound in tests/test_media.py). The
    release's own decord loader also resizes with swscale inside the decoder."""

    name = "pyav-scale"

    @staticmethod
    def _converter(info: VideoInfo, box, size: int):
        import av
        graphs: dict = {}

        def graph_for(frame):
            key = (frame.width, frame.height, frame.format.name)
            g = graphs.get(key)
            if g is None:
                sx, sy = frame.width / info.width, frame.height / info.height
                x0, y0 = int(round(box[0] * sx)), int(round(box[1] * sy))
                x1 = min(frame.width, max(x0 + 1, int(round(box[2] * sx))))
                y1 = min(frame.height, max(y0 + 1, int(round(box[3] * sy))))
                g = av.filter.Graph()
                src = g.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                                   time_base=frame.time_base or Fraction(1, 1))
                crop = g.add("crop", f"w={x1 - x0}:h={y1 - y0}:x={x0}:y={y0}:exact=1")
                scale = g.add("scale", f"w={size}:h={size}:flags=bicubic+full_chroma_int+accurate_rnd")
                fmt = g.add("format", "rgb24")
                sink = g.add("buffersink")
                src.link_to(crop)
                crop.link_to(scale)
                scale.link_to(fmt)
                fmt.link_to(sink)
                g.configure()
                g = graphs[key] = (g, src, sink)
            return g

        def convert(frame):
            g, src, sink = graph_for(frame)
            src.push(frame)
            return sink.pull().to_ndarray()
        return convert


class DALIDecoder(VideoDecoder):
    """NVIDIA DALI backend; falls back to PyAV (one warning line) where DALI cannot decode."""

    name = "dali"
    CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
    GPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})

    def __init__(self, device: str = "auto", num_threads: int = 1) -> None:
        if device == "auto":
            device = "gpu" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        self.device = device
        self.num_threads = num_threads
        self._pipes: dict = {}
        self._lock = threading.Lock()
        self._warned: set = set()
        self._fallback = PyAVDecoder()

    def _pipe(self, size: int):
        # DataLoader workers fork: a pipeline built in the parent must not be reused.
        key = (os.getpid(), size)
        pipe = self._pipes.get(key)
        if pipe is None:
            if self.device == "gpu" and torch.cuda._is_in_bad_fork():
                raise RuntimeError("DALI GPU decoding cannot start in a forked DataLoader worker (CUDA was "
                                   "initialised in the parent); start workers with spawn "
                                   "(worker_start_method) or decode in the main process (num_workers=0)")
            pipe = self._build(size)
            self._pipes[key] = pipe
        return pipe

    def _build(self, size: int):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"

        @pipeline_def(batch_size=1, num_threads=self.num_threads,
                      device_id=torch.cuda.current_device() if gpu else None,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            video = fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=frames)
            video = fn.resize(video, size=[size, size], roi_start=roi_start, roi_end=roi_end,
                              interp_type=types.INTERP_CUBIC, antialias=True)
            norm = fn.crop_mirror_normalize(
                video, dtype=types.FLOAT, output_layout="CFHW",
                mean=[255.0 * m for m in CLIP_MEAN], std=[255.0 * s for s in CLIP_STD])
            return video, norm

        p = pipe()
        p.build()
        return p

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _decode(self, path, info, idx, box, size, normalize, sample_id):
        codecs = self.GPU_CODECS if self.device == "gpu" else self.CPU_CODECS
        if info.codec not in codecs:
            self._warn(f"codec:{info.codec}", f"DALI {self.device} decoder cannot read "
                       f"{info.codec}; decoding with PyAV instead ({path})")
            return self._fallback._decode(path, info, idx, box, size, normalize, sample_id)
        x0, y0, x1, y1 = box
        with self._lock:  # one pipeline, fed and run as a unit
            pipe = self._pipe(size)
            try:
                pipe.feed_input("encoded", [np.fromfile(path, dtype=np.uint8)])
                pipe.feed_input("frames", [np.asarray(idx, dtype=np.int32)])
                pipe.feed_input("roi_start", [np.array([y0, x0], dtype=np.float32)])
                pipe.feed_input("roi_end", [np.array([y1, x1], dtype=np.float32)])
                frames, norm = pipe.run()
                out = _to_torch(norm if normalize else frames)
            except Exception as e:  # DALI raises RuntimeError/IndexError from C++
                # After a failed run DALI declares the pipeline invalid; build a new one.
                self._pipes.pop((os.getpid(), size), None)
                self._warn(f"file:{path}", f"DALI failed on {path} "
                           f"({str(e).splitlines()[0][:160]}); decoding with PyAV instead")
                return self._fallback._decode(path, info, idx, box, size, normalize, sample_id)
        return out


def _to_torch(batch) -> torch.Tensor:
    """First sample of a DALI TensorList as a torch tensor on the same device."""
    from nvidia.dali.backend import TensorListGPU

    tensor = batch.as_tensor()
    if isinstance(batch, TensorListGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype],
                          device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream())
        return out[0]
    return torch.from_numpy(np.array(tensor)[0])


def worker_start_method(backend: str) -> str | None:
    """How DataLoader workers decoding with `backend` must start: "spawn" for DALI on the GPU
    (a forked child cannot use the CUDA its parent initialised), else the platform default."""
    if backend == "dali" and torch.cuda.is_available():
        return "spawn"
    return None


_DECODERS: dict[str, VideoDecoder] = {}


BACKENDS = {"pyav": PyAVDecoder, "pyav-scale": ScaledPyAVDecoder, "dali": DALIDecoder}


def get_decoder(backend: str = "pyav") -> VideoDecoder:
    """The process-wide decoder of a backend (a key of BACKENDS)."""
    dec = _DECODERS.get(backend)
    if dec is None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        dec = _DECODERS[backend] = BACKENDS[backend]()
    return dec


def load_video(path: Any, cfg, train: bool = False, seed: Seed = None,
               backend: str = "pyav", sample_id: Any = None, *,
               allow_repeat: bool = False, resize_mode: str = "squash",
               normalize: bool = True) -> torch.Tensor:
    """Video file -> FloatTensor (3, T, S, S): T = cfg.num_frames, S = cfg.eva_image_size;
    with `normalize=False` the uint8 frames (T, S, S, 3), for `normalize_frames` on the device.

    `train` draws a random-resized crop from `seed` (an int, a numpy Generator, or None
    for fresh entropy). The tensor lives where the backend ran: CPU for "pyav" and DALI
    CPU, the GPU for DALI with NVDEC.
    """
    dec = get_decoder(backend)
    return dec.decode(path, int(cfg.num_frames), int(cfg.eva_image_size), train, seed,
                      allow_repeat=allow_repeat, resize_mode=resize_mode, normalize=normalize,
                      sample_id=sample_id)
