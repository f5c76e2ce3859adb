"""Conversations -> (input_ids, labels) as the release computes them, for each template of
the registry (fastground.data.templates): `preprocess` picks the template's masking.

`lego` (the release's `preprocess`, what it trains every stage with). The text is
`{system}\n\n` + `### {role}: {value}\n` per turn + `### `. Labels are a copy of the ids;
the header and each turn's string are tokenized SEPARATELY and their lengths (non-pad
tokens, each with its own BOS) drive the masking: cur = len(header); labels[:cur] ignored;
per turn, labels[cur+2 : cur+len] ignored when the speaker is "human"; cur += len. So gpt
turns are supervised with their `### Assistant: ` tag and newline, the first two tokens of
every human turn and the final `### ` are supervised, and the offsets drift by one token per
turn (the per-piece BOS). All reproduced as is. A leading gpt turn is kept and supervised; a
speaker other than human/gpt becomes role "unknown" and is supervised.

`vicuna_v1` (`preprocess_v1`, which the release defines but never calls). Masking follows
its arithmetic to the token, including where that arithmetic is only right for a Llama
(sentencepiece) tokenizer:

* the prompt is split into rounds on "</s>"; a round's length is the length of the round's
  text tokenized *with* BOS, the BOS standing in for the "</s>" the split removed;
* the instruction length is the length of "<round up to and including 'ASSISTANT: '>"
  tokenized with BOS, minus 2: one for the BOS, one for the token sentencepiece makes of the
  trailing space, which is absent when the answer follows;
* a round whose text does not split into exactly one question and one answer ends the masking
  (everything from there on is ignored), and if the token count the rounds add up to differs
  from the sequence length, the whole sample is ignored (the release's "tokenization
  mismatch", printed there, logged here);
* the sequence length counted against is the number of tokens that are not the pad id (the
  release pads with the unk token, so unk tokens in the text trigger the mismatch there too).

Media, both templates: placeholders are normalised as the release does (moved to the front
of their message, followed by a newline) and expanded on ids rather than as text: the text
between placeholders is tokenized chunk by chunk, as the release's slow tokenizer and its
`tokenizer_image_token` do, and each placeholder becomes start + N patch + end ids (the 576
patch tokens of an image never pass through the tokenizer). For `lego` the whitespace on both
sides of a media block is stripped first, as the release's slow tokenizer does to tokens
added with special_tokens=True (`### Human:` is followed directly by the start token; the
newline after the end token disappears).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import torch

from fastground.config import PLACEHOLDERS
from fastground.data.templates import (DEFAULT_TEMPLATE, LEGO, TEMPLATES, VICUNA_V1, Template,
                                       get_template, template_for, template_name)

__all__ = ["IGNORE_INDEX", "MODALITIES", "ConversationError", "SampleTooLongError", "preprocess",
           "preprocess_lego", "preprocess_v1", "build_prompt", "lego_text", "normalize_placeholders",
           "count_placeholders", "truncation_point", "Template", "TEMPLATES", "LEGO", "VICUNA_V1",
           "DEFAULT_TEMPLATE", "get_template", "template_for", "template_name"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MODALITIES = ("image", "video", "sound")
HUMAN, GPT = "human", "gpt"

_PLACEHOLDER_TO_MODALITY = {v: k for k, v in PLACEHOLDERS.items()}
_PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(PLACEHOLDERS[m]) for m in MODALITIES) + ")")


class ConversationError(ValueError):
    """A conversation that cannot be turned into a training sample."""

    def __init__(self, problem: str, sample_id: Any = None):
        self.problem = problem
        self.sample_id = sample_id
        where = f"sample {sample_id!r}: " if sample_id is not None else ""
        super().__init__(where + problem)


class SampleTooLongError(ConversationError):
    """A media block does not fit in max_length, so no truncation can keep the sample valid."""


def count_placeholders(conversations: Sequence[dict]) -> dict[str, int]:
    counts = dict.fromkeys(MODALITIES, 0)
    for turn in conversations:
        value = turn.get("value") if isinstance(turn, dict) else None
        if isinstance(value, str):
            for m in MODALITIES:
                counts[m] += value.count(PLACEHOLDERS[m])
    return counts


def normalize_placeholders(value: str) -> str:
    """The release's preprocess_multimodal on one message: every placeholder of a modality is
    removed and one is put at the front followed by a newline (image, then video, then sound,
    so a later modality ends up first)."""
    for m in MODALITIES:
        ph = PLACEHOLDERS[m]
        if ph in value:
            value = (ph + "\n" + value.replace(ph, "").strip()).strip()
    return value


def build_prompt(conversations: Sequence[dict], template: Template = VICUNA_V1,
                 sample_id: Any = None) -> str:
    """preprocess_v1's prompt: a leading non-human turn is dropped, turns must alternate."""
    roles = {HUMAN: template.roles[0], GPT: template.roles[1]}
    turns = list(conversations)
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in roles or not isinstance(t.get("value"), str):
            raise ConversationError(
                f"turn {j} must be {{'from': 'human'|'gpt', 'value': str}}, got {t!r:.200}", sample_id)
    if turns and turns[0]["from"] != HUMAN:
        turns = turns[1:]
    if not turns:
        raise ConversationError("conversation has no human turn", sample_id)
    messages = []
    has_media = any(_PLACEHOLDER_RE.search(t["value"]) for t in turns)
    for j, t in enumerate(turns):
        role = roles[t["from"]]
        if role != template.roles[j % 2]:
            raise ConversationError(
                f"turns must alternate human/gpt; turn {j} (after dropping a leading gpt turn) "
                f"is from {t['from']!r}", sample_id)
        messages.append((role, normalize_placeholders(t["value"]) if has_media else t["value"]))
    return template.prompt(messages)


