"""Demo data set: determinism, true annotations, LLaVA format, tokenizer."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from fastground.config import MEDIA_TOKENS, PLACEHOLDERS, GroundingGPTConfig
from fastground.data import demo as D
from fastground.grounding import box_to_relative, parse_box, parse_span


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    # Same directory as tests/test_media.py: whichever module runs first generates it.
    return D.ensure_demo_data(tmp_path_factory.getbasetemp() / "fastground-demo")


@pytest.fixture(scope="session")
def truth(demo):
    with open(demo / "annotations.json") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def stages(demo):
    out = {}
    for name in ("stage1", "stage2", "stage3"):
        with open(demo / f"{name}.json") as f:
            out[name] = json.load(f)
    return out


def _hashes(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_same_seed_same_bytes(tmp_path):
    import subprocess
    import sys

    kw = dict(seed=3, n_images=8, n_videos=4, n_sounds=4)
    # The second run is a fresh process with another hash seed: nothing may depend on
    # per-process state (set order, Rust hash maps in the tokenizer trainer). It stands
    # in an empty `fastground` package so that only the generator's own imports load,
    # not the model stack the package __init__ pulls in (seconds of test time).
    b = tmp_path / "b"
    pkg_dir = os.path.dirname(os.path.dirname(os.path.abspath(D.__file__)))  # .../fastground
    code = ("import sys, types; p = types.ModuleType('fastground'); p.__path__ = [sys.argv[1]]; "
            "sys.modules['fastground'] = p; from fastground.data.demo import main; "
            "sys.exit(main(sys.argv[2:]))")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, pkg_dir, "--out", str(b),
         "--seed", "3", "--n-images", "8", "--n-videos", "4", "--n-sounds", "4"],
        env=dict(os.environ, PYTHONHASHSEED="12345"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    a = D.generate_demo_data(tmp_path / "a", **kw)  # meanwhile, in this process
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    ha, hb = _hashes(a), _hashes(b)
    # media, 3 stages + annotations + manifest, tokenizer, held-out split (4 images, 2 videos,
    # refs + instances, 3 POPE files, Charades-STA annotations + lengths)
    assert len(ha) == 8 + 4 + 4 + 5 + 2 + 13
    assert ha == hb
    c = D.generate_demo_data(tmp_path / "c", **dict(kw, seed=4))
    assert _hashes(c)["images/img_0000.png"] != ha["images/img_0000.png"]
    with open(a / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["files"] == {k: v for k, v in ha.items() if k != "manifest.json"}


def test_ensure_demo_data_reuses_and_refuses_mismatch(tmp_path):
    kw = dict(n_images=2, n_videos=1, n_sounds=1)
    root = D.ensure_demo_data(tmp_path / "d", **kw)
    stamp = os.stat(root / "manifest.json").st_mtime_ns
    assert D.ensure_demo_data(tmp_path / "d", **kw) == root
    assert os.stat(root / "manifest.json").st_mtime_ns == stamp  # not regenerated
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".d.tmp")]  # temp dir gone
    with pytest.raises(ValueError, match="not a demo set"):
        D.ensure_demo_data(tmp_path / "d", seed=1, **kw)
    # A set of an older generator version (same parameters) is rebuilt, not refused.
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["generator_version"] = D.GENERATOR_VERSION - 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "stale.txt").write_text("left by the old version")
    assert D.ensure_demo_data(tmp_path / "d", **kw) == root
    assert json.loads((root / "manifest.json").read_text())["generator_version"] == D.GENERATOR_VERSION
    assert not (root / "stale.txt").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".d.")]


def test_full_set_size(demo, stages):
    with open(demo / "manifest.json") as f:
        manifest = json.load(f)
    n_files = len(manifest["files"])
    assert 240 <= n_files <= 400  # a few hundred real files
    assert {k: len(v) for k, v in stages.items()} == manifest["samples"]
    assert len(stages["stage1"]) == 120 + 60 + 60


def test_llava_format(demo, stages):
    ids = set()
    for name, samples in stages.items():
        for s in samples:
            assert s["id"] not in ids
            ids.add(s["id"])
            media = [k for k in ("image", "video", "sound") if k in s]
            assert len(media) <= 1
            conv = s["conversations"]
            assert len(conv) % 2 == 0 and len(conv) >= 2
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            text = "".join(t["value"] for t in conv)
            if media:
                m = media[0]
                assert (demo / s[m]).is_file() and not os.path.isabs(s[m])
                assert conv[0]["value"].startswith(PLACEHOLDERS[m] + "\n")
                assert text.count(PLACEHOLDERS[m]) == 1
            else:
                assert not any(p in text for p in PLACEHOLDERS.values())
    s3 = stages["stage3"]
    assert any("image" not in s and "video" not in s and "sound" not in s for s in s3)
    assert {len(s["conversations"]) // 2 for s in s3 if "image" in s} == {2, 3}
    assert {k for s in s3[:40] for k in ("image", "video", "sound") if k in s} == \
        {"image", "video", "sound"}  # interleaved, not grouped by modality


def test_image_boxes_are_true(demo, truth, stages):
    rec = {}
    for s in stages["stage2"]:
        if "image" in s and "-rec" in s["id"]:
            rec.setdefault(s["image"], []).append(s["conversations"][1]["value"])
    for rel, info in truth["images"].items():
        img = np.asarray(Image.open(demo / rel).convert("RGB"))
        h, w = img.shape[:2]
        assert (w, h) == (info["width"], info["height"]) and w != h
        assert sorted(rec[rel]) == sorted(o["box"] for o in info["objects"])
        for o in info["objects"]:
            ys, xs = np.nonzero((img == D.COLORS[o["color"]]).all(-1))
            assert len(xs) > 20
            px = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            exact = box_to_relative(px, w, h)
            stated = parse_box(o["box"])
            # 3 decimals: every edge within rounding of the drawn pixels' extent
            assert np.allclose(stated, exact, atol=5e-4 + 1e-9), (rel, o, exact)


def test_video_spans_are_true(demo, truth, stages):
    import av

    answers = {s["video"]: s["conversations"][1]["value"] for s in stages["stage2"]
               if "video" in s}
    for rel, info in truth["videos"].items():
        n = info["n_frames"]
        s, e = parse_span(answers[rel])
        on, off = round(s * n), round(e * n)
        assert abs(s * n - on) < 1e-6 and abs(e * n - off) < 1e-6  # exact at 2 decimals
        assert [on, off] == info["frames_visible"]
        colour = np.array(D.COLORS[info["color"]])
        with av.open(str(demo / rel)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == n
        for i, f in enumerate(frames):
            near = int((np.abs(f.astype(int) - colour).max(-1) < 60).sum())
            if on <= i < off:
                assert near >= 0.5 * info["areas"][i], (rel, i, near)
            else:
                assert near == 0, (rel, i, near)


def test_sound_spans_are_true(demo, truth, stages):
    from fastground.data.audio import decode_audio

    answers = {s["sound"]: s["conversations"][1]["value"] for s in stages["stage2"]
               if "sound" in s}
    rates = set()
    for rel, info in truth["sounds"].items():
        x, sr = decode_audio(demo / rel)
        rates.add((sr, x.shape[0]))
        assert sr == info["sample_rate"] and 3 <= x.shape[1] / sr <= 6
        s, e = parse_span(answers[rel])
        d = x.shape[1] / sr
        hop = int(0.02 * sr)
        energy = np.square(x[0, : x.shape[1] // hop * hop]).reshape(-1, hop).mean(1)
        starts = np.arange(len(energy)) * hop / sr
        ends = starts + hop / sr
        peak = (starts[np.argmax(energy)] + ends[np.argmax(energy)]) / 2
        assert s * d <= peak <= e * d, (rel, peak, s * d, e * d)
        outside = (ends <= s * d) | (starts >= e * d)  # windows not touching the span
        core = (starts >= s * d + 0.01) & (ends <= e * d - 0.01)  # past the 10 ms fades
        # Every window on the event is louder than every window off it (beeping is
        # silent half the time, so only its loudest windows count).
        on = energy[core] if info["kind"] != "beeping" else np.sort(energy[core])[-3:]
        assert on.min() > 100 * energy[outside].max(), rel
        assert energy[~outside].mean() > 100 * energy[outside].mean()
    assert rates == {(16000, 1), (44100, 2)}


def test_tokenizer(demo, stages):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo / "tokenizer"))
    assert len(tok) <= 512
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<unk>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    extra = list(MEDIA_TOKENS) + [PLACEHOLDERS[m] for m in ("image", "video", "sound")]
    ids = tok.convert_tokens_to_ids(extra)
    assert ids == list(range(len(tok) - len(extra), len(tok)))  # appended, in order
    cfg = GroundingGPTConfig.from_preset("tiny")
    cfg.set_token_ids(tok)
    assert cfg.vocab_size == 512 and cfg.token_ids("image") == tuple(ids[:3])
    # the lego template's training text and inference prompt (fastground.data.templates)
    from fastground.data.templates import LEGO

    assert D.SYSTEM_PROMPT == LEGO.system
    prompt = (f"{LEGO.system}\n\n### Human: <image>\nWhere is the red circle?\n"
              f"### Assistant: [0.125,0.5,0.875,1.000]\n### ")
    enc = tok(prompt).input_ids
    assert enc[0] == tok.bos_token_id and tok.unk_token_id not in enc
    assert tok.convert_tokens_to_ids("<image>") in enc
    # Decoding gives the text back up to whitespace: every "\n" and "###" piece is given a
    # space, and the whitespace around special tokens is stripped (as Llama's slow tokenizer).
    assert "".join(tok.decode(enc, skip_special_tokens=False).split()) == "".join(("<s>" + prompt).split())
    assert tok.tokenize("### Human: <image>\nWhere?") == ["▁###", "▁Human:", "<image>", "▁Where", "?"]
    answer = "[0.125,0.5,0.875,1.000] {0.12,0.48}"
    assert tok.decode(tok(answer).input_ids, skip_special_tokens=True) == answer
    # The template's words were in the corpus: "###" and each role tag are single tokens, and
    # the release's training text and inference prompt share them.
    for text in ("### Human:", "### Assistant:", "###Assistant:", "###Human:"):
        assert len(tok(text, add_special_tokens=False).input_ids) <= 3, (text, tok.tokenize(text))
    assert tok.tokenize("?###Assistant:")[-2:] == tok.tokenize("?\n### Assistant:")[-2:] == ["▁###", "▁Assistant:"]
    assert len(tok(" " + LEGO.system, add_special_tokens=False).input_ids) <= 30
    enc = tok(LEGO.inference_prompt("<video>\nWhen does the red circle appear?")).input_ids
    assert tok.unk_token_id not in enc
    for s in stages["stage3"][:80]:
        for t in s["conversations"]:
            assert tok.unk_token_id not in tok(t["value"], add_special_tokens=False).input_ids
    # digits one by one, as Llama splits numbers
    assert tok.tokenize("0.123") == ["▁", "0", ".", "1", "2", "3"] or \
        tok.tokenize("0.123") == ["0", ".", "1", "2", "3"]


def test_cli(tmp_path, capsys):
    assert D.main(["--out", str(tmp_path / "cli"), "--seed", "1", "--n-images", "2",
                   "--n-videos", "1", "--n-sounds", "1"]) == 0
    assert "files" in capsys.readouterr().out
    assert (tmp_path / "cli" / "stage3.json").is_file()
