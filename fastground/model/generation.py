"""Batched generation for GroundingGPT: left padding, key/value cache, greedy or sampling.

A batch may mix images, videos, sounds and text-only prompts of different lengths. Prompts
are left padded so every row's next token sits in the last column; position ids count real
tokens only (a row's first real token is position 0 whatever its padding), and the padding
is masked out of attention, so a row's tokens do not depend on what else is in the batch:
batched greedy output equals batch-1 greedy output token for token (fp32).

The media go through their branches once, in the prefill. Decoding then feeds one token per
row per step through the backbone's cache. Rows that finished (EOS, a stop string, a stop
id) keep being fed padding until the whole batch is done, and their output is frozen.

The prefill runs on the model's attention backend (FlashAttention-2 varlen on GPUs where it
runs); one-token decode steps use SDPA when that backend cannot take a query shorter than
its keys.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

__all__ = ["GenerationConfig", "GenerationOutput", "left_pad", "generate", "sample_next",
           "StopChecker", "TextStream"]

# Backends whose kernel assumes query and key lengths are equal (varlen over unpadded rows).
_PREFILL_ONLY_BACKENDS = ("fastground_varlen",)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_id: Optional[int] = None
    pad_token_id: int = 0
    stop_strings: Sequence[str] = ()  # decoded-text stops (need a tokenizer), e.g. "###"
    stop_token_ids: Sequence[int] = ()

    def check(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # per row, the generated ids (EOS excluded; a stop string's tokens kept)
    texts: Optional[list[str]] = None  # per row, decoded and cut before the stop string
    finish_reasons: list[str] = field(default_factory=list)  # "eos" | "stop" | "length"
    prompt_tokens: int = 0
    new_tokens: int = 0


def left_pad(rows: Sequence[Sequence[int] | torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> (input_ids, attention_mask), both (B, max_len), padding on the left."""
    if not rows:
        raise ValueError("no prompts to generate from")
    rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in rows]
    if any(r.numel() == 0 for r in rows):
        raise ValueError(f"empty prompt at row {next(i for i, r in enumerate(rows) if r.numel() == 0)}")
    length = max(r.numel() for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - r.numel():] = r
        mask[i, length - r.numel():] = 1
    return ids, mask


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids: argmax, or a draw at `temperature` from the smallest set
    of tokens whose probability reaches `top_p` (nucleus; the top token is always kept)."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= cfg.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StopChecker:
    """Finds stop strings in each row's decoded output. Decoding the whole output each step
    is what makes a stop spread over several tokens (`#` `#` `#`) found at all."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        if stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the output")
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def find(self, text: str) -> int:
        """Index where the earliest stop string starts, or -1."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1