def _media_ids(cfg, modality: str) -> list[int]:
    patch, start, end = cfg.token_ids(modality)
    if min(patch, start, end) < 0:
        raise ValueError(f"the config has no {modality} token ids; call cfg.set_token_ids(tokenizer) "
                         "with a tokenizer that has MEDIA_TOKENS added")
    return [start] + [patch] * cfg.media_token_len(modality) + [end]


class _Tokenize:
    """Text with placeholders -> ids, as `tokenizer(text).input_ids` would give with each
    placeholder expanded, chunk-wise like the release's slow tokenizer (and its
    tokenizer_image_token). strip=True also strips the whitespace on both sides of each media
    block, as the slow tokenizer does around tokens added with special_tokens=True."""

    def __init__(self, tokenizer, cfg, strip: bool = False):
        self.tokenizer = tokenizer
        self.blocks = {}
        self.cfg = cfg
        self.strip = strip

    def block(self, modality: str) -> list[int]:
        if modality not in self.blocks:
            self.blocks[modality] = _media_ids(self.cfg, modality)
        return self.blocks[modality]

    def __call__(self, text: str, spans: list | None = None) -> list[int]:
        pieces = _PLACEHOLDER_RE.split(text)
        if self.strip and len(pieces) > 1:
            # Text pieces sit at even indices, each between two placeholders (or an end).
            last = len(pieces) - 1
            pieces = [p if k % 2 else (p.lstrip() if k > 0 else p) for k, p in enumerate(pieces)]
            pieces = [p if k % 2 or k == last else p.rstrip() for k, p in enumerate(pieces)]
        bos = self.tokenizer.bos_token_id
        first = self.tokenizer(pieces[0]).input_ids
        # Later chunks lose their BOS only when the first chunk got one (tokenizer_image_token).
        offset = 1 if first and bos is not None and first[0] == bos else 0
        ids = list(first)
        for k in range(1, len(pieces), 2):
            block = self.block(_PLACEHOLDER_TO_MODALITY[pieces[k]])
            if spans is not None:
                spans.append((len(ids), len(ids) + len(block), _PLACEHOLDER_TO_MODALITY[pieces[k]]))
            ids.extend(block)
            if pieces[k + 1]:
                ids.extend(self.tokenizer(pieces[k + 1]).input_ids[offset:])
        return ids


def tokenize_prompt(text: str, tokenizer, cfg, template: Template | str | None = None,
                    training: bool = False) -> list[int]:
    """Prompt text with placeholders -> ids, media expanded. Training tokenization strips the
    whitespace around media blocks where the template's release did (lego); inference keeps
    it (the release's demo tokenizer does not strip)."""
    strip = training and get_template(template).strip_media_whitespace
    return _Tokenize(tokenizer, cfg, strip=strip)(text)


def preprocess(conversations: Sequence[dict], tokenizer, cfg, max_length: int | None,
               sample_id: Any = None, template: Template | str | None = None):
    """One LLaVA-style conversation -> (input_ids, labels) with `template`'s masking; by
    default the template `cfg` records (lego when it records none)."""
    t = template_for(cfg) if template is None else get_template(template)
    fn = {"lego": preprocess_lego, "vicuna_v1": preprocess_v1}[t.masking]
    return fn(conversations, tokenizer, cfg, max_length, sample_id=sample_id, template=t)


def lego_text(conversations: Sequence[dict], template: Template = LEGO,
              sample_id: Any = None) -> tuple[str, list[str], list[str]]:
    """(full text, [header, turn strings...], speakers) of the release's `preprocess`,
    placeholders moved to the front of their message and left as text."""
    turns = list(conversations)
    if not turns:
        raise ConversationError("conversation has no turns", sample_id)
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise ConversationError(f"turn {j} must be {{'from': str, 'value': str}}, got {t!r:.200}", sample_id)
    header = template.system + template.header_end
    pieces, speakers = [header], []
    for t in turns:
        speaker = t["from"]
        role = {HUMAN: template.roles[0], GPT: template.roles[1]}.get(speaker.lower(), template.unknown_role)
        pieces.append(template.turn_begin + role + ": " + normalize_placeholders(t["value"]) + template.turn_end)
        speakers.append(speaker)
    return "".join(pieces) + template.turn_begin, pieces, speakers


