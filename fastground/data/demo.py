"""A small, real, exactly annotated multimodal data set, generated in seconds.

    python -m fastground.data.demo --out DIR [--seed 0] [--n-images 120 --n-videos 60 --n-sounds 60]

Writes, under DIR:

* `images/*.png`: non-square pictures of coloured circles, squares and triangles on a
  plain background. Each box is measured on the pixels actually drawn, then written
  relative to the padded square the model sees (`fastground.grounding`), 3 decimals.
* `videos/*.webm`: VP9 clips (64-96 px, 20 or 25 frames at 8-10 fps) in which one
  coloured shape is on screen during a known run of frames, optionally next to a still
  distractor. Frame counts are chosen so every span boundary f / n is exact at 2 decimals.
* `sounds/*.wav`: 3-6 s of faint noise with one event (tone, noise burst, chirp,
  beeping) at a known span; three quarters 16 kHz mono, a quarter 44.1 kHz stereo so the
  resampler and the channel rule are exercised too.
* `stage1.json` (captions), `stage2.json` (REC / REG boxes, temporal and audio spans),
  `stage3.json` (2-3 turn instructions, mixed, plus text-only samples), in the release's
  LLaVA format with paths relative to DIR.
* `annotations.json`: the ground truth per file (pixel boxes, frame runs, event times),
  for tests and evaluation.
* `tokenizer/`: a Llama-style BPE tokenizer trained on the text above in the lego template
  (`<unk>` `<s>` `</s>` first, digits split, `###` and newlines pieces of their own and the
  whitespace at the ends of every piece stripped, so the release's training text and
  inference prompt tokenize alike, the media tokens and placeholders appended as special
  tokens), saved by transformers' `PreTrainedTokenizerFast`; <= 512 ids, the tiny preset's
  vocabulary.
* `heldout/`: images and clips not in any training file, in the published RefCOCO,
  Charades-STA and POPE formats (`fastground.data.heldout`), for `fastground.evaluate`.
* `manifest.json`: parameters and the sha256 of every other file.

The same seed gives the same bytes: every random draw comes from a generator seeded by
(seed, kind, index), the VP9 encoder runs single-threaded with fixed options, the WebM
muxer runs with `fflags=+bitexact` (no random segment ids, no version strings), and JSON
is written with fixed key order. Bytes can differ between FFmpeg/libvpx/zlib versions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import wave as wavemod
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from fastground.config import MEDIA_TOKENS, PLACEHOLDERS
from fastground.data.templates import LEGO
from fastground.grounding import box_to_relative, format_box, format_span

__all__ = ["GENERATOR_VERSION", "generate_demo_data", "ensure_demo_data", "main",
           "SYSTEM_PROMPT", "COLORS", "SHAPES"]

# Bump when the output of a given seed changes, so cached demo sets are rebuilt.
GENERATOR_VERSION = 5

# The lego template's system line (the release's, the default template): in the tokenizer
# corpus so the template tokenises compactly.
SYSTEM_PROMPT = LEGO.system

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230),
    "yellow": (240, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
    "white": (245, 245, 245), "cyan": (40, 210, 220),
}
BACKGROUNDS = {
    "gray": (110, 110, 110), "beige": (200, 185, 150), "dark": (25, 28, 45), "brown": (90, 60, 40),
}
# Videos need colours that survive VP9 4:2:0 on a dark background.
VIDEO_COLORS = ("red", "green", "blue", "yellow", "white", "cyan")
SHAPES = ("circle", "square", "triangle")

SOUNDS = {
    "low_tone": ("a low tone", "a low humming tone"),
    "high_tone": ("a high tone", "a high-pitched beep"),
    "noise": ("a burst of noise", "a short hiss of noise"),
    "chirp": ("a rising chirp", "a sweep that rises in pitch"),
    "beeping": ("a series of beeps", "rapid beeping"),
}

_KIND = {"image": 1, "video": 2, "sound": 3, "text": 4, "mix": 5}


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _KIND[kind], int(index)])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------- images


def _shape_mask(shape: str, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean (h, w) mask of one shape drawn inside the inclusive pixel box."""
    mask = Image.new("1", size, 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=1)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=1)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=1)
    return np.asarray(mask, dtype=bool)


