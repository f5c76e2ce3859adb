"""The Vicuna v1 conversation template and the release's label masking (`preprocess_v1`).

Masking follows the release's arithmetic to the token, including where that arithmetic is
only right for a Llama (sentencepiece) tokenizer:

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

Media placeholders are normalised as the release does (moved to the front of their message,
followed by a newline) and expanded on ids rather than as text: the text between placeholders
is tokenized chunk by chunk, as the release's `tokenizer_image_token` does, and each
placeholder becomes start + N patch + end ids. The 576 patch tokens of an image never pass
through the tokenizer.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from fastground.config import PLACEHOLDERS

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


@dataclass
class Conversation:
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str
    messages: list[list] = field(default_factory=list)

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        # An empty or None message leaves "ROLE:" open for generation, without a separator.
        seps = (self.sep, self.sep2)
        out = self.system + seps[0]
        for i, (role, message) in enumerate(self.messages):
            if message:
                out += f"{role}: {message}{seps[i % 2]}"
            else:
                out += f"{role}:"
        return out

    @property
    def answer_sep(self) -> str:
        """What precedes every answer; the release splits rounds into question/answer on it."""
        return f"{self.sep}{self.roles[1]}: "


VICUNA_V1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)


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


def build_prompt(conversations: Sequence[dict], template: Conversation = VICUNA_V1,
                 sample_id: Any = None) -> str:
    """The release's prompt: a leading non-human turn is dropped, turns must alternate."""
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
    conv = template.copy()
    conv.messages = []
    has_media = any(_PLACEHOLDER_RE.search(t["value"]) for t in turns)
    for j, t in enumerate(turns):
        role = roles[t["from"]]
        if role != template.roles[j % 2]:
            raise ConversationError(
                f"turns must alternate human/gpt; turn {j} (after dropping a leading gpt turn) "
                f"is from {t['from']!r}", sample_id)
        value = normalize_placeholders(t["value"]) if has_media else t["value"]
        conv.append_message(role, value)
    return conv.get_prompt()


def _media_ids(cfg, modality: str) -> list[int]:
    patch, start, end = cfg.token_ids(modality)
    if min(patch, start, end) < 0:
        raise ValueError(f"the config has no {modality} token ids; call cfg.set_token_ids(tokenizer) "
                         "with a tokenizer that has MEDIA_TOKENS added")
    return [start] + [patch] * cfg.media_token_len(modality) + [end]


class _Tokenize:
    """Text with placeholders -> ids, as `tokenizer(text).input_ids` would give with each
    placeholder expanded, chunk-wise like the release's tokenizer_image_token."""

    def __init__(self, tokenizer, cfg):
        self.tokenizer = tokenizer
        self.blocks = {}
        self.cfg = cfg

    def block(self, modality: str) -> list[int]:
        if modality not in self.blocks:
            self.blocks[modality] = _media_ids(self.cfg, modality)
        return self.blocks[modality]

    def __call__(self, text: str, spans: list | None = None) -> list[int]:
        pieces = _PLACEHOLDER_RE.split(text)
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
            ids.extend(self.tokenizer(pieces[k + 1]).input_ids[offset:])
        return ids


def preprocess_v1(conversations: Sequence[dict], tokenizer, cfg, max_length: int | None,
                  sample_id: Any = None, template: Conversation = VICUNA_V1):
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
