"""Inference prompts: the checkpoint's conversation template, rendered for generation.

One place decides which template a checkpoint answers in and where its answer stops;
`infer`, `infer --chat` and `evaluate` all ask here. Templates themselves live in
fastground.data.templates (the registry); this module only reads a checkpoint's choice
and renders an open "assistant" turn with the media block first, as the release's CLI does:
`{system}###Human: {media}\\n{question}###Assistant:` for `lego`, stopped at `###`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastground.config import PLACEHOLDERS
from fastground.data.templates import DEFAULT_TEMPLATE, Template, get_template, template_name

__all__ = ["DEFAULT_TEMPLATE", "PromptStyle", "prompt_style", "template_name", "with_media", "prompt_ids"]

# The registry's templates are the inference styles (one definition: fastground.data.templates).
PromptStyle = Template


def prompt_style(name_or_cfg) -> PromptStyle:
    """The template a checkpoint answers in: a name, or a config's record (lego when none)."""
    return get_template(name_or_cfg if isinstance(name_or_cfg, str) else template_name(name_or_cfg))


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
