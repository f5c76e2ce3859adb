import json
import os

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.infer import build_inputs, generate, main
from fastground.testing import media_tensor, with_token_ids


def test_cached_greedy_decoding_equals_full_recompute():
    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny"))
    torch.manual_seed(0)
    model = GroundingGPT(cfg).eval()
    p, s, e = cfg.token_ids("video")
    ids = torch.tensor([[1, 5, 6, s] + [p] * cfg.video_token_len + [e, 7, 8]])
    videos = media_tensor(cfg, "video", 1)
    got = generate(model, ids, videos=videos, max_new_tokens=6)
    seq = ids
    want = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(seq, videos=videos).logits[0, -1].argmax())
            want.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert got == want


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fastground.data.demo import ensure_demo_data
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "data")


def test_cli_answers_and_draws(demo, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo / "tokenizer"))
    cfg = GroundingGPTConfig.from_preset("tiny")
    cfg.set_token_ids(tok)
    torch.manual_seed(0)
    GroundingGPT(cfg).save_pretrained(str(tmp_path / "model"))
    tok.save_pretrained(str(tmp_path / "model"))
    ids = build_inputs("Where is the circle?", tok, cfg, "image")
    assert (ids[0] == cfg.im_patch_token).sum() == cfg.image_token_len
    assert tok.decode(ids[0, -3:]).replace(" ", "").endswith("ASSISTANT:")
    with open(demo / "stage2.json") as f:
        sample = next(s for s in json.load(f) if "image" in s)
    out = tmp_path / "answer.png"
    assert main(["--model", str(tmp_path / "model"), "--image", str(demo / sample["image"]),
                 "--question", "Where is the circle?", "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0
    with open(demo / "stage2.json") as f:
        vid = next(s for s in json.load(f) if "video" in s)
    out2 = tmp_path / "timeline.png"
    assert main(["--model", str(tmp_path / "model"), "--video", str(demo / vid["video"]),
                 "--question", "When?", "--max-new-tokens", "3", "--out", str(out2)]) == 0
    assert out2.is_file()


def test_cli_rejects_bad_paths_before_loading(demo, tmp_path, capsys):
    model_dir = tmp_path / "m"
    os.makedirs(model_dir)
    (model_dir / "config.json").write_text("{}")
    cases = [
        (["--model", str(tmp_path / "nope"), "--question", "q"], "not a checkpoint directory"),
        (["--model", str(model_dir), "--question", "q"], "no tokenizer in"),
        (["--model", str(model_dir), "--tokenizer", str(demo / "tokenizer"), "--image", "missing.png",
          "--question", "q"], "--image missing.png: file not found"),
        (["--model", str(model_dir), "--tokenizer", str(demo / "tokenizer"), "--question", "q", "--out", "a.png"],
         "give --image, --video or --sound"),
        (["--model", str(model_dir), "--tokenizer", str(demo / "tokenizer"), "--image", str(demo / "images" / "img_0000.png"),
          "--question", "q", "--out", str(tmp_path / "no" / "a.png")], "does not exist"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv
