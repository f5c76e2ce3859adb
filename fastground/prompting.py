"""Inference prompts: the checkpoint's conversation template, rendered for generation.

One place decides which template a checkpoint answers in and where its answer stops;
`infer`, `infer --chat` and `evaluate` all ask here. Templates themselves live in
fastground.data.conversation (the registry); this module only reads a checkpoint's choice
and renders an open "assistant" turn with the media block first, as the release's CLI does:
`{system}###Human: {media}\\n{question}###Assistant:` for `lego`, stopped at `###`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastground.config import PLACEHOLDERS

DEFAULT_TEMPLATE = "lego"  # what a release checkpoint, which records none, was trained with


@dataclass(frozen=True)
class PromptStyle:
    name: str
    system: str
    roles: tuple[str, str]
    # text between the parts: system|turn, each human turn, each assistant turn
    sep: str
    sep2: str
    stop_strings: tuple[str, ...]
    stops_at_eos: bool

    def render(self, turns: Sequence[tuple[str, Optional[str]]]) -> str:
        """(question, answer) pairs; the last answer None leaves the assistant turn open."""
        if self.name == "lego":
            out = self.system
            for q, a in turns:
                out += f"###{self.roles[0]}: {q}###{self.roles[1]}:"
                if a is not None:
                    out += f" {a}"
            return out
        out = self.system + self.sep
        for q, a in turns:
            out += f"{self.roles[0]}: {q}{self.sep}{self.roles[1]}:"
            if a is not None:
                out += f" {a}{self.sep2}"
        return out


def _registry() -> dict[str, PromptStyle]:
    """The template registry's entries as inference styles."""
    from fastground.data import conversation as conv

    styles = {}
    vic = conv.VICUNA_V1
    styles["vicuna_v1"] = PromptStyle("vicuna_v1", vic.system, tuple(vic.roles), vic.sep, vic.sep2,
                                      stop_strings=(vic.sep2,), stops_at_eos=True)
    lego = getattr(conv, "LEGO", None)
    if lego is not None:
        styles["lego"] = PromptStyle("lego", lego.system, tuple(lego.roles), "###", "###",
                                     stop_strings=("###",), stops_at_eos=True)
    else:  # the release's default conversation (GROUNDINGGPT-REFERENCE.md)
        styles["lego"] = PromptStyle(
            "lego", "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions.",
            ("Human", "Assistant"), "###", "###", stop_strings=("###",), stops_at_eos=True)
    return styles


def template_name(cfg) -> str:
    """The template a checkpoint was trained with: its config's record, else `lego`."""
    for attr in ("template", "conversation_template", "conv_template"):
        name = getattr(cfg, attr, None)
        if isinstance(name, str) and name:
            return name
    return DEFAULT_TEMPLATE


def prompt_style(name_or_cfg) -> PromptStyle:
    name = name_or_cfg if isinstance(name_or_cfg, str) else template_name(name_or_cfg)
    styles = _registry()
    if name not in styles:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(styles)}")
    return styles[name]


def with_media(question: str, modality: Optional[str]) -> str:
    """The release puts the media placeholder first, then a newline, then the question."""
    if not modality:
        return question
    ph = PLACEHOLDERS[modality]
    return ph + "\n" + question.replace(ph, "").strip()


def prompt_ids(style: PromptStyle, turns: Sequence[tuple[str, Optional[str]]], tokenizer, cfg,
               modality: Optional[str] = None) -> torch.Tensor:
    """1-D prompt ids, the media placeholder of the first question expanded on ids."""
    from fastground.data.conversation import _Tokenize

    turns = [(with_media(q, modality) if i == 0 else q, a) for i, (q, a) in enumerate(turns)]
    return torch.tensor(_Tokenize(tokenizer, cfg)(style.render(turns)), dtype=torch.long)
