"""What `python -m fastground.infer` checks before it loads a model (seconds, not minutes
at 7B): the media files, the media flags against the question's placeholders, --out, and
the prompt's length against the model's positions. Each problem is one message; the
entry point turns it into a usage error (exit code 2)."""
from __future__ import annotations

import os
from typing import Callable, Optional

from fastground.config import MEDIA_TOKENS, PLACEHOLDERS

# What the answer picture can be saved as (PIL writers for these are always present).
OUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

MEDIA_FLAGS = ("image", "video", "sound")


def media_problems(question: str, given: dict) -> list[str]:
    """`given`: modality -> path or None (at most one set). The question may name the given
    modality's placeholder once (or not at all: it is then put first); any other
    placeholder, or a raw media token, has no media behind it."""
    problems = []
    for tok in MEDIA_TOKENS:
        if tok in question:
            problems.append(f"the question contains the media token {tok!r} as text; use the placeholder "
                            f"({', '.join(PLACEHOLDERS.values())}) instead")
    chosen = [m for m in MEDIA_FLAGS if given.get(m)]
    for m, ph in PLACEHOLDERS.items():
        n = question.count(ph)
        if n and m not in chosen:
            other = f" (--{chosen[0]} was given)" if chosen else ""
            problems.append(f"the question has {ph} but no --{m} file{other}")
        elif n > 1:
            problems.append(f"the question has {n} {ph} placeholders; one --{m} file fills only one")
    return problems


def media_file_problems(given: dict) -> list[str]:
    from fastground.data.errors import MediaError, check_media_file
    kinds = {"image": "an image", "video": "a video", "sound": "an audio"}
    problems = []
    for m in MEDIA_FLAGS:
        path = given.get(m)
        if path is None:
            continue
        try:
            check_media_file(path, kinds[m])
        except MediaError as e:
            problems.append(f"--{m} {e}")
    return problems


def out_problems(out: Optional[str]) -> list[str]:
    if not out:
        return []
    ext = os.path.splitext(out)[1].lower()
    if ext not in OUT_EXTENSIONS:
        return [f"--out {out}: unknown picture extension {ext or '(none)'!r}; use one of {', '.join(OUT_EXTENSIONS)}"]
    if os.path.isdir(out):
        return [f"--out {out} is a directory; give a file name"]
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        return [f"--out {out}: folder {folder} does not exist"]
    if not os.access(folder, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        return [f"--out {out}: not writable"]
    return []


def check_inputs(error: Callable[[str], None], question: str, given: dict, out: Optional[str]) -> None:
    """Calls `error` (argparse's, which exits 2) with every problem found, one per line."""
    problems = media_file_problems(given) + media_problems(question, given) + out_problems(out)
    if problems:
        error("\n  ".join(problems))


def check_prompt_length(error: Callable[[str], None], n_prompt: int, max_new_tokens: int, positions: int) -> None:
    """The prompt (media blocks expanded) plus the answer must fit the model's positions."""
    if max_new_tokens < 1:
        error(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if n_prompt + max_new_tokens > positions:
        error(f"the prompt is {n_prompt} tokens (media blocks included); with --max-new-tokens {max_new_tokens} "
              f"that is {n_prompt + max_new_tokens}, beyond the model's {positions} positions: shorten the "
              f"question or lower --max-new-tokens (at most {max(0, positions - n_prompt)} here)")


def prompt_length(question: str, tokenizer, cfg, modality: Optional[str]) -> int:
    """Tokens of the prompt the entry point will build (media blocks expanded)."""
    try:
        from fastground.prompting import prompt_ids, prompt_style
    except ImportError:
        from fastground.infer import build_inputs
        return int(build_inputs(question, tokenizer, cfg, modality).shape[-1])
    return int(prompt_ids(prompt_style(cfg), [(question, None)], tokenizer, cfg, modality).shape[-1])


def check_prompt_fits(error: Callable[[str], None], args) -> None:
    """Reads the tokenizer and config.json only (no weights)."""
    question = getattr(args, "question", None)
    if not question:
        return
    from fastground.config import GroundingGPTConfig
    from fastground.data.tokenizer import load_tokenizer
    try:
        cfg = GroundingGPTConfig.load(args.model)
        tokenizer = load_tokenizer(getattr(args, "tokenizer", None) or args.model)
    except (OSError, ValueError) as e:
        error(f"--model {args.model}: {e}")
        return
    modality = next((m for m in MEDIA_FLAGS if getattr(args, m, None)), None)
    check_prompt_length(error, prompt_length(question, tokenizer, cfg, modality),
                        int(getattr(args, "max_new_tokens", 64)), cfg.max_position_embeddings)
