"""Small synthetic inputs for tests and benchmarks: a config with media token ids and a
batch that mixes image, video, audio and text-only samples."""
from __future__ import annotations

import torch

from fastground.config import TOKEN_ID_FIELDS, GroundingGPTConfig

MODALITIES = ("image", "video", "sound")


def with_token_ids(cfg: GroundingGPTConfig) -> GroundingGPTConfig:
    """Give the media tokens the top 9 ids of the vocabulary, as if appended to a tokenizer."""
    names = [n for m in MODALITIES for n in TOKEN_ID_FIELDS[m]]
    base = cfg.vocab_size - len(names)
    return cfg.replace(**{n: base + i for i, n in enumerate(names)})


def media_block(cfg: GroundingGPTConfig, modality: str) -> list[int]:
    patch, start, end = cfg.token_ids(modality)
    return [start] + [patch] * cfg.media_token_len(modality) + [end]


def media_tensor(cfg: GroundingGPTConfig, modality: str, n: int, generator=None) -> torch.Tensor:
    shape = {"image": (n, 3, cfg.clip_image_size, cfg.clip_image_size),
             "video": (n, 3, cfg.num_frames, cfg.eva_image_size, cfg.eva_image_size),
             "sound": (n, cfg.num_audio_clips, 1, cfg.audio_num_mel_bins, cfg.audio_target_len)}[modality]
    return torch.randn(shape, generator=generator)


def mixed_batch(cfg: GroundingGPTConfig, text_len: int = 6, seed: int = 0) -> dict:
    """Four samples: image, video, sound, text-only; right padded; labels on the last tokens."""
    g = torch.Generator().manual_seed(seed)
    text_vocab = cfg.vocab_size - 9

    def words(n):
        return torch.randint(3, text_vocab, (n,), generator=g).tolist()

    rows = [[cfg.bos_token_id] + words(2) + media_block(cfg, m) + words(text_len) for m in MODALITIES]
    rows.append([cfg.bos_token_id] + words(text_len + 4))
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, len(r) - text_len:len(r)] = ids[i, len(r) - text_len:len(r)]
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                images=media_tensor(cfg, "image", 1, g), videos=media_tensor(cfg, "video", 1, g),
                sounds=media_tensor(cfg, "sound", 1, g))
