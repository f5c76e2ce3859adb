import json
import os

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.infer import main
from fastground.model.generation import GenerationConfig, TextStream, left_pad, sample_next
from fastground.testing import media_block, media_tensor, with_token_ids


@pytest.fixture(scope="module")
def tiny():
    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny"))
    torch.manual_seed(0)
    return GroundingGPT(cfg).eval()


def _mixed_prompts(cfg, seed=1):
    """Six prompts of different lengths: image, video, sound, text, image, video."""
    g = torch.Generator().manual_seed(seed)
    kinds = ["image", "video", "sound", None, "image", "video"]
    rows = []
    for j, k in enumerate(kinds):
        words = torch.randint(3, cfg.vocab_size - 9, (3 + 2 * j,), generator=g).tolist()
        rows.append([cfg.bos_token_id] + words[:2] + (media_block(cfg, k) if k else []) + words[2:])
    media = {m: media_tensor(cfg, m, kinds.count(m), g) for m in ("image", "video", "sound")}
    return rows, kinds, media


def test_batched_greedy_equals_batch1_token_for_token(tiny):
    cfg = tiny.config
    rows, kinds, media = _mixed_prompts(cfg)
    batched = tiny.generate(rows, images=media["image"], videos=media["video"], sounds=media["sound"],
                            max_new_tokens=10)
    assert batched.finish_reasons == ["length"] * len(rows)
    seen = dict.fromkeys(media, 0)
    for row, kind, got in zip(rows, kinds, batched.tokens):
        one = {}
        if kind:
            one = {kind + "s": media[kind][seen[kind]:seen[kind] + 1]}
            seen[kind] += 1
        alone = tiny.generate([row], max_new_tokens=10, **one).tokens[0]
        assert got == alone
        assert len(got) == 10


def test_cached_decoding_equals_full_recompute(tiny):
    cfg = tiny.config
    p, s, e = cfg.token_ids("video")
    ids = torch.tensor([[1, 5, 6, s] + [p] * cfg.video_token_len + [e, 7, 8]])
    videos = media_tensor(cfg, "video", 1)
    got = tiny.generate(ids, videos=videos, max_new_tokens=6).tokens[0]
    seq, want = ids, []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(tiny(seq, videos=videos).logits[0, -1].argmax())
            want.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert got == want


def test_left_pad_and_padding_checks():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="left padding"):
        from fastground.model.generation import generate
        generate(None, torch.tensor([[5, 0]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([[1], []], 0)


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    g = torch.Generator().manual_seed(0)
    def draws(p, t=1.0):
        cfg = GenerationConfig(do_sample=True, top_p=p, temperature=t)
        return set(sample_next(logits.expand(400, 3), cfg, g).tolist())

    assert draws(0.5) == {0}          # 0.6 alone reaches 0.5
    assert draws(0.8) == {0, 1}       # 0.6 + 0.3 reaches 0.8; 0.1 never drawn
    assert draws(1.0) == {0, 1, 2}
    assert draws(1.0, t=1e-4) == {0}  # temperature -> 0 is greedy
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=0).check()


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny):
    rows, kinds, media = _mixed_prompts(tiny.config)
    rows, m = rows[3:4], {}
    greedy = tiny.generate(rows, max_new_tokens=8).tokens
    assert tiny.generate(rows, max_new_tokens=8, do_sample=True, top_p=1e-6).tokens == greedy
    a = tiny.generate(rows, max_new_tokens=8, do_sample=True, temperature=5.0,
                      generator=torch.Generator().manual_seed(3), **m).tokens
    b = tiny.generate(rows, max_new_tokens=8, do_sample=True, temperature=5.0,
                      generator=torch.Generator().manual_seed(3), **m).tokens
    assert a == b and a != greedy


class _Scripted(torch.nn.Module):
    """lm_head stand-in: row r's step k logits put all mass on script[r][k]."""

    def __init__(self, scripts, vocab, like):
        super().__init__()
        self.scripts, self.vocab, self.calls = scripts, vocab, 0
        self.weight = like

    def forward(self, h):
        out = torch.zeros(h.shape[0], self.vocab)
        for r, script in enumerate(self.scripts):
            out[r, script[min(self.calls, len(script) - 1)]] = 10.0
        self.calls += 1
        return out


class _CharTokenizer:
    """One id per character; id 2 is EOS."""

    eos_token_id, pad_token_id = 2, 0
    alphabet = "..." + "AB#xyz "

    def encode(self, s):
        return [self.alphabet.index(c) for c in s]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids if i > 2)