def _overlaps(a, b, gap: int = 3) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def _make_image(rng: np.random.Generator) -> tuple[Image.Image, dict]:
    while True:
        w, h = int(rng.integers(48, 161)), int(rng.integers(48, 161))
        if abs(w - h) >= 8:
            break
    bg_name = _pick(rng, list(BACKGROUNDS))
    n_obj = int(rng.integers(1, 4))
    colours = list(rng.permutation(list(COLORS)))[:n_obj]
    canvas = np.empty((h, w, 3), np.uint8)
    canvas[:] = BACKGROUNDS[bg_name]
    objects, taken = [], []
    for colour in colours:
        shape = _pick(rng, SHAPES)
        for _ in range(50):
            side = int(rng.integers(12, max(13, min(w, h) // 2)))
            sw = side if shape != "triangle" else int(side * rng.uniform(0.9, 1.3))
            sw = min(sw, w - 2)
            x0, y0 = int(rng.integers(0, w - sw)), int(rng.integers(0, h - side))
            box = (x0, y0, x0 + sw - 1, y0 + side - 1)
            if not any(_overlaps(box, t) for t in taken):
                break
        else:
            continue
        taken.append(box)
        mask = _shape_mask(shape, (w, h), box)
        canvas[mask] = COLORS[colour]
        ys, xs = np.nonzero(mask)
        # The box is measured on the drawn pixels: edges of the outermost pixels.
        px = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        rel = box_to_relative(px, w, h)
        objects.append({"color": colour, "shape": shape, "box_px": list(px),
                        "box": format_box(rel)})
    return Image.fromarray(canvas), {"width": w, "height": h, "background": bg_name,
                                     "objects": objects}


def _obj_name(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def _list_phrase(names: list[str]) -> str:
    names = [f"a {n}" for n in names]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


_NUM = {1: "one", 2: "two", 3: "three"}


# ---------------------------------------------------------------------------- videos


def _encode_webm(frames: list[np.ndarray], fps: int, path: str) -> None:
    import av

    h, w = frames[0].shape[:2]
    # fflags=+bitexact: the Matroska muxer otherwise writes random segment/track UIDs
    # and a version string, and the same seed would not give the same bytes.
    container = av.open(path, "w", format="webm", options={"fflags": "+bitexact"})
    try:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        # Single-threaded, no look-ahead (so no hidden alt-ref frames: one packet per
        # shown frame), constant quality: deterministic and small.
        stream.options = {"deadline": "good", "cpu-used": "5", "crf": "24", "b": "0",
                          "threads": "1", "row-mt": "0", "tile-columns": "0",
                          "frame-parallel": "0", "lag-in-frames": "0", "auto-alt-ref": "0",
                          "g": "250"}
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()


def _make_video(rng: np.random.Generator, path: str) -> dict:
    fps, n = _pick(rng, [(8, 20), (10, 20), (10, 25), (8, 25)])
    w, h = _pick(rng, [(64, 64), (96, 64), (64, 48), (96, 96), (80, 64)])
    bg = (int(rng.integers(10, 40)), int(rng.integers(10, 40)), int(rng.integers(20, 60)))
    colour, distractor_colour = [str(c) for c in rng.permutation(VIDEO_COLORS)[:2]]
    shape = _pick(rng, SHAPES)
    length = int(rng.integers(max(3, n // 5), n // 2 + 1))
    f_on = int(rng.integers(1, n - length))
    f_off = f_on + length  # visible in frames [f_on, f_off)
    side = int(rng.integers(max(12, min(w, h) // 5), min(w, h) // 3 + 1))
    (sx, sy), (ex, ey) = [(int(rng.integers(0, w - side)), int(rng.integers(0, h - side)))
                          for _ in range(2)]
    distractor = None
    if rng.random() < 0.5:
        d_shape = _pick(rng, SHAPES)
        dside = max(8, side // 2)
        dx, dy = int(rng.integers(0, w - dside)), int(rng.integers(0, h - dside))
        distractor = {"color": distractor_colour, "shape": d_shape,
                      "mask": _shape_mask(d_shape, (w, h), (dx, dy, dx + dside - 1, dy + dside - 1))}
    frames, areas = [], []
    for i in range(n):
        img = np.empty((h, w, 3), np.uint8)
        img[:] = bg
        if distractor is not None:
            img[distractor["mask"]] = COLORS[distractor["color"]]
        area = 0
        if f_on <= i < f_off:
            t = (i - f_on) / max(1, length - 1)
            x, y = int(round(sx + t * (ex - sx))), int(round(sy + t * (ey - sy)))
            mask = _shape_mask(shape, (w, h), (x, y, x + side - 1, y + side - 1))
            img[mask] = COLORS[colour]
            area = int(mask.sum())
        frames.append(img)
        areas.append(area)
    _encode_webm(frames, fps, path)
    info = {"fps": fps, "n_frames": n, "width": w, "height": h, "color": colour,
            "shape": shape, "frames_visible": [f_on, f_off], "areas": areas,
            "span": format_span(f_on, f_off, duration=n),
            "distractor": None if distractor is None else
            {"color": distractor["color"], "shape": distractor["shape"]}}
    return info


# ---------------------------------------------------------------------------- sounds


def _event(kind: str, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "low_tone":
        return np.sin(2 * np.pi * 300.0 * t)
    if kind == "high_tone":
        return np.sin(2 * np.pi * 1500.0 * t)
    if kind == "noise":
        return np.clip(rng.standard_normal(t.shape) / 2.5, -1, 1)
    if kind == "chirp":
        dur = max(t[-1], 1e-3)
        return np.sin(2 * np.pi * (400.0 * t + 0.5 * (1600.0 / dur) * t * t))
    # beeping: a 1 kHz tone gated on and off 8 times a second
    return np.sin(2 * np.pi * 1000.0 * t) * ((np.floor(t * 16) % 2) == 0)


def _write_wav(path: str, samples: np.ndarray, sr: int) -> None:
    """samples: float (channels, n) in [-1, 1] -> 16-bit PCM WAV (deterministic bytes)."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with wavemod.open(path, "wb") as f:
        f.setnchannels(pcm.shape[0])
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(np.ascontiguousarray(pcm.T).tobytes())


def _make_sound(rng: np.random.Generator, path: str) -> dict:
    sr, channels = (44100, 2) if rng.random() < 0.25 else (16000, 1)
    duration = int(rng.integers(3, 7))
    kind = _pick(rng, list(SOUNDS))
    # A span on the 0.05 grid of the duration: exact at 2 decimals.
    s_q = int(rng.integers(1, 15))
    e_q = int(rng.integers(s_q + 3, min(s_q + 10, 19) + 1))
    start, end = s_q * 0.05 * duration, e_q * 0.05 * duration
    n = duration * sr
    a, b = int(round(start * sr)), int(round(end * sr))
    t = np.arange(b - a) / sr
    ev = _event(kind, t, rng) * rng.uniform(0.3, 0.6)
    fade = min(int(0.01 * sr), (b - a) // 4)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade))
    ev[:fade] *= ramp
    ev[-fade:] *= ramp[::-1]
    out = np.empty((channels, n))
    for c in range(channels):
        # Faint background noise (about -54 dBFS): real recordings are never digital
        # silence, and it keeps the fbank off its log floor between events.
        out[c] = rng.standard_normal(n) * 0.002
        out[c, a:b] += ev * (1.0 if c == 0 else 0.8)
    _write_wav(path, out, sr)
    return {"sample_rate": sr, "channels": channels, "duration": float(duration),
            "kind": kind, "seconds": [start, end], "samples": [a, b],
            "span": format_span(s_q * 0.05, e_q * 0.05)}


# ------------------------------------------------------------------------ conversations


def _turn(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def _first(placeholder: str, turns: list[dict]) -> list[dict]:
    turns[0]["value"] = placeholder + "\n" + turns[0]["value"]
    return turns


_IMG_CAPTION_Q = ("Describe the image briefly.", "What is in this picture?",
                  "Give a short description of the image.")
_REC_Q = ("Where is the {o}? Answer with a bounding box.", "Find the {o} in the image.",
          "Give the box of the {o}.", "Locate the {o}.")
_REG_Q = ("What is the object in {b}?", "Describe the region {b}.", "What is at {b}?")
_VID_CAPTION_Q = ("Describe the video briefly.", "What happens in this video?")
_VID_SPAN_Q = ("When does the {o} appear?", "During which part of the video is the {o} visible?",
               "Give the time span in which the {o} is on screen.")
_SND_CAPTION_Q = ("What do you hear?", "Describe the sound briefly.", "What is this sound?")
_SND_SPAN_Q = ("When do you hear {s}?", "At what time does {s} occur?",
               "Give the time span of {s}.")


def _image_caption(info: dict) -> str:
    names = [_obj_name(o) for o in info["objects"]]
    return f"{_list_phrase(names).capitalize()} on a {info['background']} background."


def _video_caption(info: dict) -> str:
    o = f"{info['color']} {info['shape']}"
    extra = ""
    if info["distractor"]:
        extra = f" A {info['distractor']['color']} {info['distractor']['shape']} stays still."
    return f"A {o} appears and moves across the screen, then disappears.{extra}"


def _text_only(rng: np.random.Generator) -> list[dict]:
    kind = int(rng.integers(4))
    if kind == 0:
        a, b = int(rng.integers(2, 50)), int(rng.integers(2, 50))
        return _turn(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
    if kind == 1:
        pair, mix = _pick(rng, [(("blue", "yellow"), "green"), (("red", "yellow"), "orange"),
                                (("red", "blue"), "purple"), (("red", "white"), "pink")])
        return _turn(f"What colour do you get by mixing {pair[0]} and {pair[1]}?",
                     f"Mixing {pair[0]} and {pair[1]} gives {mix}.")
    if kind == 2:
        shape = _pick(rng, SHAPES)
        corners = {"circle": "no corners", "square": "four corners", "triangle": "three corners"}
        return _turn(f"How many corners does a {shape} have?", f"A {shape} has {corners[shape]}.")
    x = [round(float(v), 2) for v in sorted(rng.uniform(0, 1, 2))]
    return _turn(f"A video event starts at {x[0]:.2f} and ends at {x[1]:.2f} of the video. "
                 "How long is it, as a fraction of the video?",
                 f"It lasts {x[1] - x[0]:.2f} of the video.")


def _conversations(seed: int, images: list, videos: list, sounds: list) -> dict:
    s1, s2, s3 = [], [], []
    for i, (rel, info) in enumerate(images):
        rng = _rng(seed, "mix", i)
        ph = PLACEHOLDERS["image"]
        objs = info["objects"]
        s1.append({"id": f"img{i:04d}-cap", "image": rel, "conversations": _first(
            ph, _turn(_pick(rng, _IMG_CAPTION_Q), _image_caption(info)))})
        for j, o in enumerate(objs):
            s2.append({"id": f"img{i:04d}-rec{j}", "image": rel, "conversations": _first(
                ph, _turn(_pick(rng, _REC_Q).format(o=_obj_name(o)), o["box"]))})
        o = objs[0]
        s2.append({"id": f"img{i:04d}-reg", "image": rel, "conversations": _first(
            ph, _turn(_pick(rng, _REG_Q).format(b=o["box"]), f"A {_obj_name(o)}."))})
        turns = _turn(_pick(rng, _IMG_CAPTION_Q), _image_caption(info))
        target = objs[int(rng.integers(len(objs)))]
        turns += _turn(_pick(rng, _REC_Q).format(o=_obj_name(target)), target["box"])
        if rng.random() < 0.6:
            turns += _turn("How many shapes are there?",
                           f"There {'is' if len(objs) == 1 else 'are'} {_NUM[len(objs)]} "
                           f"shape{'s' if len(objs) > 1 else ''}.")
        s3.append({"id": f"img{i:04d}-chat", "image": rel, "conversations": _first(ph, turns)})
    for i, (rel, info) in enumerate(videos):
        rng = _rng(seed, "mix", 100000 + i)
        ph = PLACEHOLDERS["video"]
        o = f"{info['color']} {info['shape']}"
        s1.append({"id": f"vid{i:04d}-cap", "video": rel, "conversations": _first(
            ph, _turn(_pick(rng, _VID_CAPTION_Q), _video_caption(info)))})
        s2.append({"id": f"vid{i:04d}-tg", "video": rel, "conversations": _first(
            ph, _turn(_pick(rng, _VID_SPAN_Q).format(o=o), info["span"]))})
        turns = _turn("What appears in the video?", f"A {o} appears.")
        turns += _turn(_pick(rng, _VID_SPAN_Q).format(o=o), info["span"])
        s3.append({"id": f"vid{i:04d}-chat", "video": rel, "conversations": _first(ph, turns)})
    for i, (rel, info) in enumerate(sounds):
        rng = _rng(seed, "mix", 200000 + i)
        ph = PLACEHOLDERS["sound"]
        short, long = SOUNDS[info["kind"]]
        s1.append({"id": f"snd{i:04d}-cap", "sound": rel, "conversations": _first(
            ph, _turn(_pick(rng, _SND_CAPTION_Q), long.capitalize() + "."))})
        s2.append({"id": f"snd{i:04d}-loc", "sound": rel, "conversations": _first(
            ph, _turn(_pick(rng, _SND_SPAN_Q).format(s=short), info["span"]))})
        turns = _turn(_pick(rng, _SND_CAPTION_Q), short.capitalize() + ".")
        turns += _turn(_pick(rng, _SND_SPAN_Q).format(s="it"), info["span"])
        s3.append({"id": f"snd{i:04d}-chat", "sound": rel, "conversations": _first(ph, turns)})
    n_text = max(4, (len(images) + len(videos) + len(sounds)) // 10)
    for i in range(n_text):
        rng = _rng(seed, "text", i)
        turns = _text_only(rng)
        if rng.random() < 0.5:
            turns += _text_only(rng)
        s3.append({"id": f"txt{i:04d}", "conversations": turns})
    # Interleave stage 3 so a prefix of the file is already a mix of modalities.
    order = _rng(seed, "mix", 999999).permutation(len(s3))
    return {"stage1": s1, "stage2": s2, "stage3": [s3[k] for k in order]}


# ------------------------------------------------------------------------- tokenizer


def _metaspace_digits(prepend_scheme: str):
    from tokenizers import pre_tokenizers

    # "###" and newlines are pieces of their own, each then given its "▁" like a word: the
    # release trains on "\n### Assistant:" but prompts "###Assistant:" (lego), and merges
    # across "###" would give the prompt tokens training never saw (a 64-wide model cannot
    # bridge that; a 7B Llama tokenizes both into nearly the same tokens). Then Metaspace
    # (SentencePiece's "▁") and one token per digit, as Llama splits numbers: coordinates
    # such as 0.123 read digit by digit.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split("###", behavior="isolated"),
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme),
        pre_tokenizers.Digits(individual_digits=True)])


def _train_tokenizer(segments: list[str], out_dir: str, vocab_size: int = 480) -> int:
    """Llama-style BPE on `segments`, saved with transformers; returns len(tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    # Text is tokenized piece by piece between media blocks (fastground.data.conversation), so
    # stripping each piece strips the whitespace around media blocks, as Llama's slow
    # tokenizer does (the release's training): the release's inference prompt ("Human: " +
    # block + "\n...") then gives the tokens training saw ("Human:" + block + "...").
    tok.normalizer = normalizers.Strip()
    # Training sees the text already cut at the placeholders (see `_corpus`) and splits it
    # as tokenization will, so "▁###" and "▁\n" are learned as the pieces they will be.
    tok.pre_tokenizer = _metaspace_digits("always")
    # Printable ASCII and the newline that follows every placeholder, so no text the
    # pipeline writes falls back to <unk> (there is no byte fallback at this size).
    alphabet = [chr(c) for c in range(33, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(segments, trainer=trainer)
    tok.pre_tokenizer = _metaspace_digits("always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # Appended after the trained vocabulary, as the release appends them to Vicuna's.
    extra = list(MEDIA_TOKENS) + [PLACEHOLDERS[m] for m in ("image", "video", "sound")]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<unk>", model_max_length=2048, padding_side="right",
        clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)
    # transformers 5 records its generic class name, which 4.x cannot resolve; the
    # 4.x name loads in both.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _dump_json(tok_cfg, cfg_path)
    return len(fast)


def _corpus(stages: dict) -> list[str]:
    """Every sample as the lego template writes it, cut where the media placeholders stand,
    as tokenization will see the text: training text (the release's `preprocess`, whitespace
    around media stripped) and the inference prompt of its first question (`###Human: ...
    ###Assistant:`, whitespace kept).

    The pieces between placeholders are tokenized one by one (fastground.data.conversation),
    and each gets the leading "▁" of its own call, so each segment here starts with a space:
    the merges are learned on the same words tokenization will see. The template words
    recur in every sample, so they become single tokens.
    """
    import re

    cut = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))
    segments = []

    def add(text: str, strip: bool) -> None:
        pieces = cut.split(text)
        if strip:
            pieces = [p.lstrip() if k else p for k, p in enumerate(pieces)]
            pieces = [p.rstrip() if k < len(pieces) - 1 else p for k, p in enumerate(pieces)]
        segments.extend(" " + p for p in pieces if p)

    roles = {"human": LEGO.roles[0], "gpt": LEGO.roles[1]}
    for samples in stages.values():
        for s in samples:
            turns = s["conversations"]
            text = LEGO.system + LEGO.header_end
            for t in turns:
                text += f"{LEGO.turn_begin}{roles[t['from']]}: {t['value']}{LEGO.turn_end}"
            add(text + LEGO.turn_begin, strip=True)
            add(LEGO.inference_prompt(turns[0]["value"]), strip=False)
    return segments


# ------------------------------------------------------------------------- top level


def _dump_json(obj: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _params(seed: int, n_images: int, n_videos: int, n_sounds: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "n_images": int(n_images),
            "n_videos": int(n_videos), "n_sounds": int(n_sounds)}


def generate_demo_data(out: Any, seed: int = 0, n_images: int = 120, n_videos: int = 60,
                       n_sounds: int = 60) -> Path:
    """Write the demo set into `out` (created; existing files are overwritten)."""
    out = Path(out)
    for sub in ("images", "videos", "sounds", "tokenizer"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    images, videos, sounds = [], [], []
    truth: dict = {"images": {}, "videos": {}, "sounds": {}}
    for i in range(n_images):
        img, info = _make_image(_rng(seed, "image", i))
        rel = f"images/img_{i:04d}.png"
        img.save(out / rel, format="PNG")
        images.append((rel, info))
        truth["images"][rel] = info
    for i in range(n_videos):
        rel = f"videos/vid_{i:04d}.webm"
        info = _make_video(_rng(seed, "video", i), str(out / rel))
        videos.append((rel, info))
        truth["videos"][rel] = info
    for i in range(n_sounds):
        rel = f"sounds/snd_{i:04d}.wav"
        info = _make_sound(_rng(seed, "sound", i), str(out / rel))
        sounds.append((rel, info))
        truth["sounds"][rel] = info
    stages = _conversations(seed, images, videos, sounds)
    for name, samples in stages.items():
        _dump_json(samples, str(out / f"{name}.json"))
    _dump_json(truth, str(out / "annotations.json"))
    vocab = _train_tokenizer(_corpus(stages), str(out / "tokenizer"))
    # Held-out split for `python -m fastground.evaluate --task demo` (own random streams,
    # never in the training JSON), in the published RefCOCO / Charades-STA / POPE formats.
    from fastground.data.heldout import write_heldout
    write_heldout(out / "heldout", seed, max(4, n_images // 5), max(2, n_videos // 5))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                   if p.is_file() and p.name != "manifest.json")
    manifest = dict(_params(seed, n_images, n_videos, n_sounds), tokenizer_size=vocab,
                    samples={k: len(v) for k, v in stages.items()},
                    files={f: _sha256(str(out / f)) for f in files})
    _dump_json(manifest, str(out / "manifest.json"))
    return out


def ensure_demo_data(root: Any, seed: int = 0, n_images: int = 120, n_videos: int = 60,
                     n_sounds: int = 60) -> Path:
    """The demo set at `root`, generated on first use and reused afterwards.

    Generation writes to a temporary sibling directory that is renamed into place, so a
    crash leaves no half-written set and concurrent callers (test workers, DataLoader
    processes) end up sharing one complete copy. A set this generator made with the same
    parameters but an older version (its manifest says so) is rebuilt; any other existing
    directory is an error rather than being deleted.
    """
    root = Path(root)
    want = _params(seed, n_images, n_videos, n_sounds)

    def manifest() -> dict | None:
        try:
            with open(root / "manifest.json", encoding="utf-8") as f:
                have = json.load(f)
        except (OSError, ValueError):
            return None
        return have if isinstance(have, dict) else None

    def matches() -> bool:
        have = manifest()
        return have is not None and all(have.get(k) == v for k, v in want.items())

    if root.exists():
        if matches():
            return root
        have = manifest()
        outdated = have is not None and have.get("generator_version") != GENERATOR_VERSION and all(
            have.get(k) == v for k, v in want.items() if k != "generator_version")
        if not outdated:
            raise ValueError(f"{root}: exists but is not a demo set made with {want}; "
                             "choose another directory or remove it")
        print(f"{root}: demo set of generator version {have.get('generator_version')}, rebuilding it "
              f"with version {GENERATOR_VERSION}", file=sys.stderr)
        stale = root.parent / f".{root.name}.stale-{os.getpid()}"
        try:
            os.rename(root, stale)
        except OSError:
            pass  # another process moved it first
        else:
            shutil.rmtree(stale, ignore_errors=True)
        if matches():  # another process already rebuilt it
            return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate_demo_data(tmp, seed, n_images, n_videos, n_sounds)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process renamed its copy first; use that one.
            if not matches():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastground.data.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory to write (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-images", type=int, default=120)
    ap.add_argument("--n-videos", type=int, default=60)
    ap.add_argument("--n-sounds", type=int, default=60)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = generate_demo_data(args.out, args.seed, args.n_images, args.n_videos, args.n_sounds)
    with open(out / "manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    print(f"{out}: {len(manifest['files'])} files, samples {manifest['samples']}, "
          f"tokenizer {manifest['tokenizer_size']} ids, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
