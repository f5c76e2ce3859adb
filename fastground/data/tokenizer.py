"""Loading a GroundingGPT tokenizer: a Llama/Vicuna tokenizer with the media tokens."""
from __future__ import annotations

from fastground.config import MEDIA_TOKENS


def load_tokenizer(path: str):
    """AutoTokenizer from a local directory (a checkpoint's or a Vicuna one), with the media
    tokens appended when absent and pad = unk, as the release sets them."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads the checkpoint's config.json and warns that model_type "LEGO" is
    # unknown to transformers; the tokenizer itself is an ordinary Llama one.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [t for t in MEDIA_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        # A plain Vicuna tokenizer: append the media tokens as the release does.
        tok.add_tokens(list(MEDIA_TOKENS), special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # the release pads with unk
    return tok
