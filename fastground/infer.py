"""Ask a trained model about an image, a video or a sound, and see the answer.

    python -m fastground.infer --model runs/stage3/final --image cat.png \\
        --question "Where is the red circle? Answer with a box." --out answer.png
    python -m fastground.infer --model runs/stage3/final --video clip.webm --chat

The prompt uses the checkpoint's own conversation template (a release checkpoint: the
release's `lego` template, stopped at `###`). The answer's boxes are drawn on the image; time
spans on a timeline over the video's frames or the sound's waveform. `--chat` keeps a
multi-turn conversation about the same media and streams each answer as it is generated.
A release config that names the CLIP tower by hub id needs `--vision-tower DIR` (weights are
never downloaded at run time).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

MODALITIES = ("image", "video", "sound")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ------------------------------------------------------------------- model arguments
def add_model_args(ap: argparse.ArgumentParser) -> None:
    """Where the model comes from and where it runs; shared by infer and evaluate."""
    ap.add_argument("--model", required=True, help="release-layout checkpoint directory (with its tokenizer)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="weights and compute precision (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--vision-tower", metavar="DIR",
                    help="local transformers CLIP directory, for configs that name the tower by hub id")
    ap.add_argument("--eva", metavar="FILE", help="eva_vit_g.pth, when the checkpoint lacks the EVA weights")
    ap.add_argument("--qformer", metavar="FILE", help="BLIP-2 checkpoint with the frame Q-Former")
    ap.add_argument("--imagebind", metavar="FILE", help="imagebind_huge.pth, when the checkpoint lacks it")
    ap.add_argument("--fast", action="store_true", help="run the branches on the Triton fast path")


def check_model_args(ap: argparse.ArgumentParser, args) -> None:
    """Model, tokenizer, device and encoder paths, checked before anything loads."""
    from fastground.config import GroundingGPTConfig

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        ap.error(f"--model {args.model}: not a checkpoint directory (no config.json)")
    tok = args.tokenizer or args.model
    if not os.path.isfile(os.path.join(tok, "tokenizer_config.json")):
        ap.error(f"no tokenizer in {tok} (save_pretrained writes weights only): pass --tokenizer DIR")
    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except RuntimeError as e:
            ap.error(f"--device {args.device}: {e}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            ap.error(f"--device {args.device}: no CUDA device is available (use --device cpu)")
    for opt in ("eva", "qformer", "imagebind"):
        path = getattr(args, opt)
        if path is not None and not os.path.isfile(path):
            ap.error(f"--{opt} {path}: file not found")
    if args.vision_tower is not None:
        if not os.path.isfile(os.path.join(args.vision_tower, "config.json")):
            ap.error(f"--vision-tower {args.vision_tower}: not a transformers CLIP directory (no config.json)")
        return
    try:
        cfg = GroundingGPTConfig.load(args.model)
    except (ValueError, TypeError) as e:
        ap.error(f"--model {args.model}: {e}")
    tower = cfg.mm_vision_tower
    if tower and not os.path.isdir(tower if os.path.isabs(tower) else os.path.join(args.model, tower)) \
            and not os.path.isdir(tower):
        ap.error(f"{os.path.join(args.model, 'config.json')} names the vision tower {tower!r}, which is not a "
                 f"local directory, and weights are never downloaded at run time: pass --vision-tower DIR "
                 f"(a local transformers copy of {tower})")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return DTYPES[name]


def load_for_inference(args, device: torch.device | None = None):
    """(model in eval mode on its device and dtype, tokenizer, device)."""
    from fastground import GroundingGPT, patch
    from fastground.data.tokenizer import load_tokenizer

    device = device or resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    try:
        model = GroundingGPT.from_pretrained(args.model, vision_tower_path=args.vision_tower, eva_path=args.eva,
                                             qformer_path=args.qformer, imagebind_path=args.imagebind, dtype=dtype)
    except ValueError as e:
        hint = ""
        if "missing keys" in str(e):
            hint = (" (a checkpoint without the frozen encoders needs their own files: "
                    "--eva, --qformer, --imagebind)")
        raise SystemExit(f"error: {e}{hint}") from None
    model.to(device)
    if args.fast:
        patch(model)
    return model.eval(), tokenizer, device


# ------------------------------------------------------------------------ generation
def generation_settings(model, tokenizer, args=None, **overrides):
    """The checkpoint's stop rule and the sampling flags as a GenerationConfig."""
    from fastground.model.generation import GenerationConfig
    from fastground.prompting import prompt_style

    style = prompt_style(model.config)
    temperature = getattr(args, "temperature", 0.0) if args is not None else 0.0
    values = dict(
        max_new_tokens=getattr(args, "max_new_tokens", 64) if args is not None else 64,
        do_sample=temperature > 0, temperature=temperature or 1.0,
        top_p=getattr(args, "top_p", 1.0) if args is not None else 1.0,
        eos_token_id=tokenizer.eos_token_id if style.stops_at_eos else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        stop_strings=style.stop_strings)
    values.update(overrides)
    return GenerationConfig(**values)


