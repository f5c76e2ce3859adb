"""Text side of the data pipeline: template, label masks, placeholder expansion, truncation,
packing (C++ vs reference), collation, the stage-mix sampler and the dataset's bad-input paths.

Media are made here (tiny PNGs) or faked (video/audio loaders returning tensors of the right
shape), so these tests do not depend on the media loaders.
"""
from __future__ import annotations

import json
import pickle
import random
import warnings

import numpy as np
import pytest
import torch

from fastground.config import MEDIA_TOKENS, GroundingGPTConfig
from fastground.data import packing
from fastground.data.collate import collate_packed, collate_padded, pack_samples
from fastground.data.conversation import (IGNORE_INDEX, LEGO, VICUNA_V1, SampleTooLongError,
                                          build_prompt, preprocess, preprocess_lego, preprocess_v1)
from fastground.data.dataset import GroundingDataset, MixedDataset, SampleError, SchemaError
from fastground.data.sampler import StageMixSampler

SYSTEM = VICUNA_V1.system
# The system prompt as the test tokenizer splits it, written out by hand.
SYSTEM_TOKENS = ["▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and", "▁an",
                 "▁artificial", "▁intelligence", "▁assistant.", "▁The", "▁assistant", "▁gives",
                 "▁helpful,", "▁detailed,", "▁and", "▁polite", "▁answers", "▁to", "▁the",
                 "▁user's", "▁questions."]
CORPUS = [SYSTEM, "USER: ASSISTANT: \n What is it? a red box Where? [0.1,0.2,0.3,0.4]",
          "Describe the video. When does he jump? {0.12,0.48} What sound is this? a dog barks",
          "one two three four five six seven eight nine ten"]


