"""Issue 13, the data half: media that is odd but valid decodes right, media that is broken
is a counted skip naming its file, and an adversarial corpus built here (broken, truncated
and odd-but-valid images, videos and audio; hostile JSON and text) goes through the dataset
and a short training run: every item a correct sample or a counted skip naming its file.
"""
import fractions
import json
import logging
import os
import shutil
import tracemalloc
import wave

import numpy as np
import pytest
import torch

from fastground import GroundingGPTConfig
from fastground.data.dataset import GroundingDataset, SampleError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fastground.data.demo import ensure_demo_data
    return str(ensure_demo_data(tmp_path_factory.mktemp("demo") / "data"))


@pytest.fixture(scope="module")
def tok(demo):
    from fastground.data.tokenizer import load_tokenizer
    return load_tokenizer(os.path.join(demo, "tokenizer"))


@pytest.fixture(scope="module")
def cfg(tok):
    c = GroundingGPTConfig.from_preset("tiny")
    c.set_token_ids(tok)
    return c


# ---------------------------------------------------------------------------- writers
def write_wav(path, x, sr=16000, width=2):
    """x: (channels, n) floats in [-1, 1] (width 2: 16-bit PCM) or raw float32 (width 4)."""
    x = np.atleast_2d(np.asarray(x))
    if width == 4:  # IEEE float WAV, written by hand (the wave module only does PCM)
        data = x.T.astype("<f4").tobytes()
        ch = x.shape[0]
        fmt = (b"fmt " + (16).to_bytes(4, "little") + (3).to_bytes(2, "little") + ch.to_bytes(2, "little")
               + sr.to_bytes(4, "little") + (sr * ch * 4).to_bytes(4, "little") + (ch * 4).to_bytes(2, "little")
               + (32).to_bytes(2, "little"))
        body = b"WAVE" + fmt + b"data" + len(data).to_bytes(4, "little") + data
        with open(path, "wb") as f:
            f.write(b"RIFF" + len(body).to_bytes(4, "little") + body)
        return
    with wave.open(str(path), "wb") as f:
        f.setnchannels(x.shape[0])
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(np.clip(np.rint(x.T * 32767), -32768, 32767).astype("<i2").tobytes())


def size_changing_video(path, n1=6, n2=6, s1=(64, 48), s2=(96, 80)):
    """MJPEG in AVI whose frames change size after n1 frames (a concatenated stream)."""
    import av
    out = av.open(str(path), "w")
    st = out.add_stream("mjpeg", rate=10)
    st.width, st.height = s1
    st.pix_fmt = "yuvj420p"
    enc2 = av.CodecContext.create("mjpeg", "w")
    enc2.width, enc2.height = s2
    enc2.pix_fmt = "yuvj420p"
    enc2.time_base = fractions.Fraction(1, 10)
    for i in range(n1 + n2):
        w, h = s1 if i < n1 else s2
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        img = np.concatenate([ramp[..., :1], ramp[..., :1][:, ::-1], np.full((h, w, 1), 40 + 15 * i)], axis=2)
        fr = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24").reformat(format="yuvj420p")
        fr.pts = i
        for p in (st.encode(fr) if i < n1 else enc2.encode(fr)):
            p.stream, p.pts, p.dts, p.time_base = st, i, i, fractions.Fraction(1, 10)
            out.mux(p)
    for p in st.encode(None):
        out.mux(p)
    out.close()