def answer(model, tokenizer, question: str, modality: str | None = None, media: dict | None = None,
           history=(), settings=None, stream=None, generator=None) -> str:
    """One answer to `question` after the (question, answer) turns of `history`."""
    from fastground.prompting import prompt_ids, prompt_style

    style = prompt_style(model.config)
    ids = prompt_ids(style, [*history, (question, None)], tokenizer, model.config, modality)
    out = model.generate([ids], config=settings or generation_settings(model, tokenizer), tokenizer=tokenizer,
                         stream=stream, generator=generator, **(media or {}))
    return out.texts[0]


def load_media(modality, path, cfg) -> dict:
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


# -------------------------------------------------------------------------- pictures
def media_duration(path: str) -> float:
    import av

    with av.open(path) as c:
        if c.duration:
            return c.duration / 1e6
        s = c.streams[0]
        return float(s.duration * s.time_base) if s.duration else 1.0


def picture(modality, path, text: str, true=None, caption: str | None = None):
    """The answer drawn on its media: boxes on the image, spans over frames or waveform."""
    from PIL import Image

    from fastground.grounding import parse_boxes, parse_spans
    from fastground.visualize import box_picture, span_picture, video_frames

    caption = text if caption is None else caption
    if modality == "image":
        boxes = parse_boxes(text)
        return box_picture(Image.open(path), boxes if len(boxes) > 1 else (boxes[0] if boxes else None),
                           true, caption), f"{len(boxes)} box(es)"
    spans = parse_spans(text)
    duration = media_duration(path)
    if modality == "video":
        extra = dict(frames=video_frames(path, 8))
    else:
        from fastground.data.audio import decode_audio
        wave, sr = decode_audio(path)
        extra = dict(wave=wave, sample_rate=sr)
    return span_picture(duration, spans[0] if spans else None, true, caption, **extra), \
        f"{len(spans)} span(s) on a {duration:.1f} s timeline"


# ------------------------------------------------------------------------------- CLI
def _validate(ap: argparse.ArgumentParser, args) -> None:
    """Everything checkable before the model loads (which takes a while at 7B)."""
    for opt in MODALITIES:
        path = getattr(args, opt)
        if path is not None and not os.path.isfile(path):
            ap.error(f"--{opt} {path}: file not found")
    check_model_args(ap, args)
    if not args.chat and not args.question:
        ap.error("give --question, or --chat for a conversation")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        ap.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.out:
        if not (args.image or args.video or args.sound):
            ap.error("--out draws the answer on the media: give --image, --video or --sound")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            ap.error(f"--out {args.out}: folder {folder} does not exist")
    from fastground.infer_checks import check_inputs, check_prompt_fits
    check_inputs(ap.error, args.question or "", {m: getattr(args, m) for m in ("image", "video", "sound")}, args.out)
    check_prompt_fits(ap.error, args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastground.infer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    media = ap.add_mutually_exclusive_group()
    media.add_argument("--image")
    media.add_argument("--video")
    media.add_argument("--sound")
    ap.add_argument("--question")
    ap.add_argument("--chat", action="store_true", help="multi-turn conversation, answers streamed")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); the release demo uses 0.2")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--out", help="PNG with the answer drawn (box on the image, span on a timeline)")
    return ap


def chat(model, tokenizer, modality, media, settings, first_question=None, read=None, write=None,
         generator=None) -> int:
    """Read questions until an empty line, 'exit' or end of input; each answer streams out.
    The media block stays in the first turn of every prompt, so the branches see the media
    on every turn; `/reset` starts the conversation over."""
    from fastground.model.generation import TextStream

    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    read = read or input
    history: list[tuple[str, str]] = []
    pending = first_question
    while True:
        if pending is None:
            try:
                pending = read("USER: ")
            except EOFError:
                write("\n")
                return 0
        q = pending.strip()
        pending = None
        if q in ("", "exit", "quit"):
            return 0
        if q == "/reset":
            history.clear()
            write("(conversation cleared)\n")
            continue
        write("ASSISTANT: ")
        stream = TextStream(tokenizer, settings.stop_strings, write=write)
        text = answer(model, tokenizer, q, modality, media, history, settings, stream, generator)
        write("\n")
        history.append((q, text))


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    _validate(ap, args)

    from fastground.data.errors import MediaError

    modality, path = next(((m, getattr(args, m)) for m in MODALITIES if getattr(args, m)), (None, None))
    model, tokenizer, device = load_for_inference(args)
    try:
        media = load_media(modality, path, model.config)
    except MediaError as e:
        ap.error(str(e))
    gen = torch.Generator().manual_seed(args.seed)
    settings = generation_settings(model, tokenizer, args)
    if args.chat:
        return chat(model, tokenizer, modality, media, settings, args.question, generator=gen)
    from fastground.prompting import prompt_ids, prompt_style

    ids = prompt_ids(prompt_style(model.config), [(args.question, None)], tokenizer, model.config, modality)
    text = model.generate([ids], config=settings, tokenizer=tokenizer, generator=gen, **media).texts[0]
    print(text)
    if args.out:
        img, what = picture(modality, path, text)
        img.save(args.out)
        print(f"{what} drawn -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