def make_tokenizer(corpus=CORPUS):
    """A word-level tokenizer that splits like Llama's sentencepiece: every word carries a
    leading '▁', a trailing space is a token of its own, text after a special token starts a
    new word, and every call adds <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    words = ["<unk>", "<s>", "</s>"]
    for line in corpus:
        for w, _ in pre.pre_tokenize_str(line + " "):
            if w not in words:
                words.append(w)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.add_tokens(list(MEDIA_TOKENS), special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def cfg(tok):
    c = GroundingGPTConfig.from_preset("tiny")
    c.set_token_ids(tok)
    return c


def ids_of(tok, tokens):
    return tok.convert_tokens_to_ids(tokens)


TWO_TURNS = [
    {"from": "human", "value": "What is it? <image>"},
    {"from": "gpt", "value": "a red box"},
    {"from": "human", "value": "Where?"},
    {"from": "gpt", "value": "[0.1,0.2,0.3,0.4]"},
]


# ---------------------------------------------------------------------------- template/labels
def test_vicuna_v1_prompt():
    prompt = build_prompt(TWO_TURNS)
    # The placeholder moves to the front of its message, followed by a newline (release).
    assert prompt == (SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: a red box</s>"
                      "USER: Where? ASSISTANT: [0.1,0.2,0.3,0.4]</s>")
    # A leading gpt turn is dropped; an open last message leaves "ROLE:" for generation.
    assert VICUNA_V1.prompt([("USER", "hi"), ("ASSISTANT", None)]) == SYSTEM + " USER: hi ASSISTANT:"
    assert build_prompt([{"from": "gpt", "value": "x"}] + TWO_TURNS[:2]) == build_prompt(TWO_TURNS[:2])


def test_two_turn_labels_hand_written(tok, cfg):
    assert cfg.image_token_len == 16
    input_ids, labels = preprocess_v1(TWO_TURNS, tok, cfg, max_length=2048, sample_id="s0")
    ignored = ["<s>"] + SYSTEM_TOKENS + ["▁USER:", "▁", "<im_start>"] + ["<im_patch>"] * 16 + [
        "<im_end>", "▁\n", "▁What", "▁is", "▁it?", "▁ASSISTANT:"]
    answer1 = ["▁a", "▁red", "▁box", "</s>"]
    question2 = ["▁USER:", "▁Where?", "▁ASSISTANT:"]
    answer2 = ["▁[0.1,0.2,0.3,0.4]", "</s>"]
    expected_tokens = ignored + answer1 + question2 + answer2
    expected_labels = ([IGNORE_INDEX] * 49 + ids_of(tok, ["▁a", "▁red", "▁box", "</s>"])
                       + [IGNORE_INDEX] * 3 + ids_of(tok, ["▁[0.1,0.2,0.3,0.4]", "</s>"]))
    assert len(ignored) == 49
    assert tok.convert_ids_to_tokens(input_ids.tolist()) == expected_tokens
    assert labels.tolist() == expected_labels
    assert input_ids.dtype == labels.dtype == torch.long


def test_release_tokenization_mismatch_masks_everything(tok, cfg):
    # The release pads with unk and counts non-pad tokens, so an unk in the text makes the
    # round lengths disagree with the total and the whole sample is ignored.
    tok2 = make_tokenizer()
    tok2.pad_token = tok2.unk_token
    conv = [{"from": "human", "value": "zebra?"}, {"from": "gpt", "value": "a red box"}]
    _, labels = preprocess_v1(conv, tok2, cfg, max_length=None)
    assert (labels == IGNORE_INDEX).all()
    _, labels = preprocess_v1(conv, tok, cfg, max_length=None)
    assert (labels != IGNORE_INDEX).sum() == 4  # with no pad id: "▁a ▁red ▁box </s>"


def test_placeholder_expansion_on_ids(tok, cfg):
    seen = []

    class Spy:
        bos_token_id = tok.bos_token_id
        pad_token_id = tok.pad_token_id

        def __call__(self, text):
            seen.append(text)
            return tok(text)

    conv = [{"from": "human", "value": "Describe the video. <video>"},
            {"from": "gpt", "value": "a dog barks"},
            {"from": "human", "value": "<sound> What sound is this?"},
            {"from": "gpt", "value": "a dog barks"}]
    ids, labels = preprocess_v1(conv, Spy(), cfg, max_length=None)
    assert not any(t in s for s in seen for t in MEDIA_TOKENS)  # patch strings never tokenized
    ids = ids.tolist()
    for m in ("video", "sound"):
        patch, start, end = cfg.token_ids(m)
        s = ids.index(start)
        n = cfg.media_token_len(m)
        assert ids[s + 1:s + 1 + n] == [patch] * n and ids[s + n + 1] == end
        assert ids.count(patch) == n and ids.count(start) == ids.count(end) == 1
        assert (labels[s:s + n + 2] == IGNORE_INDEX).all()
    toks = tok.convert_ids_to_tokens(ids)
    v = toks.index("<vi_end>")
    assert toks[v + 1:v + 5] == ["▁\n", "▁Describe", "▁the", "▁video."]


def test_missing_token_ids_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="set_token_ids"):
        preprocess_v1(TWO_TURNS, tok, GroundingGPTConfig.from_preset("tiny"), max_length=None)


# ---------------------------------------------------------------------------- lego (the release's)
LEGO_CORPUS = [LEGO.system, "\n ### Human: Assistant: unknown: What is it? a red box Where? [0.1,0.2,0.3,0.4]",
               "When does he jump? {0.12,0.48} What sound is this? a dog barks"]
# The header `{system}\n\n` as the lego test tokenizer splits it (each "\n" a word of its own):
# <s>, the 23 words of the system prompt, two newlines. Never supervised.
LEGO_HEADER = ["<s>", "▁A", "▁chat", "▁between", "▁a", "▁curious", "▁human", "▁and", "▁an",
               "▁artificial", "▁intelligence", "▁assistant.", "▁The", "▁assistant", "▁gives",
               "▁helpful,", "▁detailed,", "▁and", "▁polite", "▁answers", "▁to", "▁the",
               "▁human's", "▁questions.", "▁\n", "▁\n"]


@pytest.fixture(scope="module")
def ltok():
    t = make_tokenizer(LEGO_CORPUS)
    t.pad_token = t.unk_token  # as the release (and load_tokenizer) set it
    return t


@pytest.fixture(scope="module")
def lcfg(ltok):
    c = GroundingGPTConfig.from_preset("tiny")  # records no template: lego
    c.set_token_ids(ltok)
    return c


def _block(modality, n):
    short = {"image": "im", "video": "vi", "sound": "so"}[modality]
    return [f"<{short}_start>"] + [f"<{short}_patch>"] * n + [f"<{short}_end>"]


def _check_lego(conversation, tok, cfg, expected, **kw):
    """expected: (token, supervised) pairs after the header, worked out by hand from the
    release's arithmetic (lengths of the separately tokenized header and turns, each with its
    own <s>; human turns ignored from cur+2 to cur+len)."""
    ids, labels = preprocess(conversation, tok, cfg, max_length=kw.get("max_length", 2048), sample_id="x")
    want_tokens = LEGO_HEADER + [t for t, _ in expected]
    assert tok.convert_ids_to_tokens(ids.tolist()) == want_tokens
    want_labels = [IGNORE_INDEX] * len(LEGO_HEADER) + [
        tok.convert_tokens_to_ids(t) if sup else IGNORE_INDEX for t, sup in expected]
    assert labels.tolist() == want_labels
    return ids, labels


def test_lego_one_turn(ltok, lcfg):
    # Full text: header + "### Human: What is it?\n### Assistant: a red box\n### ".
    # Lengths: header 26; "### Human: What is it?\n" 7 (<s> + 6); "### Assistant: a red box\n" 7.
    # cur = 26; human: ignore [28, 33); cur = 33; gpt: cur = 40. Position 32, the
    # assistant turn's "###", falls in the human turn's range (the per-piece <s> drift).
    conv = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "a red box"}]
    _check_lego(conv, ltok, lcfg, [
        ("▁###", 1), ("▁Human:", 1), ("▁What", 0), ("▁is", 0), ("▁it?", 0), ("▁\n", 0),      # 26-31
        ("▁###", 0), ("▁Assistant:", 1), ("▁a", 1), ("▁red", 1), ("▁box", 1), ("▁\n", 1),   # 32-37
        ("▁###", 1), ("▁", 1)])                                                             # 38-39
    # Templates as data: the same conversation with vicuna_v1 is the other template's text.
    ids_v1, _ = preprocess(conv, ltok, lcfg, 2048, template="vicuna_v1")
    ids_lego, _ = preprocess(conv, ltok, lcfg, 2048)
    assert ids_v1.tolist() != ids_lego.tolist()
    assert torch.equal(preprocess(conv, ltok, lcfg.replace(conversation_template="vicuna_v1"), 2048)[0], ids_v1)


def test_lego_several_turns_with_image(ltok, lcfg):
    # The placeholder moves first ("<image>\nWhat is it?"); the whitespace around the block is
    # stripped ("### Human:" then <im_start>; the "\n" after <im_end> is gone).
    # Lengths: header 26; turn 1: <s> ### Human: + 18 block + What is it? \n = 25;
    # turn 2: 7; turn 3 "### Human: Where?\n": 5; turn 4: 5.
    # cur = 26; human: ignore [28, 51); cur = 51; gpt: cur = 58; human: ignore [60, 63);
    # cur = 63; gpt: cur = 68. The drift reaches into the last answer (positions 60-62).
    _check_lego(TWO_TURNS, ltok, lcfg, [
        ("▁###", 1), ("▁Human:", 1)] + [(t, 0) for t in _block("image", 16)] + [       # 26-45
        ("▁What", 0), ("▁is", 0), ("▁it?", 0), ("▁\n", 0),                            # 46-49
        ("▁###", 0), ("▁Assistant:", 1), ("▁a", 1), ("▁red", 1), ("▁box", 1), ("▁\n", 1),  # 50-55
        ("▁###", 1), ("▁Human:", 1), ("▁Where?", 1), ("▁\n", 1),                      # 56-59
        ("▁###", 0), ("▁Assistant:", 0), ("▁[0.1,0.2,0.3,0.4]", 0), ("▁\n", 1),       # 60-63
        ("▁###", 1), ("▁", 1)])                                                        # 64-65


def test_lego_video_turn(ltok, lcfg):
    # "<video> When does he jump?" -> "<video>\nWhen does he jump?".
    # Lengths: 26; <s> ### Human: + 8 block + When does he jump? \n = 16; gpt 5.
    # cur = 26; human: ignore [28, 42); cur = 42; gpt: cur = 47.
    conv = [{"from": "human", "value": "<video> When does he jump?"}, {"from": "gpt", "value": "{0.12,0.48}"}]
    _check_lego(conv, ltok, lcfg, [
        ("▁###", 1), ("▁Human:", 1)] + [(t, 0) for t in _block("video", 6)] + [        # 26-35
        ("▁When", 0), ("▁does", 0), ("▁he", 0), ("▁jump?", 0), ("▁\n", 0),            # 36-40
        ("▁###", 0), ("▁Assistant:", 1), ("▁{0.12,0.48}", 1), ("▁\n", 1),             # 41-44
        ("▁###", 1), ("▁", 1)])                                                        # 45-46


def test_lego_sound_turn(ltok, lcfg):
    # Lengths: 26; <s> ### Human: + 6 block + What sound is this? \n = 14; gpt 7.
    # cur = 26; human: ignore [28, 40); cur = 40; gpt: cur = 47.
    conv = [{"from": "human", "value": "What sound is this? <sound>"}, {"from": "gpt", "value": "a dog barks"}]
    _check_lego(conv, ltok, lcfg, [
        ("▁###", 1), ("▁Human:", 1)] + [(t, 0) for t in _block("sound", 4)] + [        # 26-33
        ("▁What", 0), ("▁sound", 0), ("▁is", 0), ("▁this?", 0), ("▁\n", 0),           # 34-38
        ("▁###", 0), ("▁Assistant:", 1), ("▁a", 1), ("▁dog", 1), ("▁barks", 1), ("▁\n", 1),  # 39-44
        ("▁###", 1), ("▁", 1)])                                                        # 45-46


def test_lego_media_only_question(ltok, lcfg):
    # "<image>" alone: the turn's "\n" after <im_end> is stripped away with the whitespace.
    # Lengths: 26; <s> ### Human: + 18 = 21; gpt 7. cur = 26; ignore [28, 47); cur = 47; 54.
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red box"}]
    _check_lego(conv, ltok, lcfg, [
        ("▁###", 1), ("▁Human:", 1)] + [(t, 0) for t in _block("image", 16)] + [       # 26-45
        ("▁###", 0), ("▁Assistant:", 1), ("▁a", 1), ("▁red", 1), ("▁box", 1), ("▁\n", 1),  # 46-51
        ("▁###", 1), ("▁", 1)])                                                        # 52-53


def test_lego_leading_gpt_turn_is_kept(ltok, lcfg):
    # Unlike preprocess_v1, the release's preprocess keeps a leading gpt turn, supervised.
    # Lengths: 26, 7, 7, 7. cur = 26; gpt: 33; human: ignore [35, 40); cur = 40; gpt: 47.
    conv = [{"from": "gpt", "value": "a red box"}, {"from": "human", "value": "What is it?"},
            {"from": "gpt", "value": "a red box"}]
    _check_lego(conv, ltok, lcfg, [
        ("▁###", 1), ("▁Assistant:", 1), ("▁a", 1), ("▁red", 1), ("▁box", 1), ("▁\n", 1),   # 26-31
        ("▁###", 1), ("▁Human:", 1), ("▁What", 1), ("▁is", 0), ("▁it?", 0), ("▁\n", 0),     # 32-37
        ("▁###", 0), ("▁Assistant:", 0), ("▁a", 1), ("▁red", 1), ("▁box", 1), ("▁\n", 1),   # 38-43
        ("▁###", 1), ("▁", 1)])                                                            # 44-45


def test_lego_unknown_speaker(ltok, lcfg):
    # A speaker other than human/gpt is role "unknown" and, not being "human", supervised;
    # the masking compares the raw "from" case-sensitively, so "Human" is supervised too.
    # Lengths: 26, 7, 7, 7. cur = 26; "Human" (not masked): 33; "robot": 40; human: ignore
    # [42, 47); cur = 47.
    conv = [{"from": "Human", "value": "What is it?"}, {"from": "robot", "value": "a red box"},
            {"from": "human", "value": "What is it?"}]
    _check_lego(conv, ltok, lcfg, [
        ("▁###", 1), ("▁Human:", 1), ("▁What", 1), ("▁is", 1), ("▁it?", 1), ("▁\n", 1),       # 26-31
        ("▁###", 1), ("▁unknown:", 1), ("▁a", 1), ("▁red", 1), ("▁box", 1), ("▁\n", 1),      # 32-37
        ("▁###", 1), ("▁Human:", 1), ("▁What", 1), ("▁is", 1), ("▁it?", 0), ("▁\n", 0),     # 38-43
        ("▁###", 0), ("▁", 0)])                                                              # 44-45


def test_lego_lengths_count_non_pad_tokens(ltok, lcfg):
    # The release counts a piece's tokens that are not the pad id, and pads with unk: an
    # unknown word shortens its turn's length by one. Lengths: 26; <s> ### Human: What is
    # <unk> \n = 7, 6 of them non-pad; gpt 7. cur = 26; ignore [28, 32); cur = 32; gpt: 39.
    conv = [{"from": "human", "value": "What is zebra?"}, {"from": "gpt", "value": "a red box"}]
    _check_lego(conv, ltok, lcfg, [
        ("▁###", 1), ("▁Human:", 1), ("▁What", 0), ("▁is", 0), ("<unk>", 0), ("▁\n", 0),     # 26-31
        ("▁###", 1), ("▁Assistant:", 1), ("▁a", 1), ("▁red", 1), ("▁box", 1), ("▁\n", 1),   # 32-37
        ("▁###", 1), ("▁", 1)])                                                            # 38-39


def test_lego_truncation_keeps_media_and_cuts_at_answers(ltok, lcfg):
    full_ids, full_labels = preprocess(TWO_TURNS, ltok, lcfg, max_length=None)
    assert len(full_ids) == 66
    # Cut at the end of the last answer that fits: after position 55 (first answer) or 63
    # (second answer; the final "### " is dropped).
    for max_length, end in ((56, 56), (60, 56), (63, 56), (64, 64), (65, 64)):
        ids, labels = preprocess(TWO_TURNS, ltok, lcfg, max_length=max_length)
        assert len(ids) == end and torch.equal(ids, full_ids[:end]) and torch.equal(labels, full_labels[:end])
    # Lengths are truncated like the release's pieces, but no piece here is that long.
    ids, labels = preprocess(TWO_TURNS, ltok, lcfg, max_length=50)
    assert len(ids) == 50 and _media_block_intact(ids, lcfg) and torch.equal(labels, full_labels[:50])
    with pytest.raises(SampleTooLongError, match="image block"):
        preprocess(TWO_TURNS, ltok, lcfg, max_length=45)


def test_media_whitespace_stripped_in_training_kept_at_inference(ltok, lcfg):
    from fastground.data.conversation import tokenize_prompt

    text = "### Human: <image>\nWhat is it?"
    block = _block("image", 16)
    train = ltok.convert_ids_to_tokens(tokenize_prompt(text, ltok, lcfg, "lego", training=True))
    infer = ltok.convert_ids_to_tokens(tokenize_prompt(text, ltok, lcfg, "lego", training=False))
    # the release's slow tokenizer (training) strips both sides; its demo's fast one keeps them
    assert train == ["<s>", "▁###", "▁Human:"] + block + ["▁What", "▁is", "▁it?"]
    assert infer == ["<s>", "▁###", "▁Human:", "▁"] + block + ["▁\n", "▁What", "▁is", "▁it?"]


def test_lego_never_tokenizes_patch_strings(ltok, lcfg):
    seen = []

    class Spy:
        bos_token_id = ltok.bos_token_id
        pad_token_id = ltok.pad_token_id

        def __call__(self, text):
            seen.append(text)
            return ltok(text)

    preprocess_lego(TWO_TURNS, Spy(), lcfg, max_length=None)
    assert seen and not any(t in s for s in seen for t in MEDIA_TOKENS)
    assert not any(s != s.strip() and "<" in s for s in seen)


# ---------------------------------------------------------------------------- truncation
def _media_block_intact(ids, cfg, modality="image"):
    patch, start, end = cfg.token_ids(modality)
    ids = ids.tolist()
    n = cfg.media_token_len(modality)
    if start not in ids:
        return ids.count(patch) == 0 and end not in ids
    s = ids.index(start)
    return ids[s:s + n + 2] == [start] + [patch] * n + [end] and ids.count(patch) == n


def test_truncation_drops_whole_rounds_then_text(tok, cfg):
    full_ids, full_labels = preprocess_v1(TWO_TURNS, tok, cfg, max_length=None)
    assert len(full_ids) == 58
    round1_end = 53  # <s> + 48 ignored + "▁a ▁red ▁box </s>"
    for max_length in range(round1_end, 58):
        ids, labels = preprocess_v1(TWO_TURNS, tok, cfg, max_length=max_length)
        assert len(ids) == round1_end  # round two dropped whole
        assert torch.equal(ids, full_ids[:round1_end]) and torch.equal(labels, full_labels[:round1_end])
    for max_length in range(45, round1_end):  # no whole round fits: text after the image is cut
        ids, labels = preprocess_v1(TWO_TURNS, tok, cfg, max_length=max_length)
        assert len(ids) == max_length and _media_block_intact(ids, cfg)
        assert torch.equal(labels, full_labels[:max_length])


def test_truncation_never_cuts_a_media_block(tok, cfg):
    image_end = 1 + len(SYSTEM_TOKENS) + 2 + 18  # tokens up to and including <im_end>
    ids, _ = preprocess_v1(TWO_TURNS, tok, cfg, max_length=image_end)
    assert len(ids) == image_end and _media_block_intact(ids, cfg)
    for max_length in (image_end - 1, 30, 5):
        with pytest.raises(SampleTooLongError, match=r"sample 'cut-me'.*image block.*max_length"):
            preprocess_v1(TWO_TURNS, tok, cfg, max_length=max_length, sample_id="cut-me")


# ---------------------------------------------------------------------------- packing
def _random_samples(rng, n):
    ids, labels = [], []
    for _ in range(n):
        length = rng.choice([0, 1, 2, rng.randint(3, 300)])
        x = torch.randint(0, 32000, (length,))
        y = x.clone()
        y[torch.rand(length) < 0.5] = IGNORE_INDEX
        ids.append(x)
        labels.append(y)
    return ids, labels


def test_cpp_packer_matches_reference():
    if packing.load_extension() is None:
        why = packing._ext_failed or "FASTGROUND_NO_CPP is set"
        pytest.skip(f"C++ packing op unavailable here: {why}")
    rng = random.Random(0)
    for n in (0, 1, 2, 7, 64):
        ids, labels = _random_samples(rng, n)
        got = packing.pack(ids, labels)
        want = packing.pack_reference(ids, labels)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)
        assert want[3].dtype == torch.int32
    with pytest.raises(ValueError, match="labels"):
        packing.load_extension().pack([torch.arange(3)], [torch.arange(2)])
    # Inputs are left untouched (the first-label masking works on a copy).
    ids, labels = _random_samples(rng, 3)
    before = [t.clone() for t in labels]
    packing.pack(ids, labels)
    assert all(torch.equal(a, b) for a, b in zip(before, labels))


def test_packer_fallback_path(monkeypatch):
    rng = random.Random(1)
    ids, labels = _random_samples(rng, 5)
    monkeypatch.setenv("FASTGROUND_NO_CPP", "1")
    monkeypatch.setattr(packing, "_warned", False)
    with pytest.warns(RuntimeWarning, match="FASTGROUND_NO_CPP"):
        got = packing.pack(ids, labels)
    want = packing.pack_reference(ids, labels)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per batch
        packing.pack(ids, labels)
    # A failed build also falls back.
    monkeypatch.delenv("FASTGROUND_NO_CPP")
    monkeypatch.setattr(packing, "_ext", None)
    monkeypatch.setattr(packing, "_ext_failed", "CalledProcessError: no compiler")
    monkeypatch.setattr(packing, "_warned", False)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        got = packing.pack(ids, labels)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_reference_semantics():
    ids = [torch.tensor([1, 5, 6]), torch.tensor([1, 7])]
    labels = [torch.tensor([-100, 5, 6]), torch.tensor([9, 7])]
    x, y, pos, cu = packing.pack_reference(ids, labels)
    assert x.tolist() == [1, 5, 6, 1, 7]
    assert y.tolist() == [-100, 5, 6, -100, 7]
    assert pos.tolist() == [0, 1, 2, 0, 1]
    assert cu.tolist() == [0, 3, 5] and cu.dtype == torch.int32


# ---------------------------------------------------------------------------- collate
def _sample(sid, n, media=(), S=8):
    ids = torch.arange(10, 10 + n)
    s = {"id": sid, "input_ids": ids, "labels": ids.clone(), "image": None, "video": None, "sound": None}
    tag = float(sid)
    if "image" in media:
        s["image"] = torch.full((3, S, S), tag)
    if "video" in media:
        s["video"] = torch.full((3, 4, S, S), tag)
    if "sound" in media:
        s["sound"] = torch.full((3, 1, 128, 204), tag)
    return s


def test_collate_padded_shapes_and_media_order():
    samples = [_sample(0, 5, ("image",)), _sample(1, 3, ("video",)), _sample(2, 7, ("image", "sound")),
               _sample(3, 2)]
    b = collate_padded(samples, pad_token_id=0)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (4, 7)
    assert b["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == torch.long
    assert b["attention_mask"].sum(1).tolist() == [5, 3, 7, 2]
    assert b["input_ids"][1].tolist() == [10, 11, 12, 0, 0, 0, 0]  # right padding
    assert b["labels"][1].tolist() == [10, 11, 12] + [IGNORE_INDEX] * 4
    assert b["images"].shape == (2, 3, 8, 8) and b["images"][:, 0, 0, 0].tolist() == [0.0, 2.0]
    assert b["videos"].shape == (1, 3, 4, 8, 8) and b["videos"][0, 0, 0, 0, 0] == 1.0
    assert b["sounds"].shape == (1, 3, 1, 128, 204)
    assert collate_padded([_sample(0, 2)], 0)["images"] is None


def test_collate_packed():
    samples = [_sample(0, 5, ("image",)), _sample(1, 3), _sample(2, 4, ("image",))]
    b = collate_packed(samples, max_tokens=12)
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (1, 12)
    assert b["cu_seqlens"].tolist() == [0, 5, 8, 12] and b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 5
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    assert b["labels"][0, [0, 5, 8]].tolist() == [IGNORE_INDEX] * 3  # no cross-sample target
    assert b["labels"][0, [1, 6, 9]].tolist() == [11, 11, 11]
    assert b["images"][:, 0, 0, 0].tolist() == [0.0, 2.0] and b["videos"] is None
    with pytest.raises(ValueError, match="max_tokens"):
        collate_packed(samples, max_tokens=11)


def test_pack_samples_first_fit():
    groups = pack_samples([6, 5, 4, 3, 2, 5], max_tokens=10)
    assert groups == [[0, 2], [1, 3, 4], [5]]
    lengths = [random.Random(i).randint(1, 50) for i in range(200)]
    groups = pack_samples(lengths, 64)
    assert sorted(i for g in groups for i in g) == list(range(200))
    assert all(sum(lengths[i] for i in g) <= 64 for g in groups)
    with pytest.raises(ValueError, match="sample 1"):
        pack_samples([3, 20], 10)


# ---------------------------------------------------------------------------- sampler
def test_sampler_deterministic_and_epoch_dependent():
    a = list(StageMixSampler(100, 50, 0.3, seed=7))
    b = list(StageMixSampler(100, 50, 0.3, seed=7))
    assert a == b
    assert a != list(StageMixSampler(100, 50, 0.3, seed=7, epoch=1))
    assert a != list(StageMixSampler(100, 50, 0.3, seed=8))
    cur = [i for i in a if i < 100]
    assert sorted(cur) == list(range(100))  # every current sample exactly once
    assert all(100 <= i < 150 for i in a if i >= 100)
    assert sorted(StageMixSampler(40, 0, 0.0, seed=1)) == list(range(40))
    s = StageMixSampler(20, 5, 0.5, seed=3)
    first = list(s)
    assert s.epoch == 1 and list(s) != first  # a finished pass moves on to the next epoch


def test_sampler_ranks_are_disjoint_slices():
    ws = 4
    glob = StageMixSampler(101, 30, 0.25, seed=11).global_order()
    per_rank = [list(StageMixSampler(101, 30, 0.25, seed=11, rank=r, world_size=ws))
                for r in range(ws)]
    assert len({len(p) for p in per_rank}) == 1
    padded = len(per_rank[0]) * ws
    assert padded - len(glob) < ws
    merged = [per_rank[k % ws][k // ws] for k in range(padded)]
    assert merged[:len(glob)] == glob.tolist()  # positions partition the same global order
    dl = [list(StageMixSampler(101, 30, 0.25, seed=11, rank=r, world_size=ws, drop_last=True))
          for r in range(ws)]
    assert sorted(sum(dl, [])) == sorted(glob.tolist()[:len(glob) // ws * ws])


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_sampler_alpha_rate(alpha):
    n = 20000
    order = StageMixSampler(n, 5000, alpha, seed=5).global_order()
    replay = int((order >= n).sum())
    # Replays before each current sample are geometric: mean a/(1-a), variance a/(1-a)^2.
    mean, sd = n * alpha / (1 - alpha), (n * alpha) ** 0.5 / (1 - alpha)
    assert abs(replay - mean) < 5 * sd
    assert abs(replay / len(order) - alpha) < 0.02


def test_sampler_resume_mid_epoch():
    s = StageMixSampler(60, 40, 0.4, seed=2, rank=1, world_size=2, epoch=3)
    it = iter(s)
    consumed = [next(it) for _ in range(17)]
    state = s.state_dict()
    rest = list(it)
    t = StageMixSampler(60, 40, 0.4, seed=2, rank=1, world_size=2)
    t.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert list(t) == rest
    assert consumed + rest == list(StageMixSampler(60, 40, 0.4, seed=2, rank=1, world_size=2, epoch=3))
    with pytest.raises(ValueError, match="alpha"):
        StageMixSampler(60, 40, 0.5, seed=2, rank=1, world_size=2).load_state_dict(state)


def test_mixed_dataset_indexing():
    m = MixedDataset(["c0", "c1"], ["p0", "p1", "p2"])
    assert len(m) == 5 and [m[i] for i in range(5)] == ["c0", "c1", "p0", "p1", "p2"]
    with pytest.raises(IndexError):
        m[5]


# ---------------------------------------------------------------------------- dataset
def pil_image_loader(path, cfg, sample_id=None):
    """Stand-in for fastground.data.image.load_image: PIL decode + resize, no CLIP transform."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((cfg.clip_image_size, cfg.clip_image_size))
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def fake_video_loader(path, cfg, train, seed=None, backend="pyav", sample_id=None):
    return torch.zeros(3, cfg.num_frames, cfg.eva_image_size, cfg.eva_image_size)