class TextStream:
    """Prints a row's text as it is generated, holding back the tail that could still become
    a stop string, so the separator never reaches the terminal."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), write: Callable[[str], None] | None = None):
        import sys

        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.stops = [s for s in stop_strings if s]
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.ids: list[int] = []
        self.shown = 0

    def _safe_text(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min([i for i in (text.find(s) for s in self.stops) if i >= 0], default=-1)
        if cut >= 0:
            return text[:cut]
        if final:
            return text
        if text.endswith("\ufffd"):  # a multi-byte character not complete yet
            text = text.rstrip("\ufffd")
        return text[:max(0, len(text) - self.hold)] if self.hold else text

    def put(self, token_id: int) -> None:
        self.ids.append(int(token_id))
        text = self._safe_text(final=False)
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

    def end(self) -> None:
        text = self._safe_text(final=True)
        if len(text) > self.shown:
            self.write(text[self.shown:])
        self.shown = len(text)


@contextlib.contextmanager
def _attention_backend(config, name: str | None):
    if name is None or config._attn_implementation == name:
        yield
        return
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def _decode_backend(config) -> str | None:
    return "sdpa" if config._attn_implementation in _PREFILL_ONLY_BACKENDS else None


@torch.no_grad()
def generate(model, input_ids, attention_mask: torch.Tensor | None = None, images=None, videos=None,
             sounds=None, config: GenerationConfig | None = None, tokenizer=None,
             generator: torch.Generator | None = None, stream: TextStream | None = None,
             **overrides) -> GenerationOutput:
    """Generate for a batch of prompts.

    `input_ids`: a list of 1-D id sequences (left padded here) or a (B, L) tensor with its
    `attention_mask` (1 = real token; padding must be on the left). Media tensors hold the
    batch's media in row order, as `GroundingGPT.embed` takes them. `overrides` set fields of
    `config` (max_new_tokens=..., do_sample=..., ...). `stream` prints row 0 as it goes.
    """
    from transformers import DynamicCache

    cfg = config or GenerationConfig()
    if overrides:
        cfg = GenerationConfig(**{**cfg.__dict__, **overrides})
    cfg.check()
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        ids = input_ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("attention_mask has padding at the end of a row: generation needs left padding")
    else:
        ids, mask = left_pad(list(input_ids) if not isinstance(input_ids, torch.Tensor) else [input_ids],
                             cfg.pad_token_id)
    device = model.lm_head.weight.device
    ids, mask = ids.to(device), mask.to(device)
    prompt_tokens = int(mask.sum())
    media = {k: (v.to(device) if v is not None else None)
             for k, v in (("images", images), ("videos", videos), ("sounds", sounds))}

    was_training = model.training
    model.eval()
    inner = model.model
    batch = ids.shape[0]
    stop = StopChecker(tokenizer, cfg.stop_strings)
    stop_ids = set(int(t) for t in cfg.stop_token_ids)
    if cfg.eos_token_id is not None:
        stop_ids.add(int(cfg.eos_token_id))

    out: list[list[int]] = [[] for _ in range(batch)]
    texts: list[Optional[str]] = [None] * batch
    reasons = ["length"] * batch
    # Finished rows, kept on the host: the stop rules are tested there anyway, and reading a
    # device flag per row would cost a sync per row per step.
    done = [False] * batch
    try:
        emb = model.embed(ids, **media)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=inner.config)
        hidden = inner(inputs_embeds=emb, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).last_hidden_state
        next_pos = positions[:, -1:] + 1
        with _attention_backend(inner.config, _decode_backend(inner.config)):
            for step in range(cfg.max_new_tokens):
                logits = model.lm_head(hidden[:, -1])
                nxt = sample_next(logits, cfg, generator)
                if any(done):
                    frozen = torch.tensor(done, device=device)
                    nxt = torch.where(frozen, torch.full_like(nxt, cfg.pad_token_id), nxt)
                # One host transfer per step: needed anyway to test the stop rules.
                host = nxt.tolist()
                for i, t in enumerate(host):
                    if done[i]:
                        continue
                    if t in stop_ids:
                        reasons[i] = "eos" if t == cfg.eos_token_id else "stop"
                        done[i] = True
                        continue
                    out[i].append(t)
                    if stream is not None and i == 0:
                        stream.put(t)
                    if stop.stops:
                        text = stop.decode(out[i])
                        cut = stop.find(text)
                        if cut >= 0:
                            texts[i] = text[:cut]
                            reasons[i] = "stop"
                            done[i] = True
                if all(done) or step == cfg.max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], 1)
                hidden = inner(inputs_embeds=inner.embed_tokens(nxt[:, None]), attention_mask=mask,
                               position_ids=next_pos, cache=cache, use_cache=True).last_hidden_state
                next_pos = next_pos + 1
    finally:
        if was_training:
            model.train()
    if stream is not None:
        stream.end()
    if tokenizer is not None:
        texts = [t if t is not None else tokenizer.decode(o, skip_special_tokens=True).strip()
                 for t, o in zip(texts, out)]
        texts = [t.strip() for t in texts]
    return GenerationOutput(tokens=out, texts=texts if tokenizer is not None else None,
                            finish_reasons=reasons, prompt_tokens=prompt_tokens,
                            new_tokens=sum(map(len, out)))
