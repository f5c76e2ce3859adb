"""Decoding throughput, reference (PyAV) vs DALI, in samples/s on the demo videos and
sounds. Runs on CPU too (DALI's CPU decoder), at the tiny preset's frame count and size;
on a GPU at the release's 64 frames of 224 px, DALI decoding with NVDEC. Target (reported,
not asserted): DALI >= 5x PyAV samples/s."""
import inspect
from pathlib import Path

import pytest

from bench import harness

VIDEO_EXT = (".webm", ".mp4", ".mkv", ".avi", ".mov")
AUDIO_EXT = (".wav", ".flac", ".mp3", ".ogg")


@pytest.fixture(scope="session")
def demo_root(request, tmp_path_factory) -> Path:
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


def _video_loader(fg, backend):
    try:
        from fastground.data.video import load_video
    except ImportError as e:
        pytest.skip(f"video loader not available ({e})")
    kw = {"allow_repeat": True} if "allow_repeat" in inspect.signature(load_video).parameters else {}

    def load(path, seed):
        # the training transform (random-resized crop), as a training loader calls it
        return load_video(path, fg.cfg, True, seed, backend=backend, **kw)
    return load


def _audio_loader(fg, backend):
    try:
        from fastground.data import audio
    except ImportError as e:
        pytest.skip(f"audio loader not available ({e})")
    fn = getattr(audio, "load_audio" if backend == "pyav" else "dali_audio_features", None)
    if fn is None:
        pytest.skip(f"fastground.data.audio has no {'load_audio' if backend == 'pyav' else 'dali_audio_features'}")

    def load(path, seed):
        return fn(path, fg.cfg)
    return load


@pytest.mark.fg_cpu
@pytest.mark.parametrize("backend", ("pyav", "dali"))
@pytest.mark.parametrize("media", ("video", "audio"))
def test_decoding(benchmark, fg, demo_root, media, backend):
    try:
        import av  # noqa: F401  (both backends read containers through PyAV somewhere)
    except ImportError:
        pytest.skip("PyAV is not installed here")
    if backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            pytest.skip("DALI (nvidia-dali-cuda120) is not installed here")
    files = _files(demo_root, "videos" if media == "video" else "sounds",
                   VIDEO_EXT if media == "video" else AUDIO_EXT)
    if not files:
        pytest.skip(f"ensure_demo_data wrote no {media} files")
    load = _video_loader(fg, backend) if media == "video" else _audio_loader(fg, backend)
    cfg = fg.cfg
    shape = (f"{cfg.num_frames} frames at {cfg.eva_image_size}px" if media == "video"
             else f"{cfg.num_audio_clips} clips of {cfg.audio_num_mel_bins}x{cfg.audio_target_len} fbank")
    info = harness.CaseInfo(bench=f"decode_{media}", variant=backend, mode="decode", batch=1,
                            shape=f"{len(files)} files, {shape}", dtype="-", cost=None, items_per_call=1)
    inputs = [(str(p), i) for i, p in enumerate(files)]
    extra = {"files": len(files), "dali_device": None}
    if backend == "dali" and media == "video":
        extra["dali_device"] = "gpu (NVDEC)" if fg.gpu else "cpu"
    harness.run_case(benchmark, fg, info, load, inputs, warmup=3, extra=extra)
    if backend == "dali" and media == "video":
        from fastground.data.video import get_decoder
        fell_back = sorted(getattr(get_decoder("dali"), "_warned", ()))
        if fell_back:
            # a DALI figure that is partly PyAV's must say so
            fg.records[-1]["dali_fell_back_to_pyav"] = fell_back
            benchmark.extra_info["dali_fell_back_to_pyav"] = fell_back