def fake_audio_loader(path, cfg, sample_id=None):
    return torch.zeros(cfg.num_audio_clips, 1, cfg.audio_num_mel_bins, cfg.audio_target_len)


LOADERS = {"image": pil_image_loader, "video": fake_video_loader, "sound": fake_audio_loader}


def _entry(sid, media=None, path=None):
    q = {"image": "What is it? <image>", "video": "<video> When does he jump?",
         "sound": "<sound>\nWhat sound is this?", None: "What is it?"}[media]
    a = {"image": "[0.1,0.2,0.3,0.4]", "video": "{0.12,0.48}", "sound": "a dog barks", None: "a red box"}[media]
    e = {"id": sid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if media:
        e[media] = path
    return e


@pytest.fixture()
def data_dir(tmp_path):
    from PIL import Image

    for d in ("images", "videos", "sounds"):
        (tmp_path / d).mkdir()
    Image.new("RGB", (20, 12), (200, 10, 10)).save(tmp_path / "images" / "red.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "videos" / "clip.mp4").write_bytes(b"fake")
    (tmp_path / "sounds" / "bark.wav").write_bytes(b"fake")
    return tmp_path


def _write(tmp_path, name, entries):
    p = tmp_path / name
    p.write_text(json.dumps(entries))
    return str(p)


def _dataset(data_dir, json_paths, tok, cfg, **kw):
    return GroundingDataset(json_paths, tok, cfg, image_folder=str(data_dir / "images"),
                            video_folder=str(data_dir / "videos"), sound_folder=str(data_dir / "sounds"),
                            loaders=LOADERS, **kw)


def test_dataset_items(data_dir, tok, cfg):
    a = _write(data_dir, "a.json", [_entry("img", "image", "red.png"), _entry("txt")])
    b = _write(data_dir, "b.json", [_entry("vid", "video", "clip.mp4"), _entry("snd", "sound", "bark.wav")])
    ds = _dataset(data_dir, f"{a},{b}", tok, cfg, train=False)
    assert len(ds) == 4 and ds.locate(2) == (b, 0)
    items = [ds[i] for i in range(4)]
    assert [it["id"] for it in items] == ["img", "txt", "vid", "snd"]
    assert items[0]["image"].shape == (3, 56, 56) and items[0]["video"] is None
    assert items[1]["image"] is items[1]["video"] is items[1]["sound"] is None
    assert items[2]["video"].shape == (3, cfg.num_frames, 56, 56)
    assert items[3]["sound"].shape == (3, 1, 128, 204)
    want, _ = preprocess(_entry("img", "image", "red.png")["conversations"], tok, cfg, 2048)
    assert torch.equal(items[0]["input_ids"], want)
    batch = collate_padded(items, pad_token_id=0)
    assert batch["images"].shape[0] == batch["videos"].shape[0] == batch["sounds"].shape[0] == 1


BAD_CASES = {
    # name: (entry, what the message must name besides the sample id and the JSON file)
    "missing file": (_entry("bad", "image", "nowhere.png"), "nowhere.png"),
    "corrupt image": (_entry("bad", "image", "broken.png"), "broken.png"),
    "wrong schema": ({"id": "bad", "conversations": [{"from": "robot", "value": "hi"}]}, "'from'='robot'"),
    "placeholder without media": (
        {"id": "bad", "conversations": [{"from": "human", "value": "<image> hi"},
                                        {"from": "gpt", "value": "a red box"}]}, "no 'image' file"),
    "media without placeholder": (
        {"id": "bad", "image": "red.png", "conversations": [{"from": "human", "value": "hi"},
                                                            {"from": "gpt", "value": "a red box"}]},
        "0 <image> placeholders"),
    "two placeholders": (
        {"id": "bad", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "a red box"},
            {"from": "human", "value": "<image> again"}, {"from": "gpt", "value": "a red box"}]},
        "2 <image> placeholders"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_sample_eval_raises_naming_it(data_dir, tok, cfg, case):
    entry, detail = BAD_CASES[case]
    path = _write(data_dir, "bad.json", [_entry("good"), entry])
    ds = _dataset(data_dir, path, tok, cfg, train=False)
    assert ds[0]["id"] == "good"
    with pytest.raises(SampleError) as info:
        ds[1]
    msg = str(info.value)
    assert "'bad'" in msg and path in msg and "entry 1" in msg and detail in msg, msg
    assert info.value.sample_id == "bad" and info.value.index == 1
    clone = pickle.loads(pickle.dumps(info.value))  # as it leaves a DataLoader worker
    assert type(clone) is type(info.value) and str(clone) == msg and clone.sample_id == "bad"
    if case in ("wrong schema", "placeholder without media", "media without placeholder",
                "two placeholders"):
        assert isinstance(info.value, SchemaError)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_sample_train_skips_and_counts(data_dir, tok, cfg, case):
    entry, _ = BAD_CASES[case]
    path = _write(data_dir, "bad.json", [_entry("g0"), entry, _entry("g2", "image", "red.png")])
    ds = _dataset(data_dir, path, tok, cfg, train=True, max_bad_fraction=0.5)
    assert [ds[i]["id"] for i in range(3)] == ["g0", "g2", "g2"]  # replaced by the next good one
    assert ds.bad_samples.count == 1 and ds.bad_samples.ids == ["bad"]
    assert "bad.json" in ds.bad_samples.records[0][1]
    ds[1]  # a known-bad index is not tried or counted again
    assert ds.bad_samples.count == 1


def test_bad_fraction_limit(data_dir, tok, cfg):
    entries = [_entry(f"g{i}") for i in range(20)]
    for i in (3, 9, 15):
        entries[i] = _entry(f"b{i}", "image", f"missing{i}.png")
    path = _write(data_dir, "mostly.json", entries)
    ds = _dataset(data_dir, path, tok, cfg, train=True, max_bad_fraction=0.2)
    for i in range(20):
        ds[i]  # 3 of 20 = 15%: tolerated
    assert ds.bad_samples.count == 3 and ds.bad_samples.attempts == 23  # 20 + 3 replacements
    ds = _dataset(data_dir, path, tok, cfg, train=True, max_bad_fraction=0.1, min_tries_before_check=5)
    with pytest.raises(RuntimeError, match=r"max_bad_fraction.*'b3'.*missing3\.png"):
        for i in range(20):
            ds[i]
    every = _write(data_dir, "none.json", [_entry(f"b{i}", "image", "x.png") for i in range(3)])
    with pytest.raises(RuntimeError, match="could be loaded|max_bad_fraction"):
        _dataset(data_dir, every, tok, cfg, train=True, max_bad_fraction=1.0)[0]


def test_too_long_sample(data_dir, tok, cfg):
    path = _write(data_dir, "long.json", [_entry("long", "image", "red.png"), _entry("ok")])
    with pytest.raises(SampleError, match=r"'long'.*long\.json.*image block"):
        _dataset(data_dir, path, tok, cfg, train=False, max_length=30)[0]
    ds = _dataset(data_dir, path, tok, cfg, train=True, max_length=30, max_bad_fraction=0.5)
    assert ds[0]["id"] == "ok" and ds.bad_samples.ids == ["long"]


def test_json_level_errors(data_dir, tok, cfg):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        GroundingDataset(str(data_dir / "nope.json"), tok, cfg)
    (data_dir / "obj.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="obj.json.*list"):
        GroundingDataset(str(data_dir / "obj.json"), tok, cfg)
    (data_dir / "trunc.json").write_text('[{"id": 1')
    with pytest.raises(ValueError, match="trunc.json.*not valid JSON"):
        GroundingDataset(str(data_dir / "trunc.json"), tok, cfg)
    path = _write(data_dir, "mixed.json", [_entry("ok"), {"id": "x"}, 5])
    errors = GroundingDataset(path, tok, cfg).validate()
    assert [(e.sample_id, e.index) for e in errors] == [("x", 1), ("mixed.json#2", 2)]
    assert "'conversations'" in str(errors[0]) and "mixed.json" in str(errors[1])


def test_real_image_loader_corrupt_file(data_dir, tok, cfg):
    pytest.importorskip("fastground.data.image")
    path = _write(data_dir, "real.json",
                  [_entry("broken", "image", "broken.png"), _entry("red", "image", "red.png")])
    ds = GroundingDataset(path, tok, cfg, image_folder=str(data_dir / "images"), train=False)
    assert ds[1]["image"].shape == (3, cfg.clip_image_size, cfg.clip_image_size)
    with pytest.raises(SampleError, match=r"'broken'.*broken\.png"):
        ds[0]
