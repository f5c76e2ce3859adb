"""Conversation templates, as data: the release's `lego` and Vicuna v1.

This registry is the one place that decides which template a model speaks:

* training chooses one with `--template` (default: what the starting checkpoint records,
  else `lego`) and records it in the checkpoint's config (`conversation_template`);
* inference, evaluation and chat read it back with `template_for(config)`; a config that
  records none, which is every release checkpoint, gets `lego`, the template the release
  trains every stage with.

`lego` is the release's default conversation and LLaVA-v0 style `preprocess`:
training text `{system}\\n\\n### Human: ...\\n### Assistant: ...\\n### ` with role tags and
`###` supervised and no EOS; inference prompt `{system}###Human: ...###Assistant:`, stopped
at `###`. `vicuna_v1` is LLaVA-1.5's ` USER: ... ASSISTANT: ...</s>` with `preprocess_v1`
masking (defined by the release, never called by it), kept as an option.

No torch here: the trainer's option parser reads the names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

# A checkpoint that records no template was trained by the release, with `lego`.
DEFAULT_TEMPLATE = "lego"


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    roles: tuple[str, str]  # (human, assistant)
    # Prompt separators (LLaVA's Conversation.get_prompt): `sep` after the system prompt and
    # after every human turn, `sep2` after every assistant turn.
    sep: str
    sep2: str
    # Decoded text that ends an answer, besides the EOS token.
    stop_strings: tuple[str, ...]
    # How training turns a conversation into ids and labels: "lego" (the release's
    # `preprocess`) or "vicuna_v1" (`preprocess_v1`); see fastground.data.conversation.
    masking: str
    # `lego` training text: header = system + header_end; turn = turn_begin + role + ": " +
    # value + turn_end; turn_begin once more after the last turn.
    header_end: str = ""
    turn_begin: str = ""
    turn_end: str = ""
    # The role of a speaker other than human/gpt (lego only; vicuna_v1 rejects it).
    unknown_role: str = "unknown"
    # Training tokenization strips the whitespace on both sides of a media block, as the
    # release's slow tokenizer does to tokens added with special_tokens=True. Inference
    # keeps it (the release's demo uses a fast tokenizer).
    strip_media_whitespace: bool = False

    def prompt(self, messages: Sequence[tuple[str, Optional[str]]]) -> str:
        """(role, text) messages -> prompt text; a last text of None leaves "ROLE:" open for
        the answer. Media placeholders stay text here."""
        seps = (self.sep, self.sep2)
        out = self.system + seps[0]
        for i, (role, message) in enumerate(messages):
            if message:
                out += f"{role}: {message}{seps[i % 2]}"
            else:
                out += f"{role}:"
        return out

    def chat_prompt(self, turns: Sequence[tuple[str, Optional[str]]]) -> str:
        """(question, answer) pairs -> prompt text; the last answer None leaves the
        assistant's turn open (what generation continues)."""
        messages = []
        for q, a in turns:
            messages += [(self.roles[0], q), (self.roles[1], a)]
        return self.prompt(messages)

    def render(self, turns: Sequence[tuple[str, Optional[str]]]) -> str:
        """Same as chat_prompt (the name fastground.prompting uses)."""
        return self.chat_prompt(turns)

    @property
    def stops_at_eos(self) -> bool:
        """Generation also stops at the EOS token (the release's generate does, with any template)."""
        return True

    def inference_prompt(self, question: str) -> str:
        """One question, the answer left open: `{system}###Human: {question}###Assistant:`
        for lego."""
        return self.chat_prompt([(question, None)])

    def cut_answer(self, text: str) -> str:
        """Generated text up to the first stop string, stripped (the release's CLI does the same)."""
        hits = [i for i in (text.find(s) for s in self.stop_strings if s) if i >= 0]
        return (text[:min(hits)] if hits else text).strip()

    @property
    def answer_sep(self) -> str:
        """What precedes every answer in the prompt."""
        return f"{self.sep}{self.roles[1]}: "


LEGO = Template(
    name="lego",
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("Human", "Assistant"),
    sep="###",
    sep2="###",
    stop_strings=("###",),
    masking="lego",
    header_end="\n\n",
    turn_begin="### ",
    turn_end="\n",
    strip_media_whitespace=True,
)

VICUNA_V1 = Template(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
    stop_strings=("</s>",),
    masking="vicuna_v1",
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (LEGO, VICUNA_V1)}


def get_template(name: str | Template | None) -> Template:
    """A template by name (None: the default, `lego`)."""
    if isinstance(name, Template):
        return name
    if name is None:
        name = DEFAULT_TEMPLATE
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def template_name(config: Any) -> str:
    """The template a model config records, else `lego` (a release checkpoint records none)."""
    name = getattr(config, "conversation_template", None) if config is not None else None
    return get_template(name).name


def template_for(config: Any) -> Template:
    """The template a model (its config) answers in: the one it was trained with."""
    return get_template(template_name(config))


def training_template(requested: str | None, recorded: str | None) -> tuple[Template, str]:
    """(template, why) for a training run: --template if given, else the one the starting
    checkpoint records, else `lego` (a fresh model, a release checkpoint or a Vicuna)."""
    if requested is not None:
        t = get_template(requested)
        why = "--template"
        if recorded is not None and recorded != t.name:
            why += f" (the starting checkpoint was trained with {recorded!r})"
        return t, why
    if recorded is not None:
        return get_template(recorded), "recorded in the starting checkpoint"
    return get_template(None), "the default, the release's"
