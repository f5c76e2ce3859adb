"""Decoding throughput, reference (PyAV) vs DALI, in samples/s on the demo videos and
sounds, always at the release's sampling (64 frames of 224 px with the training crop;
3 clips of 128 x 204 fbank): with DALI's CPU decoders where there is no GPU, NVDEC where
there is. Target (reported, not asserted): DALI >= 5x PyAV samples/s."""
import inspect
from pathlib import Path

import pytest

from bench import harness

VIDEO_EXT = (".webm", ".mp4", ".mkv", ".avi", ".mov")
AUDIO_EXT = (".wav", ".flac", ".mp3", ".ogg")


@pytest.fixture(scope="session")
def demo_root(request, tmp_path_factory) -> Path:
    try:
        import av  # noqa: F401  (the demo set is encoded, and read back, through PyAV)
    except ImportError:
        pytest.skip("PyAV is not installed here (it writes and reads the demo set)")
    try:
        from fastground.data.demo import ensure_demo_data
    except ImportError as e:
        pytest.skip(f"demo data not available (fastground.data.demo: {e})")
    # Generation takes seconds; pytest's cache keeps one set across runs (the generator
    # checks its manifest and rebuilds nothing that matches).
    cache = getattr(request.config, "cache", None)
    base = cache.mkdir("fastground-demo") if cache is not None else tmp_path_factory.mktemp("demo")
    return Path(ensure_demo_data(Path(base) / "data"))


def _files(root: Path, sub: str, exts) -> list[Path]:
    return sorted(p for p in (root / sub).rglob("*") if p.suffix.lower() in exts)


def _release_cfg():
    from fastground.config import GroundingGPTConfig
    return GroundingGPTConfig.from_preset("groundinggpt-7b")


def _video_loader(backend):
    try:
        from fastground.data.video import load_video
    except ImportError as e:
        pytest.skip(f"video loader not available ({e})")
    # demo clips have 20-25 frames; the release samples 64, repeating frames of short files
    kw = {"allow_repeat": True} if "allow_repeat" in inspect.signature(load_video).parameters else {}
    cfg = _release_cfg()

    def load(path, seed):
        # the training transform (random-resized crop), as a training loader calls it
        return load_video(path, cfg, True, seed, backend=backend, **kw)
    return load


def _audio_loader(backend):
    try:
        from fastground.data import audio
    except ImportError as e:
        pytest.skip(f"audio loader not available ({e})")
    fn = getattr(audio, "load_audio" if backend == "pyav" else "dali_audio_features", None)
    if fn is None:
        pytest.skip(f"fastground.data.audio has no {'load_audio' if backend == 'pyav' else 'dali_audio_features'}")

    cfg = _release_cfg()

    def load(path, seed):
        return fn(path, cfg)
    return load


@pytest.mark.fg_cpu
@pytest.mark.parametrize("backend", ("pyav", "dali"))
@pytest.mark.parametrize("media", ("video", "audio"))
def test_decoding(benchmark, fg, demo_root, media, backend):
    if backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            pytest.skip("DALI (nvidia-dali-cuda120) is not installed here")
    files = _files(demo_root, "videos" if media == "video" else "sounds",
                   VIDEO_EXT if media == "video" else AUDIO_EXT)
    if not files:
        pytest.skip(f"ensure_demo_data wrote no {media} files")
    load = _video_loader(backend) if media == "video" else _audio_loader(backend)
    cfg = _release_cfg()
    shape = (f"{cfg.num_frames} frames at {cfg.eva_image_size}px" if media == "video"
             else f"{cfg.num_audio_clips} clips of {cfg.audio_num_mel_bins}x{cfg.audio_target_len} fbank")
    info = harness.CaseInfo(bench=f"decode_{media}", variant=backend, mode="decode", batch=1,
                            shape=f"{len(files)} files, {shape}", dtype="-", cost=None, items_per_call=1)
    inputs = [(str(p), i) for i, p in enumerate(files)]
    extra = {"files": len(files), "dali_device": None}
    if backend == "dali" and media == "video":
        extra["dali_device"] = "gpu (NVDEC)" if fg.gpu else "cpu"
    # a fixed count over the same files in the same order for both backends: per-file cost
    # varies (length, 44.1 kHz stereo sounds need resampling), so equal work is compared
    rounds = min(len(files), 60 if fg.gpu else 20)
    harness.run_case(benchmark, fg, info, load, inputs, warmup=3, rounds=rounds, extra=extra)
    if backend == "dali" and media == "video":
        from fastground.data.video import get_decoder
        fell_back = sorted(getattr(get_decoder("dali"), "_warned", ()))
        if fell_back:
            # a DALI figure that is partly PyAV's must say so
            fg.records[-1]["dali_fell_back_to_pyav"] = fell_back
            benchmark.extra_info["dali_fell_back_to_pyav"] = fell_back


# ---------------------------------------------------------------------------- real-sized clips
# The training path on clips of real size, made at bench time (kept in pytest's cache):
# "float": the loader before issue 10 (every frame decoded in order, full-resolution RGB, PIL
# resize, normalised on the CPU, float32 shipped); "uint8": the trainer's default now ("pyav":
# unwanted non-reference H.264 pictures skipped, same frames; uint8 shipped, normalised on the
# device); "uint8-scale": --video-backend pyav-scale (crop, resize and RGB in one FFmpeg pass).
CLIPS = (("360p", 360, "h264"), ("360p", 360, "vp9"), ("720p", 720, "h264"), ("720p", 720, "vp9"))
CLIP_SECONDS, CLIP_FPS = 20, 30


def make_clip(path: Path, height: int, codec: str, seconds: int = CLIP_SECONDS, fps: int = CLIP_FPS) -> Path:
    """A moving random-block pattern, 16:9, `seconds` long; written once, reused."""
    import av
    import numpy as np
    if path.exists():
        return path
    width = height * 16 // 9
    tmp = path.with_suffix(".part" + path.suffix)
    c = av.open(str(tmp), "w")
    s = c.add_stream({"h264": "libx264", "vp9": "libvpx-vp9"}[codec], rate=fps)
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    s.options = {"preset": "veryfast"} if codec == "h264" else {"deadline": "realtime", "cpu-used": "8", "b": "2M"}
    base = np.random.default_rng(0).integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    base = base.repeat(8, 0).repeat(8, 1)
    for i in range(seconds * fps):
        for p in s.encode(av.VideoFrame.from_ndarray(np.roll(base, i * 3, axis=1), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def clip_dir(request, tmp_path_factory) -> Path:
    pytest.importorskip("av")
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("fastground-clips")) if cache is not None else tmp_path_factory.mktemp("clips")


@pytest.mark.fg_cpu
@pytest.mark.parametrize("variant", ("float", "uint8", "uint8-scale"))
@pytest.mark.parametrize("clip", CLIPS, ids=[f"{r}-{c}" for r, _, c in CLIPS])
def test_decoding_clip(benchmark, fg, clip_dir, clip, variant):
    from fastground.data.video import load_video
    res, height, codec = clip
    path = make_clip(clip_dir / f"{res}.{'mp4' if codec == 'h264' else 'webm'}", height, codec)
    cfg = _release_cfg()
    info = harness.CaseInfo(bench="decode_clip", variant=variant, mode=f"{res} {codec}", batch=1,
                            shape=f"{CLIP_SECONDS} s {res} {codec} at {CLIP_FPS} fps -> {cfg.num_frames} frames "
                                  f"at {cfg.eva_image_size}px", dtype=variant, cost=None, items_per_call=1)

    from fastground.data.video import PyAVDecoder, get_decoder
    dec = {"float": PyAVDecoder(skip_nonref=False), "uint8": get_decoder("pyav"),
           "uint8-scale": get_decoder("pyav-scale")}[variant]

    def load(seed):
        # the training transform; the trainer's loader ships uint8 (normalize=False)
        return dec.decode(str(path), cfg.num_frames, cfg.eva_image_size, True, seed, normalize=variant == "float")
    harness.run_case(benchmark, fg, info, load, [(i,) for i in range(4)], warmup=1, rounds=3,
                     extra={"file_mb": round(path.stat().st_size / 2**20, 1),
                            "cpu_threads_available": len(__import__("os").sched_getaffinity(0))})
