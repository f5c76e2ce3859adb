"""Ask a trained model about an image, a video or a sound, and see the answer.

    python -m fastground.infer --model runs/stage3/final --image cat.png \\
        --question "Where is the red circle? Answer with a box." --out answer.png

The answer's boxes are drawn on the image; time spans (video, sound) on a timeline.
Greedy decoding with the backbone's key/value cache.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from fastground.config import PLACEHOLDERS
from fastground.data.conversation import VICUNA_V1, _Tokenize, normalize_placeholders


def build_inputs(question: str, tokenizer, cfg, modality: str | None) -> torch.Tensor:
    """Vicuna v1 prompt ending in "ASSISTANT:", media placeholder expanded on ids."""
    if modality and PLACEHOLDERS[modality] not in question:
        question = PLACEHOLDERS[modality] + "\n" + question
    conv = VICUNA_V1.copy()
    conv.messages = []
    conv.append_message(conv.roles[0], normalize_placeholders(question) if modality else question)
    conv.append_message(conv.roles[1], None)
    return torch.tensor([_Tokenize(tokenizer, cfg)(conv.get_prompt())])


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, images=None, videos=None, sounds=None,
             max_new_tokens: int = 64, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding of one sequence; media go through the branches once, in the prefill."""
    from transformers import DynamicCache

    model.eval()
    inner = model.model
    emb = model.embed(input_ids, images, videos, sounds)
    cache = DynamicCache(config=inner.config)
    hidden = inner(inputs_embeds=emb, past_key_values=cache, use_cache=True).last_hidden_state
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = model.lm_head(hidden[:, -1]).argmax(-1)
        if eos_token_id is not None and int(nxt) == eos_token_id:
            break
        out.append(int(nxt))
        hidden = inner(inputs_embeds=inner.embed_tokens(nxt[:, None]), past_key_values=cache,
                       use_cache=True).last_hidden_state
    return out


def _picture(modality, path, answer, cfg, out_path):
    from PIL import Image

    from fastground.grounding import parse_boxes, parse_spans
    from fastground.visualize import draw_boxes, draw_timeline

    if modality == "image":
        boxes = parse_boxes(answer)
        img = draw_boxes(Image.open(path).convert("RGB"), boxes, labels=[f"#{i + 1}" for i in range(len(boxes))])
        img.save(out_path)
        return f"{len(boxes)} box(es) drawn on the image"
    spans = parse_spans(answer)
    duration = _duration(path)
    draw_timeline(duration, spans or [None], labels=["answer"] * max(1, len(spans))).save(out_path)
    return f"{len(spans)} span(s) drawn on a {duration:.1f} s timeline"


def _duration(path: str) -> float:
    import av

    with av.open(path) as c:
        if c.duration:
            return c.duration / 1e6
        s = c.streams[0]
        return float(s.duration * s.time_base) if s.duration else 1.0


def _validate(ap: argparse.ArgumentParser, args) -> None:
    """Everything checkable before the model loads (which takes a while at 7B)."""
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        ap.error(f"--model {args.model}: not a checkpoint directory (no config.json)")
    tok = args.tokenizer or args.model
    if not os.path.isfile(os.path.join(tok, "tokenizer_config.json")):
        ap.error(f"no tokenizer in {tok} (save_pretrained writes weights only): pass --tokenizer DIR")
    for opt in ("image", "video", "sound"):
        path = getattr(args, opt)
        if path is not None and not os.path.isfile(path):
            ap.error(f"--{opt} {path}: file not found")
    if args.out:
        if not (args.image or args.video or args.sound):
            ap.error("--out draws the answer on the media: give --image, --video or --sound")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            ap.error(f"--out {args.out}: folder {folder} does not exist")
    from fastground.infer_checks import check_inputs, check_prompt_fits
    check_inputs(ap.error, args.question or "", {m: getattr(args, m) for m in ("image", "video", "sound")}, args.out)
    check_prompt_fits(ap.error, args)


def _load_media(modality, path, cfg) -> dict:
    if modality == "image":
        from fastground.data.image import load_image
        return {"images": load_image(path, cfg)[None]}
    if modality == "video":
        from fastground.data.video import load_video
        return {"videos": load_video(path, cfg, train=False, allow_repeat=True)[None]}
    if modality == "sound":
        from fastground.data.audio import load_audio
        return {"sounds": load_audio(path, cfg)[None]}
    return {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastground.infer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="release-layout checkpoint directory (with its tokenizer)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    media = ap.add_mutually_exclusive_group()
    media.add_argument("--image")
    media.add_argument("--video")
    media.add_argument("--sound")
    ap.add_argument("--question", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", help="PNG with the answer drawn (box on the image, span on a timeline)")
    ap.add_argument("--fast", action="store_true", help="run the branches on the Triton fast path")
    args = ap.parse_args(argv)
    _validate(ap, args)

    from fastground import GroundingGPT, patch
    from fastground.data.errors import MediaError
    from fastground.data.tokenizer import load_tokenizer

    modality, path = next(((m, p) for m, p in (("image", args.image), ("video", args.video),
                                               ("sound", args.sound)) if p), (None, None))
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = GroundingGPT.from_pretrained(args.model)
    if args.fast:
        patch(model)
    try:
        media = _load_media(modality, path, model.config)
    except MediaError as e:
        ap.error(str(e))
    ids = build_inputs(args.question, tokenizer, model.config, modality)
    answer = tokenizer.decode(generate(model, ids, max_new_tokens=args.max_new_tokens,
                                       eos_token_id=tokenizer.eos_token_id, **media), skip_special_tokens=True)
    print(answer)
    if args.out:
        print(_picture(modality, path, answer, model.config, args.out), "->", args.out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