# ---------------------------------------------------------------------------- media
def test_quiet_and_silent_audio_are_processed_like_the_release(tmp_path, cfg, caplog):
    from fastground.data.audio import load_audio
    rng = np.random.default_rng(0)
    stereo = tmp_path / "silent_channel0.wav"
    write_wav(stereo, np.stack([np.zeros(40000), 0.3 * rng.standard_normal(40000).clip(-1, 1)]))
    lsb = tmp_path / "one_lsb.wav"
    write_wav(lsb, rng.integers(-1, 2, 40000) / 32767)
    silent = tmp_path / "silent.wav"
    write_wav(silent, np.zeros(40000))
    with caplog.at_level(logging.WARNING, logger="fastground.data.audio"):
        for p in (stereo, lsb, silent):
            x = load_audio(p, cfg, sample_id="q")
            assert x.shape == (cfg.num_audio_clips, 1, cfg.audio_num_mel_bins, cfg.audio_target_len)
            assert bool(torch.isfinite(x).all())
    assert "silent_channel0.wav: silent audio (channel 0 (the fbank channel)" in caplog.text
    assert "silent.wav: silent audio" in caplog.text
    assert "one_lsb.wav" not in caplog.text  # one 16-bit step is signal, not silence


def test_audio_memory_is_bounded_by_the_clips(tmp_path, cfg):
    from fastground.data.audio import load_audio
    sr, seconds = 44100, 60
    path = tmp_path / "long.wav"
    t = np.arange(sr * seconds) / sr
    write_wav(path, np.stack([0.4 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 97 * t)]), sr=sr)
    whole = sr * seconds * 2 * 4  # the decoded file as float32: 21 MB
    tracemalloc.start()
    got = load_audio(path, cfg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < whole / 5, f"peak {peak / 2**20:.1f} MiB of numpy memory for a {whole / 2**20:.1f} MiB file"
    want = load_audio(path, cfg, spans_only=False)
    assert torch.equal(got, want)


def test_video_whose_frame_size_changes_decodes_each_frame_from_its_own_size(tmp_path, cfg):
    import av
    from av.video.reformatter import Interpolation
    from PIL import Image

    from fastground.data.video import frame_indices, load_video, normalize_frames
    path = tmp_path / "resized_mid_stream.avi"
    size_changing_video(path)
    got = load_video(path, cfg)
    flags = Interpolation.BILINEAR | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND
    with av.open(str(path)) as c:
        frames = [f.reformat(format="rgb24", interpolation=flags).to_ndarray() for f in c.decode(video=0)]
    assert {f.shape for f in frames} == {(48, 64, 3), (80, 96, 3)}
    s = cfg.eva_image_size
    ref = [np.asarray(Image.fromarray(frames[i]).resize((s, s), Image.BICUBIC,
                                                        box=(0, 0, frames[i].shape[1], frames[i].shape[0])))
           for i in frame_indices(len(frames), cfg.num_frames)]
    want = normalize_frames(torch.from_numpy(np.stack(ref)))
    assert torch.equal(got, want)


def test_sixteen_bit_png_decodes_to_the_right_pixels(tmp_path):
    from PIL import Image

    from fastground.data.image import open_rgb
    a = (np.arange(48 * 40).reshape(40, 48) * 34).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.png")
    got = np.asarray(open_rgb(tmp_path / "deep.png"))
    assert np.array_equal(got[..., 0], np.rint(a / 257).astype(np.uint8))
    assert np.array_equal(got[..., 0], got[..., 2])


# ---------------------------------------------------------------------------- the corpus
def _conv(q, a="It is at [0.100,0.200,0.300,0.400]."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def corpus(demo, tmp_path_factory):
    """(json path, media folder, {id: "ok" | "skip"}): every hostile item the tests build."""
    import av
    from PIL import Image
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(7)
    entries, expect = [], {}

    def add(sid, want, conv=None, raw=None, **media):
        e = raw if raw is not None else dict(id=sid, conversations=conv, **media)
        entries.append(e)
        expect[sid] = want

    # images
    img = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    img.save(root / "ok.png")
    data = (root / "ok.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "noise.png").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    img.save(root / "jpeg_named.png", format="JPEG")
    Image.new("RGB", (1, 1), (9, 200, 30)).save(root / "one_pixel.png")
    Image.fromarray((np.arange(30 * 20).reshape(20, 30) * 100).astype(np.uint16)).save(root / "deep16.png")
    pal = Image.new("P", (20, 30))
    pal.putpalette(list(range(256)) * 3)
    pal.save(root / "palette.png", transparency=0)
    Image.new("CMYK", (24, 24), (10, 200, 30, 5)).save(root / "cmyk.jpg")
    (root / "a_dir.png").mkdir()
    for name, want in (("ok.png", "ok"), ("cut.png", "skip"), ("zero.png", "skip"), ("noise.png", "skip"),
                       ("jpeg_named.png", "ok"), ("one_pixel.png", "ok"), ("deep16.png", "ok"),
                       ("palette.png", "ok"), ("cmyk.jpg", "ok"), ("a_dir.png", "skip"),
                       ("no_such.png", "skip"), ("../../../../../../etc/hostname", "skip")):
        add(f"img:{name}", want, _conv("<image>\nWhere is it?"), image=name)
    # videos
    demo_video = next(p for p in sorted(os.listdir(os.path.join(demo, "videos"))) if p.endswith(".webm"))
    shutil.copy(os.path.join(demo, "videos", demo_video), root / "ok.webm")
    vdata = (root / "ok.webm").read_bytes()
    (root / "cut.webm").write_bytes(vdata[: len(vdata) // 3])
    (root / "noise.webm").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    size_changing_video(root / "resized.avi")
    size_changing_video(root / "two_frames.avi", n1=1, n2=1)
    for name, want in (("ok.webm", "ok"), ("cut.webm", "skip"), ("noise.webm", "skip"), ("resized.avi", "ok"),
                       ("two_frames.avi", "skip")):
        add(f"vid:{name}", want, _conv("<video>\nWhen does it happen?", "From 0.10 to 0.40."), video=name)
    # audio
    t = np.arange(48000) / 16000
    write_wav(root / "ok.wav", 0.3 * np.sin(2 * np.pi * 300 * t))
    adata = (root / "ok.wav").read_bytes()
    (root / "cut.wav").write_bytes(adata[: len(adata) // 2])
    write_wav(root / "silent.wav", np.zeros(48000))
    write_wav(root / "silent_ch0.wav", np.stack([np.zeros(48000), 0.3 * np.sin(2 * np.pi * 300 * t)]))
    write_wav(root / "huge.wav", np.full(48000, 3e38) * np.sign(np.sin(2 * np.pi * 50 * t)), width=4)
    nan = 0.1 * np.sin(2 * np.pi * 300 * t)
    nan[1000] = np.nan
    write_wav(root / "nan.wav", nan, width=4)
    write_wav(root / "short.wav", 0.3 * np.sin(np.arange(100)))
    with av.open(str(root / "ok.mp3"), "w") as c:  # a compressed format, decoded twice (count, then spans)
        s = c.add_stream("mp3", rate=22050, layout="stereo")
        fr = av.AudioFrame.from_ndarray((0.3 * np.sin(np.arange(22050 * 3) / 9.0)).astype(np.float32)[None]
                                        .repeat(2, 0), format="fltp", layout="stereo")
        fr.sample_rate = 22050
        for p in s.encode(fr):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    for name, want in (("ok.wav", "ok"), ("cut.wav", "skip"), ("silent.wav", "ok"), ("silent_ch0.wav", "ok"),
                       ("huge.wav", "skip"), ("nan.wav", "skip"), ("short.wav", "skip"), ("ok.mp3", "ok")):
        add(f"snd:{name}", want, _conv("<sound>\nWhat is heard?", "A tone."), sound=name)
    # hostile JSON and text
    add("json:list", "skip", raw=["not", "an", "object"])
    add("json:no_conversations", "skip", raw={"id": "json:no_conversations"})
    add("json:id_list", "skip", raw={"id": ["x"], "conversations": _conv("hi")})
    add("json:turn_from", "skip", raw={"id": "json:turn_from", "conversations": [{"from": "bot", "value": "x"}]})
    add("json:value_number", "skip", raw={"id": "json:value_number", "conversations": [{"from": "human", "value": 3}]})
    add("txt:media_token", "skip", _conv("see <vi_start> here"))
    add("txt:surrogate", "skip", _conv("broken \ud83d text"))
    add("txt:placeholder_no_file", "skip", _conv("<image>\nWhere?"))
    add("txt:file_no_placeholder", "skip", _conv("Where?"), image="ok.png")
    add("txt:two_placeholders", "skip", _conv("<image> and <image>"), image="ok.png")
    add("txt:unicode", "ok", _conv("Où est le 猫? \u202eRTL\u202c \x00 nul 🐈", "Là."))
    add("txt:empty_answer", "ok", _conv("Say nothing.", ""))
    add("txt:image_path_number", "skip", raw={"id": "txt:image_path_number", "image": 5,
                                             "conversations": _conv("<image>\nq")})
    path = root / "corpus.json"
    path.write_text(json.dumps(entries))
    return str(path), str(root), expect


def _ids(entries):
    return [e.get("id") if isinstance(e, dict) and isinstance(e.get("id"), str) else None for e in entries]


def test_every_corpus_item_is_a_correct_sample_or_a_skip_naming_its_file(corpus, tok, cfg):
    path, root, expect = corpus
    ds = GroundingDataset(path, tok, cfg, image_folder=root, video_folder=root, sound_folder=root, train=False)
    entries = json.load(open(path))
    seen = {}
    for i, sid in enumerate(_ids(entries)):
        key = sid or list(expect)[i]
        try:
            s = ds.load(i)
        except SampleError as e:
            seen[key] = "skip"
            msg = str(e)
            assert path in msg and f"entry {i} of" in msg, msg  # names the sample and its JSON file
            media = entries[i].get("image") or entries[i].get("video") or entries[i].get("sound") \
                if isinstance(entries[i], dict) else None
            if isinstance(media, str) and key.split(":")[0] in ("img", "vid", "snd"):
                assert os.path.basename(media) in msg, msg  # and the media file
            continue
        seen[key] = "ok"
        assert s["input_ids"].dim() == 1 and s["labels"].shape == s["input_ids"].shape
        assert bool((s["labels"] != -100).any())
        want_shapes = {"image": (3, cfg.clip_image_size, cfg.clip_image_size),
                       "video": (3, cfg.num_frames, cfg.eva_image_size, cfg.eva_image_size),
                       "sound": (cfg.num_audio_clips, 1, cfg.audio_num_mel_bins, cfg.audio_target_len)}
        for m, shape in want_shapes.items():
            if s[m] is not None:
                assert tuple(s[m].shape) == shape and bool(torch.isfinite(s[m]).all()), (key, m)
    assert seen == expect


@pytest.mark.slow
@pytest.mark.requires("deepspeed")
def test_short_training_on_the_corpus_counts_every_skip(corpus, demo, tmp_path, caplog):
    from dataclasses import fields

    from fastground.train.cli import main
    from fastground.train.config import TrainConfig
    path, root, expect = corpus
    n_skip = sum(v == "skip" for v in expect.values())
    out = tmp_path / "stage3"
    argv = ["--stage", "3", "--data", path, "--image-folder", root, "--video-folder", root, "--sound-folder", root,
            "--demo-data", demo, "--output", str(out), "--max-steps", "8", "--global-batch", "4", "--micro-batch",
            "2", "--max-bad-fraction", "0.9", "--no-progress", "--no-tensorboard", "--save-every", "0"]
    if "fast_path" in {f.name for f in fields(TrainConfig)}:
        argv.append("--no-fast-path")
    with caplog.at_level(logging.WARNING, logger="fastground.data.dataset"):
        assert main(argv) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    skipped = sum(r.get("skipped_samples", 0) for r in records)
    assert 0 < skipped <= n_skip
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping sample")]
    assert len(lines) == skipped  # every skip is counted and named
    for line in lines:
        assert path in line
    assert (out / "final").is_dir()