def _count(ids: list[int], pad: int | None, max_length: int | None) -> int:
    """The release's length of a piece: non-pad tokens of its (truncated) tokenization."""
    if max_length is not None:
        ids = ids[:max_length]
    return len(ids) if pad is None else sum(1 for i in ids if i != pad)


def preprocess_lego(conversations: Sequence[dict], tokenizer, cfg, max_length: int | None,
                    sample_id: Any = None, template: Template = LEGO):
    """The release's `preprocess` (module docstring): (input_ids, labels), 1-D long tensors.

    Too long: cut at the end of the last non-human turn that fits and holds every media block,
    else at max_length (text after the last media block is shortened); labels keep the
    arithmetic of the whole conversation. The release cuts at max_length wherever it falls,
    also inside a media block, which its embedding splice cannot take; a media block that
    ends past max_length raises SampleTooLongError naming the sample.
    """
    text, pieces, speakers = lego_text(conversations, template, sample_id)
    tok = _Tokenize(tokenizer, cfg, strip=template.strip_media_whitespace)
    spans: list = []
    ids = tok(text, spans)
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    pad = tokenizer.pad_token_id
    lens = [_count(tok(p), pad, max_length) for p in pieces]
    cur = lens[0]
    labels[:cur] = IGNORE_INDEX
    for n, speaker in zip(lens[1:], speakers):
        if speaker == HUMAN:  # case-sensitive, as released: "Human" is supervised
            labels[cur + 2:cur + n] = IGNORE_INDEX
        cur += n

    if max_length is not None and len(ids) > max_length:
        ends = []
        prefix = pieces[0]
        for piece, speaker in zip(pieces[1:], speakers):
            prefix += piece
            if speaker != HUMAN:
                head = tok(prefix)
                if ids[:len(head)] == head:  # a clean token boundary
                    ends.append(len(head))
        cut = truncation_point(len(ids), spans, ends, max_length, sample_id)
        input_ids, labels = input_ids[:cut], labels[:cut]
    return input_ids, labels


def preprocess_v1(conversations: Sequence[dict], tokenizer, cfg, max_length: int | None,
                  sample_id: Any = None, template: Template = VICUNA_V1):
    """One LLaVA-style conversation -> (input_ids, labels), 1-D long tensors.

    Labels are IGNORE_INDEX except on the answers (and their closing "</s>"), computed as the
    release's preprocess_v1 does (module docstring). Sequences longer than max_length are cut
    without splitting a media block: first at the end of the last whole round that fits, else
    inside the text after the last media block; if a media block itself ends past max_length,
    SampleTooLongError names the sample.
    """
    prompt = build_prompt(conversations, template, sample_id)
    tok = _Tokenize(tokenizer, cfg)
    spans: list = []
    ids = tok(prompt, spans)
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()

    pad = tokenizer.pad_token_id
    total_len = int(input_ids.ne(pad).sum()) if pad is not None else len(ids)
    answer_sep = template.answer_sep
    round_ends = []
    cur = 1
    labels[:cur] = IGNORE_INDEX
    for rou in prompt.split(template.sep2):
        if rou == "":
            break
        parts = rou.split(answer_sep)
        if len(parts) != 2:
            break
        round_len = len(tok(rou))
        instruction_len = len(tok(parts[0] + answer_sep)) - 2
        # Unguarded on purpose: slice semantics (a negative end counts from the back) are the
        # release's for odd tokenizers too.
        labels[cur:cur + instruction_len] = IGNORE_INDEX
        cur += round_len
        round_ends.append(cur)
    labels[cur:] = IGNORE_INDEX
    if cur != total_len:
        labels[:] = IGNORE_INDEX
        round_ends = []
        logger.warning("sample %r: tokenization mismatch: %d vs. %d tokens; its labels are all "
                       "ignored (as the release does)", sample_id, cur, total_len)

    if max_length is not None and len(ids) > max_length:
        cut = truncation_point(len(ids), spans, round_ends, max_length, sample_id)
        input_ids, labels = input_ids[:cut], labels[:cut]
    return input_ids, labels


def truncation_point(length: int, media_spans: Sequence[tuple], round_ends: Sequence[int],
                     max_length: int, sample_id: Any = None) -> int:
    """Where to cut a sequence of `length` tokens so it fits max_length and keeps every media
    block whole: the end of the last round that fits and still holds all media, else
    max_length (text after the last media block is shortened)."""
    if length <= max_length:
        return length
    media_end = max((end for _, end, _ in media_spans), default=0)
    if media_end > max_length:
        start, end, modality = max(media_spans, key=lambda s: s[1])
        raise SampleTooLongError(
            f"the {modality} block (tokens {start}..{end - 1}) does not fit max_length={max_length}; "
            f"the sample needs at least {media_end} tokens. Raise max_length or shorten the text "
            f"before the {PLACEHOLDERS[modality]} placeholder", sample_id)
    for end in reversed(round_ends):
        if media_end <= end <= max_length:
            return end
    return max_length