def test_stop_strings_eos_and_frozen_rows(tiny):
    tok = _CharTokenizer()
    scripts = [tok.encode("AB###xyz"), tok.encode("xy") + [2, 3, 3], tok.encode("zzzzzzzz")]
    head = tiny.lm_head
    try:
        tiny.lm_head = _Scripted(scripts, tiny.config.vocab_size, head.weight)
        out = tiny.generate([[1, 5], [1, 5, 6, 7], [1]], max_new_tokens=6, tokenizer=tok,
                            stop_strings=["###"], eos_token_id=2)
    finally:
        tiny.lm_head = head
    assert out.texts == ["AB", "xy", "zzzzzz"]
    assert out.finish_reasons == ["stop", "eos", "length"]
    assert out.tokens[1] == tok.encode("xy")  # nothing after EOS
    shown = []
    stream = TextStream(tok, ["###"], write=shown.append)
    for t in tok.encode("AB#x##"):
        stream.put(t)
    assert "".join(shown) == "AB#x"  # "##" held back: it may still become "###"
    stream.put(tok.encode("#")[0])
    stream.end()
    assert "".join(shown) == "AB#x"


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fastground.data.demo import ensure_demo_data
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "data", n_images=10, n_videos=5, n_sounds=3)


@pytest.fixture(scope="module")
def ckpt(demo, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("ckpt") / "model"
    tok = AutoTokenizer.from_pretrained(str(demo / "tokenizer"))
    cfg = GroundingGPTConfig.from_preset("tiny")
    cfg.set_token_ids(tok)
    torch.manual_seed(0)
    GroundingGPT(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_prompt_is_the_checkpoints_template(ckpt):
    from fastground.data.tokenizer import load_tokenizer
    from fastground.prompting import prompt_ids, prompt_style

    cfg = GroundingGPTConfig.load(str(ckpt))
    style = prompt_style(cfg)
    assert style.name == "lego" and "###" in style.stop_strings  # a checkpoint that records none
    text = style.render([("<image>\nWhere is it?", "[0.1,0.2,0.3,0.4]"), ("And now?", None)])
    assert text.endswith("###Human: <image>\nWhere is it?###Assistant: [0.1,0.2,0.3,0.4]"
                         "###Human: And now?###Assistant:")
    ids = prompt_ids(style, [("Where is the circle?", None)], load_tokenizer(str(ckpt)), cfg, "image")
    assert int((ids == cfg.im_patch_token).sum()) == cfg.image_token_len
    assert prompt_style("vicuna_v1").render([("q", None)]).endswith("USER: q ASSISTANT:")


def test_cli_answers_and_draws(demo, ckpt, tmp_path, capsys):
    with open(demo / "stage2.json") as f:
        data = json.load(f)
    image = next(s for s in data if "image" in s)["image"]
    out = tmp_path / "answer.png"
    assert main(["--model", str(ckpt), "--image", str(demo / image), "--device", "cpu", "--dtype", "float32",
                 "--question", "Where is the circle?", "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0
    sound = next(s for s in data if "sound" in s)["sound"]
    out2 = tmp_path / "timeline.png"
    assert main(["--model", str(ckpt), "--sound", str(demo / sound), "--question", "When?", "--dtype", "bfloat16",
                 "--max-new-tokens", "3", "--temperature", "0.7", "--top-p", "0.9", "--out", str(out2)]) == 0
    from PIL import Image
    assert Image.open(out2).height > 150  # spans plus the waveform strip


def test_chat_keeps_history_and_streams(demo, ckpt, monkeypatch, capsys):
    questions = iter(["What is this?", "And where?", ""])
    seen = []

    def fake_input(prompt):
        seen.append(prompt)
        return next(questions)

    monkeypatch.setattr("builtins.input", fake_input)
    video = sorted(os.listdir(demo / "videos"))[0]
    assert main(["--model", str(ckpt), "--video", str(demo / "videos" / video), "--chat",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("ASSISTANT: ") == 2 and len(seen) == 3


def test_chat_second_turn_carries_the_first(tiny):
    from fastground.data.templates import VICUNA_V1
    from fastground.infer import chat

    class Tok:  # ids are characters' codes modulo a small range, decode is a fixed word
        eos_token_id, pad_token_id, bos_token_id = 2, 0, 1

        def __call__(self, text):
            return type("E", (), {"input_ids": [1] + [3 + ord(c) % 200 for c in text]})()

        def decode(self, ids, skip_special_tokens=True):
            return "ok" * len(ids)

    prompts, written = [], []
    real = tiny.generate

    def spy(rows, **kw):
        prompts.append(rows[0].tolist())
        return real(rows, **kw)

    tiny.generate = spy
    try:
        from fastground.model.generation import GenerationConfig
        questions = iter(["first?", "second?", "exit"])
        tiny.config.conversation_template = "vicuna_v1"
        chat(tiny, Tok(), None, {}, GenerationConfig(max_new_tokens=2, stop_strings=VICUNA_V1.stop_strings),
             read=lambda _: next(questions), write=written.append)
    finally:
        del tiny.generate
        tiny.config.conversation_template = None
    assert len(prompts) == 2
    first, second = prompts
    answer = [3 + ord(c) % 200 for c in " " + "okok" + "</s>"]
    # the second prompt is the first prompt with its answer, then the new question
    assert second[:len(first)] == first and len(second) > len(first) + len(answer)
    assert "".join(written).count("ASSISTANT: ") == 2


def test_cli_rejects_bad_input_before_loading(demo, ckpt, tmp_path, capsys):
    model_dir = tmp_path / "m"
    os.makedirs(model_dir)
    (model_dir / "config.json").write_text("{}")
    hub = tmp_path / "hub"
    os.makedirs(hub)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (hub / "config.json").write_text(json.dumps(cfg))
    tokdir = str(demo / "tokenizer")
    img = str(demo / "images" / "img_0000.png")
    cases = [
        (["--model", str(tmp_path / "nope"), "--question", "q"], "not a checkpoint directory"),
        (["--model", str(model_dir), "--question", "q"], "no tokenizer in"),
        (["--model", str(model_dir), "--tokenizer", tokdir, "--image", "missing.png", "--question", "q"],
         "--image missing.png: file not found"),
        (["--model", str(ckpt), "--question", "q", "--out", "a.png"], "give --image, --video or --sound"),
        (["--model", str(ckpt), "--image", img, "--question", "q", "--out", str(tmp_path / "no" / "a.png")],
         "does not exist"),
        (["--model", str(ckpt), "--image", img], "give --question, or --chat"),
        (["--model", str(ckpt), "--question", "q", "--device", "cuda:0"] if not torch.cuda.is_available()
         else ["--model", str(ckpt), "--question", "q", "--device", "bogus"], "--device"),
        (["--model", str(hub), "--tokenizer", tokdir, "--question", "q"],
         "names the vision tower 'openai/clip-vit-large-patch14-336'"),
        (["--model", str(hub), "--tokenizer", tokdir, "--question", "q", "--vision-tower", str(tmp_path)],
         "not a transformers CLIP directory"),
        (["--model", str(ckpt), "--question", "q", "--eva", "nope.pth"], "--eva nope.pth: file not found"),
        (["--model", str(ckpt), "--question", "q", "--top-p", "0"], "--top-p"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_hub_id_tower_resolves_through_the_flag(ckpt, demo, tmp_path, capsys):
    import shutil

    hub = tmp_path / "release"
    shutil.copytree(ckpt, hub)
    tower = tmp_path / "clip-local"
    shutil.move(str(hub / "vision_tower"), str(tower))
    cfg = json.loads((hub / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (hub / "config.json").write_text(json.dumps(cfg))
    assert main(["--model", str(hub), "--vision-tower", str(tower), "--question", "Hello?",
                 "--max-new-tokens", "2"]) == 0


def test_varlen_prefill_then_sdpa_decode_gives_the_same_tokens(tiny):
    # The GPU backend without flash_attn (torch's varlen FlashAttention-2; its per-sequence
    # reference on CPU) prefills; decode steps, whose queries are shorter than their keys,
    # switch to SDPA for the loop and back after.
    cfg = tiny.config
    rows = [[1, 5, 6] + media_block(cfg, "image") + [7], [1, 9, 10, 11, 12, 13, 14, 15, 16]]
    img = media_tensor(cfg, "image", 1, torch.Generator().manual_seed(1))
    want = tiny.generate(rows, images=img, max_new_tokens=6).tokens
    inner = tiny.model.config
    old = inner._attn_implementation
    inner._attn_implementation = "fastground_varlen"
    try:
        assert tiny.generate(rows, images=img, max_new_tokens=6).tokens == want
        assert inner._attn_implementation == "fastground_varlen"
    finally:
        inner._attn_implementation = old
